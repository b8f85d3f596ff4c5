"""Free Spoken Digit Dataset (FSDD): 10 spoken digits, the project's small real-data example.

FSDD defines its own test set (takes 0-4 of every speaker and digit); this writer keeps it and carves
a validation set out of the training takes by take number, so no speaker/digit pair is missing from
any split and the split never depends on a seed.
"""
from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path

from eat_fairseq.prep.common import (
    BAD_NAME,
    Excluded,
    ManifestReport,
    PrepError,
    add_common_args,
    check_outputs,
    format_label_descriptors,
    has_ext,
    new_parser,
    probe_entries,
    run_cli,
    write_excluded,
    write_split,
    write_text_atomic,
)

HELP_EPILOG = """\
input: RECORDINGS_DIR/{digit}_{speaker}_{take}.wav (the recordings/ folder of FSDD, not recursive).
--split-by take (default): 0-4 -> test (FSDD's own test set), 5-9 -> valid, 10 and above -> train.
--split-by speaker: one split per speaker, named after the speaker ({speaker}.tsv/.lbl, e.g.
  jackson.tsv), for leave-one-speaker-out evaluation (eat-probe --data DEST --folds auto).
outputs (in DEST, shown for --split-by take):
  train.tsv, valid.tsv, test.tsv   line 1 the absolute RECORDINGS_DIR, then file.wav<TAB>n_samples,
                                   sorted by file name (FSDD is 8 kHz; n_samples are 8 kHz frames)
  train.lbl, valid.lbl, test.lbl   clip_id<TAB>digit, clip_id = file name without .wav
  label_descriptors.csv            index,digit,word (no header): 0,0,zero ... 9,9,nine
  excluded.tsv                     header path, reason, detail; badly named or unreadable files
Existing outputs are not overwritten without --force.
exit status: 0 written, 1 no usable audio, 2 bad arguments/input or outputs in the way."""

NAME = re.compile(r"(\d)_([A-Za-z0-9]+)_(\d+)\.wav", re.IGNORECASE)
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "valid", "test")


def split_of_take(take: int) -> str:
    """FSDD's test set is takes 0-4; takes 5-9 are held out of training for validation."""
    return "test" if take < 5 else "valid" if take < 10 else "train"


SPLIT_BY = ("take", "speaker")


def write_fsdd_manifests(
    recordings: str | os.PathLike,
    dest: str | os.PathLike,
    workers: int = 1,
    force: bool = False,
    quiet: bool = True,
    split_by: str = "take",
) -> ManifestReport:
    """Write the split tsv+lbl files, ``label_descriptors.csv`` and ``excluded.tsv``.

    ``split_by="take"``: train/valid/test by take number; ``"speaker"``: one split per speaker.
    """
    if split_by not in SPLIT_BY:
        raise PrepError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
    root = os.path.abspath(os.fspath(recordings))
    dest_p = Path(os.path.abspath(os.fspath(dest)))
    if not os.path.isdir(root):
        raise PrepError(f"{root} is not a directory")

    report = ManifestReport(root=Path(root), dest=dest_p)
    candidates = []
    split_of: dict[str, str] = {}
    for name in sorted(os.listdir(root)):
        if not (has_ext(name, ("wav",)) and os.path.isfile(os.path.join(root, name))):
            continue
        match = NAME.fullmatch(name)
        if match is None:
            report.excluded.append(Excluded(name, BAD_NAME, "not {digit}_{speaker}_{take}.wav"))
            continue
        candidates.append((name, name.rsplit(".", 1)[0], (match.group(1),)))
        split_of[name] = split_of_take(int(match.group(3))) if split_by == "take" else match.group(2).lower()
    splits = SPLITS if split_by == "take" else tuple(sorted(set(split_of.values())))
    outputs = [dest_p / f"{s}{ext}" for s in splits for ext in (".tsv", ".lbl")]
    outputs += [dest_p / "label_descriptors.csv", dest_p / "excluded.tsv"]
    check_outputs(outputs, force)
    usable = probe_entries(root, candidates, workers, quiet, report)
    for split in splits:
        entries = [usable[n] for n, _, _ in candidates if n in usable and split_of[n] == split]
        write_split(dest_p, split, root, entries, report)
    report.outputs.append(write_text_atomic(
        dest_p / "label_descriptors.csv", format_label_descriptors([(str(d), w) for d, w in enumerate(WORDS)])))
    report.excluded.sort(key=lambda e: e.path)
    report.outputs.append(write_excluded(dest_p / "excluded.tsv", report.excluded))
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("Write Free Spoken Digit Dataset manifests (train/valid/test by take number).", HELP_EPILOG)
    parser.add_argument("recordings", metavar="RECORDINGS_DIR", help="FSDD's recordings/ folder")
    parser.add_argument("--dest", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--split-by", choices=SPLIT_BY, default="take",
                        help="take: train/valid/test by take number (default); speaker: one split per speaker")
    add_common_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: write_fsdd_manifests(args.recordings, args.dest, workers=args.workers,
                                                force=args.force, quiet=args.quiet, split_by=args.split_by),
                   all_or_nothing=True)
