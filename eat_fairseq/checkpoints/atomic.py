"""Files that appear complete or not at all: temporary file in the same folder, fsync, rename.

A process killed while writing (SIGKILL, OOM killer, a pre-empted cluster job) or stopped by a full
disk must never leave a truncated file under the final name: a later run would take it for a
complete checkpoint. ``os.replace`` within one folder is atomic on POSIX filesystems, and the
fsyncs make the new content and the rename durable before the old file is gone.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from typing import BinaryIO, Callable, List

__all__ = ["atomic_write", "atomic_copy", "temp_name", "is_temp_name", "remove_stale_temps"]

_TEMP_SUFFIX = ".tmp"
# ours: .NAME.PID-RANDOM.tmp; fairseq's own torch_persistent_save: NAME.tmp
_TEMP_RE = re.compile(r"^(\.(?P<ours>.+)\.\d+-[0-9a-f]{8}|(?P<theirs>.+))\.tmp$")


def temp_name(path: str) -> str:
    """A unique hidden temporary name next to ``path`` (same folder, so the rename is atomic)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{_TEMP_SUFFIX}")


def is_temp_name(name: str, pattern: str = r".*") -> bool:
    """Whether ``name`` is a temporary file of a file matching ``pattern`` (ours or fairseq's)."""
    match = _TEMP_RE.match(name)
    if match is None:
        return False
    return re.fullmatch(pattern, match.group("ours") or match.group("theirs")) is not None


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening folders; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temporary file, then make it ``path`` atomically.

    On any failure (an exception from ``write``, a full disk, an interrupt) the temporary file is
    removed and ``path`` keeps its previous content.
    """
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def atomic_copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` so that ``dst`` is always either its old or its complete new content."""
    with open(src, "rb") as source:
        atomic_write(dst, lambda out: shutil.copyfileobj(source, out, 16 << 20))


def remove_stale_temps(folder: str, pattern: str = r".*") -> List[str]:
    """Delete temporary files left in ``folder`` by an interrupted write of files matching
    ``pattern``; returns their names. Only call it when no other process writes there."""
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        if is_temp_name(name, pattern):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed
