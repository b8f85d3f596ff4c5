"""AudioSet fine-tuning data (AS-20K balanced / AS-2M unbalanced) from segment CSVs and local clips.

AudioSet is distributed as YouTube ids; everyone's local copy misses some clips (deleted videos) and
names files differently. This writer accepts the common namings, lists every segment without usable
audio in ``missing_{split}.tsv`` instead of failing, and writes the balanced-sampling weights the
AS-2M recipe needs.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eat_fairseq.prep.balanced_weights import balanced_weights
from eat_fairseq.prep.common import (
    AUDIO_EXTS,
    Entry,
    Excluded,
    ManifestReport,
    PrepError,
    add_common_args,
    check_outputs,
    find_audio,
    format_label_descriptors,
    format_weights,
    new_parser,
    probe_entries,
    run_cli,
    write_split,
    write_text_atomic,
)

HELP_EPILOG = """\
inputs:
  --segments   AudioSet segment CSV(s) (balanced_train_segments.csv, eval_segments.csv, ...): lines
               starting with '#' are comments, rows are YTID, start_seconds, end_seconds, "mid1,mid2".
               Several files are concatenated in the given order; a YTID seen again is skipped.
  --audio-dir  searched recursively for a clip of each segment; accepted names, in this order of
               preference: {YTID}_{start:.3f}.EXT (e.g. --PJHxphWEs_30.000.wav), Y{YTID}.EXT,
               {YTID}.EXT, with EXT one of wav, flac, mp3, ogg (any case). When several files share
               a name, the first in sorted path order is used.
  --labels     class_labels_indices.csv (header index,mid,display_name).
outputs (in DEST):
  {split}.tsv            line 1 the absolute --audio-dir, then relative/path<TAB>n_samples, in segment order
  {split}.lbl            YTID<TAB>mid1,mid2,...  (one line per manifest row)
  {split}.weights        one float per manifest row: sum over its labels of 1000 / (count + 0.01),
                         count = rows of this split carrying the label (balanced sampling)
  missing_{split}.tsv    header ytid, start_seconds, end_seconds, reason, detail; one line per segment
                         left out: no-audio, no-known-labels (all its MIDs absent from --labels), or
                         the audio check's reason (empty-file, not-audio, zero-length, read-error, ...)
  label_descriptors.csv  index,mid,display_name (no header; display names CSV-quoted when needed).
                         Shared by all splits: an identical existing file is left as is.
Existing outputs are not overwritten without --force.
exit status: 0 written, 1 no usable audio, 2 bad arguments/input or outputs in the way."""

SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Segment:
    ytid: str
    start: str
    end: str
    labels: tuple[str, ...]


def read_segments(path: str | os.PathLike) -> list[Segment]:
    """Rows of an AudioSet segment CSV; raises ``PrepError`` naming the line of a malformed row."""
    segments = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise PrepError(f"cannot read {path}: {exc}") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = next(csv.reader([line], skipinitialspace=True))
        if len(fields) != 4:
            raise PrepError(f"{path}:{lineno}: expected YTID, start, end, \"labels\"; found {line[:100]!r}")
        ytid, start, end, labels = (x.strip() for x in fields)
        try:
            float(start), float(end)
        except ValueError:
            raise PrepError(f"{path}:{lineno}: start/end are not numbers: {line[:100]!r}") from None
        if not ytid or any(c in ytid for c in ",\t/"):
            raise PrepError(f"{path}:{lineno}: bad YTID {ytid!r}")
        segments.append(Segment(ytid, start, end, tuple(x.strip() for x in labels.split(",") if x.strip())))
    return segments


def read_class_labels(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(mid, display_name)`` in index order from AudioSet's ``class_labels_indices.csv``."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"index", "mid", "display_name"} <= set(reader.fieldnames):
                raise PrepError(f"{path}: expected a header index,mid,display_name")
            rows = [(int(r["index"]), r["mid"].strip(), r["display_name"].strip()) for r in reader]
    except OSError as exc:
        raise PrepError(f"cannot read {path}: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise PrepError(f"{path}: malformed row ({exc})") from exc
    rows.sort()
    if [r[0] for r in rows] != list(range(len(rows))) or not rows:
        raise PrepError(f"{path}: indices must be 0..N-1, each once")
    return [(mid, name) for _, mid, name in rows]


def candidate_stems(segment: Segment) -> list[str]:
    """File names (without extension) a clip of ``segment`` may have, most specific first."""
    return [f"{segment.ytid}_{float(segment.start):.3f}", f"Y{segment.ytid}", segment.ytid]


def index_audio(audio_dir: str) -> dict[str, str]:
    """File name without extension -> relative path (first in sorted order when names repeat)."""
    index: dict[str, str] = {}
    for rel in find_audio(audio_dir, AUDIO_EXTS):
        stem = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        index.setdefault(stem, rel)
    return index


def write_audioset_manifest(
    segments: Sequence[str | os.PathLike],
    split_name: str,
    audio_dir: str | os.PathLike,
    labels: str | os.PathLike,
    dest: str | os.PathLike,
    workers: int = 1,
    force: bool = False,
    quiet: bool = True,
) -> ManifestReport:
    """Write ``{split}.tsv/.lbl/.weights``, ``missing_{split}.tsv`` and ``label_descriptors.csv``."""
    if not SPLIT_NAME.fullmatch(split_name):
        raise PrepError(f"bad split name {split_name!r} (letters, digits, '_', '-', '.')")
    root = os.path.abspath(os.fspath(audio_dir))
    dest_p = Path(os.path.abspath(os.fspath(dest)))
    if not os.path.isdir(root):
        raise PrepError(f"audio dir {root} is not a directory")
    classes = read_class_labels(labels)
    descriptors = format_label_descriptors(classes)
    outputs = {name: dest_p / name for name in
               (f"{split_name}.tsv", f"{split_name}.lbl", f"{split_name}.weights",
                f"missing_{split_name}.tsv", "label_descriptors.csv")}
    check_outputs(outputs.values(), force, same_content_ok={outputs["label_descriptors.csv"]: descriptors})

    report = ManifestReport(root=Path(root), dest=dest_p)
    known = {mid for mid, _ in classes}
    ordered: list[Segment] = []
    seen: set[str] = set()
    duplicates = 0
    for path in segments:
        for seg in read_segments(path):
            if seg.ytid in seen:
                duplicates += 1
                continue
            seen.add(seg.ytid)
            ordered.append(seg)
    if duplicates:
        report.notes.append(f"{duplicates} segment(s) with an already listed YTID skipped")

    missing: list[tuple[Segment, str, str]] = []
    unknown: set[str] = set()
    files = index_audio(root)
    candidates: list[tuple[str, str, tuple[str, ...]]] = []
    seg_of: dict[str, Segment] = {}
    for seg in ordered:
        mids = tuple(m for m in seg.labels if m in known)
        unknown.update(m for m in seg.labels if m not in known)
        rel = next((files[s] for s in candidate_stems(seg) if s in files), None)
        if not mids:
            missing.append((seg, "no-known-labels", ",".join(seg.labels)))
        elif rel is None:
            missing.append((seg, "no-audio", ""))
        elif rel in seg_of:
            missing.append((seg, "no-audio", f"{rel} is already used by {seg_of[rel].ytid}"))
        else:
            seg_of[rel] = seg
            candidates.append((rel, seg.ytid, mids))
    if unknown:
        report.notes.append(f"{len(unknown)} label(s) not in {labels} dropped: "
                            + ",".join(sorted(unknown)[:10]) + (" ..." if len(unknown) > 10 else ""))

    usable = probe_entries(root, candidates, workers, quiet, report)
    for bad in report.excluded:
        missing.append((seg_of[bad.path], bad.reason, f"{bad.path}: {bad.detail}"))
    entries: list[Entry] = [usable[rel] for rel, _, _ in candidates if rel in usable]

    write_split(dest_p, split_name, root, entries, report)
    report.outputs.append(write_text_atomic(
        outputs[f"{split_name}.weights"], format_weights(balanced_weights([e.labels for e in entries]))))
    order = {seg.ytid: i for i, seg in enumerate(ordered)}
    missing.sort(key=lambda m: order[m[0].ytid])
    report.outputs.append(write_text_atomic(outputs[f"missing_{split_name}.tsv"], [
        "ytid\tstart_seconds\tend_seconds\treason\tdetail\n",
        *(f"{s.ytid}\t{s.start}\t{s.end}\t{reason}\t{' '.join(detail.split())}\n"
          for s, reason, detail in missing)]))
    report.outputs.append(write_text_atomic(outputs["label_descriptors.csv"], descriptors))
    report.excluded = [Excluded(s.ytid, reason, detail) for s, reason, detail in missing]
    if missing:
        report.notes.append(f"{len(missing)} of {len(ordered)} segment(s) left out, listed in "
                            f"{outputs[f'missing_{split_name}.tsv']}")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("Write an AudioSet fine-tuning split (tsv, lbl, weights) from segment CSVs.", HELP_EPILOG)
    parser.add_argument("--segments", required=True, action="append", metavar="CSV",
                        help="segment CSV; repeat to concatenate several")
    parser.add_argument("--split-name", required=True, metavar="NAME", help="e.g. train, eval, train_2m")
    parser.add_argument("--audio-dir", required=True, metavar="DIR", help="folder holding the clips")
    parser.add_argument("--labels", required=True, metavar="CSV", help="class_labels_indices.csv")
    parser.add_argument("--dest", required=True, metavar="DIR", help="output folder (created)")
    add_common_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: write_audioset_manifest(
        args.segments, args.split_name, args.audio_dir, args.labels, args.dest,
        workers=args.workers, force=args.force, quiet=args.quiet), all_or_nothing=True)
