"""Register the fairseq layer whenever fairseq is in the process, without importing fairseq ourselves.

``import eat_fairseq`` must stay cheap (the inference tools never need fairseq, whose import takes
seconds), yet ``checkpoint_utils.load_model_ensemble_and_task`` never imports ``common.user_dir``, so
the ``eat_*`` tasks, models and criterions must be registered whenever fairseq is used. Three paths
lead there:

1. fairseq is already imported when ``eat_fairseq`` is (``fairseq-hydra-train`` loading this package
   as ``common.user_dir``, or a script that imported fairseq first): :func:`install` registers at once;
2. fairseq is imported later (``import eat_fairseq; from fairseq import checkpoint_utils``): a
   one-shot meta-path finder wraps fairseq's loader so that the registration runs right after the
   ``fairseq`` package has finished executing, before the importer gets it back;
3. ``import eat_fairseq.fairseq_ext`` registers directly (it imports fairseq itself).

The finder only answers for the top-level name ``fairseq``; it asks the other finders for the real
spec and hands it back with a wrapping loader, which restores the original loader on the module
afterwards (``module.__loader__``/``__spec__.loader``), so fairseq looks untouched. It removes itself
once fairseq has loaded.

When the registration fails (a bug or a missing dependency in the fairseq layer), what happens depends on
whether the process is using fairseq at that moment, because that is when a user needs the eat_*
components and would otherwise get fairseq's confusing "Could not infer task type" much later:

- ``import eat_fairseq`` while fairseq is not imported never fails on fairseq's account, even when the
  installed fairseq is broken: it does not import fairseq (inference never needs it), so it cannot know,
  and an inference user should not pay for a training dependency;
- fairseq already loaded (path 1: ``fairseq-hydra-train`` importing ``common.user_dir``, or a script
  that imported fairseq first): the process is using fairseq and asked for this package in it, so
  ``import eat_fairseq`` raises :class:`RegistrationError` (an ``ImportError``) naming the eat_fairseq
  module that failed, with the original exception chained as its cause;
- fairseq imported later (path 2): a ``RuntimeWarning`` with the same message. Raising there would fail
  the user's own ``import fairseq`` after fairseq has executed (importlib then drops the module while
  its submodules stay registered) and would break uses of fairseq that have nothing to do with EAT;
  ``import eat_fairseq.fairseq_ext`` shows the full error.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings
from types import ModuleType
from typing import Any, Optional, Sequence

TARGET = "fairseq"
LAYER = "eat_fairseq.fairseq_ext"


class RegistrationError(ImportError):
    """The eat_* fairseq components could not be registered while fairseq is in use (see the module doc)."""


def _failed_module(exc: BaseException) -> str:
    """The innermost eat_fairseq module (other than this one) on the traceback of ``exc``: where the
    registration actually broke (a task module, a model module ...), not just the layer's package."""
    name = LAYER
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.split(".")[0] == "eat_fairseq" and module != __name__:
            name = module
        tb = tb.tb_next
    return name


def register(strict: bool = False) -> None:
    """Import the fairseq layer (idempotent).

    A failure raises :class:`RegistrationError` (chained to the cause) with ``strict``, else it is a
    ``RuntimeWarning``; both name the module that failed and the cause.
    """
    try:
        importlib.import_module(LAYER)
    except Exception as exc:
        module = _failed_module(exc)
        message = (f"eat_fairseq: registering the eat_* fairseq components failed in {module} "
                   f"({type(exc).__name__}: {exc}); fairseq will not know the eat_* tasks, models and "
                   f"criterions")
        if strict:
            raise RegistrationError(message, name=module) from exc
        warnings.warn(f"{message}. `import {LAYER}` shows the full error", RuntimeWarning, stacklevel=2)


def import_layer_quietly() -> ModuleType:
    """Import (and so register) the fairseq layer for our own tools, without the FutureWarning that
    fairseq's import raises from ``torch.jit.script`` (fairseq's code, nothing a user can act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        return importlib.import_module(LAYER)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs fairseq's own loader, then :func:`register`."""

    def __init__(self, loader: Any, finder: "_FairseqFinder") -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: Any) -> Optional[ModuleType]:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            module.__loader__ = self._loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self._loader
        self._finder.uninstall()
        register()

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, get_code, ...
        return getattr(self._loader, name)


class _FairseqFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Optional[Sequence[str]] = None, target: Optional[ModuleType] = None):
        if name != TARGET:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader, self)
        return spec

    def uninstall(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Register now if fairseq is loaded (a failure raises :class:`RegistrationError`), else arrange for
    registration when it gets imported (a failure warns); the module doc says why they differ."""
    loaded = sys.modules.get(TARGET)
    if loaded is not None:
        # a fairseq that is still executing its own __init__ cannot be completed from here; no path of
        # this package gets there (fairseq imports user dirs only once it is fully loaded)
        if not getattr(getattr(loaded, "__spec__", None), "_initializing", False):
            register(strict=True)
        return
    if not any(isinstance(f, _FairseqFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _FairseqFinder())
