"""Speech Commands v2 (SPC-2, 35 words) with its official train/valid/test split.

The official split is defined by the two list files shipped with the corpus (files in neither list
are training data); keeping to it is what makes accuracies comparable with published numbers.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from eat_fairseq.prep.common import (
    ManifestReport,
    PrepError,
    add_common_args,
    new_parser,
    run_cli,
)
from eat_fairseq.prep.labeled_folder import (
    scan_class_folders,
    split_from_lists,
    write_class_manifests,
)

HELP_EPILOG = """\
input: SPC_DIR/<word>/*.wav (35 words in v2), SPC_DIR/validation_list.txt and testing_list.txt
(paths relative to SPC_DIR). _background_noise_ (and any folder starting with '_' or '.') is ignored.
Files in testing_list.txt -> test, in validation_list.txt -> valid, all others -> train.
outputs (in DEST):
  train.tsv, valid.tsv, test.tsv   line 1 the absolute SPC_DIR, then word/file.wav<TAB>n_samples,
                                   sorted by path
  train.lbl, valid.lbl, test.lbl   clip_id<TAB>word, clip_id = word/file without .wav (file names
                                   repeat across words, so the word is part of the id)
  label_descriptors.csv            index,word (no header), words in sorted order
  excluded.tsv                     header path, reason, detail; listed-but-missing or unreadable files
Existing outputs are not overwritten without --force.
exit status: 0 written, 1 no usable audio, 2 bad arguments/input or outputs in the way."""

NUM_CLASSES_V2 = 35


def write_speech_commands_manifests(
    spc_dir: str | os.PathLike,
    dest: str | os.PathLike,
    workers: int = 1,
    force: bool = False,
    quiet: bool = True,
) -> ManifestReport:
    """Write train/valid/test tsv+lbl, ``label_descriptors.csv`` and ``excluded.tsv``."""
    root = os.path.abspath(os.fspath(spc_dir))
    dest_p = Path(os.path.abspath(os.fspath(dest)))
    lists = {"test": os.path.join(root, "testing_list.txt"), "valid": os.path.join(root, "validation_list.txt")}
    for path in lists.values():
        if not os.path.isfile(path):
            raise PrepError(f"{path} not found (is {root} a Speech Commands folder?)")
    assign = split_from_lists(lists)
    notes = []
    if os.path.isdir(root):
        classes, _, _ = scan_class_folders(root, ("wav",))
        if len(classes) != NUM_CLASSES_V2:
            notes.append(f"found {len(classes)} word folders; Speech Commands v2 has {NUM_CLASSES_V2}")
    return write_class_manifests(root, dest_p, ["train", "valid", "test"], assign, "train", ("wav",),
                                 workers, force, quiet, notes)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("Write Speech Commands v2 manifests with the official train/valid/test split.", HELP_EPILOG)
    parser.add_argument("spc_dir", metavar="SPC_DIR", help="the extracted speech_commands_v0.02 folder")
    parser.add_argument("--dest", required=True, metavar="DIR", help="output folder (created)")
    add_common_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: write_speech_commands_manifests(args.spc_dir, args.dest, workers=args.workers,
                                                           force=args.force, quiet=args.quiet), all_or_nothing=True)

