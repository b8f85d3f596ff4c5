#!/usr/bin/env python3
"""Build the UNLABELLED pre-training pool (about 4.9 h of real recorded audio) from Debian packages.

Why: pre-training EAT needs real audio, not generated tones, and the experiments in docs/ must be
reproducible by anyone without a data-set download or a licence agreement. Debian's archive ships
hours of freely licensed recordings inside a few game and music packages; this tool fetches them
with `apt-get download` (the only network access: Debian's package archive, through apt), unpacks
them with `dpkg-deb -x` (only sox and libsox-fmt-all get installed), converts every sound to 16 kHz
mono and cuts it into short segments. Same packages, same --seed and same options give the same
pool: the file list is sorted, then shuffled with the seed, and sox runs with repeatable dither (-R).

Output (OUT is --out; built in a sibling folder .OUT.partial, renamed to OUT at the end):
  OUT/audio/IIIII_KKK.wav  16 kHz, mono, 16-bit PCM WAV; segments of --min-s..--seg-s seconds
                           (default 1..10 s). IIIII = index of the source file in the shuffled list,
                           KKK = its --seg-s chunk; chunks shorter than --min-s or nearly silent
                           (peak below 30/32768) are left out, so the numbers have gaps.
  OUT/pool.csv             one row per segment: filename (audio/IIIII_KKK.wav), package, source
                           (path inside the package), seconds.
  CACHE (default OUT/../pool_cache): debs/*.deb and root_PACKAGE/ (the unpacked packages), reused
                           by later runs.
With the defaults: 5,803 segments, 4.89 h.

Sources (default --packages; licences as in each package's usr/share/doc/PACKAGE/copyright):
  tuxpaint-stamps-default  ~2.4 h  spoken stamp names/descriptions in ~30 languages, animal and
                                   household sounds (GPL-2); its symbols/math/ folder is left out
  hedgewars-data           ~1.6 h  game music (GPL-2) and sound effects (GFDL-1.3, a few
                                   CC-BY-SA-3.0); Sounds/voices/ is left out
  fillets-ng-data          ~0.5 h  music and dialogue (GPL-2)
  hydrogen-drumkits        ~13 min drum one-shots (per kit: GPL-2(+), CC-BY(-SA)-3.0 or CC0)
  lmms-common              ~5 min  instrument, drum and effect samples (GPL-2+)
  sonic-pi-samples         ~5 min  instrument, drum and ambient samples (mostly CC0, a few
                                   CC-BY-SA-4.0)
Sound files are *.wav, *.ogg, *.flac and *.gsm; symbolic links and doc/ folders are skipped.
Files sox cannot read are skipped with a warning that names them.

Run as root (apt-get update / install sox / download need it), about 3 minutes:
  python3 experiments/build_pretrain_pool.py --out /data/pool
  python manifests/audio_folder.py /data/pool/audio --dest /data/pool_manifests --valid-percent 0
Use it for pre-training only: it has no labels.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import re
import shutil
import subprocess
import sys
import time
import wave
from typing import Optional, Sequence

import numpy as np

SR = 16000
PACKAGES = ("tuxpaint-stamps-default", "hedgewars-data", "fillets-ng-data",
            "sonic-pi-samples", "hydrogen-drumkits", "lmms-common")
EXTS = (".wav", ".ogg", ".flac", ".gsm")
LEFT_OUT = ("/Sounds/voices/", "/symbols/math/", "/doc/")  # matched against "/" + path inside the package
SILENCE_PEAK = 30  # int16 peak below which a segment counts as silent
CSV_FIELDS = ("filename", "package", "source", "seconds")
TOOLS = ("sox", "libsox-fmt-all")
_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")  # Debian policy 5.6.1


class PoolError(RuntimeError):
    """A failure the user can act on (bad package, missing tool, existing output)."""


class UnreadableSound(PoolError):
    """sox could not convert one source file (it is skipped, with a warning that names it)."""


# ---------------------------------------------------------------- pure helpers

def parse_packages(text: str) -> list[str]:
    """The comma-separated package list of --packages, checked against Debian's naming rules."""
    packages = [p.strip() for p in text.split(",") if p.strip()]
    if not packages:
        raise PoolError("--packages is empty")
    for package in packages:
        if not _PACKAGE_NAME.match(package):
            raise PoolError(f"--packages: {package!r} is not a Debian package name")
    return packages


def is_pool_source(relpath: str) -> bool:
    """Whether a file at ``relpath`` (inside an unpacked package) is a sound the pool uses."""
    return relpath.lower().endswith(EXTS) and not any(part in "/" + relpath for part in LEFT_OUT)


def list_sources(root: str) -> list[str]:
    """Paths (relative to ``root``, sorted) of the sound files of one unpacked package; links skipped."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if is_pool_source(rel) and not os.path.islink(path):
                found.append(rel)
    return sorted(found)


def shuffled_sources(sources: dict[str, list[str]], seed: int) -> list[tuple[str, str]]:
    """All (package, relpath) pairs sorted, then shuffled with ``seed``: the order (and so the
    IIIII index of the segment names) depends only on the files and the seed."""
    pairs = sorted((package, rel) for package, rels in sources.items() for rel in rels)
    random.Random(seed).shuffle(pairs)
    return pairs


def split_segments(samples: np.ndarray, seg_n: int, min_n: int) -> list[tuple[int, np.ndarray]]:
    """Cut ``samples`` (int16) into chunks of ``seg_n``; returns (chunk number, chunk) for the chunks
    that are at least ``min_n`` long and not (nearly) silent."""
    if seg_n <= 0 or min_n < 0:
        raise ValueError(f"segment length {seg_n} and minimum {min_n} must be positive")
    kept = []
    for start in range(0, len(samples), seg_n):
        chunk = samples[start:start + seg_n]
        if len(chunk) < min_n or len(chunk) == 0:
            continue
        if np.abs(chunk.astype(np.int32)).max() < SILENCE_PEAK:
            continue
        kept.append((start // seg_n, chunk))
    return kept


def segment_name(index: int, chunk: int) -> str:
    """The pool-relative file name of chunk ``chunk`` of the ``index``-th shuffled source."""
    return f"audio/{index:05d}_{chunk:03d}.wav"


def write_wav(path: str, samples: np.ndarray, sample_rate: int = SR) -> None:
    """Write int16 mono ``samples`` as a 16-bit PCM WAV."""
    with wave.open(path, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def read_wav(path: str) -> np.ndarray:
    """The int16 samples of a 16-bit mono WAV (as written by sox or ``write_wav``)."""
    with wave.open(path) as handle:
        if handle.getsampwidth() != 2 or handle.getnchannels() != 1:
            raise PoolError(f"{path}: expected 16-bit mono, got {8 * handle.getsampwidth()}-bit "
                            f"{handle.getnchannels()} channels")
        return np.frombuffer(handle.readframes(handle.getnframes()), "<i2")


def summarize(rows: Sequence[dict]) -> dict[str, float]:
    """Seconds per package, largest first."""
    by: dict[str, float] = {}
    for row in rows:
        by[row["package"]] = by.get(row["package"], 0.0) + float(row["seconds"])
    return dict(sorted(by.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------- system steps

def _run(cmd: Sequence[str], what: str, **kwargs) -> None:
    try:
        proc = subprocess.run(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs)
    except FileNotFoundError as exc:
        raise PoolError(f"{what}: {cmd[0]} not found (this tool needs Debian's apt-get and dpkg-deb)") from exc
    if proc.returncode:
        hint = " (run as root?)" if os.name == "posix" and os.geteuid() != 0 else ""
        raise PoolError(f"{what} failed{hint}: `{' '.join(cmd)}` exited {proc.returncode}: "
                        f"{proc.stderr.strip()[-2000:]}")


def ensure_tools() -> None:
    """apt's package lists (which `apt-get download` needs) and sox with all its formats."""
    lists = "/var/lib/apt/lists"
    have_lists = os.path.isdir(lists) and any(f.endswith(("_Packages", "_Packages.lz4")) for f in os.listdir(lists))
    if not have_lists:
        _run(["apt-get", "update", "-q"], "apt-get update")
    missing = [p for p in TOOLS if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode]
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
             f"installing {', '.join(missing)}", env=env)


def unpack(package: str, cache: str) -> str:
    """Download (once) and unpack (once) ``package`` into CACHE/root_PACKAGE; returns that folder."""
    root = os.path.join(cache, "root_" + package)
    if os.path.isdir(root):
        return root
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    if not any(f.startswith(package + "_") for f in os.listdir(debs)):
        print("+ apt-get download", package, flush=True)
        _run(["apt-get", "download", package], f"downloading package {package}", cwd=debs)
    candidates = sorted(f for f in os.listdir(debs) if f.startswith(package + "_") and f.endswith(".deb"))
    if not candidates:
        raise PoolError(f"package {package}: no {package}_*.deb in {debs} after apt-get download")
    partial = root + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    _run(["dpkg-deb", "-x", os.path.join(debs, candidates[-1]), partial], f"unpacking package {package}")
    os.rename(partial, root)
    return root


def convert(src: str, dst: str) -> np.ndarray:
    """Convert any sound sox reads to 16 kHz mono 16-bit at ``dst`` (high-quality resampling,
    repeatable dither, guarded against clipping); returns the int16 samples."""
    cmd = ["sox", "-q", "-R", "-G", src, "-r", str(SR), "-c", "1", "-b", "16", dst, "rate", "-h", str(SR)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError as exc:
        raise PoolError("sox not found: run as root so the tool can install it, or apt-get install sox "
                        "libsox-fmt-all") from exc
    if proc.returncode:
        raise UnreadableSound(f"{src}: sox exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return read_wav(dst)


# ---------------------------------------------------------------- the pool

def check_out(out: str, force: bool, error: type[Exception] = PoolError) -> None:
    """Refuse an existing ``out`` (a file, or a non-empty folder) unless ``force``; raises ``error``
    (the held-out set builders pass their own)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise error(f"--out {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise error(f"--out {out} exists and is not empty; pass --force to replace it")


def build_pool(out: str, cache: Optional[str] = None, packages: Sequence[str] = PACKAGES, seg_s: float = 10.0,
               min_s: float = 1.0, max_minutes: float = 1e9, seed: int = 0, force: bool = False) -> list[dict]:
    """Build the pool at ``out`` (see the module docstring); returns the rows of pool.csv."""
    out = os.path.abspath(out)
    check_out(out, force)
    if seg_s <= 0 or min_s < 0 or min_s > seg_s:
        raise PoolError(f"need 0 <= --min-s ({min_s}) <= --seg-s ({seg_s}) and --seg-s > 0")
    cache = os.path.abspath(cache or os.path.join(os.path.dirname(out), "pool_cache"))
    os.makedirs(cache, exist_ok=True)
    ensure_tools()

    roots, sources = {}, {}
    for package in packages:
        roots[package] = unpack(package, cache)
        sources[package] = list_sources(roots[package])
        if not sources[package]:
            print(f"warning: package {package} has no sound files", file=sys.stderr, flush=True)
    order = shuffled_sources(sources, seed)

    work = os.path.join(os.path.dirname(out), "." + os.path.basename(out) + ".partial")
    shutil.rmtree(work, ignore_errors=True)  # left by an interrupted run
    os.makedirs(os.path.join(work, "audio"))
    tmp = os.path.join(work, "_tmp.wav")
    seg_n, min_n = int(seg_s * SR), int(min_s * SR)
    rows: list[dict] = []
    total, skipped = 0.0, 0
    for index, (package, rel) in enumerate(order):
        if total / 60 >= max_minutes:
            break
        try:
            samples = convert(os.path.join(roots[package], rel), tmp)
        except UnreadableSound as exc:
            print(f"warning: skipped {package}: {exc}", file=sys.stderr, flush=True)
            skipped += 1
            continue
        for chunk, segment in split_segments(samples, seg_n, min_n):
            name = segment_name(index, chunk)
            write_wav(os.path.join(work, name), segment)
            seconds = len(segment) / SR
            rows.append(dict(filename=name, package=package, source=rel, seconds=round(seconds, 3)))
            total += seconds
    if os.path.exists(tmp):
        os.remove(tmp)
    with open(os.path.join(work, "pool.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CSV_FIELDS))
        writer.writeheader()
        writer.writerows(rows)

    if os.path.isdir(out):
        check_out(out, force)  # nothing appeared meanwhile
        shutil.rmtree(out)
    os.rename(work, out)
    if skipped:
        print(f"warning: {skipped} files sox could not read were skipped", file=sys.stderr)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the pool folder to create (see Output above)")
    parser.add_argument("--cache", default=None, help="where .deb files and unpacked packages are kept "
                        "(default OUT/../pool_cache)")
    parser.add_argument("--packages", default=",".join(PACKAGES), help="comma-separated Debian packages "
                        "(default: the six above)")
    parser.add_argument("--seg-s", type=float, default=10.0, help="segment length in seconds (default 10)")
    parser.add_argument("--min-s", type=float, default=1.0, help="shortest segment kept, seconds (default 1)")
    parser.add_argument("--max-minutes", type=float, default=1e9, help="stop after about this many minutes")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        packages = parse_packages(args.packages)
        rows = build_pool(args.out, args.cache, packages, args.seg_s, args.min_s, args.max_minutes,
                          args.seed, args.force)
    except PoolError as exc:
        print(f"build_pretrain_pool: error: {exc}", file=sys.stderr)
        return 2
    for package, seconds in summarize(rows).items():
        print(f"  {package:26s} {seconds / 60:7.1f} min")
    total = sum(row["seconds"] for row in rows)
    print(f"pretrain pool: {len(rows)} segments, {total / 3600:.2f} h, {time.time() - start:.0f} s -> "
          f"{os.path.abspath(args.out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
