"""Checkpoint conversion (core/convert.py, cli/convert.py) on synthetic files in the released layouts.

The released layouts follow reference section 7 exactly (names and shapes). Base and large state
dicts use zero-stride tensors (one distinct value per tensor, expanded to the real shape) so they
cost kilobytes while keeping every name and shape real; the tiny variant (D 64) uses random values.
Position tables are always real sin-cos tables, because conversion checks them.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import pickle
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from eat_fairseq.cli.convert import main as cli_main
from eat_fairseq.checkpoints.load import CheckpointError, StandIn, load_checkpoint
from eat_fairseq.checkpoints.convert import ConversionError, convert_file, convert_released, read_any
from eat_fairseq.model.encoder import sincos_pos_embed_2d

P = "modality_encoders.IMAGE."
Fill = Callable[[tuple[int, ...]], torch.Tensor]


def _cheap_fill() -> Fill:
    """Zero-stride tensors with one distinct value each: real shapes, ~nothing in memory or on disk."""
    counter = itertools.count(1)
    return lambda shape: torch.tensor(float(next(counter))).expand(*shape)


def _random_fill(seed: int = 0) -> Fill:
    gen = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(*shape, generator=gen)


def released_encoder(dim: int, depth: int, rows: int, fill: Fill, prefix: str = "") -> dict[str, torch.Tensor]:
    """Encoder tensors with the released names (reference section 7)."""
    out = {
        f"{prefix}{P}extra_tokens": fill((1, 1, dim)),
        f"{prefix}{P}local_encoder.proj.weight": fill((dim, 1, 16, 16)),
        f"{prefix}{P}local_encoder.proj.bias": fill((dim,)),
        f"{prefix}{P}fixed_positional_encoder.positions": sincos_pos_embed_2d(dim, rows // 8, 8).unsqueeze(0),
        f"{prefix}{P}context_encoder.norm.weight": fill((dim,)),
        f"{prefix}{P}context_encoder.norm.bias": fill((dim,)),
    }
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        for name, shape in (
            ("norm1.weight", (dim,)), ("norm1.bias", (dim,)), ("norm2.weight", (dim,)), ("norm2.bias", (dim,)),
            ("attn.qkv.weight", (3 * dim, dim)), ("attn.qkv.bias", (3 * dim,)),
            ("attn.proj.weight", (dim, dim)), ("attn.proj.bias", (dim,)),
            ("mlp.fc1.weight", (4 * dim, dim)), ("mlp.fc1.bias", (4 * dim,)),
            ("mlp.fc2.weight", (dim, 4 * dim)), ("mlp.fc2.bias", (dim,)),
        ):
            out[b + name] = fill(shape)
    return out


def released_pretrained_state(
    dim: int, depth: int, dec_depth: int, kernel: int, fill: Fill, rows: int = 6144
) -> dict[str, Any]:
    """Student + decoder + ``_ema`` teacher, as ``data2vec_multi`` stores them."""
    state: dict[str, Any] = released_encoder(dim, depth, rows, fill)
    for i in range(dec_depth):
        state[f"{P}decoder.blocks.{i}.0.weight"] = fill((dim, dim // 16, kernel, kernel))
        state[f"{P}decoder.blocks.{i}.0.bias"] = fill((dim,))
    state[f"{P}decoder.proj.weight"] = fill((dim, dim))
    state[f"{P}decoder.proj.bias"] = fill((dim,))
    state["_ema"] = released_encoder(dim, depth, rows, fill)
    return state


def released_finetuned_state(dim: int, depth: int, num_classes: int, fill: Fill, rows: int = 6144) -> dict[str, Any]:
    state: dict[str, Any] = released_encoder(dim, depth, rows, fill, prefix="model.")
    state.update(
        {
            "fc_norm.weight": fill((dim,)),
            "fc_norm.bias": fill((dim,)),
            "head.weight": fill((num_classes, dim)),
            "head.bias": fill((num_classes,)),
        }
    )
    return state


@contextlib.contextmanager
def _vanishing_class(module_name: str) -> Iterator[type]:
    """A class whose module exists only inside this block (a training-time helper of the authors)."""
    module = types.ModuleType(module_name)

    class RunInfo:
        def __init__(self, epoch: int) -> None:
            self.epoch = epoch

    RunInfo.__module__ = module_name
    RunInfo.__qualname__ = "RunInfo"
    module.RunInfo = RunInfo
    sys.modules[module_name] = module
    try:
        yield RunInfo
    finally:
        sys.modules.pop(module_name, None)


def write_released(path: Path, kind: str, state: dict[str, Any], labels: dict[str, str] | None = None,
                   heads: int | None = None, omegaconf_cfg: bool = False) -> None:
    """A released-style .pt: cfg, state, numpy scalars in the training state, a vanished class."""
    name = "data2vec_multi" if kind == "pretrained" else "mae_image_classification"
    task = "mae_image_pretraining" if kind == "pretrained" else "mae_image_classification"
    model_cfg: dict[str, Any] = {"_name": name}
    if heads is not None:
        model_cfg["num_heads"] = heads
    cfg: Any = {"common": {"seed": 1}, "task": {"_name": task}, "model": model_cfg}
    if omegaconf_cfg:
        omegaconf = pytest.importorskip("omegaconf")
        cfg = omegaconf.OmegaConf.create(cfg, flags={"allow_objects": True})
    with _vanishing_class(f"eat_release_only_{os.getpid()}") as run_info:
        ckpt = {
            "cfg": cfg,
            "model": state,
            "criterion": None,
            "optimizer_history": [{"criterion_name": "ModelCriterion", "num_updates": np.int64(400000)}],
            "task_state": {"labels": labels} if labels else {},
            "extra_state": {"best": np.float64(0.4864), "run": run_info(10)},
        }
        torch.save(ckpt, path)


def _flatten(state: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def _assert_plain(obj: Any, where: str = "cfg") -> None:
    """Only plain containers and scalars (what weights_only and fairseq's OmegaConf.create accept)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str), f"{where}: key {k!r}"
            _assert_plain(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _assert_plain(v, f"{where}[{i}]")
    else:
        assert obj is None or type(obj) in (str, int, float, bool), f"{where}: {type(obj)}"


LABELS_527 = {f"/m/label{i:03d}": str(i) for i in range(527)}

# --------------------------------------------------------------------------------------------------
# released -> ours -> released


@pytest.mark.parametrize("size", ["base", "large"])
def test_round_trip_is_lossless_for_base_and_large(tmp_path: Path, size: str) -> None:
    dim, depth, dec_depth, kernel = (768, 12, 6, 3) if size == "base" else (1024, 24, 3, 5)
    state = released_pretrained_state(dim, depth, dec_depth, kernel, _cheap_fill())
    src, ours, back = tmp_path / "released.pt", tmp_path / "ours.pt", tmp_path / "back.pt"
    write_released(src, "pretrained", state)
    summary = convert_file(src, ours)
    assert summary.kind == "pretrained" and summary.size == size and not summary.positions_extended
    assert summary.encoder.num_heads == (12 if size == "base" else 16)
    convert_file(ours, back, to="released")

    converted = torch.load(ours)  # weights_only=True: our files hold only plain containers + tensors
    cfg = converted["cfg"]
    _assert_plain(cfg)
    assert cfg["model"]["_name"] == "eat" and cfg["task"]["_name"] == "eat_pretraining"
    assert (cfg["model"]["embed_dim"], cfg["model"]["depth"]) == (dim, depth)
    assert (cfg["model"]["decoder_depth"], cfg["model"]["decoder_kernel_size"]) == (dec_depth, kernel)
    assert cfg["model"]["decoder_dim"] == dim and cfg["model"]["max_length"] == 768
    assert converted["model"]["encoder.pos_embed"].shape == (1, 6144, dim)
    assert converted["model"]["num_ema_updates"].item() == 0

    released_back = load_checkpoint(back)
    assert released_back["cfg"]["model"]["_name"] == "data2vec_multi"
    assert released_back["cfg"]["task"]["_name"] == "mae_image_pretraining"
    original, restored = _flatten(state), _flatten(released_back["model"])
    assert sorted(original) == sorted(restored)  # names identical, the nested _ema included
    for key, tensor in original.items():
        assert restored[key].shape == tensor.shape and torch.equal(restored[key], tensor), key


def test_tiny_round_trip_with_random_values_and_omegaconf_cfg(tmp_path: Path) -> None:
    state = released_pretrained_state(64, 2, 2, 3, _random_fill())
    src, ours, back = tmp_path / "released.pt", tmp_path / "ours.pt", tmp_path / "back.pt"
    write_released(src, "pretrained", state, heads=4, omegaconf_cfg=True)
    loaded = load_checkpoint(src)
    assert isinstance(loaded["cfg"], StandIn)  # the cfg is an omegaconf object in this file
    summary = convert_file(src, ours)
    assert summary.encoder.num_heads == 4  # from the source cfg: heads cannot be read from shapes
    assert summary.size.startswith("custom")
    convert_file(ours, back, to="released")
    restored = _flatten(load_checkpoint(back)["model"])
    original = _flatten(state)
    assert sorted(restored) == sorted(original)
    assert all(torch.equal(restored[k], v) for k, v in original.items())
    ours_state = torch.load(ours)["model"]
    assert torch.equal(ours_state["encoder.cls_token"], state[f"{P}extra_tokens"])
    assert torch.equal(ours_state["teacher.blocks.1.mlp.fc2.weight"], state["_ema"]["blocks.1.mlp.fc2.weight"])
    assert torch.equal(ours_state["decoder.blocks.1.conv.weight"], state[f"{P}decoder.blocks.1.0.weight"])


def test_finetuned_527_classes_with_label_map(tmp_path: Path) -> None:
    state = released_finetuned_state(768, 12, 527, _cheap_fill())
    src, ours, back = tmp_path / "ft.pt", tmp_path / "ours.pt", tmp_path / "back.pt"
    write_released(src, "finetuned", state, labels=LABELS_527)
    summary = convert_file(src, ours, kind="finetuned")
    assert (summary.kind, summary.size, summary.num_classes, summary.num_labels) == ("finetuned", "base", 527, 527)
    converted = torch.load(ours)
    _assert_plain(converted["cfg"])
    assert converted["cfg"]["model"]["_name"] == "eat_classifier"
    assert converted["cfg"]["model"]["num_classes"] == 527
    assert converted["cfg"]["task"]["_name"] == "eat_classification"
    labels = converted["task_state"]["labels"]
    assert labels == {k: int(v) for k, v in LABELS_527.items()}
    assert all(type(v) is int for v in labels.values())
    assert set(converted["model"]) >= {"encoder.cls_token", "fc_norm.weight", "head.weight", "encoder.pre_norm.bias"}

    convert_file(ours, back, to="released")
    released_back = load_checkpoint(back)
    assert released_back["cfg"]["model"]["_name"] == "mae_image_classification"
    assert released_back["task_state"]["labels"] == LABELS_527
    assert sorted(released_back["model"]) == sorted(state)
    assert all(torch.equal(released_back["model"][k], v) for k, v in state.items())


def test_released_file_needs_more_than_weights_only_but_converted_file_does_not(tmp_path: Path) -> None:
    """Reference section 7 / fairseq-notes trap 5: the released file defeats torch's default loader."""
    src, ours = tmp_path / "released.pt", tmp_path / "ours.pt"
    write_released(src, "finetuned", released_finetuned_state(64, 1, 5, _random_fill()),
                   labels={str(i): str(i) for i in range(5)}, heads=4)
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        torch.load(src)
    convert_file(src, ours)
    assert torch.load(ours, weights_only=True)["cfg"]["model"]["num_classes"] == 5


# --------------------------------------------------------------------------------------------------
# positions


def test_old_512_row_positions_are_checked_and_extended(tmp_path: Path) -> None:
    state = released_pretrained_state(64, 1, 1, 3, _random_fill(), rows=512)
    src, ours = tmp_path / "old.pt", tmp_path / "ours.pt"
    write_released(src, "pretrained", state, heads=4)
    summary = convert_file(src, ours)
    assert summary.positions_extended and "512 -> 6144" in summary.positions
    model = torch.load(ours)["model"]
    for key in ("encoder.pos_embed", "teacher.pos_embed"):
        table = model[key]
        assert table.shape == (1, 6144, 64)
        assert torch.allclose(table[0, :512], state[f"{P}fixed_positional_encoder.positions"][0], atol=1e-6)
        assert torch.allclose(table[0], sincos_pos_embed_2d(64, 768, 8), atol=0)
    assert torch.load(ours)["cfg"]["model"]["max_length"] == 768


def test_positions_that_are_not_the_sincos_table_are_not_extended(tmp_path: Path) -> None:
    state = released_pretrained_state(64, 1, 1, 3, _random_fill(), rows=512)
    state[f"{P}fixed_positional_encoder.positions"] = torch.randn(1, 512, 64)
    src = tmp_path / "odd.pt"
    write_released(src, "pretrained", state, heads=4)
    with pytest.raises(ConversionError, match="pos_embed"):
        convert_file(src, tmp_path / "ours.pt")
    assert not (tmp_path / "ours.pt").exists()


# --------------------------------------------------------------------------------------------------
# Hugging Face port


def _hf_state(dim: int, depth: int, num_classes: int | None, fill: Fill) -> dict[str, torch.Tensor]:
    """The port's names: ``model.`` prefix, ``modality_encoders.IMAGE.`` dropped, ``pre_norm``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in released_encoder(dim, depth, 6144, fill).items():
        key = key.replace(P, "").replace("context_encoder.norm", "pre_norm")
        out["model." + key] = value.contiguous()
    if num_classes:
        out.update({"fc_norm.weight": fill((dim,)), "fc_norm.bias": fill((dim,)),
                    "head.weight": fill((num_classes, dim)), "head.bias": fill((num_classes,))})
    return out


def test_hf_finetuned_safetensors_with_config_labels(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    tensors = _hf_state(64, 2, 10, _random_fill(1))
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"num_heads": 4, "id2label": {str(i): f"c{i}" for i in range(10)}}))
    ours = tmp_path / "ours.pt"
    assert cli_main([str(folder / "model.safetensors"), str(ours)]) == 0
    converted = torch.load(ours)
    assert converted["cfg"]["model"]["_name"] == "eat_classifier" and converted["cfg"]["model"]["num_heads"] == 4
    assert converted["task_state"]["labels"] == {f"c{i}": i for i in range(10)}
    model = converted["model"]
    assert torch.equal(model["encoder.pre_norm.weight"], tensors["model.pre_norm.weight"])
    assert torch.equal(model["encoder.blocks.1.attn.qkv.weight"], tensors["model.blocks.1.attn.qkv.weight"])
    assert torch.equal(model["encoder.patch_embed.proj.weight"], tensors["model.local_encoder.proj.weight"])
    assert torch.equal(model["head.weight"], tensors["head.weight"])


def test_hf_encoder_only_becomes_pretraining_checkpoint_with_notes(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    tensors = _hf_state(64, 1, None, _random_fill(2))
    src = tmp_path / "encoder.safetensors"
    save_file(tensors, str(src))
    with pytest.raises(ConversionError, match="attention heads"):
        read_any(src)  # D 64 is no released size, and nothing records the heads
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 4}))
    ours, summary = read_any(src)
    assert summary.kind == "pretrained" and any("decoder freshly initialised" in n for n in summary.notes)
    model = ours["model"]
    assert torch.equal(model["teacher.blocks.0.mlp.fc1.weight"], tensors["model.blocks.0.mlp.fc1.weight"])
    assert any(k.startswith("decoder.blocks.") for k in model)


# --------------------------------------------------------------------------------------------------
# CLI behaviour and refusals


def test_cli_refuses_to_overwrite_without_force_and_prints_a_summary(tmp_path: Path, capsys) -> None:
    src, dst = tmp_path / "released.pt", tmp_path / "ours.pt"
    write_released(src, "pretrained", released_pretrained_state(64, 1, 1, 3, _random_fill()), heads=4)
    dst.write_bytes(b"keep me")
    assert cli_main([str(src), str(dst)]) == 1
    assert "--force" in capsys.readouterr().err and dst.read_bytes() == b"keep me"
    assert cli_main([str(src), str(dst), "--force"]) == 0
    out = capsys.readouterr().out
    assert "pretrained" in out and "tensors:" in out and "positions:" in out
    assert cli_main([str(src), str(tmp_path / "x.pt"), "--kind", "finetuned"]) == 1
    assert "finetuned" in capsys.readouterr().err


def test_cli_reports_corrupt_and_malicious_sources(tmp_path: Path, capsys) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a zip")
    assert cli_main([str(corrupt), str(tmp_path / "a.pt")]) == 1
    assert str(corrupt) in capsys.readouterr().err

    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self) -> tuple:
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pt"
    torch.save({"cfg": {"model": {"_name": "data2vec_multi"}}, "model": {}, "extra_state": {"x": Payload()}}, evil)
    assert cli_main([str(evil), str(tmp_path / "b.pt")]) == 1
    err = capsys.readouterr().err
    assert "refusing" in err and "system" in err and str(evil) in err
    assert not marker.exists() and not (tmp_path / "b.pt").exists()


def test_unrecognised_and_mismatched_sources_raise_conversion_error(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="unrecognised"):
        convert_released({"model": {"foo.weight": torch.zeros(1)}})
    state = released_finetuned_state(64, 1, 3, _random_fill())
    with pytest.raises(ConversionError, match="3 outputs"):
        convert_released({"cfg": {"model": {"_name": "mae_image_classification", "num_heads": 4}}, "model": state,
                          "task_state": {"labels": {"a": "0", "b": "1"}}})
    src = tmp_path / "t.pt"
    torch.save(torch.zeros(2), src)
    with pytest.raises(CheckpointError, match="expected a dict"):
        read_any(src)


# --------------------------------------------------------------------------------------------------
# fairseq loading of converted files


def _fairseq_loader(model_name: str):
    pytest.importorskip("fairseq")
    import eat_fairseq  # noqa: F401  (registers the fairseq models)
    from fairseq import checkpoint_utils
    from fairseq.models import MODEL_REGISTRY

    assert model_name in MODEL_REGISTRY, f"`import eat_fairseq` did not register fairseq model {model_name!r}"
    return checkpoint_utils


def test_fairseq_loads_a_converted_pretrained_checkpoint(tmp_path: Path) -> None:
    checkpoint_utils = _fairseq_loader("eat")
    state = released_pretrained_state(64, 2, 2, 3, _random_fill(3), rows=512)
    src, ours = tmp_path / "released.pt", tmp_path / "ours.pt"
    write_released(src, "pretrained", state, heads=4)
    convert_file(src, ours)
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(ours)])
    model = models[0]
    assert cfg.model._name == "eat" and type(task).__name__ == "EATPretrainingTask"
    loaded = model.state_dict()
    expected = torch.load(ours)["model"]
    assert sorted(loaded) == sorted(expected)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_fairseq_loads_a_converted_classifier_with_its_labels(tmp_path: Path) -> None:
    checkpoint_utils = _fairseq_loader("eat_classifier")
    state = released_finetuned_state(64, 2, 6, _random_fill(4))
    src, ours = tmp_path / "ft.pt", tmp_path / "ours.pt"
    labels = {f"l{i}": str(i) for i in range(6)}
    write_released(src, "finetuned", state, labels=labels, heads=4)
    convert_file(src, ours)
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(ours)])
    assert cfg.model._name == "eat_classifier" and cfg.model.num_classes == 6
    assert task.state_dict()["labels"] == {k: int(v) for k, v in labels.items()}
    loaded = models[0].state_dict()
    expected = torch.load(ours)["model"]
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
