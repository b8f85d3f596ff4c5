"""Pack the audio of a manifest folder into uncompressed zip shards (fairseq's audio-in-zip rows).

Millions of small files on a shared filesystem are slow to open and exhaust inode quotas. Packed,
each clip is one byte range of a large zip file: a row ``shard_000.zip:OFFSET:LENGTH<TAB>n_samples``
is read with one seek, in any data-loader worker, without reading the zip's directory.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import uuid
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from eat_fairseq.data.manifest import (
    FILE,
    SHARD,
    SPAN,
    ManifestError,
    ManifestRow,
    read_manifest,
)
from eat_fairseq.data.clips import open_clip
from eat_fairseq.data.shards import shard_members
from eat_fairseq.prep.common import (
    OutputExistsError,
    PrepError,
    add_common_args,
    check_outputs,
    new_parser,
    progress,
    read_lines,
    run_cli,
    write_manifest,
    write_text_atomic,
)

OUTPUT_FORMAT = """\
input: every *.tsv manifest in MANIFEST_DIR (excluded.tsv and other files whose first line is not a
folder are ignored); rows may be files, spans (long.wav:START:LENGTH) or shard rows.

outputs (in DEST):
  shard_000.zip, ...  uncompressed (stored) zip files of about --shard-size each; a member's name is
                      the address of the row it came from (clips/a.wav, long.wav:START:LENGTH), so
                      every clip's origin stays known. A clip listed in several manifests is stored
                      once.
  {split}.tsv         line 1: the absolute DEST; then, in the input's order,
                      shard_NNN.zip:OFFSET:LENGTH<TAB>n_samples   (OFFSET/LENGTH: the member's data
                      bytes in the zip; n_samples as in the input)
  *.lbl, *.csv, *.weights   copied unchanged (they are row-aligned with the manifests)

Member content: the source file's bytes unchanged (any format soundfile reads), so the features of
every clip are identical to the loose files'. --flac stores PCM sources (wav/aiff, 8/16/24 bit) as
FLAC of the same bit depth instead: lossless, about half the size; float and already-compressed
sources are stored unchanged. A span (window) row is stored as its samples alone, in the source's
sample format (WAV, or FLAC with --flac).
Shards are assigned in manifest order before any is written, so the output does not depend on
--workers. Everything is written into a temporary folder beside DEST (.DEST.pack-tmp-*) and moved into
DEST only when complete, so a failed or interrupted run leaves DEST as it was; with --force the
outputs of an earlier run are replaced (and its extra shards removed) only then.
Existing outputs are not overwritten without --force (exit status 2); nor is a temporary folder left
by a killed run (--force removes it). Rows whose files lie inside DEST (symlinks resolved) are refused
whatever the options (exit status 2): packing would replace or remove its own input.
exit status: 0 written, 1 no rows to pack, 2 bad arguments or outputs in the way."""

SHARD_NAME = "shard_{:03d}.zip"
_SHARD_RE = re.compile(r"^shard_\d{3,}\.zip$")
COPIED_SUFFIXES = (".lbl", ".csv", ".weights")
# FLAC holds integer PCM up to 24 bits; these subtypes are read as integers and stored losslessly.
_FLAC_INT = {"PCM_S8": ("int16", "PCM_S8"), "PCM_U8": ("int16", "PCM_S8"), "PCM_16": ("int16", "PCM_16"),
             "PCM_24": ("int32", "PCM_24")}
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # member timestamps: the same bytes on every run


def parse_size(text: str) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"512MiB"`` -> 536_870_912, ``"1000"`` -> 1000 (bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if match is None:
        raise PrepError(f"cannot read the size {text!r} (examples: 2GB, 500MB, 512MiB)")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    size = int(float(number) * base ** " kmgt".index(prefix or " "))
    if size <= 0:
        raise PrepError(f"the shard size must be positive, got {text!r}")
    return size


@dataclass(frozen=True)
class Source:
    """One distinct clip to store: where it comes from and its member name in the shard."""

    kind: str
    path: str
    offset: int
    length: int
    name: str
    size: int  # estimated bytes in the shard (for planning)


@dataclass
class PackReport:
    dest: Path
    splits: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    members: int = 0
    bytes_written: int = 0
    flac_members: int = 0
    outputs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total_rows(self) -> int:
        return sum(self.splits.values())

    def summary(self) -> str:
        lines = [f"dest: {self.dest}"]
        lines += [f"  {name}: {rows} rows" for name, rows in self.splits.items()]
        lines.append(f"{self.members} clips in {self.shards} shard(s), {self.bytes_written / 1e9:.3f} GB"
                     + (f" ({self.flac_members} stored as FLAC)" if self.flac_members else ""))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def find_manifests(manifest_dir: Path) -> list[Path]:
    """``*.tsv`` files whose first line is a folder (not a header or data row), sorted by name."""
    found = []
    for path in sorted(manifest_dir.glob("*.tsv")):
        lines = read_lines(path)
        if lines and lines[0] and "\t" not in lines[0]:
            found.append(path)
    return found


def _source(row: ManifestRow) -> Source:
    if row.kind == FILE:
        return Source(FILE, row.path, 0, 0, row.rel, os.path.getsize(row.path))
    if row.kind == SHARD:
        member = shard_members(row.path).get(row.offset)
        if member is None or member.length != row.length:
            raise PrepError(f"{row.rel}: no stored member with exactly this byte range in {row.path}")
        return Source(SHARD, row.path, row.offset, row.length, member.name, row.length)
    info = sf.info(row.path)
    per_frame = max(1, info.channels) * 4
    return Source(SPAN, row.path, row.offset, row.length, row.rel, 64 + row.length * per_frame)


def _encode_frames(row: ManifestRow, flac: bool) -> tuple[bytes, bool]:
    """The samples of a file or span row (read by the one row reader, in their stored type, so they are
    exact) as a standalone WAV/FLAC file."""
    import io

    with open_clip(row) as clip:
        int_plan = _FLAC_INT.get(clip.subtype)
        if int_plan is not None:
            dtype, subtype = int_plan
        elif clip.subtype in ("PCM_32", "FLOAT", "DOUBLE") and clip.format in ("WAV", "WAVEX", "AIFF"):
            dtype, subtype = {"PCM_32": "int32", "FLOAT": "float32", "DOUBLE": "float64"}[clip.subtype], clip.subtype
        else:  # compressed sources: the decoded samples, as float
            dtype, subtype = "float32", "FLOAT"
        data = clip.read(dtype=dtype)
        if data.shape[0] != clip.frames:
            raise PrepError(f"{row.describe()}: only {data.shape[0]} of {clip.frames} frames could be read")
        samplerate = clip.samplerate
    use_flac = flac and int_plan is not None
    buf = io.BytesIO()
    if use_flac:
        sf.write(buf, data, samplerate, format="FLAC", subtype=subtype)
    else:
        sf.write(buf, data, samplerate, format="WAV", subtype=subtype)
    return buf.getvalue(), use_flac


def _member_bytes(src: Source, flac: bool) -> tuple[bytes, bool]:
    """A member's bytes: a file or shard member copied as stored; a span cut out with its exact samples
    (and, with ``flac``, integer PCM WAV re-encoded losslessly)."""
    if src.kind == SPAN:
        return _encode_frames(ManifestRow(src.path, src.length, 0, SPAN, src.offset, src.length), flac)
    with open(src.path, "rb") as f:
        f.seek(src.offset)
        data = f.read(src.length if src.kind == SHARD else -1)
    if src.kind == FILE and flac:
        info = sf.info(src.path)
        if info.subtype in _FLAC_INT and info.format in ("WAV", "WAVEX", "AIFF"):
            return _encode_frames(ManifestRow(src.path, info.frames, 0, FILE), True)
    return data, False


def _write_shard(job: tuple[str, list[Source], bool]) -> tuple[list[tuple[int, int]], int, int]:
    """Write one shard (temporary file, fsync, rename); return each member's data byte range."""
    path, sources, flac = job
    tmp = f"{path}.tmp{os.getpid()}"
    n_flac = 0
    try:
        with open(tmp, "wb") as raw:
            with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                for src in sources:
                    data, as_flac = _member_bytes(src, flac)
                    n_flac += as_flac
                    info = zipfile.ZipInfo(src.name, date_time=_FIXED_TIME)
                    info.compress_type = zipfile.ZIP_STORED
                    info.external_attr = 0o644 << 16
                    with warnings.catch_warnings():
                        # two manifests with different roots may list the same relative path; rows
                        # address members by offset, so a repeated name is harmless here
                        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)
                        archive.writestr(info, data)
            raw.flush()
            os.fsync(raw.fileno())
        members = sorted(shard_members(tmp).values(), key=lambda m: m.offset)  # = the order written
        if [m.name for m in members] != [src.name for src in sources]:
            raise PrepError(f"{path}: the written zip does not list its members as written")
        ranges = [(m.offset, m.length) for m in members]
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ranges, os.path.getsize(path), n_flac


def _temp_prefix(real_dest: Path) -> str:
    """Name prefix of the working folders beside ``real_dest`` (hidden, and unmistakably pack's)."""
    return f".{real_dest.name}.pack-tmp-"


def _leftover_temps(real_dest: Path) -> list[Path]:
    """Working folders of earlier runs beside ``real_dest``: a run that was killed (SIGKILL, power loss)
    could not remove its own, and one that is still running owns its folder."""
    parent, prefix = real_dest.parent, _temp_prefix(real_dest)
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def _refuse_sources_inside(parsed: list[tuple[Path, list[ManifestRow]]], real_dest: Path, dest: Path) -> None:
    """Raise ``PrepError`` naming the first row whose file lies inside ``real_dest`` (symlinks resolved).

    Such a row (typically a shard row of an earlier pack into the same folder) addresses a file that
    this run's outputs replace or remove (the new shards, the removal of stale ones), so the run would
    destroy its own input and leave rows pointing at nothing; no option makes that safe, so inputs and
    outputs are kept apart. Folders are resolved once each (a manifest holds many files per folder),
    files only when they are symlinks themselves.
    """
    inside = str(real_dest).rstrip(os.sep) + os.sep
    real_folders: dict[str, str] = {}
    checked: set[str] = set()
    for manifest, rows in parsed:
        for row in rows:
            if row.path in checked:
                continue
            checked.add(row.path)
            folder, name = os.path.split(row.path)
            real_folder = real_folders.get(folder)
            if real_folder is None:
                real_folder = real_folders[folder] = os.path.realpath(folder)
            real = os.path.join(real_folder, name)
            if os.path.islink(real):
                real = os.path.realpath(real)
            if real.startswith(inside):
                raise PrepError(f"{manifest}:{row.line}: {row.describe()} lies inside --dest {dest} ({real}); "
                                f"packing into the folder that holds the sources would replace them: choose "
                                f"another --dest")


def _swap_in(work: Path, real_dest: Path) -> None:
    """Move the complete outputs in ``work`` to ``real_dest``; remove ``work`` and any stale shard.

    A new destination is ``work`` renamed (atomic). An existing one keeps its own identity (permissions,
    a symlink pointing to it, files that are not pack's): each output is renamed over the old one, shards
    first, then the manifests; shards of an earlier, larger run are removed last. Nothing is read or
    written in this step, so only a crash between these few renames can leave a mix of old and new.
    """
    if not real_dest.exists():
        os.rename(work, real_dest)
        return
    names = sorted((p.name for p in work.iterdir()), key=lambda n: (not _SHARD_RE.match(n), n))
    for name in names:
        os.replace(work / name, real_dest / name)
    for old in real_dest.iterdir():
        if _SHARD_RE.match(old.name) and old.name not in names:
            old.unlink()
    work.rmdir()


def pack_manifests(
    manifest_dir: str | os.PathLike,
    dest: str | os.PathLike,
    shard_size: int = 2_000_000_000,
    workers: int = 1,
    force: bool = False,
    flac: bool = False,
    quiet: bool = True,
) -> PackReport:
    """Pack every manifest of ``manifest_dir`` into zip shards in ``dest`` (format: ``OUTPUT_FORMAT``).

    Raises ``PrepError`` for a bad input (including a row whose file lies inside ``dest``) and
    ``OutputExistsError`` when an output, or the working folder of a killed run, exists and ``force``
    is False (all checked before anything is written). The outputs are written into a working folder
    beside ``dest`` and moved into ``dest`` only when complete (:func:`_swap_in`), so a failure leaves
    ``dest`` as it was and removes the working folder.
    """
    src_dir = Path(os.path.abspath(os.fspath(manifest_dir)))
    dest_p = Path(os.path.abspath(os.fspath(dest)))
    if not src_dir.is_dir():
        raise PrepError(f"manifest folder {src_dir} is not a directory")
    real_dest = Path(os.path.realpath(dest_p))
    if src_dir == dest_p or os.path.realpath(src_dir) == str(real_dest):
        raise PrepError("--dest must differ from the manifest folder")
    if real_dest.exists() and not real_dest.is_dir():
        raise PrepError(f"--dest {dest_p} exists and is not a folder")
    if shard_size <= 0:
        raise PrepError(f"the shard size must be positive, got {shard_size}")
    manifests = find_manifests(src_dir)
    if not manifests:
        raise PrepError(f"no manifests (*.tsv with a root folder on line 1) in {src_dir}")
    copied = sorted(p for p in src_dir.iterdir() if p.is_file() and p.suffix in COPIED_SUFFIXES)

    # 1. read every manifest; refuse rows inside the destination and outputs in the way; then one
    # Source per distinct clip, in first-seen order
    parsed: list[tuple[Path, list[ManifestRow]]] = []
    for manifest in manifests:
        try:
            _, rows = read_manifest(str(manifest), check_root=True)
        except ManifestError as e:
            raise PrepError(str(e)) from None
        parsed.append((manifest, rows))
    _refuse_sources_inside(parsed, real_dest, dest_p)
    old_shards = sorted(p for p in dest_p.glob("shard_*.zip") if _SHARD_RE.match(p.name)) if dest_p.is_dir() else []
    check_outputs([dest_p / m.name for m in manifests] + [dest_p / c.name for c in copied] + old_shards, force)
    leftovers = _leftover_temps(real_dest)
    if leftovers and not force:
        raise OutputExistsError(f"{leftovers[0]} is the working folder of an earlier pack run that was killed (or "
                                f"is still running); remove it, or use --force to remove it")
    keys: dict[tuple[str, str, int, int], int] = {}
    sources: list[Source] = []
    for manifest, rows in parsed:
        for row in rows:
            key = (row.kind, row.path, row.offset, row.length)
            if key in keys:
                continue
            try:
                src = _source(row)
            except (OSError, RuntimeError, KeyError, zipfile.BadZipFile) as e:
                raise PrepError(f"{manifest}:{row.line}: cannot read {row.describe()}: {e}") from None
            keys[key] = len(sources)
            sources.append(src)

    # 2. plan the shards (manifest order, cut at the size limit) -- independent of --workers
    plan: list[list[int]] = [[]]
    filled = 0
    for i, src in enumerate(sources):
        if plan[-1] and filled + src.size > shard_size:
            plan.append([])
            filled = 0
        plan[-1].append(i)
        filled += src.size
    if not sources:
        plan = []

    # 3. write everything into a working folder beside the destination (same filesystem, so the final
    # renames are atomic); the destination is touched only once the outputs are complete
    report = PackReport(dest=dest_p)
    for leftover in leftovers:
        shutil.rmtree(leftover)
        report.notes.append(f"removed {leftover}, left by an earlier run that was killed")
    real_dest.parent.mkdir(parents=True, exist_ok=True)
    work = real_dest.parent / f"{_temp_prefix(real_dest)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        _write_outputs(work, dest_p, parsed, copied, keys, sources, plan, flac, workers, quiet, report)
        _swap_in(work, real_dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def _write_outputs(work: Path, dest: Path, parsed: list[tuple[Path, list[ManifestRow]]], copied: list[Path],
                   keys: dict[tuple[str, str, int, int], int], sources: list[Source], plan: list[list[int]],
                   flac: bool, workers: int, quiet: bool, report: PackReport) -> None:
    """Write the shards, the manifests (rooted at ``dest``, where they will live) and the side files
    into ``work``; ``report`` lists them under their final paths in ``dest``."""
    jobs = [(str(work / SHARD_NAME.format(k)), [sources[i] for i in members], flac) for k, members in enumerate(plan)]
    location: dict[int, tuple[str, int, int]] = {}
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context().Pool(min(workers, len(jobs))) as pool:
            results = list(progress(pool.imap(_write_shard, jobs), total=len(jobs), desc="packing", quiet=quiet))
    else:
        results = list(progress(map(_write_shard, jobs), total=len(jobs), desc="packing", quiet=quiet))
    for (path, _, _), members, (ranges, size, n_flac) in zip(jobs, plan, results):
        for i, (offset, length) in zip(members, ranges):
            location[i] = (os.path.basename(path), offset, length)
        report.outputs.append(dest / os.path.basename(path))
        report.bytes_written += size
        report.flac_members += n_flac
    report.shards, report.members = len(jobs), len(sources)

    # the manifests (same rows, same order) and the row-aligned side files
    for manifest, rows in parsed:
        def packed(rows: list[ManifestRow] = rows):
            for row in rows:
                name, offset, length = location[keys[(row.kind, row.path, row.offset, row.length)]]
                yield f"{name}:{offset}:{length}", row.num_samples

        write_manifest(work / manifest.name, str(dest), packed())
        report.outputs.append(dest / manifest.name)
        report.splits[manifest.stem] = len(rows)
    for side in copied:
        write_text_atomic(work / side.name, side.read_text(encoding="utf-8"))
        report.outputs.append(dest / side.name)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("Pack the audio of every manifest in MANIFEST_DIR into uncompressed zip shards and write "
                    "manifests whose rows address the shards (shard_000.zip:OFFSET:LENGTH<TAB>n_samples).", OUTPUT_FORMAT)
    parser.add_argument("manifest_dir", metavar="MANIFEST_DIR", help="folder with {split}.tsv (+ .lbl, ...)")
    parser.add_argument("--dest", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--shard-size", default="2GB", metavar="SIZE",
                        help="target bytes per shard: 2GB, 500MB, 512MiB ... (default: %(default)s)")
    parser.add_argument("--flac", action="store_true", help="store PCM audio as lossless FLAC (about half the size)")
    add_common_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action() -> PackReport:
        return pack_manifests(args.manifest_dir, args.dest, shard_size=parse_size(args.shard_size),
                              workers=args.workers, force=args.force, flac=args.flac, quiet=args.quiet)
    return run_cli(action)
