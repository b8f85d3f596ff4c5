"""TSV manifests (docs/reference.md section 6), parsed without fairseq so every reader shares one parser.

The format is the release's: the first line is the audio root folder, then one
``ADDRESS<TAB>n_samples`` row per clip. Training, evaluation, extraction and validation all read
manifests through one parser (:func:`read_manifest_rows`, and :func:`read_manifest` for a list of
rows), so a malformed file fails the same way everywhere, with the file and line named. Datasets hold
the rows compactly (:class:`ManifestRows`: flat arrays, about 56 bytes per AudioSet row instead of
about 400 for a ``ManifestRow`` object). ``ADDRESS`` (relative to the root) is one of:

- ``path/clip.wav``: a whole audio file (the release's rows);
- ``path/long.wav:START:LENGTH``: a span of an audio file, ``LENGTH`` frames from frame ``START``
  at the file's native rate (``n_samples`` must equal ``LENGTH``); written by ``manifests/windows.py``
  to cut long recordings into fixed windows;
- ``shard_000.zip:OFFSET:LENGTH``: an audio file stored uncompressed in a zip shard, its bytes
  ``OFFSET .. OFFSET+LENGTH`` of the zip (fairseq's convention for audio in zips); written by
  ``manifests/pack.py``.

The two ``:A:B`` forms are told apart by the suffix: a path ending in ``.zip`` is a shard, anything
else is a span. A plain path that happens to end in ``:digits:digits`` would be misread as a span, so
such names are not supported.
"""
from __future__ import annotations

import operator
import os
import re
from array import array
from dataclasses import dataclass
from typing import Iterator, List, TextIO, Tuple

import numpy as np

__all__ = [
    "ManifestError",
    "ManifestRow",
    "ManifestRows",
    "parse_address",
    "read_manifest",
    "read_manifest_rows",
    "window_id",
    "id_for_path",
    "FILE",
    "SPAN",
    "SHARD",
]

FILE = "file"
SPAN = "span"
SHARD = "shard"

_RANGE = re.compile(r"^(.+):(\d+):(\d+)$")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the line."""


@dataclass
class ManifestRow:
    """One clip of a manifest.

    ``path`` is the absolute path of the file the clip lives in (the audio file, or the zip shard).
    For ``kind == "span"``, ``offset``/``length`` are the first frame and the frame count within the
    audio file; for ``kind == "shard"`` they are the byte offset and byte count of the stored member
    inside the zip. ``rel`` is the address exactly as the manifest wrote it.
    """

    path: str
    num_samples: int
    line: int  # 1-based line number in the manifest
    kind: str = FILE
    offset: int = 0
    length: int = 0
    rel: str = ""

    def describe(self) -> str:
        """The address for messages: the file, plus the span or byte range when there is one."""
        if self.kind == FILE:
            return self.path
        unit = "frames" if self.kind == SPAN else "bytes"
        return f"{self.path} [{unit} {self.offset}..{self.offset + self.length}]"


def parse_address(address: str) -> Tuple[str, str, int, int]:
    """Split a row's address into ``(relative path, kind, offset, length)`` (see the module doc).

    Raises ``ValueError`` for a span or byte range of length 0.
    """
    match = _RANGE.match(address) if ":" in address else None  # most rows: a plain file, no regex needed
    if match is None:
        return address, FILE, 0, 0
    rel, offset, length = match.group(1), int(match.group(2)), int(match.group(3))
    if length <= 0:
        raise ValueError(f"empty range in {address!r}")
    return rel, (SHARD if rel.lower().endswith(".zip") else SPAN), offset, length


def _read_root(handle: TextIO, manifest: str, check_root: bool) -> str:
    """Line 1 of an open manifest: the audio root folder, checked (see :func:`read_manifest`)."""
    root = handle.readline().rstrip("\n").rstrip("\r")
    if not root:
        raise ManifestError(f"{manifest}:1: first line must be the audio root folder, got an empty line")
    if "\t" in root:
        raise ManifestError(f"{manifest}:1: first line must be the audio root folder, got a data row {root!r}")
    if check_root and not os.path.isdir(root):
        raise ManifestError(
            f"{manifest}:1: the audio root folder {root!r} does not exist (line 1 of the manifest "
            "must name the folder the rows are relative to)"
        )
    return root


def parse_row(line: str) -> Tuple[str, int]:
    """THE check of one data row (no newline, not blank): ``(address, n_samples)``, or ``ValueError``
    with the reason. Training's reader and ``manifests/validate.py`` both call it, so the validator
    refuses exactly the rows training refuses."""
    parts = line.split("\t")
    if len(parts) != 2:
        raise ValueError(f"expected 'relative/path<TAB>n_samples', got {len(parts)} field(s): {line!r}")
    try:
        n = int(parts[1])
    except ValueError:
        raise ValueError(f"n_samples is not an integer: {parts[1]!r}") from None
    if not -_INT64_LIMIT <= n < _INT64_LIMIT:
        raise ValueError(f"n_samples is out of range: {parts[1]!r}")
    _, kind, _, length = parse_address(parts[0])
    if kind == SPAN and n != length:
        raise ValueError(f"n_samples {n} differs from the span's length {length}: {parts[0]!r}")
    return parts[0], n


def _parse_rows(handle: TextIO, manifest: str) -> Iterator[Tuple[int, str, int]]:
    """THE row reader: ``(line number, address, n_samples)`` of every data row after line 1, each
    checked as it is read (:func:`parse_row`), so a 2M-row manifest is never held as a list of parsed rows."""
    for lineno, line in enumerate(handle, start=2):
        line = line.rstrip("\n").rstrip("\r")
        if not line.strip():
            continue
        try:
            address, n = parse_row(line)
        except ValueError as e:
            raise ManifestError(f"{manifest}:{lineno}: {e}") from None
        yield lineno, address, n


class ManifestRows:
    """The rows of a manifest held in four flat numpy arrays, each row built as a
    :class:`ManifestRow` only when it is asked for (``rows[i]``, iteration).

    Why: a list of ``ManifestRow`` objects costs about 400 bytes per row (object, dict, three
    strings, ints), 800 MB per process for AudioSet-2M, and every forked data-loader worker that
    touches a row writes its reference count and so copies the page it lives on: over an epoch each
    worker ends up with a private copy. Here a row is ``addresses[offsets[i]:offsets[i + 1]]`` (the
    address exactly as the manifest wrote it, UTF-8, the root folder stored once), ``sizes[i]`` and
    ``lines[i]``: about 56 bytes for an AudioSet row (32-byte address + three int64), and reading a
    row only reads the arrays' pages, so forked workers share them for the whole epoch.

    The layout is the one Arrow uses for a string column (one byte buffer plus int64 offsets), built
    with numpy, which the project already depends on: pyarrow would add a large dependency for the
    same bytes per row. The kind, offset and length of span and shard rows are re-parsed from the
    address on access (:func:`parse_address`, microseconds beside decoding the clip) rather than
    stored as three more int64 per row that file rows would not use.
    """

    def __init__(self, root: str, addresses: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
                 lines: np.ndarray) -> None:
        consistent = len(offsets) == len(sizes) + 1 and len(lines) == len(sizes)
        if not consistent or offsets[0] != 0 or offsets[-1] != len(addresses):
            raise ValueError("ManifestRows: arrays of inconsistent lengths")
        self.root = root
        self.addresses = np.ascontiguousarray(addresses, dtype=np.uint8)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.sizes = np.ascontiguousarray(sizes, dtype=np.int64)
        self.lines = np.ascontiguousarray(lines, dtype=np.int64)

    @classmethod
    def read(cls, manifest: str, check_root: bool = False) -> "ManifestRows":
        """Parse a manifest straight into the arrays (see :func:`read_manifest_rows`)."""
        text = bytearray()
        ends, sizes, lines = array("q"), array("q"), array("q")
        with open(manifest, encoding="utf-8") as handle:
            root = _read_root(handle, manifest, check_root)
            for lineno, address, n in _parse_rows(handle, manifest):
                text += address.encode("utf-8")
                ends.append(len(text))
                sizes.append(n)
                lines.append(lineno)
        offsets = np.zeros(len(ends) + 1, dtype=np.int64)
        offsets[1:] = np.frombuffer(ends, dtype=np.int64)
        return cls(root, np.frombuffer(text, dtype=np.uint8).copy(), offsets,
                   np.frombuffer(sizes, dtype=np.int64).copy(), np.frombuffer(lines, dtype=np.int64).copy())

    def __len__(self) -> int:
        return len(self.sizes)

    def _index(self, index: int) -> int:
        i = operator.index(index)
        n = len(self.sizes)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {index} out of range for {n} rows")
        return i

    def address(self, index: int) -> str:
        """Row ``index``'s address exactly as the manifest wrote it (``ManifestRow.rel``)."""
        i = self._index(index)
        return self.addresses[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")

    def __getitem__(self, index: int) -> ManifestRow:
        i = self._index(index)
        address = self.addresses[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")
        rel, kind, offset, length = parse_address(address)
        return ManifestRow(os.path.join(self.root, rel), self.sizes[i].item(), self.lines[i].item(), kind, offset,
                           length, address)

    def __iter__(self) -> Iterator[ManifestRow]:
        for i in range(len(self)):
            yield self[i]

    @property
    def nbytes(self) -> int:
        """Bytes of row data held: the four arrays plus the root folder's name."""
        arrays = self.addresses.nbytes + self.offsets.nbytes + self.sizes.nbytes + self.lines.nbytes
        return arrays + len(self.root.encode("utf-8"))

    def select(self, which: np.ndarray) -> "ManifestRows":
        """The rows a boolean mask (one per row) or an array of row indices picks, in that order."""
        which = np.asarray(which)
        if which.dtype == bool:
            if which.shape != self.sizes.shape:
                raise ValueError(f"mask of shape {which.shape} for {len(self)} rows")
            index = np.flatnonzero(which)
        else:
            index = which.astype(np.int64, copy=False).reshape(-1)
            index = np.where(index < 0, index + len(self), index)
            if len(index) and (index.min() < 0 or index.max() >= len(self)):
                raise IndexError(f"row index out of range for {len(self)} rows")
        starts = self.offsets[index]
        lengths = self.offsets[index + 1] - starts
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        addresses = np.empty(int(offsets[-1]), dtype=np.uint8)
        # gather the bytes a block of rows at a time: the per-byte index array stays small
        for first in range(0, len(index), _SELECT_BLOCK):
            block = slice(first, first + _SELECT_BLOCK)
            lo, hi = int(offsets[first]), int(offsets[min(first + _SELECT_BLOCK, len(index))])
            if hi > lo:
                shift = np.repeat(starts[block] - offsets[:-1][block], lengths[block])
                addresses[lo:hi] = self.addresses[shift + np.arange(lo, hi)]
        return ManifestRows(self.root, addresses, offsets, self.sizes[index], self.lines[index])

    def __repr__(self) -> str:
        return f"ManifestRows({len(self)} rows under {self.root!r}, {self.nbytes} bytes)"


_SELECT_BLOCK = 1 << 16
_INT64_LIMIT = 1 << 63


def read_manifest_rows(manifest: str, check_root: bool = False) -> ManifestRows:
    """Parse a TSV manifest into a compact :class:`ManifestRows`, row by row (never a list of rows).

    The checks and error messages are :func:`read_manifest`'s (the same parser).
    """
    return ManifestRows.read(manifest, check_root)


def read_manifest(manifest: str, check_root: bool = False) -> tuple[str, List[ManifestRow]]:
    """Parse a TSV manifest, checking its format up front so a bad row fails before training.

    With ``check_root`` the root folder (line 1) must exist: a wrong root otherwise shows up only as
    every clip being "not found", one at a time. The rows are :func:`read_manifest_rows`'s, as a list
    (for the small manifests of the preparation tools; datasets keep the compact form).
    """
    rows = read_manifest_rows(manifest, check_root)
    return rows.root, list(rows)


def window_id(clip_id: str, start: int) -> str:
    """Clip id of a window of a longer clip: ``ID@START`` (``START``: first frame, native rate)."""
    return f"{clip_id}@{int(start)}"


def id_for_path(clip_id: str, address: str) -> tuple[str, str] | None:
    """The (id, relative file path) pair to compare when matching a label line to its row.

    For a span row a window id ``ID@START`` is reduced to ``ID`` when ``START`` is the span's first
    frame, and refused (None) when it is another frame; ids without ``@`` match as for whole files.
    Shard rows must first be resolved to their member's name (:mod:`eat_fairseq.data.shards`).
    """
    rel, kind, offset, _ = parse_address(address)
    if kind == SPAN:
        base, sep, start = clip_id.rpartition("@")
        if sep and start.isdigit():
            return (base, rel) if int(start) == offset else None
    return clip_id, rel
