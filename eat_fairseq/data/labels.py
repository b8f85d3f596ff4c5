"""Label files for fine-tuning (docs/reference.md section 6), validated before any training starts.

A mislabelled corpus trains silently into a useless model, so every inconsistency between
``label_descriptors.csv``, ``{split}.lbl`` and ``{split}.tsv`` is a :class:`LabelError` that names
the file and the (1-based) line.

Formats:
- ``label_descriptors.csv``: ``index,label[,display name]``, optionally preceded by a header line
  (AudioSet's own ``class_labels_indices.csv`` has ``index,mid,display_name``). Display names may be
  quoted and contain commas, so the file is read with :mod:`csv`.
- ``{split}.tsv``: first line the root directory, then ``relative/path<TAB>n_samples`` (or a span /
  shard row, :mod:`eat_fairseq.data.manifest`).
- ``{split}.lbl``: one line per manifest row, ``clip_id<TAB>label1,label2,...``.
"""
from __future__ import annotations

import csv
import operator
import os
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eat_fairseq.data.manifest import id_for_path, read_manifest_rows


class LabelError(ValueError):
    """A label file is inconsistent; the message names the file and line (also in ``line``, 1-based;
    0 when the problem concerns the file as a whole)."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(message)
        self.line = line


@dataclass
class LabelSet:
    """The class inventory: ``labels[i]`` is the label string of class ``i``."""

    labels: list[str]
    display_names: list[str]
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.index:
            self.index = {label: i for i, label in enumerate(self.labels)}

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_index(cls, mapping: dict[str, int | str]) -> "LabelSet":
        """Rebuild from a ``{label: index}`` map (fairseq ``task_state["labels"]``; values may be strings)."""
        pairs = sorted(((int(i), label) for label, i in mapping.items()))
        if [i for i, _ in pairs] != list(range(len(pairs))):
            raise LabelError(f"label map indices are not 0..{len(pairs) - 1}")
        labels = [label for _, label in pairs]
        return cls(labels=labels, display_names=list(labels))


class LabelTable:
    """Class indices of every clip, stored flat: ``ids[offsets[i]:offsets[i + 1]]`` are clip ``i``'s.

    Why: a dataset of AudioSet-2M held as a list of per-clip Python lists costs about 120 bytes per
    clip, and forked data-loader workers copy the pages of every list they touch (reference counts).
    Two numpy arrays cost ``2 * labels + 8`` bytes per clip (int16 ids when the classes fit) and are
    only read. ``table[i]`` gives back the clip's indices as a new list of ints, equal to the list
    :func:`read_split_labels` returned for it.
    """

    def __init__(self, ids: np.ndarray, offsets: np.ndarray) -> None:
        if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(ids):
            raise ValueError("LabelTable: offsets must run from 0 to len(ids)")
        self.ids = ids
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)

    @classmethod
    def from_lists(cls, label_lists: Iterable[Sequence[int]]) -> "LabelTable":
        """Pack per-clip lists of class indices (as :func:`read_split_labels` returns them)."""
        lists = label_lists if isinstance(label_lists, Sequence) else list(label_lists)
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists)), out=offsets[1:])
        ids = np.fromiter((int(c) for x in lists for c in x), dtype=np.int64, count=int(offsets[-1]))
        if len(ids) and (ids.min() < 0 or ids.max() >= 2**31):
            raise ValueError("LabelTable: class indices must be in 0 .. 2**31 - 1")
        small = not len(ids) or ids.max() < 2**15
        return cls(ids.astype(np.int16 if small else np.int32), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> list[int]:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"clip {index} out of range for {n} clips")
        return self.ids[self.offsets[i]:self.offsets[i + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(len(self)):
            yield self[i]

    @property
    def nbytes(self) -> int:
        """Bytes of label data held (the two arrays)."""
        return self.ids.nbytes + self.offsets.nbytes

    def select(self, index: np.ndarray) -> "LabelTable":
        """The clips an array of indices picks, in that order."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        starts = self.offsets[index]
        lengths = self.offsets[index + 1] - starts
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return LabelTable(self.ids[gather], offsets)


def read_label_descriptors(path: str | os.PathLike) -> LabelSet:
    """Read ``label_descriptors.csv``; indices must be exactly 0..C-1 and labels unique."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: label descriptor file not found")
    by_index: dict[int, tuple[str, str, int]] = {}
    seen: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for lineno, row in enumerate(csv.reader(handle), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            cells = [cell.strip() for cell in row]
            try:
                idx = int(cells[0])
            except ValueError:
                if lineno == 1:
                    continue  # header line
                raise LabelError(f"{path}:{lineno}: index {cells[0]!r} is not an integer", lineno) from None
            if len(cells) < 2 or not cells[1]:
                raise LabelError(f"{path}:{lineno}: expected 'index,label[,display name]'", lineno)
            label = cells[1]
            display = ",".join(cells[2:]).strip() if len(cells) > 2 else label
            if idx in by_index:
                raise LabelError(f"{path}:{lineno}: index {idx} repeated (first on line {by_index[idx][2]})", lineno)
            if label in seen:
                raise LabelError(f"{path}:{lineno}: label {label!r} repeated (first on line {seen[label]})", lineno)
            by_index[idx] = (label, display or label, lineno)
            seen[label] = lineno
    if not by_index:
        raise LabelError(f"{path}: no labels")
    expected = list(range(len(by_index)))
    if sorted(by_index) != expected:
        missing = sorted(set(expected) - set(by_index))
        raise LabelError(f"{path}: indices must be 0..{len(by_index) - 1}; missing {missing[:10]}")
    labels = [by_index[i][0] for i in expected]
    names = [by_index[i][1] for i in expected]
    return LabelSet(labels=labels, display_names=names)


def read_manifest_paths(tsv_path: str | os.PathLike, resolve_shards: bool = False) -> list[str]:
    """Addresses of a ``{split}.tsv`` manifest's rows (the root line skipped), in order.

    With ``resolve_shards`` a shard row (``shard.zip:OFFSET:LENGTH``) is replaced by its member's
    name, the address of the clip before packing, so its clip id can be checked.
    """
    tsv_path = Path(tsv_path)
    if not tsv_path.is_file():
        raise LabelError(f"{tsv_path}: manifest not found")
    with open(tsv_path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if not lines:
        raise LabelError(f"{tsv_path}: empty manifest (expected the root directory on line 1)")
    if not resolve_shards:
        return [line.split("\t")[0] for line in lines[1:] if line.strip()]
    from eat_fairseq.data.shards import source_address

    out = []
    for row in read_manifest_rows(str(tsv_path)):  # one row object at a time, even for 2M rows
        try:
            out.append(source_address(row))
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise LabelError(
                f"{tsv_path}:{row.line}: cannot look up the shard member of {row.rel!r} to check its clip id "
                f"({type(e).__name__}: {e}); fix the shard or set task.check_clip_ids=false"
            ) from None
    return out


def clip_id_matches(clip_id: str, address: str) -> bool:
    """Whether a clip id names its manifest row (training's check; ``eat-manifest-validate`` uses it too).

    Accepted: the relative path with or without extension, the file name, the stem, and AudioSet's
    file namings of a YouTube id: ``Y{id}`` and ``{id}_{start}``. A window of a file (span row) is
    named ``ID@START`` (or just ``ID``), see :func:`eat_fairseq.data.manifest.id_for_path`.
    """
    pair = id_for_path(clip_id, address)
    if pair is None:
        return False
    clip_id, rel_path = pair
    base = os.path.basename(rel_path)
    stem = os.path.splitext(base)[0]
    if clip_id in {rel_path, os.path.splitext(rel_path)[0], base, stem, stem[1:] if stem.startswith("Y") else None}:
        return True
    return stem.startswith(clip_id + "_")


def parse_label_line(line: str) -> tuple[str, list[str]]:
    """``(clip id, label names)`` of one ``.lbl`` line ``clip_id<TAB>label1,label2,...``: both stripped,
    empty names dropped (``a,,b`` is ``[a, b]``; a line without labels gives ``[]``). Training, the
    balanced-weights tool and the manifest validator all read labels through this one function.
    Raises ValueError for a line without exactly one tab."""
    parts = line.split("\t")
    if len(parts) != 2:
        raise ValueError(f"expected 'clip_id<TAB>label1,label2,...', got {line!r}")
    return parts[0].strip(), [name.strip() for name in parts[1].split(",") if name.strip()]


def read_split_labels(
    lbl_path: str | os.PathLike,
    label_set: LabelSet,
    tsv_path: str | os.PathLike | None = None,
    multi_label: bool = True,
    check_ids: bool = True,
) -> list[list[int]]:
    """Class indices per manifest row, in manifest order.

    Raises :class:`LabelError` for a missing file, a line count that differs from the manifest's,
    a malformed line, an empty label list, an unknown label, more than one label when
    ``multi_label`` is False, or (``check_ids``) a clip id that does not name its manifest row.
    """
    lbl_path = Path(lbl_path)
    if not lbl_path.is_file():
        raise LabelError(f"{lbl_path}: label file not found")
    with open(lbl_path, encoding="utf-8") as handle:
        lines = [line for line in handle.read().splitlines()]
    while lines and not lines[-1].strip():
        lines.pop()
    paths = read_manifest_paths(tsv_path, resolve_shards=check_ids) if tsv_path is not None else None
    if paths is not None and len(paths) != len(lines):
        raise LabelError(
            f"{lbl_path}: {len(lines)} label lines but {tsv_path} has {len(paths)} rows "
            "(one label line per manifest row, in the same order)"
        )
    result: list[list[int]] = []
    for lineno, line in enumerate(lines, start=1):
        try:
            clip_id, names = parse_label_line(line)
        except ValueError as exc:
            raise LabelError(f"{lbl_path}:{lineno}: {exc}", lineno) from None
        if paths is not None and check_ids and not clip_id_matches(clip_id, paths[lineno - 1]):
            raise LabelError(
                f"{lbl_path}:{lineno}: clip id {clip_id!r} does not match manifest row {lineno} "
                f"({paths[lineno - 1]!r} in {tsv_path})", lineno
            )
        if not names:
            raise LabelError(f"{lbl_path}:{lineno}: empty label list for {clip_id!r}", lineno)
        if not multi_label and len(names) != 1:
            raise LabelError(f"{lbl_path}:{lineno}: {len(names)} labels for {clip_id!r} in a single-label task", lineno)
        indices = []
        for name in names:
            if name not in label_set.index:
                raise LabelError(f"{lbl_path}:{lineno}: unknown label {name!r} (not in the label descriptors)", lineno)
            indices.append(label_set.index[name])
        result.append(sorted(set(indices)))
    return result
