"""Checkpoints that survive a kill during a save, and a resume that survives a damaged one.

fairseq writes the first checkpoint of a save (``checkpoint_1_N.pt``) to ``NAME.tmp`` and renames
it, without an fsync, and then COPIES it to ``checkpoint_last.pt`` (and ``checkpoint_best.pt`` ...)
with a plain ``shutil.copyfile``. A job killed during that copy (about 0.8 s for a 1.4 GB base
checkpoint) leaves a truncated ``checkpoint_last.pt``, and the next start fails in ``torch.load``
although fairseq promises to resume from it.

:func:`install` (run when an ``eat_*`` task is set up for training) replaces, for local paths:

- ``checkpoint_utils.torch_persistent_save``: the state is written to a unique temporary file in
  the same folder, fsynced and renamed (:func:`eat_fairseq.checkpoints.atomic.atomic_write`);
- the copies to the other names: the same temporary-file-and-rename procedure, so every
  ``checkpoint*.pt`` this training writes appears complete or not at all;
- ``checkpoint_utils.load_checkpoint`` (the resume at start-up): it first deletes temporary files
  left by a killed save, then, when ``checkpoint_last.pt`` is unreadable (e.g. truncated by an
  older version) or missing next to other checkpoints (a kill during the first save of a run),
  resumes from the newest intact ``checkpoint*.pt`` with a warning that names both files. When
  none is intact it stops with an error rather than silently starting over.

Remote paths (fairseq's iopath ``PathManager``) and ``write_checkpoints_asynchronously`` keep
fairseq's own code.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import zipfile
from typing import Any, List, Optional

import torch
from omegaconf import open_dict

from eat_fairseq.checkpoints.atomic import atomic_copy, atomic_write, remove_stale_temps

logger = logging.getLogger(__name__)

CHECKPOINT_RE = r"(checkpoint|crash).*\.pt"
_ORIGINALS: dict = {}


def _is_local(path: str) -> bool:
    from fairseq.file_io import PathManager

    return not PathManager.path_requires_pathmanager(path)


def atomic_torch_save(obj: Any, filename: str, async_write: bool = False) -> None:
    """``checkpoint_utils.torch_persistent_save`` with an atomic, fsynced write for local files."""
    if async_write or not _is_local(filename):
        return _ORIGINALS["torch_persistent_save"](obj, filename, async_write=async_write)
    atomic_write(filename, lambda handle: torch.save(obj, handle))


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be a complete checkpoint written by torch.save (None: it looks intact).

    Checks the zip structure torch writes: a truncated file has no central directory at its end, so
    this catches every interrupted write without reading the tensors.
    """
    try:
        size = os.path.getsize(path)
    except OSError as e:
        return f"cannot stat it ({e})"
    if size == 0:
        return "it is empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickle_name = next((n for n in names if n.endswith("/data.pkl")), None)
            if pickle_name is None:
                return "it holds no data.pkl record"
            archive.read(pickle_name)  # checks that record's CRC
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"it is not a complete torch checkpoint ({size} bytes; {e})"
    return None


def newest_intact(save_dir: str, suffix: str = "", exclude: tuple = ()) -> tuple[Optional[str], List[str]]:
    """The newest (by modification time) intact ``checkpoint*{suffix}.pt`` in ``save_dir`` other
    than ``exclude``, and the names of the damaged ones found on the way."""
    pattern = re.compile(r"checkpoint.*" + re.escape(suffix) + r"\.pt$")
    candidates = []
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if pattern.match(name) and name not in exclude and os.path.isfile(path):
            candidates.append((os.path.getmtime(path), name))
    damaged = []
    for _, name in sorted(candidates, reverse=True):
        if checkpoint_problem(os.path.join(save_dir, name)) is None:
            return os.path.join(save_dir, name), damaged
        damaged.append(name)
    return None, damaged


def load_checkpoint_with_fallback(cfg: Any, trainer: Any, **passthrough_args: Any):
    """fairseq's ``checkpoint_utils.load_checkpoint`` with stale-temp cleanup and a fallback from an
    unreadable ``checkpoint_last.pt`` to the newest intact checkpoint."""
    original = _ORIGINALS["load_checkpoint"]
    save_dir = str(cfg.save_dir)
    if not _is_local(save_dir) or not os.path.isdir(save_dir):
        return original(cfg, trainer, **passthrough_args)
    if getattr(trainer, "data_parallel_rank", 0) == 0:
        removed = remove_stale_temps(save_dir, CHECKPOINT_RE)
        if removed:
            logger.info("removed %d temporary file(s) of an interrupted checkpoint save in %s: %s",
                        len(removed), save_dir, ", ".join(removed))
    suffix = getattr(trainer, "checkpoint_suffix", "") or ""
    last_name = f"checkpoint_last{suffix}.pt"
    last = os.path.join(save_dir, last_name)
    if str(cfg.restore_file) != "checkpoint_last.pt":
        return original(cfg, trainer, **passthrough_args)
    missing = not os.path.exists(last)
    problem = "it does not exist" if missing else checkpoint_problem(last)
    if problem is None:
        return original(cfg, trainer, **passthrough_args)
    fallback, damaged = newest_intact(save_dir, suffix, exclude=(last_name,))
    if fallback is None:
        if missing and not damaged:
            return original(cfg, trainer, **passthrough_args)  # a new run
        others = f"; also damaged: {', '.join(damaged)}" if damaged else ""
        raise RuntimeError(
            f"cannot resume: {last} is unreadable ({problem}) and no intact checkpoint*.pt is left in "
            f"{save_dir}{others}. Move the damaged file(s) away to start this run from scratch."
        )
    # a kill during the very first save can leave checkpoint_1_N.pt without checkpoint_last.pt
    logger.warning(
        "%s %s; resuming from the newest intact checkpoint instead: %s%s",
        last, "is missing (a save was interrupted)" if missing else f"is unreadable ({problem})",
        fallback, f" (also skipped as damaged: {', '.join(damaged)})" if damaged else "",
    )
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.restore_file = fallback[: -len(f"{suffix}.pt")] + ".pt" if suffix else fallback
        cfg.finetune_from_model = None  # a run being resumed never restarts from its initial model
    return original(cfg, trainer, **passthrough_args)


def install() -> None:
    """Patch fairseq's checkpoint writing and resuming (idempotent)."""
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    if _ORIGINALS:
        return
    _ORIGINALS["torch_persistent_save"] = checkpoint_utils.torch_persistent_save
    _ORIGINALS["load_checkpoint"] = checkpoint_utils.load_checkpoint

    class AtomicCopyPathManager(PathManager):
        """fairseq's PathManager whose ``copy`` (used only to fan a saved checkpoint out to
        checkpoint_last.pt / checkpoint_best.pt ...) is atomic for local files."""

        @staticmethod
        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            if not (_is_local(src_path) and _is_local(dst_path)):
                return PathManager.copy(src_path, dst_path, overwrite=overwrite)
            if not overwrite and os.path.exists(dst_path):
                return False
            atomic_copy(src_path, dst_path)
            return True

    checkpoint_utils.torch_persistent_save = atomic_torch_save
    checkpoint_utils.PathManager = AtomicCopyPathManager
    checkpoint_utils.load_checkpoint = load_checkpoint_with_fallback
