"""Check an existing manifest (and optionally its labels) before spending GPU hours on it.

Manifests are often edited by hand, concatenated, or moved between machines; each of those can leave
a wrong root, a stale sample count or a label file that is off by one row. Every problem is reported
with the file and line it is on, so it can be fixed rather than guessed at.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eat_fairseq.data.clips import open_clip
from eat_fairseq.data.labels import LabelError, clip_id_matches, parse_label_line, read_label_descriptors
from eat_fairseq.data.manifest import (
    FILE,
    SHARD,
    SPAN,
    ManifestRow,
    parse_address,
    parse_row,
)
from eat_fairseq.data.shards import shard_members
from eat_fairseq.prep.common import (
    MISSING,
    PROBE_FRAMES,
    TAIL_FRAMES,
    TOO_SHORT,
    _one_line,
    add_common_args,
    new_parser,
    probe_files,
    progress,
    read_lines,
)

HELP_EPILOG = """\
checks:
  MANIFEST  line 1 is an existing directory; every other line (blank lines are skipped, as in
            training) is ADDRESS<TAB>n_samples with a positive integer count; no address is listed
            twice; every file exists, can be decoded,
            and has exactly n_samples frames (soundfile's count at the native rate). ADDRESS is
            relative/path, a span path:START:LENGTH (LENGTH == n_samples, within the file), or a
            shard row shard.zip:OFFSET:LENGTH, whose byte range must be exactly the data of one
            stored (uncompressed) zip member, decodable, with n_samples frames.
  --labels  one line per manifest row, clip_id<TAB>label1,label2,... with a non-empty id and at least
            one label (spaces around ids and labels are ignored, as in training); ids are unique and
            match their row's file as training checks them: the id is the path with or without its
            extension, or the file name with or without extension, or that name is "Y"+id or starts
            with id+"_" (the AudioSet namings). A window (span row) may be named ID@START; a shard
            row is matched through its member's name (the address it was packed from).
  --descriptors  label_descriptors.csv (index,label[,display_name]; a first line that is not an
            index is a header) is read by training's reader: indices exactly 0..C-1, labels
            unique; every label used in --labels is listed in it.
Problems are printed as FILE:LINE: message.
exit status: 0 clean, 1 problems found, 2 bad arguments."""


@dataclass(frozen=True)
class Problem:
    """One defect: ``path`` is the file it is in (manifest, labels or descriptors), ``line`` is
    1-based within that file (0 when it concerns the file as a whole)."""

    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def validate_manifest(
    path: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    descriptors: str | os.PathLike | None = None,
    workers: int = 1,
    quiet: bool = True,
) -> list[Problem]:
    """Return every problem found in the manifest at ``path`` (and ``labels``/``descriptors``),
    ordered by file (manifest, labels, descriptors) and line."""
    mpath = os.fspath(path)
    try:
        lines = read_lines(mpath)
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem(0, mpath, f"cannot read the manifest: {exc}")]
    if not lines:
        return [Problem(0, mpath, "empty file: line 1 must be the root directory")]

    problems: list[Problem] = []
    root = lines[0]
    root_ok = False
    if not root.strip():
        problems.append(Problem(1, mpath, "line 1 must be the root directory, found an empty line"))
    elif "\t" in root:
        problems.append(Problem(1, mpath, "line 1 must be the root directory, found a tab-separated row"))
    elif not os.path.isdir(root):
        problems.append(Problem(1, mpath, f"root directory does not exist: {root}"))
    else:
        root_ok = True

    rows: list[tuple[int, str, int | None]] = []
    # label line k belongs to the k-th data row; blank lines are skipped, as training's row parser skips them
    rel_by_line: dict[int, str] = {}
    row_of_line: dict[int, int] = {}
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        row_of_line[lineno] = len(row_of_line) + 1
        try:
            rel, n = parse_row(line)
        except ValueError as exc:  # the reason training's reader would refuse this row with
            problems.append(Problem(lineno, mpath, str(exc)))
            continue
        if not rel.strip():
            problems.append(Problem(lineno, mpath, "empty path"))
            continue
        rel_by_line[lineno] = rel
        if os.path.isabs(rel):
            problems.append(Problem(lineno, mpath, f"path must be relative to the root: {rel}"))
            continue
        count: int | None = n
        if n <= 0:  # training reads the row, but no clip of 0 samples can be loaded
            problems.append(Problem(lineno, mpath, f"n_samples {n} is not a positive integer: {rel}"))
            count = None
        path, kind, offset, length = parse_address(rel)
        key = posixpath.normpath(path) + (f":{offset}:{length}" if kind != FILE else "")
        if key in seen:
            problems.append(Problem(lineno, mpath, f"duplicate of line {seen[key]}: {rel}"))
            continue
        seen[key] = lineno
        rows.append((lineno, rel, count))

    if root_ok:
        problems += _check_audio(mpath, root, rows, workers, quiet)
    if labels is not None:
        _resolve_shard_members(root, rel_by_line)

    used_labels: dict[str, tuple[str, int]] = {}
    if labels is not None:
        problems += _check_labels(os.fspath(labels), row_of_line, rel_by_line, used_labels)
    if descriptors is not None:
        problems += _check_descriptors(os.fspath(descriptors), used_labels)
    order = {mpath: 0, os.fspath(labels) if labels is not None else "": 1}
    return sorted(problems, key=lambda p: (order.get(p.path, 2), p.line))


def _check_audio(mpath: str, root: str, rows: list[tuple[int, str, int | None]], workers: int,
                 quiet: bool) -> list[Problem]:
    """Open every row's audio: whole files and the files under spans are probed once each, shard
    rows are checked against the zip's member table and decoded."""
    problems: list[Problem] = []
    parsed = [(lineno, rel, n, parse_address(rel)) for lineno, rel, n in rows]
    files = sorted({os.path.join(root, path) for _, _, _, (path, kind, _, _) in parsed if kind != SHARD})
    probe_of = dict(zip(files, probe_files(files, workers=workers, quiet=quiet, desc="checking audio")))
    shard_rows = [ManifestRow(os.path.join(root, path), n or 0, lineno, kind, offset, length, rel)
                  for lineno, rel, n, (path, kind, offset, length) in parsed if kind == SHARD]
    shard_result = dict(zip([r.line for r in shard_rows], _map(_check_shard_row, shard_rows, workers, quiet)))
    for lineno, rel, n, (path, kind, offset, length) in parsed:
        if kind == SHARD:
            message, frames = shard_result[lineno]
            if message is None and n is not None and frames != n:
                message = f"n_samples is {n} but the member has {frames} frames: {rel}"
            if message is not None:
                problems.append(Problem(lineno, mpath, message))
            continue
        probe = probe_of[os.path.join(root, path)]
        if probe.reason == MISSING:
            problems.append(Problem(lineno, mpath, f"file not found: {rel}"))
        elif probe.reason == TOO_SHORT and kind == FILE:
            problems.append(Problem(lineno, mpath, f"too short ({probe.detail}): {rel}"))
        elif not probe.ok and probe.reason != TOO_SHORT:
            problems.append(Problem(lineno, mpath, f"unreadable ({probe.reason}: {probe.detail}): {rel}"))
        elif kind == SPAN and offset + length > probe.frames:
            problems.append(Problem(lineno, mpath, f"span ends at frame {offset + length} but the file has "
                                                   f"{probe.frames} frames: {rel}"))
        elif kind == FILE and n is not None and probe.frames != n:
            problems.append(Problem(lineno, mpath, f"n_samples is {n} but the file has {probe.frames} frames: {rel}"))
    return problems


def _map(fn, items: list, workers: int, quiet: bool) -> list:
    if workers <= 1 or len(items) < 2:
        return list(progress(map(fn, items), total=len(items), desc="checking shards", quiet=quiet))
    with multiprocessing.get_context().Pool(min(workers, len(items))) as pool:
        return list(progress(pool.imap(fn, items, chunksize=16), total=len(items), desc="checking shards",
                             quiet=quiet))


def _check_shard_row(row: ManifestRow) -> tuple[str | None, int]:
    """(problem or None, frames): the byte range must be one stored member's data, and decode."""
    if not os.path.isfile(row.path):
        return f"shard not found: {row.rel}", 0
    try:
        member = shard_members(row.path).get(row.offset)
    except Exception as exc:  # zipfile.BadZipFile, OSError, struct errors
        return f"not a readable zip ({_one_line(exc)}): {row.rel}", 0
    if member is None:
        return f"offset {row.offset} is not the start of a member's data in the shard: {row.rel}", 0
    if not member.stored:
        return f"member {member.name} is compressed; rows can only address stored members: {row.rel}", 0
    if member.length != row.length:
        return f"length {row.length} but member {member.name} holds {member.length} bytes: {row.rel}", 0
    try:
        with open_clip(row) as clip:
            head = clip.read(0, min(PROBE_FRAMES, clip.frames))
            frames = clip.frames
        tail = head
        if frames > PROBE_FRAMES:
            # a fresh handle: libsndfile 1.2 returns no frames when an Ogg file that has already been
            # read is seeked close to its end
            with open_clip(row) as clip:
                tail = clip.read(max(0, frames - TAIL_FRAMES), TAIL_FRAMES)
    except Exception as exc:
        return f"unreadable member {member.name} ({_one_line(exc)}): {row.rel}", 0
    if head.shape[0] == 0 or tail.shape[0] == 0:
        return f"unreadable member {member.name} (no frames could be decoded): {row.rel}", 0
    if not (np.isfinite(head).all() and np.isfinite(tail).all()):
        return f"member {member.name} has NaN or inf samples: {row.rel}", 0
    return None, frames


def _resolve_shard_members(root: str, rel_by_line: dict[int, str]) -> None:
    """Replace shard addresses by their members' names (the packed rows' origins) for the id check;
    rows whose member cannot be found (a problem reported by the audio check) are left out of it."""
    for lineno, rel in list(rel_by_line.items()):
        path, kind, offset, _ = parse_address(rel)
        if kind != SHARD:
            continue
        try:
            member = shard_members(os.path.join(root, path)).get(offset)
        except Exception:
            member = None  # already reported by the audio check
        if member is not None:
            rel_by_line[lineno] = member.name
        else:
            del rel_by_line[lineno]  # nothing to match the id against


def _check_labels(lpath: str, row_of_line: dict[int, int], rel_by_line: dict[int, str],
                  used_labels: dict[str, tuple[str, int]]) -> list[Problem]:
    try:
        lines = read_lines(lpath)
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem(0, lpath, f"cannot read the labels: {exc}")]
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines: ignored, as fine-tuning's reader ignores them
    problems = []
    n_rows = len(row_of_line)
    if len(lines) != n_rows:
        problems.append(Problem(0, lpath, f"{len(lines)} label lines but the manifest has {n_rows} rows "
                                          f"(label line k belongs to the manifest's k-th row)"))
    line_of_row = {row: mline for mline, row in row_of_line.items()}
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        try:
            clip_id, names = parse_label_line(line)
        except ValueError:
            fields = line.count("\t") + 1
            problems.append(Problem(lineno, lpath, f"expected 2 tab-separated fields (clip_id, labels), "
                                                   f"found {fields}: {line[:80]!r}"))
            continue
        if not clip_id:
            problems.append(Problem(lineno, lpath, "empty clip id"))
            continue
        if not names:
            problems.append(Problem(lineno, lpath, f"no labels for {clip_id}"))
        for name in names:
            used_labels.setdefault(name, (lpath, lineno))
        if clip_id in seen:
            problems.append(Problem(lineno, lpath, f"duplicate clip id {clip_id} (first on line {seen[clip_id]})"))
        else:
            seen[clip_id] = lineno
        mline = line_of_row.get(lineno)
        rel = rel_by_line.get(mline) if mline is not None else None
        if rel is not None and not clip_id_matches(clip_id, rel):
            problems.append(Problem(lineno, lpath, f"clip id {clip_id} does not match manifest line "
                                                   f"{mline} ({rel})"))
    return problems


def _check_descriptors(dpath: str, used_labels: dict[str, tuple[str, int]]) -> list[Problem]:
    try:
        known_set = set(read_label_descriptors(dpath).labels)  # training's reader: its checks, its errors
    except LabelError as exc:
        message = str(exc)
        for prefix in (f"{Path(dpath)}:{exc.line}: ", f"{Path(dpath)}: "):
            message = message.removeprefix(prefix)
        return [Problem(exc.line, dpath, message)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [Problem(0, dpath, f"cannot read the label descriptors: {exc}")]
    problems = []
    for label, (lpath, lineno) in used_labels.items():
        if label not in known_set:
            problems.append(Problem(lineno, lpath, f"label {label} is not in {dpath}"))
    return problems


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("Check a fairseq audio manifest (and its labels) for problems.", HELP_EPILOG)
    parser.add_argument("manifest", metavar="MANIFEST", help="a {split}.tsv file")
    parser.add_argument("--labels", metavar="LBL", help="the matching {split}.lbl file")
    parser.add_argument("--descriptors", metavar="CSV", help="label_descriptors.csv to check labels against")
    add_common_args(parser, force=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = validate_manifest(args.manifest, labels=args.labels, descriptors=args.descriptors,
                                 workers=args.workers, quiet=args.quiet)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) found")
        return 1
    print(f"{args.manifest}: OK")
    return 0
