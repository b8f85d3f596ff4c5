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
- ``checkpoint_utils.save_checkpoint``: an empty temporary file (named like those above) marks a
  save in progress, so that a kill anywhere inside a save leaves evidence for the next start;
- ``checkpoint_utils.load_checkpoint`` (the resume at start-up), with the rules below.

The resume (decided on data-parallel rank 0, shared with the other ranks):

1. Temporary files of an interrupted save are noted, then deleted.
2. An explicit ``checkpoint.restore_file`` and a readable ``checkpoint_last.pt``: fairseq's own
   behaviour, unchanged.
3. A fallback replaces ``checkpoint_last.pt`` only with evidence that a save was interrupted: the file
   exists but is unreadable (truncated by fairseq's plain copy in an older version), or it is missing
   and step 1 found temporary files (a kill during the first saves of a run). The fallback is the
   ``checkpoint*.pt`` with the highest update number STORED in it
   (``optimizer_history[-1]["num_updates"]``, read from the pickle record alone by
   :func:`eat_fairseq.checkpoints.resume.read_saved_run`); modification times and file names decide
   nothing (a copy without timestamps made the old newest-by-time rule resume update 28 over 35).
   Equal numbers are ordered by name; damaged files and files without a stored number are skipped
   and named. When nothing can be resumed it stops with an error, except after a kill before the
   first checkpoint was complete (only temporary files): then the run starts from scratch.
4. The fallback must belong to this run: a model or task configuration that differs
   (:func:`eat_fairseq.checkpoints.resume.config_differences` says which keys are compared) stops the
   start with an error naming the files and each differing key, saved and now. Setting the
   environment variable ``EAT_RESUME_IGNORE_CONFIG=1`` resumes it anyway. ``checkpoint_last.pt``
   itself is not checked (yet): a resume from it stays fairseq's.
5. ``checkpoint_last.pt`` missing without evidence (a fresh ``save_dir``, or the user deleted it to
   start over: resuming the old attempt's ``checkpoint_best.pt`` then was the old rule's bug):
   fairseq's behaviour, a start from scratch (or from ``finetune_from_model``); when
   other checkpoints are left in the folder a warning names them, with their stored updates, and how
   to resume one (``checkpoint.restore_file=PATH``; the ``checkpoint.reset_*`` options to take only
   its weights).
6. ``checkpoint.no_last_checkpoints=true``: fairseq never writes ``checkpoint_last.pt`` and never
   resumes by itself; its absence is by design, not evidence, so such a run is never resumed
   automatically, whatever temporary files step 1 found: every start that should continue names its
   checkpoint with ``checkpoint.restore_file`` (rule 5's warning says so).

Remote paths (fairseq's iopath ``PathManager``) and ``write_checkpoints_asynchronously`` keep
fairseq's own code.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import open_dict

from eat_fairseq.checkpoints.atomic import atomic_copy, atomic_write, is_temp_name, remove_stale_temps, temp_name
from eat_fairseq.checkpoints.load import CheckpointError
from eat_fairseq.checkpoints.resume import config_differences, read_saved_run
from eat_fairseq.data.identity import describe_identity, manifest_identity, same_data

logger = logging.getLogger(__name__)

CHECKPOINT_RE = r"(checkpoint|crash).*\.pt"
IGNORE_CONFIG_ENV = "EAT_RESUME_IGNORE_CONFIG"
"""Environment variable: set to 1 to resume a fallback checkpoint whose configuration differs."""
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


@dataclass
class Candidate:
    """A ``checkpoint*.pt`` a run could resume from, as :func:`ranked_checkpoints` found it."""

    name: str
    path: str
    num_updates: Optional[int] = None  # stored in the file (optimizer_history[-1]["num_updates"])
    cfg: Optional[Dict[str, Any]] = None  # the configuration of the run that saved it
    problem: Optional[str] = None  # why it cannot be resumed from (None: it can)

    def describe(self) -> str:
        return f"{self.name} ({self.problem})" if self.problem else f"{self.name} (update {self.num_updates})"


def ranked_checkpoints(save_dir: str, suffix: str = "", exclude: Tuple[str, ...] = ()) -> List[Candidate]:
    """Every ``checkpoint*{suffix}.pt`` in ``save_dir`` but ``exclude``: the resumable ones first, by
    the update number stored in them (highest first; equal numbers, e.g. checkpoint_best.pt and the
    interval checkpoint it was copied from, by name), then the others (damaged, unreadable, or without
    a stored update number: not a training checkpoint) by name.

    Modification times and the numbers in file names are not used: a copy without timestamps reorders
    the former, and ``checkpoint_best.pt`` has none of the latter.
    """
    pattern = re.compile(r"checkpoint.*" + re.escape(suffix) + r"\.pt$")
    found = []
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        if not pattern.match(name) or name in exclude or not os.path.isfile(path):
            continue
        candidate = Candidate(name=name, path=path, problem=checkpoint_problem(path))
        if candidate.problem is None:
            try:
                saved = read_saved_run(path)
            except CheckpointError as e:
                candidate.problem = f"unreadable: {e}"
            else:
                candidate.num_updates, candidate.cfg = saved.num_updates, saved.cfg
                if saved.num_updates is None:
                    candidate.problem = "no update number stored: not a training checkpoint"
        found.append(candidate)
    usable = sorted((c for c in found if c.problem is None), key=lambda c: (-int(c.num_updates or 0), c.name))
    return usable + [c for c in found if c.problem is not None]


class ResumeError(RuntimeError):
    """The run cannot decide safely what to resume from; the message says why and what to do."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _restore_option(path: str, suffix: str) -> str:
    """``path`` as ``checkpoint.restore_file`` takes it: fairseq appends the rank's suffix itself."""
    return path[: -len(f"{suffix}.pt")] + ".pt" if suffix and path.endswith(f"{suffix}.pt") else path


_RESETS = ("checkpoint.reset_optimizer=true checkpoint.reset_lr_scheduler=true checkpoint.reset_meters=true "
           "checkpoint.reset_dataloader=true")


def _warn_fresh_start(save_dir: str, suffix: str, last_name: str, no_last: bool) -> None:
    """fairseq starts from scratch: say so when checkpoints of an earlier attempt are left, and how to
    resume one of them instead (the start is otherwise silent, and its saves overwrite them)."""
    left = ranked_checkpoints(save_dir, suffix, exclude=(last_name,))
    if not left:
        return
    example = _restore_option(left[0].path, suffix) if left[0].problem is None else "PATH"
    if no_last:
        why = (f"checkpoint.no_last_checkpoints=true: fairseq never writes {last_name} and never resumes by "
               "itself, so every start that should continue needs checkpoint.restore_file")
        keep = ""
    else:
        why = f"{last_name} does not exist and no temporary file shows an interrupted save"
        keep = (f"; fairseq reloads that file at every start given the option, so drop it once {last_name} "
                f"exists, or instead copy the checkpoint to {os.path.join(save_dir, last_name)}")
    logger.warning(
        "starting from scratch, as fairseq does (%s), although %s holds checkpoints: %s. Saves of this run "
        "overwrite files of the same names. To resume one instead, stop this run and start it with "
        "checkpoint.restore_file=%s (model, optimizer, learning-rate schedule and data position%s); to start "
        "from its weights only, also set %s.",
        why, save_dir, ", ".join(c.describe() for c in left), example, keep, _RESETS,
    )


def choose_restore_file(cfg: Any, trainer: Any) -> Optional[str]:
    """Rank 0's part of the resume: remove temporary files of an interrupted save and decide whether
    to fall back from ``checkpoint_last.pt`` (module docstring). Returns the checkpoint to resume from
    instead (as ``checkpoint.restore_file`` takes it), or None for fairseq's own behaviour; raises
    :class:`ResumeError` when resuming would be wrong and starting over would discard work."""
    save_dir = str(cfg.save_dir)
    if not os.path.isdir(save_dir):
        return None
    # the evidence of an interrupted save, captured before the clean-up removes it
    temps = sorted(name for name in os.listdir(save_dir) if is_temp_name(name, CHECKPOINT_RE))
    removed = remove_stale_temps(save_dir, CHECKPOINT_RE)
    if removed:
        logger.info("removed %d temporary file(s) of an interrupted checkpoint save in %s: %s",
                    len(removed), save_dir, ", ".join(removed))
    if str(cfg.restore_file) != "checkpoint_last.pt":
        return None  # the user named the file to resume
    suffix = getattr(trainer, "checkpoint_suffix", "") or ""
    last_name = f"checkpoint_last{suffix}.pt"
    last = os.path.join(save_dir, last_name)
    if os.path.exists(last):
        problem = checkpoint_problem(last)
        if problem is None:
            check_same_run(last, trainer)
            return None
        reason = f"{last} is unreadable ({problem})"
    elif bool(getattr(cfg, "no_last_checkpoints", False)):
        _warn_fresh_start(save_dir, suffix, last_name, no_last=True)
        return None
    elif temps:
        reason = f"{last} is missing and a save was interrupted (it left {', '.join(temps)})"
    else:
        _warn_fresh_start(save_dir, suffix, last_name, no_last=False)
        return None

    ranked = ranked_checkpoints(save_dir, suffix, exclude=(last_name,))
    usable = [c for c in ranked if c.problem is None]
    skipped = [c.describe() for c in ranked if c.problem is not None]
    if not usable:
        if not skipped and not os.path.exists(last):
            logger.warning("%s before any checkpoint of this run was complete: starting from scratch", reason)
            return None
        raise ResumeError(
            f"cannot resume: {reason} and no other checkpoint*.pt in {save_dir} can be resumed from"
            f"{' (' + '; '.join(skipped) + ')' if skipped else ''}. Move the file(s) away to start this run "
            "from scratch."
        )
    chosen = usable[0]
    run_cfg = getattr(trainer, "cfg", None)
    differences = config_differences(chosen.cfg, run_cfg) if run_cfg is not None else []
    if differences:
        detail = "; ".join(differences)
        if not _env_flag(IGNORE_CONFIG_ENV):
            matching = [c for c in usable[1:] if not config_differences(c.cfg, run_cfg)]
            hint = (f" Checkpoints there that match this run's configuration: "
                    f"{', '.join(c.describe() for c in matching)} (resume one with checkpoint.restore_file=PATH)."
                    if matching else "")
            raise ResumeError(
                f"cannot resume: {reason}; the checkpoint to resume from instead, {chosen.path} "
                f"(update {chosen.num_updates}), was saved by a run whose configuration differs from this "
                f"run's: {detail}. It may belong to another run that used {save_dir}.{hint} To resume from it "
                f"anyway, set the environment variable {IGNORE_CONFIG_ENV}=1; to start this run from scratch, "
                f"move the checkpoint*.pt files out of {save_dir} or use another checkpoint.save_dir."
            )
        logger.warning("%s=1: resuming from %s although its configuration differs from this run's: %s",
                       IGNORE_CONFIG_ENV, chosen.path, detail)
    logger.warning(
        "%s; resuming from the checkpoint with the highest stored update instead: %s (update %d)%s",
        reason, chosen.path, chosen.num_updates,
        f" (also skipped: {'; '.join(skipped)})" if skipped else "",
    )
    return _restore_option(chosen.path, suffix)


DATA_STATE_KEY = "train_data"
"""Key of the training data's identity (:mod:`eat_fairseq.data.identity`) in an eat task's state."""


def run_data_identity(run_cfg: Any) -> Optional[Dict[str, Any]]:
    """The identity of the training manifest the run being started names (None: not an eat run or no
    such manifest, which fairseq then reports itself)."""
    task = getattr(run_cfg, "task", None)
    name = str(getattr(task, "_name", "") or "")
    data = getattr(task, "data", None)
    if not name.startswith("eat_") or not data:
        return None
    subset = str(getattr(getattr(run_cfg, "dataset", None), "train_subset", "train") or "train")
    return manifest_identity(os.path.join(str(data), f"{subset}.tsv"))


def check_same_run(path: str, trainer: Any) -> None:
    """Stop a resume of ``path`` (a readable ``checkpoint_last.pt``) by a run that is not the one that
    saved it: other training data (rows, not spelling: :mod:`eat_fairseq.data.identity`), or other
    model/task settings (:func:`eat_fairseq.checkpoints.resume.config_differences`, keys one side lacks
    left out so that an upgrade of this package does not stop runs). ``EAT_RESUME_IGNORE_CONFIG=1``
    continues anyway, with a warning. Also says plainly when the run has nothing left to train."""
    try:
        saved = read_saved_run(path)
    except CheckpointError:
        return  # fairseq's own load reports an unreadable file
    run_cfg = getattr(trainer, "cfg", None)
    if run_cfg is None:
        return
    lines = config_differences(saved.cfg, run_cfg, absent_ok=True) if saved.cfg is not None else []
    data_saved = (saved.task_state or {}).get(DATA_STATE_KEY)
    # the task computes the identity once and stores it in every checkpoint: reuse it, not a second pass
    identity_of_task = getattr(getattr(trainer, "task", None), "train_data_identity", None)
    data_now = identity_of_task() if callable(identity_of_task) else run_data_identity(run_cfg)
    if isinstance(data_saved, dict) and data_now is not None:
        # the rows decide, not the folder's name: data moved elsewhere (manifests rewritten) is the same data
        lines = [line for line in lines if not line.startswith("task.data:")]
        if not same_data(data_saved, data_now):
            lines.insert(0, f"training data: saved {describe_identity(data_saved)}, now {describe_identity(data_now)}")
    save_dir = os.path.dirname(path)
    if lines:
        detail = "; ".join(lines)
        if not _env_flag(IGNORE_CONFIG_ENV):
            raise ResumeError(
                f"{path} was saved by a run that differs from this one, and starting here would continue it: "
                f"{detail}. For a new run pass another checkpoint.save_dir (or move {save_dir} away); to continue "
                f"this run with the new data or settings anyway, set the environment variable {IGNORE_CONFIG_ENV}=1."
            )
        logger.warning("%s=1: continuing %s although this run differs from the one that saved it: %s",
                       IGNORE_CONFIG_ENV, path, detail)
    optimization = getattr(run_cfg, "optimization", None)
    max_update = int(getattr(optimization, "max_update", 0) or 0)
    if saved.num_updates is not None and 0 < max_update <= saved.num_updates:
        logger.warning(
            "%s already reached update %d and this run stops at optimization.max_update=%d: there is nothing "
            "left to train. Raise optimization.max_update to train on (it also stretches the cosine schedule), "
            "or pass another checkpoint.save_dir for a new run.",
            path, saved.num_updates, max_update,
        )


def load_checkpoint_with_fallback(cfg: Any, trainer: Any, **passthrough_args: Any):
    """fairseq's ``checkpoint_utils.load_checkpoint`` after :func:`choose_restore_file`.

    Data-parallel rank 0 decides (it is also the rank that reads the checkpoint) and the other ranks
    take its decision: deciding on every rank would race with rank 0's removal of the temporary files
    that are the evidence, and ranks resuming different files would hang in fairseq's broadcast.
    """
    original = _ORIGINALS["load_checkpoint"]
    if not _is_local(str(cfg.save_dir)):
        return original(cfg, trainer, **passthrough_args)
    failure: Optional[BaseException] = None
    decision: Optional[Dict[str, Optional[str]]] = None
    if getattr(trainer, "data_parallel_rank", 0) == 0:
        try:
            decision = {"restore_file": choose_restore_file(cfg, trainer), "error": None}
        except Exception as e:  # shared with the other ranks, so that they stop instead of hanging
            failure = e
            decision = {"restore_file": None, "error": f"{type(e).__name__} on rank 0: {e}"}
    if getattr(trainer, "data_parallel_world_size", 1) > 1:
        from fairseq.distributed import utils as distributed_utils

        decision = distributed_utils.broadcast_object(
            decision, src_rank=0, group=trainer.data_parallel_process_group, dist_device=trainer.device
        )
    assert decision is not None
    if failure is not None:
        raise failure
    if decision["error"]:
        raise ResumeError(decision["error"])
    if decision["restore_file"] is None:
        return original(cfg, trainer, **passthrough_args)
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.restore_file = decision["restore_file"]
        cfg.finetune_from_model = None  # a run being resumed never restarts from its initial model
    return original(cfg, trainer, **passthrough_args)


def save_checkpoint_marked(cfg: Any, trainer: Any, epoch_itr: Any, val_loss: Any) -> Any:
    """fairseq's ``checkpoint_utils.save_checkpoint`` with a marker of a save in progress.

    The marker is an empty temporary file named like one of :func:`atomic_write`'s, created before
    the first file of the save is written and removed once the copy to ``checkpoint_last.pt`` is
    done. A kill anywhere in between (also after ``checkpoint_E_N.pt`` is complete and before the copy
    has created its own temporary file) therefore leaves the evidence the next start looks for. It
    stays after an exception too: that save did not complete either.
    """
    original = _ORIGINALS["save_checkpoint"]
    save_dir = str(cfg.save_dir)
    if (
        cfg.no_save
        or getattr(cfg, "write_checkpoints_asynchronously", False)
        or not _is_local(save_dir)
        or not getattr(trainer, "should_save_checkpoint_on_current_rank", True)
    ):
        return original(cfg, trainer, epoch_itr, val_loss)
    os.makedirs(save_dir, exist_ok=True)
    suffix = getattr(trainer, "checkpoint_suffix", "") or ""
    marker = temp_name(os.path.join(save_dir, f"checkpoint_last{suffix}.pt"))
    with open(marker, "wb"):
        pass
    result = original(cfg, trainer, epoch_itr, val_loss)
    os.unlink(marker)
    return result


def install() -> None:
    """Patch fairseq's checkpoint writing and resuming (idempotent)."""
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    if _ORIGINALS:
        return
    _ORIGINALS["torch_persistent_save"] = checkpoint_utils.torch_persistent_save
    _ORIGINALS["load_checkpoint"] = checkpoint_utils.load_checkpoint
    _ORIGINALS["save_checkpoint"] = checkpoint_utils.save_checkpoint

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
    # fairseq keeps the best score as an attribute of whatever checkpoint_utils.save_checkpoint names
    # (its save and load read and write it through that module global, train.py through the module),
    # so from now on the wrapper carries it, for every reader alike
    checkpoint_utils.save_checkpoint = save_checkpoint_marked
