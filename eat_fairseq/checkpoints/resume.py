"""What a resume must know about a checkpoint before trusting it, without loading its tensors.

A run that cannot resume from ``checkpoint_last.pt`` picks another ``checkpoint*.pt`` of its folder
(:mod:`eat_fairseq.fairseq_ext.checkpoint_io`). Two facts decide whether, and which:

- **the update it was saved at**: fairseq's trainer stores it in
  ``optimizer_history[-1]["num_updates"]``. File names (``checkpoint_E_N.pt``) and modification times
  are not evidence: a copy without timestamps reorders the times, and ``checkpoint_best.pt`` or a
  renamed file carries no number. :func:`read_saved_run` unpickles only the small pickle record of the
  file: ``torch.load(mmap=True)`` maps the tensor records instead of reading them (a few milliseconds
  for a 1.4 GB checkpoint), and the project's restricted unpickler
  (:func:`eat_fairseq.checkpoints.load.restricted_pickle_module`) makes sure that a file left in the
  folder by anyone runs no code while it is inspected.
- **the configuration of the run that saved it**: :func:`config_differences` compares it with the run
  being started, so that a checkpoint of another experiment left in the same folder is not continued
  as if it were this one. What is compared, and why, is documented there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional


from .load import load_checkpoint, to_plain

__all__ = [
    "SavedRun",
    "read_saved_run",
    "config_differences",
    "COMPARED_SECTIONS",
    "TASK_KEYS_NOT_COMPARED",
    "TASK_PREFIXES_NOT_COMPARED",
    "PATH_KEYS",
]

COMPARED_SECTIONS = ("model", "task")
"""Config sections that make a checkpoint part of a run: what is trained (model) and on what (task).
The optimizer, schedule, dataset batching, checkpointing and distributed sections are left out: a
resume may legitimately change them (more updates, another batch size on other hardware, ...)."""

TASK_KEYS_NOT_COMPARED = frozenset(
    {
        # training length: a resume that extends a run raises it (a copy of optimization.max_update)
        "max_update",
        # how the process runs, not what it trains
        "num_threads",
        # what to do with a bad input (stop or skip; check the label file's clip ids): switching to
        # ``skip`` after a crash on a bad file and resuming is the intended use
        "on_bad_file",
        "check_clip_ids",
        # monitoring only: they read the model and never change it (so do all ``probe_*`` keys)
        "diagnostics_interval_updates",
        "per_class_ap_dir",
    }
)
"""Keys of the task section that may differ between a run and its resume."""

TASK_PREFIXES_NOT_COMPARED = ("probe_",)
"""Task keys starting so are not compared either: the online probe's settings (monitoring only)."""

PATH_KEYS = frozenset({"task.data", "task.labels", "task.weights_file", "model.model_path"})
"""Keys naming files or folders: equal when they name the same folder (``/data/x`` and ``/data/x/``, or
a symlink to it), since the data is what matters, not how its path is spelled."""


@dataclass(frozen=True)
class SavedRun:
    """What a checkpoint says about the run that saved it (None: not stored)."""

    num_updates: Optional[int]
    cfg: Optional[Dict[str, Any]]
    task_state: Optional[Dict[str, Any]] = None  # the task's state_dict() (eat tasks: the training data)


def read_saved_run(path: str) -> SavedRun:
    """The stored update number and configuration of a fairseq training checkpoint.

    Reads only the pickle record (tensors are memory-mapped, never read) through the restricted
    unpickler: :func:`~eat_fairseq.checkpoints.load.load_checkpoint` with ``mmap=True``, so it is cheap
    and safe for any file. Raises :class:`~eat_fairseq.checkpoints.load.CheckpointError` naming the
    file when it cannot be read at all.
    """
    state = load_checkpoint(path, mmap=True)
    num_updates = None
    history = state.get("optimizer_history")
    if isinstance(history, (list, tuple)) and history and isinstance(history[-1], dict):
        value = history[-1].get("num_updates")
        if isinstance(value, int) and not isinstance(value, bool):
            num_updates = value
    cfg = to_plain(state.get("cfg"))
    task_state = state.get("task_state")
    return SavedRun(
        num_updates=num_updates,
        cfg=cfg if isinstance(cfg, dict) else None,
        task_state=task_state if isinstance(task_state, dict) else None,
    )


def _as_plain(cfg: Any) -> Any:
    """An omegaconf config as resolved plain containers (the form fairseq stores); others unchanged."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with fairseq
        return cfg
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return cfg


def _flatten(node: Any, prefix: str, out: Dict[str, Any]) -> None:
    """Nested dicts as ``dotted.key -> leaf`` (lists are leaves, compared whole)."""
    if isinstance(node, Mapping) and node:
        for key, value in node.items():
            _flatten(value, f"{prefix}.{key}", out)
    else:
        out[prefix] = node


def _not_compared(task_key: List[str]) -> bool:
    """Whether the task key (``[]`` for the section itself) is one a resume may change."""
    if not task_key:
        return False
    return task_key[0] in TASK_KEYS_NOT_COMPARED or task_key[0].startswith(TASK_PREFIXES_NOT_COMPARED)


def _same_value(a: Any, b: Any) -> bool:
    """``==``, except that a bool never equals a number (``True`` is not ``1`` in a config)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _same_path(a: Any, b: Any) -> bool:
    if _same_value(a, b):
        return True
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (here): only the spelling could match
        return False


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def config_differences(saved_cfg: Optional[Mapping[str, Any]], run_cfg: Any, absent_ok: bool = False) -> List[str]:
    """How the configuration stored in a checkpoint differs from the run being started, one
    ``"key: saved X, now Y"`` line per differing key (empty: the checkpoint belongs to this run).

    Compared: the whole ``model`` section (any change there is another model) and the ``task``
    section except :data:`TASK_KEYS_NOT_COMPARED` and :data:`TASK_PREFIXES_NOT_COMPARED` (keys a
    resume legitimately changes: the training length, execution and monitoring settings). The data
    stays compared, by the folder it names (:data:`PATH_KEYS`). A key present on one side only (e.g.
    a field added by a newer version) is a difference shown as ``(absent)``: whether its default
    reproduces the old behaviour is for the user to judge; with ``absent_ok`` such keys are left out
    (the check of every resume, which must not stop a run because a newer version of this package
    added a field). ``saved_cfg`` is a plain dict (as read by
    :func:`read_saved_run`); ``run_cfg`` a plain dict or an omegaconf config (fairseq's
    ``trainer.cfg``).
    """
    if saved_cfg is None:
        return ["the checkpoint stores no configuration (no 'cfg' entry)"]
    saved, run = _as_plain(saved_cfg), _as_plain(run_cfg)
    lines = []
    for section in COMPARED_SECTIONS:
        flat_saved: Dict[str, Any] = {}
        flat_run: Dict[str, Any] = {}
        _flatten(saved.get(section, _ABSENT), section, flat_saved)
        _flatten(run.get(section, _ABSENT), section, flat_run)
        for key in sorted(set(flat_saved) | set(flat_run)):
            if section == "task" and _not_compared(key.split(".", 2)[1:2]):
                continue
            old, new = flat_saved.get(key, _ABSENT), flat_run.get(key, _ABSENT)
            if absent_ok and (old is _ABSENT or new is _ABSENT):
                continue
            if not (_same_path(old, new) if key in PATH_KEYS else _same_value(old, new)):
                lines.append(f"{key}: saved {_show(old)}, now {_show(new)}")
    return lines
