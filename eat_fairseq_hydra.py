"""Hydra callback of eat_fairseq's recipes: ``common.user_dir`` filled in when a run does not give it.

Why a module of its own, outside the ``eat_fairseq`` package: Hydra imports a callback's module before
the run starts, and fairseq refuses a ``common.user_dir`` whose package name is already imported from
another folder ("not globally unique"). Importing ``eat_fairseq`` here would break runs that point
``common.user_dir`` at another copy of the package (a development checkout), so this module imports
nothing of it: it finds the installed package's folder with ``importlib.util.find_spec``, which does
not run the package.

Without it, a shipped recipe started without ``common.user_dir`` ended in fairseq's
``AssertionError: Could not infer task type from {...}``, in every process. The recipes name the callback
(``hydra.callbacks.eat_user_dir``); it sets the folder that ``eat-user-dir`` prints, before fairseq reads
the config (so spawned DDP workers get it too), and says so in one line.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write


def installed_user_dir() -> Optional[str]:
    """The folder of the ``eat_fairseq`` package Python would import (None when there is none)."""
    spec = importlib.util.find_spec("eat_fairseq")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.abspath(list(spec.submodule_search_locations)[0])


def fill_user_dir(config: Any) -> Optional[str]:
    """Set ``common.user_dir`` of a composed run config to the installed package's folder when it is not
    given; returns the folder set (None when the run named one, or no package is found). A user_dir the
    run gives is left alone, even one that points elsewhere: fairseq imports what the user asked for."""
    common = config.get("common") if isinstance(config, DictConfig) else None
    if not isinstance(common, DictConfig) or common.get("user_dir"):
        return None
    folder = installed_user_dir()
    if folder is None:
        return None
    with read_write(config), open_dict(config):
        common.user_dir = folder
    return folder


class UserDirCallback(Callback):
    """``hydra.callbacks.eat_user_dir`` in every shipped recipe (see the module doc)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = fill_user_dir(config)
        if folder is not None:
            print(f"eat_fairseq: common.user_dir not given; using {folder} (what eat-user-dir prints)",
                  file=sys.stderr)
