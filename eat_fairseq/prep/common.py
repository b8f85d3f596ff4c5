"""Shared pieces of the manifest writers: probing audio, writing the data files, reports, CLI plumbing.

Every writer in this package follows the same life cycle, so the pieces live here:

1. work out the full list of output files and refuse early (before any expensive probing) when one of
   them exists and ``--force`` was not given;
2. open every candidate audio file (``probe_files``), because a manifest row that cannot be decoded
   only shows up hours later as a crashed training job;
3. write the outputs atomically (temporary file + rename) so an interrupted run never leaves a
   half-written manifest that a later run or a trainer would take for a complete one;
4. return a ``ManifestReport`` and print its summary.

The CLIs run their writer inside :func:`staged_outputs` (``run_cli(..., all_or_nothing=True)``): every
output stays a temporary file until the writer has succeeded and found usable audio, then all are
renamed into place together. A failed run (no usable audio, an error half-way) therefore leaves no
outputs behind: no empty ``.tsv`` that the next run would refuse to overwrite without ``--force``, and
with ``--force`` the earlier outputs stay intact.

File formats (docs/reference.md section 6):

- ``{split}.tsv``: first line the absolute root directory, then ``relative/path<TAB>n_samples`` where
  ``n_samples`` is the number of frames at the file's native sample rate, as soundfile reports it.
- ``{split}.lbl``: one line per manifest row, ``clip_id<TAB>label1,label2,...``.
- ``label_descriptors.csv``: ``index,label[,display_name]`` lines, WITHOUT a header line (the layout
  the released EAT/data2vec data directories use; readers accept an optional header too). The row
  number is the class index.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import soundfile as sf

T = TypeVar("T")

AUDIO_EXTS: tuple[str, ...] = ("wav", "flac", "mp3", "ogg")

# Reasons a file is left out of a manifest; they are the second column of excluded.tsv.
MISSING = "missing"
EMPTY_FILE = "empty-file"
NOT_AUDIO = "not-audio"
ZERO_LENGTH = "zero-length"
READ_ERROR = "read-error"
NON_FINITE = "non-finite"
TOO_SHORT = "too-short"
BAD_NAME = "bad-name"

# How many frames are decoded at the start and at the end of every file. Decoding the tail catches
# truncated compressed files whose header still promises the full length.
PROBE_FRAMES = 1024
TAIL_FRAMES = 256

# The shortest clip that gives one Kaldi fbank frame (25 ms: 400 samples at 16 kHz). Shorter clips would
# train as pure padding, so the preparers leave them out.
MIN_SECONDS = 0.025


def min_frames(samplerate: int) -> int:
    """Fewest samples at ``samplerate`` that still give one 25 ms fbank frame after resampling to 16 kHz."""
    return max(1, math.ceil(MIN_SECONDS * samplerate - 1e-9))


class PrepError(Exception):
    """Bad input or arguments; CLIs print the message and exit with status 2."""


class OutputExistsError(PrepError):
    """An output file exists and ``force`` was not given."""


@dataclass(frozen=True)
class Probe:
    """What opening one audio file found; ``reason`` is None when the file is usable."""

    path: str
    frames: int = 0
    samplerate: int = 0
    channels: int = 0
    reason: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def seconds(self) -> float:
        return self.frames / self.samplerate if self.samplerate else 0.0


@dataclass(frozen=True)
class Excluded:
    """One input left out of the outputs, with a short machine-readable reason and a human detail."""

    path: str
    reason: str
    detail: str = ""


@dataclass
class SplitSummary:
    rows: int = 0
    seconds: float = 0.0


@dataclass
class ManifestReport:
    """Result of a writer: what was written where, and what was left out and why."""

    root: Path
    dest: Path
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    excluded: list[Excluded] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.splits.values())

    @property
    def total_hours(self) -> float:
        return sum(s.seconds for s in self.splits.values()) / 3600.0

    def excluded_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(e.reason for e in self.excluded).items()))

    def summary(self) -> str:
        lines = [f"root: {self.root}", f"dest: {self.dest}"]
        for name, s in self.splits.items():
            lines.append(f"  {name}: {s.rows} rows, {s.seconds / 3600.0:.3f} h")
        lines.append(f"total: {self.total_rows} rows, {self.total_hours:.3f} h")
        if self.excluded:
            per_reason = ", ".join(f"{r}: {n}" for r, n in self.excluded_by_reason().items())
            lines.append(f"excluded: {len(self.excluded)} ({per_reason})")
        else:
            lines.append("excluded: 0")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- probing

def probe_audio(path: str) -> Probe:
    """Open ``path`` with soundfile and decode a few frames at both ends.

    Header-only checks (``soundfile.info``) accept files whose data is corrupt or truncated; decoding
    the first and last frames is cheap and catches most of those without reading whole files.
    The tail is read through a second, fresh handle: libsndfile's Ogg/Vorbis decoder returns no
    frames for a forward seek made after a read on the same handle, which made valid short OGG files
    look undecodable. When the tail still cannot be read, the whole file is decoded once: fewer
    frames than the header promises is a truncated file (read error), otherwise its decoded length
    is used. Files shorter than one
    25 ms fbank frame (:func:`min_frames`) are left out as ``too-short``.
    """
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return Probe(path, reason=MISSING, detail="no such file")
    except OSError as exc:
        return Probe(path, reason=READ_ERROR, detail=str(exc))
    if not os.path.isfile(path):
        return Probe(path, reason=NOT_AUDIO, detail="not a regular file")
    if size == 0:
        return Probe(path, reason=EMPTY_FILE, detail="0 bytes")
    try:
        info = sf.info(path)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError or TypeError
        return Probe(path, reason=NOT_AUDIO, detail=_one_line(exc))
    frames, samplerate = int(info.frames), int(info.samplerate)
    base = dict(frames=frames, samplerate=samplerate, channels=int(info.channels))
    if frames <= 0:
        return Probe(path, **base, reason=ZERO_LENGTH, detail="0 frames")
    try:
        with sf.SoundFile(path) as f:
            head = f.read(min(PROBE_FRAMES, frames), dtype="float32", always_2d=True)
        tail = head
        if frames > PROBE_FRAMES:
            with sf.SoundFile(path) as f:
                f.seek(max(0, frames - TAIL_FRAMES))
                tail = f.read(TAIL_FRAMES, dtype="float32", always_2d=True)
        if head.shape[0] > 0 and tail.shape[0] == 0:
            # the decoder cannot seek in this file: decode it all once
            whole = sf.read(path, dtype="float32", always_2d=True)[0]
            if whole.shape[0] < frames:
                return Probe(path, **base, reason=READ_ERROR,
                             detail=f"truncated: the header promises {frames} frames, {whole.shape[0]} decode")
            base["frames"] = frames = int(whole.shape[0])
            head = tail = whole
    except Exception as exc:
        return Probe(path, **base, reason=READ_ERROR, detail=_one_line(exc))
    if head.shape[0] == 0 or tail.shape[0] == 0:
        return Probe(path, **base, reason=READ_ERROR, detail="no frames could be decoded")
    if not (np.isfinite(head).all() and np.isfinite(tail).all()):
        return Probe(path, **base, reason=NON_FINITE, detail="NaN or inf samples")
    if frames < min_frames(samplerate):
        return Probe(path, **base, reason=TOO_SHORT,
                     detail=f"{frames} samples at {samplerate} Hz, shorter than one 25 ms fbank frame "
                            f"({min_frames(samplerate)} samples)")
    return Probe(path, **base)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def probe_files(paths: Sequence[str], workers: int = 1, quiet: bool = False,
                desc: str = "probing") -> list[Probe]:
    """Probe ``paths`` (in order) with ``workers`` processes; the result is aligned with ``paths``."""
    if workers <= 1 or len(paths) < 2:
        return list(progress(map(probe_audio, paths), total=len(paths), desc=desc, quiet=quiet))
    chunk = max(1, min(64, len(paths) // (workers * 8)))
    with multiprocessing.get_context().Pool(min(workers, len(paths))) as pool:
        return list(progress(pool.imap(probe_audio, paths, chunksize=chunk), total=len(paths),
                             desc=desc, quiet=quiet))


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "",
             quiet: bool = False) -> Iterator[T]:
    """A tqdm bar on stderr, off with ``quiet`` or when stderr is not a terminal (logs, CI, tests)."""
    from tqdm import tqdm

    disable = quiet or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return iter(tqdm(iterable, total=total, desc=desc, disable=disable, unit="file", leave=False))


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# --------------------------------------------------------------------------------- finding files

def normalize_exts(exts: str | Iterable[str]) -> tuple[str, ...]:
    """``"wav,.FLAC"`` or ``["wav", "flac"]`` -> ``("flac", "wav")`` (lower case, no dots)."""
    items = exts.split(",") if isinstance(exts, str) else list(exts)
    out = sorted({e.strip().lstrip(".").lower() for e in items if e.strip().lstrip(".")})
    if not out:
        raise PrepError("no audio extensions given")
    return tuple(out)


def has_ext(name: str, exts: Sequence[str]) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in exts


def find_audio(root: str | os.PathLike, exts: Sequence[str] = AUDIO_EXTS) -> list[str]:
    """Relative POSIX paths of files under ``root`` with one of ``exts`` (case-insensitive), sorted.

    Hidden directories (``.git``, ``.cache`` ...) are skipped; symlinked files are listed, symlinked
    directories are not followed (they could loop or duplicate the tree).
    """
    root = os.fspath(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if has_ext(name, exts):
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                found.append(Path(rel).as_posix())
    return sorted(found)


def bad_name_reason(rel_path: str) -> str | None:
    """Tabs and newlines cannot be represented in a tsv row, so such files are excluded."""
    if "\t" in rel_path or "\n" in rel_path or "\r" in rel_path:
        return "path contains a tab or newline"
    return None


def in_valid_split(key: str, seed: int, valid_percent: float) -> bool:
    """Whether ``key`` (a relative path) belongs to the validation split.

    A hash of ``seed`` and the key, not a shuffle: the assignment of a file never depends on which
    other files exist, so adding files to a corpus never moves existing ones between train and valid
    (no leakage across re-runs). The valid fraction is ``valid_percent`` in expectation, not exactly.
    """
    if valid_percent <= 0:
        return False
    if valid_percent >= 100:
        return True
    digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < valid_percent / 100.0 * 2.0**64


def read_lines(path: str | os.PathLike) -> list[str]:
    """Lines of a text file without their line terminators (a final newline adds no empty line)."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read().splitlines()


# ------------------------------------------------------------------------------------- outputs

def check_outputs(paths: Iterable[Path], force: bool,
                  same_content_ok: Mapping[Path, str] | None = None) -> None:
    """Raise ``OutputExistsError`` if any of ``paths`` exists and ``force`` is False.

    ``same_content_ok`` maps files that several runs legitimately share (``label_descriptors.csv``
    written by the train and the eval run of one corpus) to their intended content; an existing file
    with exactly that content is not in the way.
    """
    if force:
        return
    same_content_ok = same_content_ok or {}
    existing = []
    for p in paths:
        if not p.exists():
            continue
        wanted = same_content_ok.get(p)
        if wanted is not None and p.is_file() and p.read_text(encoding="utf-8") == wanted:
            continue
        existing.append(p)
    if existing:
        listed = "\n  ".join(str(p) for p in existing)
        raise OutputExistsError(f"refusing to overwrite existing output(s) (use --force):\n  {listed}")


class OutputStage:
    """Outputs written while :func:`staged_outputs` is open: temporary files held back from their
    final names, and the folders created for them, until :meth:`commit` or :meth:`discard`."""

    def __init__(self) -> None:
        self.pending: dict[Path, Path] = {}  # final path -> its temporary file
        self.new_dirs: list[Path] = []
        self.discarded = False

    def make_parent(self, path: Path) -> None:
        missing = [p for p in reversed(path.parents) if not p.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.new_dirs.extend(missing)

    def hold(self, tmp: Path, path: Path) -> None:
        earlier = self.pending.pop(path, None)
        if earlier is not None and earlier.exists():
            earlier.unlink()
        self.pending[path] = tmp

    def commit(self) -> None:
        for path, tmp in self.pending.items():
            os.replace(tmp, path)
        self.pending.clear()

    def discard(self) -> None:
        """Delete the held files and the folders made for them (when empty): nothing was written."""
        self.discarded = True
        for tmp in self.pending.values():
            if tmp.exists():
                tmp.unlink()
        self.pending.clear()
        for folder in reversed(self.new_dirs):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        self.new_dirs.clear()


_stage: OutputStage | None = None


@contextmanager
def staged_outputs() -> Iterator[OutputStage]:
    """Hold back every file :func:`write_text_atomic` writes in the block; rename them all into place
    when the block ends normally (unless :meth:`OutputStage.discard` was called), delete them when it
    raises. Stages do not nest."""
    global _stage
    if _stage is not None:
        raise RuntimeError("staged_outputs() is already open")
    stage = _stage = OutputStage()
    try:
        yield stage
    except BaseException:
        stage.discard()
        raise
    else:
        if not stage.discarded:
            stage.commit()
    finally:
        _stage = None


def write_text_atomic(path: Path, text: str | Iterable[str]) -> Path:
    """Write ``text`` (a string or an iterable of chunks) to ``path`` via a temporary file + rename
    (inside :func:`staged_outputs`, the rename waits for the end of the stage)."""
    stage = _stage
    if stage is not None:
        stage.make_parent(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            if isinstance(text, str):
                f.write(text)
            else:
                for chunk in text:
                    f.write(chunk)
        if stage is not None:
            stage.hold(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if stage is None and tmp.exists():
            tmp.unlink()
    return path


def write_manifest(path: Path, root: str, rows: Iterable[tuple[str, int]]) -> Path:
    """``{split}.tsv``: the root line, then ``relative/path<TAB>n_samples`` per row."""
    def lines() -> Iterator[str]:
        yield f"{root}\n"
        for rel, frames in rows:
            yield f"{rel}\t{int(frames)}\n"
    return write_text_atomic(path, lines())


def check_label_token(token: str, what: str) -> str:
    """Labels are comma-separated and lines tab-separated, so neither may contain those characters."""
    if not token or any(c in token for c in ",\t\n\r"):
        raise PrepError(f"{what} {token!r} is empty or contains a comma, tab or newline")
    return token


def write_labels(path: Path, rows: Iterable[tuple[str, Sequence[str]]]) -> Path:
    """``{split}.lbl``: ``clip_id<TAB>label1,label2,...`` per manifest row."""
    def lines() -> Iterator[str]:
        for clip_id, labels in rows:
            if not clip_id or any(c in clip_id for c in "\t\n\r"):
                raise PrepError(f"clip id {clip_id!r} is empty or contains a tab or newline")
            yield f"{clip_id}\t{','.join(check_label_token(lb, 'label') for lb in labels)}\n"
    return write_text_atomic(path, lines())


def format_label_descriptors(rows: Sequence[tuple[str, str | None]]) -> str:
    """``index,label[,display_name]`` lines without header; the index is the row number.

    Display names may contain commas (AudioSet: "Male speech, man speaking"); they are quoted the CSV
    way, so read the file with a CSV reader.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    seen = set()
    for index, (label, display) in enumerate(rows):
        check_label_token(label, "label")
        if label in seen:
            raise PrepError(f"duplicate label {label!r} in label descriptors")
        seen.add(label)
        writer.writerow([index, label] if display is None else [index, label, display])
    return buf.getvalue()


def write_excluded(path: Path, excluded: Sequence[Excluded]) -> Path:
    """``excluded.tsv``: header ``path<TAB>reason<TAB>detail``, then one line per excluded input."""
    def clean(s: str) -> str:
        return " ".join(s.replace("\t", " ").split())
    lines = ["path\treason\tdetail\n"]
    lines += [f"{clean(e.path)}\t{e.reason}\t{clean(e.detail)}\n" for e in excluded]
    return write_text_atomic(path, lines)


def format_weights(weights: Iterable[float]) -> str:
    """One float per line, shortest round-trip repr, so re-runs are byte-identical."""
    return "".join(f"{float(w)!r}\n" for w in weights)


@dataclass(frozen=True)
class Entry:
    """One usable clip of a labelled corpus: where it is, its length and its labels."""

    rel_path: str
    clip_id: str
    labels: tuple[str, ...]
    frames: int
    samplerate: int


def write_split(dest: Path, split: str, root: str, entries: Sequence[Entry],
                report: ManifestReport) -> None:
    """Write ``{split}.tsv`` and ``{split}.lbl`` (row-aligned) and record them in ``report``."""
    report.outputs.append(write_manifest(dest / f"{split}.tsv", root,
                                         ((e.rel_path, e.frames) for e in entries)))
    report.outputs.append(write_labels(dest / f"{split}.lbl", ((e.clip_id, e.labels) for e in entries)))
    key = split if dest == report.dest else f"{dest.relative_to(report.dest).as_posix()}/{split}"
    report.splits[key] = SplitSummary(len(entries), sum(e.frames / e.samplerate for e in entries))


def probe_entries(root: str, candidates: Sequence[tuple[str, str, tuple[str, ...]]], workers: int,
                  quiet: bool, report: ManifestReport) -> dict[str, Entry]:
    """Probe ``(rel_path, clip_id, labels)`` candidates; usable ones come back keyed by rel_path,
    the others are appended to ``report.excluded``."""
    usable: dict[str, Entry] = {}
    todo = []
    for rel, clip_id, labels in candidates:
        why = bad_name_reason(rel)
        if why:
            report.excluded.append(Excluded(rel, BAD_NAME, why))
        else:
            todo.append((rel, clip_id, labels))
    probes = probe_files([os.path.join(root, rel) for rel, _, _ in todo], workers=workers, quiet=quiet)
    for (rel, clip_id, labels), probe in zip(todo, probes):
        if probe.ok:
            usable[rel] = Entry(rel, clip_id, labels, probe.frames, probe.samplerate)
        else:
            report.excluded.append(Excluded(rel, probe.reason or READ_ERROR, probe.detail))
    return usable


def clip_id_from_path(rel_path: str) -> str:
    """Default clip id: the relative path without its extension (unique within a manifest)."""
    return rel_path.rsplit(".", 1)[0] if "." in rel_path.rsplit("/", 1)[-1] else rel_path


# ----------------------------------------------------------------------------------------- CLI

def new_parser(description: str, epilog: str) -> argparse.ArgumentParser:
    """The parser of a preparation CLI: its description, and the module's format help kept as written."""
    return argparse.ArgumentParser(description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_args(parser: argparse.ArgumentParser, workers: bool = True, force: bool = True) -> None:
    if force:
        parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    if workers:
        parser.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                            help="processes used to open the audio files (default: %(default)s)")


def run_cli(action: Callable[[], ManifestReport | int], all_or_nothing: bool = False) -> int:
    """Run a writer for a CLI: print its summary; map ``PrepError`` to exit status 2.

    Exit status: 0 written, 1 nothing usable was found, 2 bad arguments/input or outputs in the way.
    With ``all_or_nothing`` the writer runs inside :func:`staged_outputs`, so a run that fails (status 1
    or 2, or an exception) leaves no outputs (the writers that move their own outputs, like ``pack``,
    do without it).
    """
    with staged_outputs() if all_or_nothing else _no_stage() as stage:
        try:
            result = action()
        except PrepError as exc:
            if stage is not None:
                stage.discard()
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if isinstance(result, int):
            if result != 0 and stage is not None:
                stage.discard()
            return result
        print(result.summary())
        if result.total_rows == 0:
            if stage is not None:
                stage.discard()
            print("error: no usable audio was found" + ("; nothing was written" if stage is not None else ""),
                  file=sys.stderr)
            return 1
    return 0


@contextmanager
def _no_stage() -> Iterator[None]:
    yield None

