"""Shared steps of the held-out probe-set builders (experiments/build_spoken_language.py,
build_instrument_family.py, build_game_foley.py); not a command of its own.

Each builder lists its sources (a sound file, its class, its GROUP: the voice, instrument or source
its clips must not be separated from) from Debian packages that are NOT in the pre-training pool
(experiments/build_pretrain_pool.py), and hands them to :func:`build_set`, which

1. converts every source with sox to 16 kHz mono 16-bit PCM (high-quality resampling, repeatable
   dither: the pool's ``convert``), leaving out near-silent ones (peak below 30/32768);
2. drops exact copies (same length and waveform correlation above 0.9 after conversion; packages
   reuse takes under other names) and merges the groups of a copy and its original, so a take and
   its copy never land in different folds; copies with different classes are all left out, and so
   is a class whose clips all come from one group (it could not be held out and still be learnt);
3. keeps a source whole up to --max-seconds (default 10 s); a longer one is cut into the fewest equal
   segments of at most that length, all in the source's group;
4. writes OUT/audio/<class>/<name>.wav and OUT/clips.csv (filename, label, group, package, source,
   seconds: the attribution the CC-BY licences ask for), then the fold manifests in OUT/manifests with
   :func:`eat_fairseq.prep.grouped_folds.write_grouped_fold_manifests` (one split per fold, whole
   groups per fold), which ``eat-probe --data OUT/manifests`` reads.

The set is built in a sibling folder .OUT.partial and renamed to OUT at the end; an existing OUT is
refused unless --force. Same packages and options, same output.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_pretrain_pool as pool  # noqa: E402  (the pool's apt, sox and WAV helpers)

from eat_fairseq.prep.common import PrepError, staged_outputs  # noqa: E402
from eat_fairseq.prep.grouped_folds import GroupedClip, write_grouped_fold_manifests  # noqa: E402

SR = pool.SR
POOL_PACKAGES = pool.PACKAGES
CLIPS_FIELDS = ("filename", "label", "group", "package", "source", "seconds")
DUPLICATE_CORRELATION = 0.9


class SetError(pool.PoolError):
    """A failure the user can act on (existing output, missing package tree, too few groups)."""


@dataclass(frozen=True)
class Source:
    """One sound to take: a file sox reads, its class and group, the package and path it came from,
    and ``name``, the clip's file name without extension (unique within its class)."""

    path: str
    label: str
    group: str
    name: str
    package: str
    source: str
    stratum: str = ""  # spread over the folds too (e.g. the language of a voice); see grouped_folds


@dataclass
class BuildResult:
    rows: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    report_summary: str = ""


def check_held_back(packages: Sequence[str]) -> None:
    """Refuse any package of the pre-training pool: a held-out set must not have been pre-trained on."""
    overlap = sorted(set(packages) & set(POOL_PACKAGES))
    if overlap:
        raise SetError(f"packages {overlap} are in the pre-training pool (build_pretrain_pool.py); "
                       "a held-out set must use other sources")


def safe_name(text: str) -> str:
    """File-name-safe form of ``text``: [A-Za-z0-9_.-] kept, anything else becomes '_'."""
    out = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_.-") else "_" for ch in text)
    return out.strip("._") or "x"


def equal_segments(samples: np.ndarray, max_n: int) -> list[np.ndarray]:
    """``samples`` whole when at most ``max_n`` long, else cut into the fewest equal parts of at most
    ``max_n`` samples (no short remainder)."""
    if max_n <= 0 or len(samples) <= max_n:
        return [samples]
    parts = -(-len(samples) // max_n)
    bounds = np.linspace(0, len(samples), parts + 1).round().astype(int)
    return [samples[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def is_duplicate(a: np.ndarray, b: np.ndarray) -> bool:
    """Same length and waveform correlation above DUPLICATE_CORRELATION (a copy or a re-encoding)."""
    if len(a) != len(b) or len(a) == 0:
        return False
    x, y = a.astype(np.float64), b.astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    if den == 0.0:
        return bool(np.array_equal(a, b))
    return float((x * y).sum()) / den > DUPLICATE_CORRELATION


class _Groups:
    """Union-find over group names; the representative is the smallest name."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, g: str) -> str:
        self.parent.setdefault(g, g)
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


# ---------------------------------------------------------------- packages

def package_roots(packages: Sequence[str], deb_root: Optional[str], cache: str) -> dict[str, str]:
    """Where each package's files are: ``deb_root`` for all of them (the packages unpacked into one
    folder with ``dpkg-deb -x``, or ``/`` where they are installed), else CACHE/root_PACKAGE after
    ``apt-get download`` and ``dpkg-deb -x`` (done once, reused by later runs)."""
    check_held_back(packages)
    if deb_root is not None:
        if not os.path.isdir(deb_root):
            raise SetError(f"--deb-root {deb_root} is not a folder")
        return {p: deb_root for p in packages}
    pool.ensure_tools()
    os.makedirs(cache, exist_ok=True)
    return {p: pool.unpack(p, cache) for p in packages}


def ensure_commands(packages: Mapping[str, str]) -> None:
    """Install the Debian packages that provide missing commands (``{command: package}``)."""
    missing = sorted({pkg for cmd, pkg in packages.items() if shutil.which(cmd) is None})
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        pool._run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                  f"installing {', '.join(missing)}", env=env)


# ---------------------------------------------------------------- the set

def check_out(out: str, force: bool) -> None:
    """Refuse an existing ``out`` (file, or non-empty folder) unless ``force`` (the pool's rule)."""
    pool.check_out(out, force, SetError)


def build_set(out: str, sources: Sequence[Source], labels: Sequence[str], num_folds: int = 5,
              max_seconds: float = 10.0, force: bool = False,
              convert: Optional[Callable[[str, str], np.ndarray]] = None) -> BuildResult:
    """Convert ``sources`` and write the set at ``out`` (see the module docstring)."""
    out = os.path.abspath(out)
    check_out(out, force)
    convert = convert or pool.convert
    names = Counter((s.label, s.name) for s in sources)
    twice = sorted(k for k, n in names.items() if n > 1)
    if twice:
        raise SetError(f"clip names used twice: {twice[:5]}")
    work = os.path.join(os.path.dirname(out), "." + os.path.basename(out) + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "audio"))
    result = BuildResult()
    groups = _Groups()
    kept: list[tuple[Source, np.ndarray]] = []
    by_length: dict[int, list[int]] = defaultdict(list)
    drop: set[int] = set()
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp_wav = os.path.join(tmp, "x.wav")
        for src in sorted(sources, key=lambda s: (s.label, s.name)):
            try:
                samples = np.array(convert(src.path, tmp_wav), dtype=np.int16)
            except pool.UnreadableSound as exc:
                result.skipped.append(f"{src.package}:{src.source}: {exc}")
                continue
            if len(samples) == 0 or np.abs(samples.astype(np.int32)).max() < pool.SILENCE_PEAK:
                result.skipped.append(f"{src.package}:{src.source}: silent")
                continue
            groups.find(src.group)
            copy_of = next((i for i in by_length[len(samples)] if is_duplicate(kept[i][1], samples)), None)
            if copy_of is not None:
                first = kept[copy_of][0]
                groups.union(first.group, src.group)
                result.merged.append(f"{src.package}:{src.source} = {first.package}:{first.source}")
                if first.label != src.label:
                    drop.add(copy_of)  # one take under two classes: ambiguous, both left out
                continue
            by_length[len(samples)].append(len(kept))
            kept.append((src, samples))
    groups_of_label: dict[str, set[str]] = defaultdict(set)
    for i, (src, _) in enumerate(kept):
        if i not in drop:
            groups_of_label[src.label].add(groups.find(src.group))
    max_n = int(round(max_seconds * SR)) if max_seconds > 0 else 0
    clips: list[GroupedClip] = []
    for i, (src, samples) in enumerate(kept):
        if i in drop:
            result.skipped.append(f"{src.package}:{src.source}: the same take is also filed under another class")
            continue
        if len(groups_of_label[src.label]) < 2:
            result.skipped.append(f"{src.package}:{src.source}: class {src.label} has one group only (it could "
                                  "not be held out and still be learnt)")
            continue
        parts = equal_segments(samples, max_n)
        for k, part in enumerate(parts):
            if len(parts) > 1 and np.abs(part.astype(np.int32)).max() < pool.SILENCE_PEAK:
                result.skipped.append(f"{src.package}:{src.source}: segment {k} silent")
                continue
            name = src.name if len(parts) == 1 else f"{src.name}_s{k:02d}"
            rel = f"{src.label}/{name}.wav"
            os.makedirs(os.path.join(work, "audio", src.label), exist_ok=True)
            pool.write_wav(os.path.join(work, "audio", rel), part)
            group = groups.find(src.group)
            clips.append(GroupedClip(rel, src.label, group, src.stratum))
            result.rows.append(dict(filename=f"audio/{rel}", label=src.label, group=group, package=src.package,
                                    source=src.source, seconds=round(len(part) / SR, 3)))
    if not clips:
        shutil.rmtree(work, ignore_errors=True)
        raise SetError("no usable sources were found")
    with open(os.path.join(work, "clips.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CLIPS_FIELDS))
        writer.writeheader()
        writer.writerows(sorted(result.rows, key=lambda r: r["filename"]))
    if os.path.isdir(out):
        check_out(out, force)
        shutil.rmtree(out)
    os.rename(work, out)
    try:
        with staged_outputs():
            report = write_grouped_fold_manifests(os.path.join(out, "audio"), os.path.join(out, "manifests"),
                                                  clips, num_folds=num_folds, labels=labels)
    except (PrepError, OSError):
        shutil.rmtree(out, ignore_errors=True)  # no half-made set stays behind
        raise
    result.report_summary = report.summary()
    return result


def summary(result: BuildResult, out: str) -> str:
    """Clips and seconds per class and per fold, groups per fold, total hours."""
    lines = []
    by_label: dict[str, list[float]] = defaultdict(list)
    for row in result.rows:
        by_label[row["label"]].append(float(row["seconds"]))
    for label in sorted(by_label):
        secs = by_label[label]
        lines.append(f"  {label:14s} {len(secs):5d} clips {sum(secs) / 60:7.1f} min")
    folds_csv = os.path.join(out, "manifests", "folds.csv")
    if os.path.isfile(folds_csv):
        with open(folds_csv, newline="") as handle:
            rows = list(csv.DictReader(handle))
        for fold in sorted({r["fold"] for r in rows}, key=lambda f: int(f[4:])):
            mine = [r for r in rows if r["fold"] == fold]
            per = Counter(r["label"] for r in mine)
            groups = sorted({r["group"] for r in mine})
            lines.append(f"  {fold}: {len(mine)} clips ({', '.join(f'{k} {v}' for k, v in sorted(per.items()))}); "
                         f"groups: {', '.join(groups)}")
    total = sum(float(r["seconds"]) for r in result.rows)
    lines.append(f"total: {len(result.rows)} clips, {total / 3600:.2f} h; {len(result.skipped)} sources left out, "
                 f"{len(result.merged)} copies dropped")
    return "\n".join(lines)


def make_parser(doc: str, default_folds: int = 5) -> argparse.ArgumentParser:
    """A builder's parser: its docstring's first paragraph as description, the rest as epilog, and the
    options every builder shares."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_folds=default_folds)
    return parser


def add_common_args(parser: argparse.ArgumentParser, default_folds: int = 5) -> None:
    parser.add_argument("--out", required=True, help="the set to create (OUT/audio, OUT/clips.csv, OUT/manifests)")
    parser.add_argument("--deb-root", default=None, metavar="DIR",
                        help="build from packages already unpacked into DIR (dpkg-deb -x PKG.deb DIR for each "
                             "package; or / where they are installed) instead of downloading them")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="where .deb files and unpacked packages are kept (default OUT/../heldout_cache)")
    parser.add_argument("--folds", type=int, default=default_folds, help=f"number of folds (default {default_folds})")
    parser.add_argument("--max-seconds", type=float, default=10.0,
                        help="longer sources are cut into equal segments of at most this length, kept in "
                             "their group (default 10; 0 keeps every source whole)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --out")


def run_main(name: str, build: Callable[[argparse.Namespace], BuildResult], args: argparse.Namespace) -> int:
    """Run a builder for its CLI: errors the user can act on are one line and exit status 2."""
    start = time.time()
    try:
        check_out(os.path.abspath(args.out), args.force)
        result = build(args)
    except (pool.PoolError, PrepError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    for line in result.skipped:
        print(f"warning: left out {line}", file=sys.stderr)
    for line in result.merged:
        print(f"note: copy dropped, groups merged: {line}", file=sys.stderr)
    print(summary(result, os.path.abspath(args.out)))
    print(f"{name}: {time.time() - start:.0f} s -> {os.path.abspath(args.out)} "
          f"(eat-probe --data {os.path.join(os.path.abspath(args.out), 'manifests')})", flush=True)
    return 0


def default_cache(args: argparse.Namespace) -> str:
    return os.path.abspath(args.cache or os.path.join(os.path.dirname(os.path.abspath(args.out)), "heldout_cache"))
