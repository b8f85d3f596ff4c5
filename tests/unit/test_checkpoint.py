"""Restricted checkpoint loading (core/checkpoint.py) and the fairseq allow-list (checkpoint_compat).

The security tests build pickles that would run a command under full unpickling and check both
that loading is refused and that the command did not run (its marker file does not exist).
"""
from __future__ import annotations

import argparse
import builtins
import collections
import importlib
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from eat_fairseq.checkpoints.load import (
    CheckpointError,
    StandIn,
    UnsafeCheckpointError,
    load_checkpoint,
    load_safetensors,
    to_plain,
)

# --------------------------------------------------------------------------------------------------
# ordinary content


def _training_state() -> dict:
    """What a fairseq fine-tuning checkpoint holds besides the cfg, numpy scalars included."""
    return {
        "model": collections.OrderedDict(
            w=torch.randn(3, 4), b=torch.arange(5, dtype=torch.int64), h=torch.randn(2, dtype=torch.float16)
        ),
        "param": torch.nn.Parameter(torch.ones(2)),
        "extra_state": {
            "best": np.float64(0.4712),  # how a fine-tuned file stores its best mAP
            "count": np.int64(7),
            "flag": np.bool_(True),
            "array": np.arange(6, dtype=np.float32).reshape(2, 3),
            "args": argparse.Namespace(lr=[5e-5], task="x"),
            "set": {1, 2},
            "bytes": b"\x00\xffab",
            "dtype": torch.float16,
            "device": torch.device("cpu"),
            "size": torch.Size([2, 3]),
            "float": float("inf"),
        },
    }


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_loads_tensors_containers_and_numpy_values(tmp_path: Path, legacy: bool, mmap: bool) -> None:
    """Also memory-mapped (the resume scan's cheap read): a legacy file, which cannot be mapped, is read whole."""
    state = _training_state()
    path = tmp_path / "ckpt.pt"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    out = load_checkpoint(path, mmap=mmap)
    assert isinstance(out["model"], collections.OrderedDict)
    for key, value in state["model"].items():
        assert out["model"][key].dtype == value.dtype and torch.equal(out["model"][key], value)
    assert isinstance(out["param"], torch.nn.Parameter) and torch.equal(out["param"], state["param"])
    extra = out["extra_state"]
    # numpy scalars come back as Python numbers, so nothing downstream re-saves a numpy scalar
    assert type(extra["best"]) is float and extra["best"] == 0.4712
    assert type(extra["count"]) is int and extra["count"] == 7
    assert extra["flag"] is True
    assert isinstance(extra["array"], np.ndarray) and np.array_equal(extra["array"], state["extra_state"]["array"])
    assert isinstance(extra["args"], argparse.Namespace) and extra["args"].lr == [5e-5]
    assert extra["set"] == {1, 2} and extra["bytes"] == b"\x00\xffab"
    assert extra["dtype"] is torch.float16 and extra["device"] == torch.device("cpu")
    assert extra["size"] == torch.Size([2, 3]) and extra["float"] == float("inf")


def test_mmap_maps_a_zip_file_and_reads_a_legacy_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for legacy, expected in ((False, [True]), (True, [True, None])):
        calls.clear()
        path = tmp_path / f"legacy{legacy}.pt"
        torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=not legacy)
        assert torch.equal(load_checkpoint(path, mmap=True)["w"], torch.ones(3))
        assert calls == expected  # one mapped read; a legacy file cannot be mapped and is read once more


def test_numpy_scalar_breaks_weights_only_but_not_the_restricted_loader(tmp_path: Path) -> None:
    """Reference section 7: torch's default loader rejects a stored best mAP; ours reads it."""
    path = tmp_path / "finetuned.pt"
    torch.save({"cfg": {"model": {"_name": "mae_image_classification"}}, "extra_state": {"best": np.float64(0.5)}}, path)
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        torch.load(path)  # weights_only=True is torch's default
    assert load_checkpoint(path)["extra_state"]["best"] == 0.5


@pytest.fixture
def vanishing_module(tmp_path: Path):
    """A module importable only while the fixture sets up; yields (module name, module)."""
    name = f"eat_vanishing_{os.getpid()}_{tmp_path.name}".replace("-", "_")
    src = tmp_path / "mods"
    src.mkdir()
    (src / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import enum

            class Color(enum.Enum):
                RED = "red"

            class TrainingInfo:
                def __init__(self, best, note):
                    self.best = best
                    self.note = note

            class Meters(dict):
                pass

            class History(list):
                pass
            """
        )
    )
    sys.path.insert(0, str(src))
    try:
        module = importlib.import_module(name)
        yield name, module
    finally:
        if str(src) in sys.path:
            sys.path.remove(str(src))
        sys.modules.pop(name, None)


def test_instance_of_a_class_from_a_vanished_module_loads_as_standin(tmp_path: Path, vanishing_module) -> None:
    name, module = vanishing_module
    path = tmp_path / "ckpt.pt"
    meters = module.Meters(loss=1.5, n=3)
    history = module.History([0.1, 0.2])
    torch.save(
        {"info": module.TrainingInfo(0.25, "best"), "color": module.Color.RED, "w": torch.ones(2),
         "meters": meters, "history": history},
        path,
    )
    # the module is gone: full unpickling could not even import it
    sys.path.remove(str(Path(module.__file__).parent))
    sys.modules.pop(name)
    Path(module.__file__).unlink()
    out = load_checkpoint(path)
    info = out["info"]
    assert isinstance(info, StandIn) and info.origin == f"{name}.TrainingInfo"
    assert info.state == {"best": 0.25, "note": "best"}
    assert to_plain(info) == {"best": 0.25, "note": "best"}
    assert to_plain(out["color"]) == "red"  # enums become their value
    assert to_plain(out["meters"]) == {"loss": 1.5, "n": 3}  # dict / list subclasses keep their items
    assert to_plain(out["history"]) == [0.1, 0.2]
    assert torch.equal(out["w"], torch.ones(2))
    assert name not in sys.modules  # a stand-in never imports its module
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(info)


def test_omegaconf_config_becomes_plain_containers(tmp_path: Path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    plain = {
        "common": {"seed": 1, "fp16": False, "log_format": None},
        "model": {"_name": "data2vec_multi", "layers": [1, 2.5, None, "s", {"a": [[True]]}], "empty": {}},
        "optimization": {"lr": [0.0005]},
    }
    cfg = omegaconf.OmegaConf.create(plain, flags={"allow_objects": True})  # as fairseq's loader makes it
    path = tmp_path / "cfg.pt"
    torch.save({"cfg": cfg, "model": collections.OrderedDict(x=torch.zeros(1))}, path)
    out = load_checkpoint(path)
    assert isinstance(out["cfg"], StandIn) and out["cfg"].origin == "omegaconf.dictconfig.DictConfig"
    assert to_plain(out["cfg"]) == plain
    assert to_plain(out["model"]) == {"x": out["model"]["x"]}


# --------------------------------------------------------------------------------------------------
# malicious files: refused, and nothing runs


class _Payload:
    """Pickles as ``func(*args)``: what an attacker's object does through ``__reduce__``."""

    def __init__(self, func: object, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _raw_global_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-2 pickle calling ``module.name(arg)``, for globals that cannot be referenced here."""
    return (
        b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n"
        + b"X" + len(arg.encode()).to_bytes(4, "little") + arg.encode() + b"\x85R."
    )


def _marker_cases(marker: Path) -> list[tuple[str, object, str]]:
    cmd = f"touch {marker}"
    return [
        ("os.system", _Payload(os.system, (cmd,)), "system"),
        ("subprocess.Popen", _Payload(subprocess.Popen, (["touch", str(marker)],)), "Popen"),
        ("builtins.exec", _Payload(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)), "exec"),
        ("builtins.eval", _Payload(builtins.eval, (f"open({str(marker)!r}, 'w')",)), "eval"),
        ("builtins.getattr", _Payload(builtins.getattr, (os, "system")), "getattr"),
        ("torch.load", _Payload(torch.load, (str(marker),)), "load"),
    ]


@pytest.mark.parametrize("case", range(6), ids=["os.system", "Popen", "exec", "eval", "getattr", "torch.load"])
def test_code_running_globals_are_refused_and_not_executed(tmp_path: Path, case: int) -> None:
    marker = tmp_path / "PWNED"
    label, payload, global_name = _marker_cases(marker)[case]
    path = tmp_path / "evil.pt"
    state = {"model": {"w": torch.ones(2)}, "extra_state": {"x": payload}}
    if label == "builtins.getattr":  # a module object cannot be pickled: reference the global raw
        path.write_bytes(_raw_global_call("builtins", "getattr", "x"))
    else:
        torch.save(state, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and global_name in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "module,name",
    [
        ("builtins", "__import__"),
        ("builtins", "compile"),
        ("builtins", "open"),
        ("posix", "system"),
        ("nt", "system"),
        ("importlib", "import_module"),
        ("runpy", "run_path"),
        ("pty", "spawn"),
        ("pickle", "loads"),
        ("shutil", "rmtree"),
        ("socket", "Socket"),  # a class name from a denied module is refused too
        ("numpy", "load"),
        ("some_unknown_module", "run_me"),  # not a class name: never stood in for
    ],
)
def test_raw_pickles_naming_dangerous_globals_are_refused(tmp_path: Path, module: str, name: str) -> None:
    path = tmp_path / "raw.pt"
    path.write_bytes(_raw_global_call(module, name, "x"))
    with pytest.raises(UnsafeCheckpointError, match=f"{module}.{name}"):
        load_checkpoint(path)


def test_trusted_is_the_explicit_opt_in_to_full_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"best": np.float64(0.5)}, path)
    out = load_checkpoint(path, trusted=True)
    assert type(out["best"]) is np.float64  # torch's own unpickler, nothing converted


# --------------------------------------------------------------------------------------------------
# broken files


def _broken_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.randn(64, 64)}}, good)
    data = good.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "random": bytes(range(256)) * 8,
        "text": b"this is not a checkpoint\n",
        "truncated_pickle": pickle.dumps({"a": list(range(100))}, protocol=2)[:40],
    }
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name}.pt"
        out[name].write_bytes(content)
    return out


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("kind", ["truncated", "empty", "random", "text", "truncated_pickle"])
def test_corrupt_files_raise_checkpoint_error_naming_the_file(tmp_path: Path, kind: str, mmap: bool) -> None:
    path = _broken_files(tmp_path)[kind]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, mmap=mmap)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert str(path) in str(info.value)


def test_missing_directory_and_non_dict_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="expected a dict") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_load_safetensors_reads_tensors_and_reports_bad_files(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    tensors = {"model.blocks.0.norm1.weight": torch.randn(8), "model.extra_tokens": torch.randn(1, 1, 8)}
    good = tmp_path / "model.safetensors"
    save_file(tensors, str(good))
    out = load_safetensors(good)
    assert out.keys() == tensors.keys() and all(torch.equal(out[k], v) for k, v in tensors.items())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_safetensors(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_safetensors(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------------------------------
# fairseq side: the weights_only allow-list


_ALLOW_LIST_SCRIPT = """
import io, pickle, sys
import numpy as np, torch
from omegaconf import OmegaConf

# the state a resumed distributed run broadcasts: cfg already turned into a DictConfig
cfg = OmegaConf.create({"common": {"seed": 1}, "model": {"_name": "eat", "x": [1, None, 2.5, {"a": True}]}},
                       flags={"allow_objects": True})
buf = io.BytesIO(); torch.save({"cfg": cfg, "model": {"w": torch.ones(2)}}, buf)

def load(b):
    b.seek(0); return torch.load(b)

try:
    load(buf); print("BEFORE: loaded")
except pickle.UnpicklingError as e:
    print("BEFORE: refused", "DictConfig" in str(e))
# importing the package installs the list (before that, nothing in this process had)
from eat_fairseq.fairseq_ext.checkpoint_compat import install_safe_globals
install_safe_globals(); install_safe_globals()  # idempotent
out = load(buf)
print("AFTER:", OmegaConf.to_container(out["cfg"]) == OmegaConf.to_container(cfg))
nbuf = io.BytesIO(); torch.save({"best": np.float64(1.0)}, nbuf)
try:
    load(nbuf); print("NUMPY: loaded")
except pickle.UnpicklingError:
    print("NUMPY: refused")
"""


def test_allow_list_makes_a_dictconfig_state_load_with_weights_only(tmp_path: Path) -> None:
    """Run in a fresh interpreter: the allow-list is process-wide and may already be installed here."""
    pytest.importorskip("fairseq")
    pytest.importorskip("omegaconf")
    script = tmp_path / "allow.py"
    script.write_text(_ALLOW_LIST_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "BEFORE: refused True" in lines
    assert "AFTER: True" in lines
    assert "NUMPY: refused" in lines  # numpy scalars stay off the list on purpose


def test_allow_list_entries_are_all_classes_or_typing_any() -> None:
    pytest.importorskip("omegaconf")
    import typing

    from eat_fairseq.fairseq_ext.checkpoint_compat import safe_globals

    entries = safe_globals()
    assert all(isinstance(e, type) or e is typing.Any for e in entries)
    names = {f"{getattr(e, '__module__', '')}.{getattr(e, '__qualname__', getattr(e, '_name', e))}" for e in entries}
    assert not any(n.startswith("numpy") for n in names)
    assert len(entries) == 11
