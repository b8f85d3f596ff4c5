"""Single-label classification data from a folder with one sub-folder per class.

This is the layout most small corpora (and Speech Commands) ship in, so one writer covers them: the
class is the top-level folder name, and the split comes either from path lists shipped with the
corpus or from a seeded hash of each path.
"""
from __future__ import annotations

import argparse
import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from eat_fairseq.prep.common import (
    AUDIO_EXTS,
    MISSING,
    Excluded,
    ManifestReport,
    PrepError,
    add_common_args,
    check_label_token,
    check_outputs,
    clip_id_from_path,
    find_audio,
    format_label_descriptors,
    in_valid_split,
    new_parser,
    normalize_exts,
    probe_entries,
    read_lines,
    run_cli,
    write_excluded,
    write_split,
    write_text_atomic,
)

HELP_EPILOG = """\
input: ROOT/<class>/**/*.{wav,flac,mp3,ogg}; every top-level folder whose name does not start with
'.' or '_' is a class (so _background_noise_ and the like are ignored); files directly in ROOT are
ignored. Split, either:
  --valid-percent P --seed S   each file goes to valid with probability P% from a hash of S and its
                               path (deterministic, stable when files are added); no test split
  --train-list F --valid-list F [--test-list F]
                               files listed (paths relative to ROOT, one per line, '#' comments);
                               files in no list are left out (reason "unlisted")
outputs (in DEST):
  {split}.tsv            line 1 the absolute ROOT, then class/file.wav<TAB>n_samples, sorted by path
  {split}.lbl            clip_id<TAB>class, clip_id = the relative path without extension
  label_descriptors.csv  index,class (no header), classes in sorted order
  excluded.tsv           header path, reason, detail; files left out and why
Existing outputs are not overwritten without --force.
exit status: 0 written, 1 no usable audio, 2 bad arguments/input or outputs in the way."""

UNLISTED = "unlisted"


def scan_class_folders(root: str, exts: Sequence[str] = AUDIO_EXTS) -> tuple[list[str], list[str], int]:
    """``(classes, relative paths of their audio, files ignored directly in root)``, all sorted."""
    classes, files = [], []
    ignored = 0
    for name in sorted(os.listdir(root)):
        full = os.path.join(root, name)
        if not os.path.isdir(full):
            ignored += int(os.path.isfile(full) and "." in name and name.rsplit(".", 1)[1].lower() in exts)
            continue
        if name.startswith((".", "_")):
            continue
        found = [f"{name}/{rel}" for rel in find_audio(full, exts)]
        if found:
            check_label_token(name, "class folder name")
            classes.append(name)
            files.extend(found)
    return classes, sorted(files), ignored


def read_path_list(path: str | os.PathLike) -> list[str]:
    """Relative paths of a split list (one per line; blank lines and '#' comments skipped)."""
    try:
        lines = read_lines(path)
    except OSError as exc:
        raise PrepError(f"cannot read {path}: {exc}") from exc
    out = []
    for line in lines:
        item = line.strip()
        if item and not item.startswith("#"):
            out.append(posixpath.normpath(item.replace("\\", "/")))
    return out


def split_from_lists(lists: Mapping[str, str | os.PathLike]) -> dict[str, str]:
    """Relative path -> split name, from ``{split: list file}``; a path in two lists is an error."""
    split_of: dict[str, str] = {}
    for split, path in lists.items():
        for rel in read_path_list(path):
            other = split_of.setdefault(rel, split)
            if other != split:
                raise PrepError(f"{rel} is listed for both {other} and {split}")
    return split_of


def write_class_manifests(
    root: str,
    dest: Path,
    splits: Sequence[str],
    assign: Mapping[str, str] | None,
    default_split: str | None,
    exts: Sequence[str],
    workers: int,
    force: bool,
    quiet: bool,
    notes: Iterable[str] = (),
) -> ManifestReport:
    """Shared body of the class-folder writers.

    ``assign`` maps relative paths to splits (None: every file goes to ``default_split``); files it
    does not map go to ``default_split``, or are excluded as unlisted when that is None. Paths it
    maps that are not on disk are excluded as missing.
    """
    if not os.path.isdir(root):
        raise PrepError(f"{root} is not a directory")
    outputs = [dest / f"{s}{ext}" for s in splits for ext in (".tsv", ".lbl")]
    outputs += [dest / "label_descriptors.csv", dest / "excluded.tsv"]
    check_outputs(outputs, force)

    classes, files, ignored = scan_class_folders(root, exts)
    if not classes:
        raise PrepError(f"no class folders with audio found in {root}")
    report = ManifestReport(root=Path(root), dest=dest, notes=list(notes))
    if ignored:
        report.notes.append(f"{ignored} audio file(s) directly in the root ignored (not in a class folder)")
    on_disk = set(files)
    split_of: dict[str, str] = {}
    for rel in files:
        split = (assign or {}).get(rel, default_split)
        if split is None:
            report.excluded.append(Excluded(rel, UNLISTED, "in none of the split lists"))
        else:
            split_of[rel] = split
    for rel, split in sorted((assign or {}).items()):
        if rel not in on_disk:
            report.excluded.append(Excluded(rel, MISSING, f"listed for {split}, not found"))

    candidates = [(rel, clip_id_from_path(rel), (rel.split("/", 1)[0],)) for rel in files if rel in split_of]
    usable = probe_entries(root, candidates, workers, quiet, report)
    for split in splits:
        entries = [usable[rel] for rel, _, _ in candidates if rel in usable and split_of[rel] == split]
        write_split(dest, split, root, entries, report)
    report.outputs.append(write_text_atomic(dest / "label_descriptors.csv",
                                            format_label_descriptors([(c, None) for c in classes])))
    report.excluded.sort(key=lambda e: e.path)
    report.outputs.append(write_excluded(dest / "excluded.tsv", report.excluded))
    report.notes.append(f"{len(classes)} classes")
    return report


def write_labeled_folder_manifests(
    root: str | os.PathLike,
    dest: str | os.PathLike,
    valid_percent: float = 10.0,
    seed: int = 0,
    train_list: str | os.PathLike | None = None,
    valid_list: str | os.PathLike | None = None,
    test_list: str | os.PathLike | None = None,
    exts: str | Iterable[str] = AUDIO_EXTS,
    workers: int = 1,
    force: bool = False,
    quiet: bool = True,
) -> ManifestReport:
    """Write train/valid[/test] tsv+lbl, ``label_descriptors.csv`` and ``excluded.tsv``."""
    root_s = os.path.abspath(os.fspath(root))
    dest_p = Path(os.path.abspath(os.fspath(dest)))
    exts_t = normalize_exts(exts)
    if (train_list is None) != (valid_list is None) or (test_list is not None and train_list is None):
        raise PrepError("give --train-list and --valid-list together (and optionally --test-list)")
    if train_list is not None:
        lists = {"train": train_list, "valid": valid_list}
        if test_list is not None:
            lists["test"] = test_list
        return write_class_manifests(root_s, dest_p, list(lists), split_from_lists(lists), None,
                                     exts_t, workers, force, quiet)
    if not 0.0 <= valid_percent <= 100.0:
        raise PrepError(f"--valid-percent must be within [0, 100], got {valid_percent}")
    assign = None
    if os.path.isdir(root_s):
        _, files, _ = scan_class_folders(root_s, exts_t)
        assign = {rel: "valid" if in_valid_split(rel, seed, valid_percent) else "train" for rel in files}
    return write_class_manifests(root_s, dest_p, ["train", "valid"], assign, "train",
                                 exts_t, workers, force, quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("Write classification manifests for a folder with one sub-folder per class.", HELP_EPILOG)
    parser.add_argument("root", metavar="ROOT", help="folder holding one sub-folder per class")
    parser.add_argument("--dest", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--valid-percent", type=float, metavar="P",
                        help="percentage of files for valid (default: 10)")
    parser.add_argument("--seed", type=int, metavar="S", help="split seed (default: 0)")
    parser.add_argument("--train-list", metavar="F", help="paths of the training files")
    parser.add_argument("--valid-list", metavar="F", help="paths of the validation files")
    parser.add_argument("--test-list", metavar="F", help="paths of the test files (optional)")
    parser.add_argument("--ext", default=",".join(AUDIO_EXTS), metavar="EXTS",
                        help="comma-separated extensions, case-insensitive (default: %(default)s)")
    add_common_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    lists = (args.train_list, args.valid_list, args.test_list)
    if any(x is not None for x in lists) and (args.valid_percent is not None or args.seed is not None):
        parser.error("--valid-percent/--seed and the --*-list options exclude each other")
    return run_cli(lambda: write_labeled_folder_manifests(
        args.root, args.dest, valid_percent=10.0 if args.valid_percent is None else args.valid_percent,
        seed=0 if args.seed is None else args.seed,
        train_list=args.train_list, valid_list=args.valid_list, test_list=args.test_list,
        exts=args.ext, workers=args.workers, force=args.force, quiet=args.quiet), all_or_nothing=True)
