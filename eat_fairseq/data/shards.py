"""The index of a zip shard: which member's data starts at which byte.

Readers never need it (a shard row carries its byte range, read with one seek); it serves the
checks: ``manifests/validate.py`` confirms that every row's range is exactly one stored member, and
label files are matched against the member's name, which ``manifests/pack.py`` sets to the source
row's address (``clips/a.wav``, or ``long.wav:START:LENGTH`` for a window).
"""
from __future__ import annotations

import functools
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import Dict

from eat_fairseq.data.manifest import SHARD, ManifestRow

__all__ = ["ShardMember", "shard_members", "source_address", "LOCAL_HEADER_SIZE"]

LOCAL_HEADER_SIZE = 30  # fixed part of a zip local file header
_LOCAL_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class ShardMember:
    name: str
    offset: int  # first byte of the member's data in the zip
    length: int  # bytes of data as stored
    stored: bool  # True when uncompressed (ZIP_STORED): only such members can be read by byte range
    file_size: int  # uncompressed size


def _data_offset(handle, info: zipfile.ZipInfo) -> int:
    # The data follows the LOCAL header, whose name/extra lengths may differ from the central
    # directory's copy, so read them there.
    handle.seek(info.header_offset)
    header = handle.read(LOCAL_HEADER_SIZE)
    if len(header) != LOCAL_HEADER_SIZE or header[:4] != _LOCAL_MAGIC:
        raise zipfile.BadZipFile(f"no local header for {info.filename!r} at byte {info.header_offset}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + LOCAL_HEADER_SIZE + name_len + extra_len


@functools.lru_cache(maxsize=64)
def _members(path: str, mtime_ns: int, size: int) -> Dict[int, ShardMember]:
    out: Dict[int, ShardMember] = {}
    with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            offset = _data_offset(handle, info)
            out[offset] = ShardMember(
                info.filename, offset, info.compress_size, info.compress_type == zipfile.ZIP_STORED, info.file_size
            )
    return out


def shard_members(path: str) -> Dict[int, ShardMember]:
    """Members of the zip at ``path`` keyed by the byte offset of their data (cached per file
    version). Raises ``OSError`` or ``zipfile.BadZipFile``."""
    st = os.stat(path)
    return _members(os.path.abspath(path), st.st_mtime_ns, st.st_size)


def source_address(row: ManifestRow) -> str:
    """The address a row's audio came from: for a shard row its member's name (pack.py names
    members after their source rows), otherwise the row's own address. Raises ``KeyError`` when no
    member starts at the row's offset, ``OSError``/``BadZipFile`` for an unreadable shard."""
    if row.kind != SHARD:
        return row.rel
    return shard_members(row.path)[row.offset].name
