"""Cut the long recordings of a manifest folder into fixed windows (span rows), so all of them is used.

EAT trains on ``target_length`` fbank frames per clip (10.24 s by default). A 10-minute recording
listed as one row contributes only its first window each epoch (``task.crop=start``) or one random
window (``task.crop=random``). Split into windows, every part of it becomes a clip of its own, and
each is read with a seek: a row ``long.wav:START:LENGTH<TAB>LENGTH`` addresses frames
``START .. START+LENGTH`` of the file at its native rate.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eat_fairseq.data.features import DEFAULT_TARGET_LENGTH, frame_geometry
from eat_fairseq.data.manifest import (
    FILE,
    SHARD,
    ManifestError,
    ManifestRow,
    parse_address,
    read_manifest,
    window_id,
)
from eat_fairseq.prep.common import (
    ManifestReport,
    PrepError,
    SplitSummary,
    add_common_args,
    check_outputs,
    new_parser,
    probe_files,
    read_lines,
    run_cli,
    write_manifest,
    write_text_atomic,
)
from eat_fairseq.prep.pack import find_manifests

OUTPUT_FORMAT = """\
input: every *.tsv manifest in MANIFEST_DIR (file or span rows; split before packing: shard rows are
refused), with its row-aligned {split}.lbl / {split}.weights when present.

outputs (in DEST), same root (line 1) as the input:
  {split}.tsv   a clip no longer than the window keeps its row unchanged; a longer one becomes
                path:START:LENGTH<TAB>LENGTH rows of one window each (frames at the file's native
                rate), back to back from frame 0; a last partial window is kept when it is at least
                --min-last seconds long
  {split}.lbl   the clip's labels repeated for each of its windows, with clip id ID@START
  {split}.weights  the clip's weight repeated for each of its windows
  other *.csv files are copied unchanged

The window is --frames fbank frames at 16 kHz (the default 1024 = 10.255 s, the task's default
target_length: each window then fills exactly one training example), or --window seconds.
Existing outputs are not overwritten without --force (exit status 2).
exit status: 0 written, 1 no rows, 2 bad arguments or outputs in the way."""


@dataclass(frozen=True)
class Window:
    start: int
    length: int


def frames_to_seconds(frames: int, sample_rate: int = 16000) -> float:
    """Seconds of audio that give exactly ``frames`` fbank frames (25 ms window, 10 ms shift)."""
    window, shift, _ = frame_geometry(sample_rate)
    return (window + (frames - 1) * shift) / sample_rate


def plan_windows(num_frames: int, window: int, min_last: int) -> list[Window]:
    """Back-to-back windows over ``num_frames``; a clip of at most one window stays one piece."""
    if num_frames <= window:
        return [Window(0, num_frames)]
    out = [Window(start, window) for start in range(0, num_frames - window + 1, window)]
    end = out[-1].start + window
    if num_frames - end >= max(1, min_last):
        out.append(Window(end, num_frames - end))
    return out


def split_manifests(
    manifest_dir: str | os.PathLike,
    dest: str | os.PathLike,
    window_seconds: float = frames_to_seconds(DEFAULT_TARGET_LENGTH),
    min_last_seconds: float = 1.0,
    workers: int = 1,
    force: bool = False,
    quiet: bool = True,
) -> ManifestReport:
    """Write windowed copies of the manifests (and their .lbl/.weights) of ``manifest_dir`` to ``dest``."""
    src_dir = Path(os.path.abspath(os.fspath(manifest_dir)))
    dest_p = Path(os.path.abspath(os.fspath(dest)))
    if not src_dir.is_dir():
        raise PrepError(f"manifest folder {src_dir} is not a directory")
    if src_dir == dest_p:
        raise PrepError("--dest must differ from the manifest folder")
    if not window_seconds > 0 or min_last_seconds < 0:
        raise PrepError("--window must be positive and --min-last non-negative")
    manifests = find_manifests(src_dir)
    if not manifests:
        raise PrepError(f"no manifests (*.tsv with a root folder on line 1) in {src_dir}")
    side = {m: [src_dir / f"{m.stem}{ext}" for ext in (".lbl", ".weights") if (src_dir / f"{m.stem}{ext}").is_file()]
            for m in manifests}
    csvs = sorted(p for p in src_dir.glob("*.csv") if p.is_file())
    outputs = [dest_p / m.name for m in manifests] + [dest_p / p.name for ps in side.values() for p in ps]
    check_outputs(outputs + [dest_p / p.name for p in csvs], force)

    report = ManifestReport(root=src_dir, dest=dest_p)
    for manifest in manifests:
        try:
            root, rows = read_manifest(str(manifest), check_root=True)
        except ManifestError as e:
            raise PrepError(str(e)) from None
        for row in rows:
            if row.kind == SHARD:
                raise PrepError(f"{manifest}:{row.line}: shard rows cannot be split; split the loose manifests, then pack")
        probes = probe_files(sorted({r.path for r in rows}), workers=workers, quiet=quiet, desc="reading headers")
        rate = {p.path: p for p in probes}
        pieces: list[list[Window]] = []
        seconds = 0.0
        for row in rows:
            probe = rate[row.path]
            if not probe.ok:
                raise PrepError(f"{manifest}:{row.line}: {row.path}: {probe.reason} ({probe.detail})")
            frames = row.num_samples if row.kind == FILE else row.length
            window = max(1, round(window_seconds * probe.samplerate))
            pieces.append(plan_windows(frames, window, round(min_last_seconds * probe.samplerate)))
            seconds += sum(w.length for w in pieces[-1]) / probe.samplerate

        def windowed(rows: list[ManifestRow] = rows, pieces: list[list[Window]] = pieces):
            for row, windows in zip(rows, pieces):
                if len(windows) == 1 and windows[0].start == 0:
                    yield row.rel, row.num_samples
                    continue
                rel = parse_address(row.rel)[0]
                base = row.offset if row.kind != FILE else 0
                for w in windows:
                    yield f"{rel}:{base + w.start}:{w.length}", w.length

        report.outputs.append(write_manifest(dest_p / manifest.name, root, windowed()))
        report.splits[manifest.stem] = SplitSummary(sum(len(p) for p in pieces), seconds)
        for path in side[manifest]:
            report.outputs.append(_expand_side_file(path, dest_p / path.name, rows, pieces))
    for path in csvs:
        report.outputs.append(write_text_atomic(dest_p / path.name, path.read_text(encoding="utf-8")))
    return report


def _expand_side_file(src: Path, out: Path, rows: list[ManifestRow], pieces: list[list[Window]]) -> Path:
    """Repeat each line of a row-aligned .lbl/.weights file once per window (window ids in .lbl)."""
    lines = [line for line in read_lines(src) if line.strip()]
    if len(lines) != len(rows):
        raise PrepError(f"{src}: {len(lines)} lines but its manifest has {len(rows)} rows")
    is_lbl = src.suffix == ".lbl"

    def expanded():
        for line, row, windows in zip(lines, rows, pieces):
            whole = len(windows) == 1 and windows[0].start == 0
            for w in windows:
                if is_lbl and not whole:
                    clip_id, _, labels = line.partition("\t")
                    clip_id = clip_id.rpartition("@")[0] if row.kind != FILE and "@" in clip_id else clip_id
                    base = row.offset if row.kind != FILE else 0
                    yield f"{window_id(clip_id, base + w.start)}\t{labels}\n"
                else:
                    yield f"{line}\n"

    return write_text_atomic(out, expanded())


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("Split the long recordings of every manifest in MANIFEST_DIR into fixed windows "
                    "(rows path:START:LENGTH that address a span of a file).", OUTPUT_FORMAT)
    parser.add_argument("manifest_dir", metavar="MANIFEST_DIR", help="folder with {split}.tsv (+ .lbl, .weights)")
    parser.add_argument("--dest", required=True, metavar="DIR", help="output folder (created)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--frames", type=int, default=DEFAULT_TARGET_LENGTH, metavar="N",
                      help="window length in fbank frames, as task.target_length (default: %(default)s)")
    size.add_argument("--window", type=float, metavar="SECONDS", help="window length in seconds instead")
    parser.add_argument("--min-last", type=float, default=1.0, metavar="SECONDS",
                        help="keep a last partial window of at least this length (default: %(default)s)")
    add_common_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.window is None and args.frames < 1:
        print("error: --frames must be positive", file=sys.stderr)
        return 2
    seconds = args.window if args.window is not None else frames_to_seconds(args.frames)
    return run_cli(lambda: split_manifests(args.manifest_dir, args.dest, window_seconds=seconds,
                                           min_last_seconds=args.min_last, workers=args.workers,
                                           force=args.force, quiet=args.quiet), all_or_nothing=True)
