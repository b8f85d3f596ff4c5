"""ESC-50 five-fold cross-validation data directories (one per held-out fold).

ESC-50 results are the mean accuracy over the 5 official folds (docs/reference.md section 4), so a run is
needed per fold; one self-contained data directory per fold keeps each run's config a single path.
"""
from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Sequence
from pathlib import Path

from eat_fairseq.prep.common import (
    ManifestReport,
    PrepError,
    add_common_args,
    check_outputs,
    format_label_descriptors,
    new_parser,
    probe_entries,
    run_cli,
    write_excluded,
    write_split,
    write_text_atomic,
)

HELP_EPILOG = """\
input: ESC50_DIR/meta/esc50.csv (header filename,fold,target,category,esc10,src_file,take) and the
clips in ESC50_DIR/audio/.
outputs, for every fold k listed in the CSV (1-5 for ESC-50):
  DEST/fold{k}/train.tsv, train.lbl   clips of the other folds
  DEST/fold{k}/eval.tsv,  eval.lbl    clips of fold k
  DEST/fold{k}/label_descriptors.csv  index,target,category (no header; index = target)
  DEST/excluded.tsv                   header path, reason, detail; clips missing or unreadable
Manifests: line 1 the absolute ESC50_DIR/audio, then file.wav<TAB>n_samples, sorted by file name.
Labels: clip_id<TAB>target, clip_id = file name without .wav, target = the class index as a string.
Existing outputs are not overwritten without --force.
exit status: 0 written, 1 no usable audio, 2 bad arguments/input or outputs in the way."""


def read_esc50_meta(path: str | os.PathLike) -> list[tuple[str, int, int, str]]:
    """``(filename, fold, target, category)`` rows of ``meta/esc50.csv``."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            need = {"filename", "fold", "target", "category"}
            if reader.fieldnames is None or not need <= set(reader.fieldnames):
                raise PrepError(f"{path}: expected a header with {','.join(sorted(need))}")
            return [(r["filename"].strip(), int(r["fold"]), int(r["target"]), r["category"].strip())
                    for r in reader]
    except OSError as exc:
        raise PrepError(f"cannot read {path}: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise PrepError(f"{path}: malformed row ({exc})") from exc


def write_esc50_manifests(
    esc50_dir: str | os.PathLike,
    dest: str | os.PathLike,
    workers: int = 1,
    force: bool = False,
    quiet: bool = True,
) -> ManifestReport:
    """Write ``fold{k}/{train,eval}.{tsv,lbl}`` and ``label_descriptors.csv`` for every fold."""
    base = os.path.abspath(os.fspath(esc50_dir))
    root = os.path.join(base, "audio")
    dest_p = Path(os.path.abspath(os.fspath(dest)))
    if not os.path.isdir(root):
        raise PrepError(f"{root} is not a directory (expected ESC50_DIR/audio)")
    rows = sorted(read_esc50_meta(os.path.join(base, "meta", "esc50.csv")))
    if not rows:
        raise PrepError("meta/esc50.csv lists no clips")
    category: dict[int, str] = {}
    for name, _, target, cat in rows:
        if category.setdefault(target, cat) != cat:
            raise PrepError(f"target {target} has two categories: {category[target]!r} and {cat!r}")
    if sorted(category) != list(range(len(category))):
        raise PrepError("targets must be 0..N-1 (they are used as class indices)")
    descriptors = format_label_descriptors([(str(t), category[t]) for t in range(len(category))])
    folds = sorted({fold for _, fold, _, _ in rows})

    outputs = [dest_p / "excluded.tsv"]
    for k in folds:
        outputs += [dest_p / f"fold{k}" / name for name in
                    ("train.tsv", "train.lbl", "eval.tsv", "eval.lbl", "label_descriptors.csv")]
    check_outputs(outputs, force)

    report = ManifestReport(root=Path(root), dest=dest_p)
    candidates = [(name, name.rsplit(".", 1)[0], (str(target),)) for name, _, target, _ in rows]
    usable = probe_entries(root, candidates, workers, quiet, report)
    for k in folds:
        fold_dir = dest_p / f"fold{k}"
        train = [usable[n] for n, fold, _, _ in rows if fold != k and n in usable]
        held_out = [usable[n] for n, fold, _, _ in rows if fold == k and n in usable]
        write_split(fold_dir, "train", root, train, report)
        write_split(fold_dir, "eval", root, held_out, report)
        report.outputs.append(write_text_atomic(fold_dir / "label_descriptors.csv", descriptors))
    report.outputs.append(write_excluded(dest_p / "excluded.tsv", report.excluded))
    report.notes.append(f"{len(category)} classes, folds {','.join(map(str, folds))}")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("Write ESC-50 cross-validation data directories (one per fold).", HELP_EPILOG)
    parser.add_argument("esc50_dir", metavar="ESC50_DIR", help="folder holding meta/ and audio/")
    parser.add_argument("--dest", required=True, metavar="DIR", help="output folder (created)")
    add_common_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: write_esc50_manifests(args.esc50_dir, args.dest, workers=args.workers,
                                                 force=args.force, quiet=args.quiet), all_or_nothing=True)
