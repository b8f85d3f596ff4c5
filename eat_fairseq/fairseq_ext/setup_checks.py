"""Start-of-training checks that turn silent or misleading set-up mistakes into one line naming them.

- :func:`check_known_keys`: a key given on the command line with ``+`` (``+optimization.max_updates=20``,
  a typo of ``max_update``) is added to the config, and in fairseq's own sections (``common``,
  ``optimization``, ``checkpoint``, ``dataset``, ...) nothing reads it: the run goes on with the
  default and no word said. fairseq checks only the registry sections (task, model, criterion, ...)
  and only when it builds them. So at task set-up every section whose dataclass is known is compared
  with that dataclass's fields, and an unknown key stops the run with the closest known names.
- :func:`check_data_folder`: a mistyped ``task.data`` used to surface as a missing
  ``label_descriptors.csv`` or a missing manifest inside it; the folder itself is named first.
- A forgotten ``common.user_dir`` is filled in before the run by the recipes' Hydra callback, which
  lives outside this package (``eat_fairseq_hydra.py``, where its module doc says why).

Keys that fairseq or hydra add on purpose are not flagged: ``_name`` (every registry dataclass has it),
``job_logging_cfg`` (fairseq-hydra-train adds it to the root), ``distributed_num_procs`` (fairseq's
process spawner adds it), and sections whose ``_name`` selects no registered dataclass are skipped.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Dict, List, Optional, Set

from omegaconf import DictConfig, OmegaConf

# keys fairseq itself adds to a composed config before the task is set up (open_dict), by section;
# "" is the root
RUNTIME_KEYS: Dict[str, Set[str]] = {
    "": {"job_logging_cfg"},
    "distributed_training": {"distributed_num_procs"},
}

PLUS_NOTE = "a key given with + is added to the config and otherwise ignored"


class UnknownSettingError(ValueError):
    """A composed config holds keys that no section of the run reads (see the module doc)."""


def _registry_dataclass(section: str, name: Optional[str]) -> Optional[type]:
    """The dataclass fairseq builds a registry section (task, model, criterion, ...) from, as
    ``fairseq.dataclass.initialize.add_defaults`` looks it up; None when ``_name`` selects none."""
    if not name:
        return None
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY, MODEL_DATACLASS_REGISTRY
    from fairseq.registry import REGISTRIES
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    if section == "task":
        return TASK_DATACLASS_REGISTRY.get(name)
    if section == "model":
        return MODEL_DATACLASS_REGISTRY.get(ARCH_MODEL_NAME_REGISTRY.get(name, name))
    if section in REGISTRIES:
        return REGISTRIES[section]["dataclass_registry"].get(name)
    return None


def _fields(dc: type) -> Set[str]:
    return {f.name for f in dataclasses.fields(dc)}


def _suggest(key: str, known: Set[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""


def unknown_keys(root: Any) -> List[str]:
    """One description per key of ``root`` (a composed fairseq config) that its section's dataclass
    does not have, with the closest known names; sections without a known dataclass are skipped."""
    from fairseq.dataclass.configs import FairseqConfig

    sections = {f.name: f.type for f in dataclasses.fields(FairseqConfig)}
    problems: List[str] = []
    for key in root.keys():
        key = str(key)
        if key not in sections and key not in RUNTIME_KEYS[""]:
            problems.append(f"{key} is not a section of this run{_suggest(key, set(sections), '')}")
    for section, kind in sections.items():
        node = root.get(section) if section in root else None
        if not isinstance(node, DictConfig):
            continue
        dc = kind if dataclasses.is_dataclass(kind) else _registry_dataclass(section, node.get("_name"))
        if dc is None:
            continue
        known = _fields(dc) | RUNTIME_KEYS.get(section, set())
        for key in node.keys():
            if str(key) not in known:
                problems.append(f"{section}.{key} is not a setting of this run{_suggest(str(key), known, section + '.')}")
    return problems


def check_known_keys(task_cfg: Any) -> None:
    """Raise :class:`UnknownSettingError` (one line) when the config that ``task_cfg`` belongs to holds
    keys nothing reads. A task config without a parent (built by hand, not composed) is not checked."""
    if not OmegaConf.is_config(task_cfg):
        return
    root = task_cfg._get_root()
    if root is task_cfg or not isinstance(root, DictConfig) or "task" not in root:
        return
    problems = unknown_keys(root)
    if problems:
        raise UnknownSettingError(f"{'; '.join(problems)}; {PLUS_NOTE}")


def check_data_folder(data: Any, what: str = "task.data") -> None:
    """Raise ``FileNotFoundError`` naming ``data`` when it is not a folder, with the closest sibling
    folder when there is one (a typo), before anything looks for a file inside it."""
    folder = os.path.abspath(os.path.expanduser(str(data)))
    if os.path.isdir(folder):
        return
    if os.path.exists(folder):
        raise FileNotFoundError(f"{what}={data}: {folder} is a file, not a folder; {what} is the folder that "
                                f"holds the manifests ({{split}}.tsv)")
    parent, name = os.path.split(folder)
    hint = ""
    if os.path.isdir(parent):
        siblings = [e.name for e in os.scandir(parent) if e.is_dir()]
        close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
        hint = f" (did you mean {os.path.join(parent, close[0])}?)" if close else ""
    else:
        hint = f" (nor does {parent})"
    raise FileNotFoundError(f"{what}={data}: the folder {folder} does not exist{hint}")

