"""TSV manifests (docs/reference.md section 6), parsed without fairseq so every reader shares one parser.

The format is the release's: the first line is the audio root folder, then one
``ADDRESS<TAB>n_samples`` row per clip. Training, evaluation, extraction and validation all read
manifests through :func:`read_manifest`, so a malformed file fails the same way everywhere, with the
file and line named. ``ADDRESS`` (relative to the root) is one of:

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

import os
import re
from dataclasses import dataclass
from typing import List, Tuple

__all__ = [
    "ManifestError",
    "ManifestRow",
    "parse_address",
    "read_manifest",
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
    match = _RANGE.match(address)
    if match is None:
        return address, FILE, 0, 0
    rel, offset, length = match.group(1), int(match.group(2)), int(match.group(3))
    if length <= 0:
        raise ValueError(f"empty range in {address!r}")
    return rel, (SHARD if rel.lower().endswith(".zip") else SPAN), offset, length


def read_manifest(manifest: str, check_root: bool = False) -> tuple[str, List[ManifestRow]]:
    """Parse a TSV manifest, checking its format up front so a bad row fails before training.

    With ``check_root`` the root folder (line 1) must exist: a wrong root otherwise shows up only as
    every clip being "not found", one at a time.
    """
    rows: List[ManifestRow] = []
    with open(manifest, encoding="utf-8") as f:
        root = f.readline().rstrip("\n").rstrip("\r")
        if not root:
            raise ManifestError(f"{manifest}:1: first line must be the audio root folder, got an empty line")
        if "\t" in root:
            raise ManifestError(f"{manifest}:1: first line must be the audio root folder, got a data row {root!r}")
        if check_root and not os.path.isdir(root):
            raise ManifestError(
                f"{manifest}:1: the audio root folder {root!r} does not exist (line 1 of the manifest "
                "must name the folder the rows are relative to)"
            )
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise ManifestError(
                    f"{manifest}:{lineno}: expected 'relative/path<TAB>n_samples', got {len(parts)} field(s): {line!r}"
                )
            try:
                n = int(parts[1])
            except ValueError:
                raise ManifestError(f"{manifest}:{lineno}: n_samples is not an integer: {parts[1]!r}") from None
            try:
                rel, kind, offset, length = parse_address(parts[0])
            except ValueError as e:
                raise ManifestError(f"{manifest}:{lineno}: {e}") from None
            if kind == SPAN and n != length:
                raise ManifestError(
                    f"{manifest}:{lineno}: n_samples {n} differs from the span's length {length}: {parts[0]!r}"
                )
            rows.append(ManifestRow(os.path.join(root, rel), n, lineno, kind, offset, length, parts[0]))
    return root, rows


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
