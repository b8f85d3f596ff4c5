"""Read fairseq ``.pt`` checkpoints (ours and the released EAT files) without running their code.

A ``.pt`` file is a pickle, and unpickling can call any importable function. torch's default
``weights_only=True`` loader is safe but rejects what fairseq files legitimately hold (numpy scalars
in training state, omegaconf objects, fairseq dataclasses; docs/reference.md section 7), and plain
``torch.load(weights_only=False)`` runs whatever the file asks for. This module is the middle way:
``torch.load`` driven by a restricted unpickler whose ``find_class`` decides, for every global the
file names, one of three things.

1. **Allowed**: a fixed table of globals that only build data: torch's tensor/storage rebuild
   functions, dtypes and devices, plain containers (``dict``, ``list``, ``set``, ``OrderedDict``,
   ``defaultdict``, ...), ``argparse.Namespace``, ``types.SimpleNamespace``, and numpy scalars,
   dtypes and arrays. numpy scalars are converted to Python numbers on load, so nothing downstream
   ever sees (or re-saves) a numpy scalar.
2. **Refused** with :class:`UnsafeCheckpointError` (naming the file and the global):
   - any other global of a *denied* module: ``builtins`` (``eval``, ``exec``, ``getattr``,
     ``__import__``, ``open``, ``compile``, ...), ``os``/``posix``/``nt``, ``subprocess``, ``sys``,
     ``shutil``, ``importlib``, ``pickle``, ``runpy``, ``socket``, ``code``, ``pty``, ``ctypes``,
     ``types``, ``operator``, ``functools``, ``codecs``, ``copyreg``, ``multiprocessing``, ... (see
     ``DENIED_MODULES``), and ``torch``/``numpy`` outside the table: those libraries are importable
     and hold code-running functions (``torch.load``, ``numpy.load``, ...), and a stand-in for one of
     their objects would silently drop data;
   - any global whose name does not look like a class (rule below), from any module.
3. **Stand-in**: a global whose name looks like a class, from any other module (``omegaconf``,
   ``fairseq``, ``typing``, ``__main__``, a module that no longer exists, ...), becomes an inert
   :class:`StandIn` subclass named after it. The module is never imported and nothing of it runs;
   constructing a stand-in (pickle's REDUCE / NEWOBJ) only records the arguments, and restoring its
   state (BUILD) only records the state. :func:`to_plain` turns stand-ins of omegaconf containers
   into plain dicts and lists.

The class-name rule: every dotted part of the name matches ``_*[A-Z][A-Za-z0-9_]*`` (PEP 8
CapWords, which is how ``DictConfig``, ``AnyNode``, ``FairseqConfig`` or ``Any`` are spelled and how
functions such as ``system``, ``eval`` or ``load`` are not). Because only such names ever become
stand-ins, a pickle can never make a function call through a stand-in: function-like names are
refused when they are looked up, before anything is invoked. Since stand-ins never execute
anything, the rule is about loud refusal of suspicious files, not about containment.

``load_checkpoint(path, trusted=True)`` is the explicit opt-in to full unpickling, for files the
caller produced or otherwise trusts.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import collections
import copyreg
import io
import os
import pickle
import re
import types
import zipfile
from typing import Any, Callable

import torch

from eat_fairseq.checkpoints.errors import CheckpointError, UnsafeCheckpointError

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "StandIn",
    "DENIED_MODULES",
    "load_checkpoint",
    "load_safetensors",
    "to_plain",
    "restricted_pickle_module",
]


DENIED_MODULES: frozenset[str] = frozenset(
    {
        "builtins", "__builtin__", "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys",
        "shutil", "importlib", "pickle", "_pickle", "cPickle", "pickletools", "dill", "cloudpickle",
        "joblib", "runpy", "socket", "_socket", "ssl", "code", "codeop", "pty", "tty", "ctypes",
        "_ctypes", "types", "marshal", "io", "_io", "operator", "_operator", "functools",
        "_functools", "itertools", "codecs", "_codecs", "copyreg", "copy_reg", "copy", "webbrowser",
        "multiprocessing", "concurrent", "threading", "_thread", "signal", "tempfile", "shelve",
        "dbm", "pdb", "bdb", "inspect", "gc", "ast", "platform", "asyncio", "http", "urllib",
        "ftplib", "smtplib", "telnetlib", "zipimport", "pkgutil", "site", "sysconfig", "imp",
        "timeit", "trace", "profile", "cProfile", "pydoc", "tkinter", "ensurepip", "venv",
        "distutils", "setuptools", "pip", "pkg_resources", "glob", "fcntl", "resource", "mmap",
        "select", "selectors", "logging", "zipfile", "tarfile", "torch", "numpy",
    }
)
"""Top-level modules whose globals are refused unless listed in the allow table."""

_CLASS_PART = re.compile(r"_*[A-Z][A-Za-z0-9_]*")


def _looks_like_class(name: str) -> bool:
    """True when every dotted part of ``name`` is spelled like a class (CapWords)."""
    return all(_CLASS_PART.fullmatch(part) for part in name.split("."))


# --------------------------------------------------------------------------------------------------
# stand-ins


class StandIn:
    """Inert replacement for an instance of a class that is not loaded (omegaconf, fairseq, ...).

    It records what unpickling would have passed to the real class: ``args``/``kwargs`` (from
    REDUCE / NEWOBJ) and ``state`` (from BUILD). Subclasses are created per original class name;
    ``origin`` holds ``"module.QualName"``.
    """

    origin: str = "StandIn"

    def __new__(cls, *args: Any, **kwargs: Any) -> "StandIn":
        obj = super().__new__(cls)
        obj.__dict__["args"] = args
        obj.__dict__["kwargs"] = kwargs
        obj.__dict__["state"] = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Accept and ignore constructor arguments: ``__new__`` already recorded them."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        """Items pickle adds to a dict subclass (SETITEMS), recorded in ``items``."""
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        """Elements pickle adds to a list subclass (APPENDS), recorded in ``elements``."""
        self.__dict__.setdefault("elements", []).append(value)

    def extend(self, values: Any) -> None:
        """Bulk form of :meth:`append` (pickle prefers it when present)."""
        self.__dict__.setdefault("elements", []).extend(values)

    def __reduce__(self) -> tuple:
        """Refuse re-pickling: a stand-in saved back would masquerade as the original class."""
        raise TypeError(f"a StandIn for {self.origin} cannot be pickled; convert it with to_plain() first")

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        if self.state is not None:
            parts.append(f"state={self.state!r}")
        return f"StandIn[{self.origin}]({', '.join(parts)})"

    def to_plain(self) -> Any:
        """Plain Python for this object; see :func:`to_plain`."""
        return _standin_to_plain(self)


_STANDIN_CACHE: dict[str, type[StandIn]] = {}


def _standin_class(module: str, name: str) -> type[StandIn]:
    """The (cached) stand-in class for ``module.name``."""
    origin = f"{module}.{name}"
    cls = _STANDIN_CACHE.get(origin)
    if cls is None:
        short = name.rsplit(".", 1)[-1]
        cls = type(short, (StandIn,), {"origin": origin, "__qualname__": f"StandIn[{origin}]"})
        _STANDIN_CACHE[origin] = cls
    return cls


_OMEGACONF_DICT = {"omegaconf.dictconfig.DictConfig", "omegaconf.DictConfig"}
_OMEGACONF_LIST = {"omegaconf.listconfig.ListConfig", "omegaconf.ListConfig"}


def _state_dict_of(obj: StandIn) -> dict:
    """The attribute dict a BUILD would have set (pickle's ``(state, slotstate)`` merged)."""
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
        merged: dict = {}
        for part in state:
            merged.update(part or {})
        return merged
    return state if isinstance(state, dict) else {}


def _standin_to_plain(obj: StandIn) -> Any:
    """Plain value of a stand-in.

    omegaconf ``DictConfig``/``ListConfig`` -> dict / list of their content; omegaconf value nodes
    (anything carrying ``_val``) -> the value; an object built from exactly one argument and no
    state (how an ``Enum`` member is pickled) -> that argument; anything else -> its recorded state
    (or ``{"__class__": origin, "args": [...], "kwargs": {...}}`` when it has none). A dict or list
    subclass (items/elements added by pickle) -> a dict / list of them.
    """
    if obj.origin in _OMEGACONF_DICT or obj.origin in _OMEGACONF_LIST:
        content = _state_dict_of(obj).get("_content")
        if content is None or isinstance(content, str):
            return content  # None config or a "???" / interpolation string
        if obj.origin in _OMEGACONF_DICT:
            return {to_plain(k): to_plain(v) for k, v in dict(content).items()}
        return [to_plain(v) for v in content]
    if "items" in obj.__dict__ or "elements" in obj.__dict__:
        if "items" in obj.__dict__:
            return {to_plain(k): to_plain(v) for k, v in obj.__dict__["items"].items()}
        return [to_plain(v) for v in obj.__dict__["elements"]]
    attrs = _state_dict_of(obj)
    if "_val" in attrs:
        return to_plain(attrs["_val"])
    if obj.state is None and len(obj.args) == 1 and not obj.kwargs:
        return to_plain(obj.args[0])
    if obj.state is not None:
        return to_plain(attrs) if attrs else to_plain(obj.state)
    return {"__class__": obj.origin, "args": to_plain(list(obj.args)), "kwargs": to_plain(obj.kwargs)}


def to_plain(obj: Any) -> Any:
    """Recursively turn a loaded cfg into plain Python for inspection.

    Stand-ins become dicts / lists / values (see :class:`StandIn`), ``OrderedDict`` and
    ``defaultdict`` become ``dict``, ``argparse.Namespace``/``SimpleNamespace`` become ``dict``,
    tuples become lists, a stand-in *class* (e.g. ``typing.Any`` used as a type) becomes its dotted
    name. Tensors, numpy arrays, strings and numbers are returned unchanged.
    """
    if isinstance(obj, StandIn):
        return _standin_to_plain(obj)
    if isinstance(obj, type) and issubclass(obj, StandIn):
        return obj.origin
    if isinstance(obj, dict):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (argparse.Namespace, types.SimpleNamespace)):
        return {k: to_plain(v) for k, v in vars(obj).items()}
    return obj


# --------------------------------------------------------------------------------------------------
# the allow table


def _codecs_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` restricted to what pickle protocol 2 emits for ``bytes`` (latin-1 text)."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") not in {"latin1", "utf8"}:
        raise pickle.UnpicklingError(f"_codecs.encode only decodes latin-1/utf-8 text, got {encoding!r}")
    return text.encode(encoding, errors)


def _check_class_for_construction(cls: Any) -> None:
    """Only classes the table allows (or stand-ins) may be instantiated by copyreg helpers."""
    if isinstance(cls, type) and (issubclass(cls, StandIn) or cls in _ALLOWED_CLASSES):
        return
    raise pickle.UnpicklingError(f"refusing to construct {cls!r}: not an allowed class")


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Protocol 0/1 object reconstruction, limited to allowed classes and stand-ins."""
    _check_class_for_construction(cls)
    if isinstance(cls, type) and issubclass(cls, StandIn):
        obj = cls()
        if state is not None:
            obj.__dict__["args"] = (state,)
        return obj
    if base is not object and base not in _ALLOWED_CLASSES:
        raise pickle.UnpicklingError(f"refusing copyreg reconstruction with base {base!r}")
    return copyreg._reconstructor(cls, base, state)


def _copyreg_newobj(cls: Any, *args: Any) -> Any:
    """``copyreg.__newobj__`` limited to allowed classes and stand-ins."""
    _check_class_for_construction(cls)
    return cls.__new__(cls, *args)


def _copyreg_newobj_ex(cls: Any, args: tuple, kwargs: dict) -> Any:
    """``copyreg.__newobj_ex__`` limited to allowed classes and stand-ins."""
    _check_class_for_construction(cls)
    return cls.__new__(cls, *args, **kwargs)


def _rebuild_from_type_v2(func: Callable, new_type: Any, args: tuple, state: Any) -> Any:
    """torch's tensor-subclass rebuild, limited to plain tensors and parameters."""
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise pickle.UnpicklingError(f"refusing to rebuild a tensor of type {new_type!r}")
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


def _numpy_table() -> dict[str, Any]:
    """numpy globals: dtypes and arrays as numpy objects, scalars converted to Python numbers."""
    import numpy as np

    real_scalar = np.float64(0).__reduce__()[0]
    real_reconstruct = np.ndarray((0,)).__reduce__()[0]

    def scalar(dtype: Any, *data: Any) -> Any:
        """A numpy scalar as the equivalent Python value (float, int, bool, str, ...)."""
        if not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError(f"numpy scalar with a non-dtype {dtype!r}")
        value = real_scalar(dtype, *data)
        return value.item() if isinstance(value, np.generic) else value

    def reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> Any:
        """The empty ndarray numpy's BUILD fills; only plain ``ndarray`` (no subclasses)."""
        if subtype is not np.ndarray:
            raise pickle.UnpicklingError(f"refusing numpy array subtype {subtype!r}")
        return real_reconstruct(subtype, shape, dtype_code)

    table: dict[str, Any] = {"numpy.dtype": np.dtype, "numpy.ndarray": np.ndarray}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[f"{mod}.scalar"] = scalar
        table[f"{mod}._reconstruct"] = reconstruct
    for name in dir(np.dtypes) if hasattr(np, "dtypes") else ():
        obj = getattr(np.dtypes, name)
        if isinstance(obj, type) and issubclass(obj, np.dtype):
            table[f"numpy.dtypes.{name}"] = obj
    return table


_TORCH_UTILS_REBUILDERS = (
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
    "_rebuild_sparse_tensor",
    "_rebuild_nested_tensor",
    "_rebuild_device_tensor_from_numpy",
    "_rebuild_device_tensor_from_cpu_tensor",
    "_rebuild_meta_tensor_no_storage",
    "_rebuild_qtensor",
)

_ALLOWED_CLASSES: set[type] = {
    dict, list, tuple, set, frozenset, int, float, complex, bool, str, bytes, bytearray, slice,
    collections.OrderedDict, collections.defaultdict, collections.Counter, collections.deque,
    argparse.Namespace, types.SimpleNamespace,
}


def _base_table() -> dict[str, Any]:
    """``"module.name" -> object`` for everything that is allowed apart from numpy."""
    table: dict[str, Any] = {}
    for cls in (dict, list, tuple, set, frozenset, int, float, complex, bool, str, bytes, bytearray, slice):
        table[f"builtins.{cls.__name__}"] = cls
        table[f"__builtin__.{cls.__name__}"] = cls
    for cls in (collections.OrderedDict, collections.defaultdict, collections.Counter, collections.deque):
        table[f"collections.{cls.__name__}"] = cls
    table["argparse.Namespace"] = argparse.Namespace
    table["types.SimpleNamespace"] = types.SimpleNamespace
    table["_codecs.encode"] = _codecs_encode
    table["codecs.encode"] = _codecs_encode
    table["copyreg._reconstructor"] = _copyreg_reconstructor
    table["copy_reg._reconstructor"] = _copyreg_reconstructor
    table["copyreg.__newobj__"] = _copyreg_newobj
    table["copyreg.__newobj_ex__"] = _copyreg_newobj_ex
    for name in _TORCH_UTILS_REBUILDERS:
        fn = getattr(torch._utils, name, None)
        if fn is not None:
            table[f"torch._utils.{name}"] = fn
    table["torch._tensor._rebuild_from_type_v2"] = _rebuild_from_type_v2
    table["torch.Size"] = torch.Size
    table["torch.device"] = torch.device
    table["torch.Tensor"] = torch.Tensor
    table["torch._tensor.Tensor"] = torch.Tensor
    table["torch.nn.parameter.Parameter"] = torch.nn.Parameter
    table["torch.storage.UntypedStorage"] = torch.UntypedStorage
    table["torch.storage.TypedStorage"] = torch.storage.TypedStorage
    get_layout = getattr(torch.serialization, "_get_layout", None)
    if get_layout is not None:
        table["torch.serialization._get_layout"] = get_layout
    value_types = (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)
    for name in dir(torch):
        obj = getattr(torch, name, None)
        if isinstance(obj, value_types):
            table[f"torch.{name}"] = obj
    return table


_TABLE: dict[str, Any] | None = None
_NUMPY_ADDED = False  # numpy's entries are added on first use, so numpy is imported only when needed
_NUMPY_PREFIXES = ("numpy.",)


def _lookup_allowed(module: str, name: str) -> Any | None:
    """The allowed object for ``module.name`` or None."""
    global _TABLE, _NUMPY_ADDED
    if _TABLE is None:
        _TABLE = _base_table()
    key = f"{module}.{name}"
    if key in _TABLE:
        return _TABLE[key]
    if key.startswith(_NUMPY_PREFIXES) and not _NUMPY_ADDED:
        _NUMPY_ADDED = True
        try:
            _TABLE.update(_numpy_table())
        except ImportError:
            return None
        return _TABLE.get(key)
    return None


def _resolve_global(module: str, name: str, path: str) -> Any:
    """Apply the module docstring's rule to one global: allowed object, stand-in, or refusal."""
    allowed = _lookup_allowed(module, name)
    if allowed is not None:
        return allowed
    top = module.split(".", 1)[0]
    if top in DENIED_MODULES:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: the file asks for {module}.{name}, which is not on the "
            f"allow-list and could run code (module {top!r} is denied). If you produced this file "
            "yourself, load it with trusted=True."
        )
    if not _looks_like_class(name):
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: the file asks for {module}.{name}, which is not a class name "
            "(only classes are replaced by inert stand-ins; functions could run code). If you "
            "produced this file yourself, load it with trusted=True."
        )
    return _standin_class(module, name)


def restricted_pickle_module(path: str = "<checkpoint>") -> types.SimpleNamespace:
    """A ``pickle_module`` for ``torch.load`` whose unpickler follows this module's rules.

    ``path`` is only used in error messages.
    """

    class RestrictedUnpickler(pickle.Unpickler):
        """``pickle.Unpickler`` whose globals go through :func:`_resolve_global`."""

        def find_class(self, module: str, name: str) -> Any:
            # Python 2 names (protocol < 3 writes e.g. int as __builtin__.long); the default
            # find_class applies this mapping, an override must do it itself.
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
            return _resolve_global(module, name, path)

    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs: Any) -> Any:
        return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()

    return types.SimpleNamespace(
        __name__="eat_fairseq.checkpoints.load.restricted_pickle",
        Unpickler=RestrictedUnpickler,
        load=load,
        loads=loads,
        UnpicklingError=pickle.UnpicklingError,
    )


# --------------------------------------------------------------------------------------------------
# public loaders


_CORRUPT_ERRORS = (
    pickle.UnpicklingError,
    AssertionError,  # torch's legacy reader asserts on a damaged storage table
    EOFError,
    zipfile.BadZipFile,
    RuntimeError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    UnicodeDecodeError,
    OSError,
    ImportError,
    OverflowError,
    MemoryError,
)


def _check_readable(path: str) -> None:
    """Fail early, naming the file, when it is missing, a folder or empty."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")


def _describe(exc: BaseException) -> str:
    """A one-line reason from a torch/zip/pickle exception (torch's messages can be long)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 300:
        text = text[:300] + " ..."
    return f"{type(exc).__name__}: {text}"


def load_checkpoint(path: str | os.PathLike, trusted: bool = False, mmap: bool = False) -> dict:
    """Load a fairseq / torch ``.pt`` checkpoint (zip or legacy format) onto the CPU.

    By default the file is read through the restricted unpickler (module docstring): tensors,
    containers, numpy values (scalars become Python numbers) and inert stand-ins for everything
    else; a file that asks for a code-running global raises :class:`UnsafeCheckpointError` before
    anything runs. ``trusted=True`` is the explicit opt-in to torch's full unpickling (only for
    files you produced). ``mmap=True`` memory-maps the tensors instead of reading them (cheap when
    only the stored configuration or update number is wanted); where that fails (a legacy non-zip
    file, a filesystem without mmap) the file is read whole, the same answer. A missing, corrupt,
    truncated or non-checkpoint file (top level not a dict) raises :class:`CheckpointError` naming
    the file.
    """
    path = os.fspath(path)
    _check_readable(path)
    for mapped in (True, False) if mmap else (False,):
        options: dict[str, Any] = {"mmap": True} if mapped else {}
        if not trusted:
            options["pickle_module"] = restricted_pickle_module(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, **options)
            break
        except CheckpointError:
            raise  # the restricted unpickler refused the file: reading it whole would not change that
        except _CORRUPT_ERRORS as exc:
            if mapped:
                continue
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint (corrupt, truncated or another format): {_describe(exc)}"
            ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: not a checkpoint: expected a dict at the top level, got {type(obj).__name__}"
        )
    return obj


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a ``.safetensors`` file onto the CPU (safetensors never runs code).

    Raises :class:`CheckpointError` naming the file when it is missing, corrupt or not safetensors,
    or when the ``safetensors`` package is not installed.
    """
    path = os.fspath(path)
    _check_readable(path)
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise CheckpointError(f"{path}: reading .safetensors needs the 'safetensors' package") from exc
    try:
        return dict(load_file(path, device="cpu"))
    except Exception as exc:  # safetensors raises its own SafetensorError (not an OSError subclass)
        raise CheckpointError(f"{path}: not a readable safetensors file: {_describe(exc)}") from exc
