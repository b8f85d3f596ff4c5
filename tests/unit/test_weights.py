"""Tests for eat_fairseq.checkpoints.weights (reference section 7).

The released layouts are built here from the names and shapes listed in the reference, not from our
own model, so a naming mistake in the model or in the mapping cannot cancel out. Base/large models
and states live on the meta device: strict loading checks names and shapes without allocating GBs.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from eat_fairseq.model.encoder import EATEncoder, EncoderConfig
from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig, count_parameters
from eat_fairseq.checkpoints.weights import (
    extend_positions,
    from_hf,
    from_released,
    infer_encoder_config,
    to_hf,
    to_released,
)

IMG = "modality_encoders.IMAGE."
SIZES = {
    # D, blocks, decoder blocks, decoder kernel, position rows
    "base": (768, 12, 6, 3, 6144),
    "large": (1024, 24, 3, 5, 6144),
}


def _t(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def released_encoder(d: int, depth: int, pos_rows: int) -> dict[str, torch.Tensor]:
    state = {
        IMG + "extra_tokens": _t(1, 1, d),
        IMG + "local_encoder.proj.weight": _t(d, 1, 16, 16),
        IMG + "local_encoder.proj.bias": _t(d),
        IMG + "fixed_positional_encoder.positions": _t(1, pos_rows, d),
        IMG + "context_encoder.norm.weight": _t(d),
        IMG + "context_encoder.norm.bias": _t(d),
    }
    for i in range(depth):
        for n in ("norm1", "norm2"):
            state[f"blocks.{i}.{n}.weight"] = _t(d)
            state[f"blocks.{i}.{n}.bias"] = _t(d)
        state[f"blocks.{i}.attn.qkv.weight"] = _t(3 * d, d)
        state[f"blocks.{i}.attn.qkv.bias"] = _t(3 * d)
        state[f"blocks.{i}.attn.proj.weight"] = _t(d, d)
        state[f"blocks.{i}.attn.proj.bias"] = _t(d)
        state[f"blocks.{i}.mlp.fc1.weight"] = _t(4 * d, d)
        state[f"blocks.{i}.mlp.fc1.bias"] = _t(4 * d)
        state[f"blocks.{i}.mlp.fc2.weight"] = _t(d, 4 * d)
        state[f"blocks.{i}.mlp.fc2.bias"] = _t(d)
    return state


def released_pretrained(size: str) -> dict:
    d, depth, dec_depth, k, rows = SIZES[size]
    state: dict = dict(released_encoder(d, depth, rows))
    for i in range(dec_depth):
        state[f"{IMG}decoder.blocks.{i}.0.weight"] = _t(d, d // 16, k, k)
        state[f"{IMG}decoder.blocks.{i}.0.bias"] = _t(d)
    state[IMG + "decoder.proj.weight"] = _t(d, d)
    state[IMG + "decoder.proj.bias"] = _t(d)
    state["_ema"] = released_encoder(d, depth, rows)
    return state


def released_finetuned(size: str, classes: int = 527) -> dict:
    d, depth, _, _, rows = SIZES[size]
    state = {"model." + k: v for k, v in released_encoder(d, depth, rows).items()}
    state.update(
        {"fc_norm.weight": _t(d), "fc_norm.bias": _t(d), "head.weight": _t(classes, d), "head.bias": _t(classes)}
    )
    return state


def _same(a: dict, b: dict) -> bool:
    """Same keys (recursively) and the very same tensor objects."""
    if a.keys() != b.keys():
        return False
    for k in a:
        if isinstance(a[k], dict):
            if not isinstance(b[k], dict) or not _same(a[k], b[k]):
                return False
        elif a[k] is not b[k]:
            return False
    return True


class _Classifier(nn.Module):
    """Stand-in with the fine-tuned layout of docs/DESIGN.md (encoder.*, fc_norm.*, head.*)."""

    def __init__(self, cfg: EncoderConfig, classes: int = 527) -> None:
        super().__init__()
        self.encoder = EATEncoder(cfg)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, classes)


@pytest.mark.filterwarnings("ignore:for num_ema_updates")  # meta model: copying is a no-op
@pytest.mark.parametrize("size", ["base", "large"])
def test_pretrained_from_released_loads_strict_and_round_trips(size: str) -> None:
    released = released_pretrained(size)
    ours = from_released(released)
    assert "decoder.blocks.0.conv.weight" in ours and "teacher.blocks.0.attn.qkv.weight" in ours
    assert not any(k.startswith("teacher.decoder") for k in ours)
    with torch.device("meta"):
        model = EATPretrainingModel(getattr(PretrainConfig, size)())
    model.load_state_dict(ours, strict=True)  # names and shapes both checked
    assert _same(to_released(ours), released)


@pytest.mark.parametrize("size", ["base", "large"])
def test_pretrained_our_state_to_released_names(size: str) -> None:
    with torch.device("meta"):
        model = EATPretrainingModel(getattr(PretrainConfig, size)())
    ours = model.state_dict()
    released = to_released(ours)
    expected = released_pretrained(size)
    assert released.keys() == expected.keys()
    assert released["_ema"].keys() == expected["_ema"].keys()
    for k, v in expected.items():
        if k != "_ema":
            assert released[k].shape == v.shape, k
    for k, v in expected["_ema"].items():
        assert released["_ema"][k].shape == v.shape, k
    back = from_released(released)
    assert back.keys() == ours.keys()


def test_parameter_counts_match_reference() -> None:
    # The reference quotes ~88M (base) and ~309M (large): student encoder + decoder.
    for size, quoted in (("base", 88e6), ("large", 309e6)):
        with torch.device("meta"):
            model = EATPretrainingModel(getattr(PretrainConfig, size)())
        n = count_parameters(model.encoder) + count_parameters(model.decoder)
        assert abs(n - quoted) / quoted < 0.01, (size, n)


def test_tiny_values_round_trip_through_released() -> None:
    torch.manual_seed(0)
    model = EATPretrainingModel(PretrainConfig.tiny())
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.ema_step(3)
    state = model.state_dict()
    released = to_released(state)
    assert "num_ema_updates" not in released and "num_ema_updates" not in released["_ema"]
    assert torch.equal(released[IMG + "extra_tokens"], model.encoder.cls_token)
    assert torch.equal(released["_ema"][IMG + "extra_tokens"], model.teacher.cls_token)
    assert torch.equal(released[IMG + "decoder.blocks.1.0.weight"], model.decoder.blocks[1].conv.weight)
    torch.manual_seed(1)
    other = EATPretrainingModel(PretrainConfig.tiny())
    other.load_state_dict(from_released(released, num_ema_updates=1), strict=True)
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_missing_ema_positions_taken_from_student() -> None:
    released = released_pretrained("base")
    del released["_ema"][IMG + "fixed_positional_encoder.positions"]
    ours = from_released(released)
    assert ours["teacher.pos_embed"].shape == (1, 6144, 768)


@pytest.mark.parametrize("size", ["base", "large"])
def test_finetuned_round_trip(size: str) -> None:
    released = released_finetuned(size)
    ours = from_released(released)
    assert set(ours) >= {"encoder.cls_token", "encoder.pre_norm.weight", "fc_norm.weight", "head.bias"}
    with torch.device("meta"):
        clf = _Classifier(getattr(EncoderConfig, size)())
    clf.load_state_dict(ours, strict=True)
    assert _same(to_released(ours), released)


def test_hf_names_round_trip() -> None:
    d, depth, _, _, rows = SIZES["base"]
    hf = {}
    for k, v in released_encoder(d, depth, rows).items():
        k = k.replace("context_encoder.norm", "pre_norm").replace(IMG, "")
        hf["model." + k] = v
    hf.update({"fc_norm.weight": _t(d), "fc_norm.bias": _t(d), "head.weight": _t(527, d), "head.bias": _t(527)})
    assert "model.pre_norm.weight" in hf and "model.extra_tokens" in hf
    ours = from_hf(hf)
    with torch.device("meta"):
        clf = _Classifier(EncoderConfig.base())
    clf.load_state_dict(ours, strict=True)
    assert _same(to_hf(ours), hf)


def test_unknown_keys() -> None:
    released = released_finetuned("base")
    released["model.something_else"] = _t(3)
    with pytest.raises(KeyError, match="something_else"):
        from_released(released)
    lenient = from_released(released, strict=False)
    assert "model.something_else" in lenient


@pytest.mark.parametrize("size", ["base", "large"])
def test_infer_encoder_config(size: str) -> None:
    expected = getattr(EncoderConfig, size)()
    assert infer_encoder_config(released_pretrained(size)) == expected
    assert infer_encoder_config(released_finetuned(size)) == expected
    assert infer_encoder_config(from_released(released_pretrained(size))) == expected
    old = released_finetuned(size)
    old["model." + IMG + "fixed_positional_encoder.positions"] = _t(1, 512, SIZES[size][0])
    assert infer_encoder_config(old).max_length == 64


def _formula_table(rows: int, d: int, w: int = 8) -> torch.Tensor:
    """Sin-cos table written out directly (float64), independent of the package."""
    out = torch.empty(rows * w, d, dtype=torch.float64)
    q = d // 4
    for t in range(rows):
        for f in range(w):
            for half, pos in ((0, f), (1, t)):
                for i in range(q):
                    omega = 1.0 / 10000 ** (i / q)
                    out[t * w + f, half * (d // 2) + i] = math.sin(pos * omega)
                    out[t * w + f, half * (d // 2) + q + i] = math.cos(pos * omega)
    return out.float()


def test_extend_positions_from_512_rows() -> None:
    d = 32
    old = _formula_table(64, d).unsqueeze(0)  # (1, 512, D): 64 time rows
    new = extend_positions(old, 768)
    assert new.shape == (1, 6144, d) and new.dtype == old.dtype
    assert torch.allclose(new[:, :512], old, atol=1e-6)
    ref_rows = _formula_table(100, d)
    assert torch.allclose(new[0, 700:800], ref_rows[700:800], atol=1e-5)
    assert torch.allclose(EATEncoder(EncoderConfig.tiny(embed_dim=32, num_heads=4)).pos_embed, new, atol=1e-6)


def test_extend_positions_rejects_foreign_table() -> None:
    old = _formula_table(64, 32).unsqueeze(0)
    old[0, 10, 3] += 0.01
    with pytest.raises(ValueError, match="do not match"):
        extend_positions(old, 768)
    with pytest.raises(ValueError):
        extend_positions(torch.zeros(1, 515, 32), 768)
