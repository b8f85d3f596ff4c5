"""Manifests for self-supervised pre-training from any folder tree of audio files (no labels).

Every candidate file is opened, because a file that cannot be decoded should be found now, listed
with a reason in ``excluded.tsv``, and kept out of the manifest, not crash a training run later.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from eat_fairseq.prep.common import (
    AUDIO_EXTS,
    BAD_NAME,
    READ_ERROR,
    Excluded,
    ManifestReport,
    PrepError,
    SplitSummary,
    add_common_args,
    bad_name_reason,
    check_outputs,
    find_audio,
    in_valid_split,
    new_parser,
    normalize_exts,
    probe_files,
    run_cli,
    write_excluded,
    write_manifest,
)

OUTPUT_FORMAT = """\
outputs (in DEST):
  train.tsv, valid.tsv  line 1: the absolute ROOT; then one row per file, sorted by path:
                        relative/path<TAB>n_samples   (frames at the file's native sample rate)
  excluded.tsv          header "path<TAB>reason<TAB>detail", then one line per file left out;
                        reasons: empty-file, not-audio, zero-length, too-short (under one
                        25 ms fbank frame), read-error, non-finite, bad-name (tab/newline in
                        the path), missing (vanished while running)

The valid split is chosen per file from a hash of --seed and its relative path, so it is the same on
every run and a file never changes split when other files are added; the valid share is
--valid-percent in expectation. With --valid-percent 0, valid.tsv holds only the root line.
Existing outputs are not overwritten without --force (exit status 2).
exit status: 0 written, 1 no usable audio, 2 bad arguments or outputs in the way."""


def write_audio_folder_manifest(
    root: str | os.PathLike,
    dest: str | os.PathLike,
    exts: str | Iterable[str] = AUDIO_EXTS,
    valid_percent: float = 1.0,
    seed: int = 0,
    workers: int = 1,
    force: bool = False,
    quiet: bool = True,
) -> ManifestReport:
    """Find audio under ``root``, open every file, write ``train.tsv``/``valid.tsv``/``excluded.tsv``.

    Raises ``PrepError`` for a missing root or a bad ``valid_percent`` and ``OutputExistsError``
    when an output exists and ``force`` is False (checked before any file is opened).
    """
    root_s = os.path.abspath(os.fspath(root))
    dest_p = Path(os.path.abspath(os.fspath(dest)))
    if not os.path.isdir(root_s):
        raise PrepError(f"root {root_s} is not a directory")
    if not 0.0 <= valid_percent <= 100.0:
        raise PrepError(f"--valid-percent must be within [0, 100], got {valid_percent}")
    exts_t = normalize_exts(exts)
    outputs = [dest_p / "train.tsv", dest_p / "valid.tsv", dest_p / "excluded.tsv"]
    check_outputs(outputs, force)

    report = ManifestReport(root=Path(root_s), dest=dest_p)
    candidates: list[str] = []
    for rel in find_audio(root_s, exts_t):
        why = bad_name_reason(rel)
        if why:
            report.excluded.append(Excluded(rel, BAD_NAME, why))
        else:
            candidates.append(rel)
    probes = probe_files([os.path.join(root_s, rel) for rel in candidates], workers=workers,
                         quiet=quiet, desc="opening audio")

    train: list[tuple[str, int]] = []
    valid: list[tuple[str, int]] = []
    seconds = {"train": 0.0, "valid": 0.0}
    for rel, probe in zip(candidates, probes):
        if not probe.ok:
            report.excluded.append(Excluded(rel, probe.reason or READ_ERROR, probe.detail))
            continue
        split = "valid" if in_valid_split(rel, seed, valid_percent) else "train"
        (valid if split == "valid" else train).append((rel, probe.frames))
        seconds[split] += probe.seconds
    report.excluded.sort(key=lambda e: e.path)

    report.outputs.append(write_manifest(outputs[0], root_s, train))
    report.outputs.append(write_manifest(outputs[1], root_s, valid))
    report.outputs.append(write_excluded(outputs[2], report.excluded))
    report.splits["train"] = SplitSummary(len(train), seconds["train"])
    report.splits["valid"] = SplitSummary(len(valid), seconds["valid"])
    if valid_percent > 0 and not valid and train:
        report.notes.append("the valid split is empty (too few files for --valid-percent)")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("Write fairseq audio manifests (train/valid) for every readable audio file under "
                    "ROOT, searched recursively.", OUTPUT_FORMAT)
    parser.add_argument("root", metavar="ROOT", help="folder searched recursively for audio")
    parser.add_argument("--dest", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--ext", default=",".join(AUDIO_EXTS), metavar="EXTS",
                        help="comma-separated extensions, case-insensitive (default: %(default)s)")
    parser.add_argument("--valid-percent", type=float, default=1.0, metavar="P",
                        help="percentage of files for valid.tsv, 0-100 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of the train/valid assignment (default: %(default)s)")
    add_common_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: write_audio_folder_manifest(
        args.root, args.dest, exts=args.ext, valid_percent=args.valid_percent, seed=args.seed,
        workers=args.workers, force=args.force, quiet=args.quiet), all_or_nothing=True)

