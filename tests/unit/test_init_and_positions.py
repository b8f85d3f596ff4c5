"""Initialisation laws and the float32 position table, as in the release (issue 11, item 3).

- The CNN decoder's final Linear keeps PyTorch's default init (weight and bias uniform in
  +-1/sqrt(fan_in)); the release resets it after its model-wide N(0, 0.02) init.
- The sin-cos table is computed in float32 like the release's numpy code: the rounding of
  ``pos * omega`` in float32 moves late rows by up to ~5.8e-5 from a float64 table.
- ``extend_positions`` keeps the stored rows bit for bit and only appends.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eat_fairseq.model.decoder import CNNDecoder
from eat_fairseq.model.encoder import sincos_pos_embed_2d
from eat_fairseq.checkpoints.weights import extend_positions


# --------------------------------------------------------------------------------------------------
# decoder projection init


@pytest.mark.parametrize("dim", [64, 768])
def test_decoder_projection_uses_pytorch_default_linear_init(dim: int) -> None:
    torch.manual_seed(0)
    proj = CNNDecoder(dim, decoder_dim=dim, depth=1, groups=16).proj
    bound = 1.0 / math.sqrt(dim)  # fan_in = decoder_dim
    w, b = proj.weight.detach().flatten(), proj.bias.detach()
    # uniform(-bound, bound): inside the bound, reaching close to it, std bound/sqrt(3), mean 0
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.99 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert abs(w.mean().item()) < 0.05 * bound
    # half of a uniform's mass lies within half the bound (a normal of the same std has ~61%)
    assert (w.abs() < bound / 2).float().mean().item() == pytest.approx(0.5, abs=0.03)
    # the bias is drawn too (not zeros), from the same law
    assert (b != 0).all()
    assert b.abs().max() <= bound
    assert b.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.25)


def test_decoder_projection_init_is_not_the_encoder_normal_law() -> None:
    """N(0, 0.02) on a 768-wide layer would put ~7% of the weights beyond 1/sqrt(768) = 0.036."""
    torch.manual_seed(1)
    w = CNNDecoder(768, decoder_dim=768, depth=1).proj.weight.detach()
    assert (w.abs() > 0.036).float().mean().item() < 0.02


# --------------------------------------------------------------------------------------------------
# float32 sin-cos table


def _emulated_float32_table(d: int, h: int, w: int) -> np.ndarray:
    """The release's arithmetic, each step rounded to float32 explicitly from float64 math.

    ``omega`` and ``pos * omega`` are rounded to float32 at the same points as the release's numpy
    float32 code; sin/cos are then taken in float64 (their own float32 rounding is < 6e-8).
    """
    q = d // 4
    omega = np.array([np.float32(1.0 / float(np.float32(10000.0 ** float(np.float32(i / q))))) for i in range(q)],
                     dtype=np.float64)
    t = np.repeat(np.arange(h), w).astype(np.float64)
    f = np.tile(np.arange(w), h).astype(np.float64)
    parts = []
    for pos in (f, t):
        ang = (pos[:, None] * omega[None, :]).astype(np.float32).astype(np.float64)
        parts += [np.sin(ang), np.cos(ang)]
    return np.concatenate(parts, axis=1)


def _float64_table(d: int, h: int, w: int) -> np.ndarray:
    q = d // 4
    omega = 1.0 / 10000 ** (np.arange(q) / q)
    t = np.repeat(np.arange(h), w).astype(np.float64)
    f = np.tile(np.arange(w), h).astype(np.float64)
    parts = []
    for pos in (f, t):
        ang = pos[:, None] * omega[None, :]
        parts += [np.sin(ang), np.cos(ang)]
    return np.concatenate(parts, axis=1)


def test_position_table_is_computed_in_float32_like_the_release() -> None:
    d, h, w = 768, 768, 8  # the released table: 6144 rows
    ours = sincos_pos_embed_2d(d, h, w).numpy().astype(np.float64)
    assert ours.shape == (6144, 768)
    # the release's float32 arithmetic, up to the float32 rounding of sin/cos ...
    assert np.abs(ours - _emulated_float32_table(d, h, w)).max() < 1e-7
    # ... and visibly not the float64 table (the difference the release's files show)
    diff64 = np.abs(ours - _float64_table(d, h, w)).max()
    assert diff64 == pytest.approx(5.35e-5, abs=0.05e-5)


def test_position_table_prefix_is_stable_and_large_size_works() -> None:
    big = sincos_pos_embed_2d(1024, 768, 8)
    assert big.dtype == torch.float32 and big.shape == (6144, 1024)
    assert torch.equal(sincos_pos_embed_2d(1024, 64, 8), big[:512])


# --------------------------------------------------------------------------------------------------
# extend_positions


def test_extend_positions_keeps_stored_rows_bit_for_bit() -> None:
    d = 64
    fresh = sincos_pos_embed_2d(d, 768, 8)
    # a stored 512-row table that differs from ours in the last bits (as a float64-built table would)
    stored = torch.from_numpy(_float64_table(d, 64, 8)).float().unsqueeze(0)
    assert not torch.equal(stored[0], fresh[:512])
    out = extend_positions(stored, 768)
    assert out.shape == (1, 6144, d) and out.dtype == stored.dtype
    assert torch.equal(out[:, :512], stored)  # kept, not regenerated
    assert torch.equal(out[0, 512:], fresh[512:])  # appended rows: the float32 table


def test_extend_positions_leaves_a_full_table_alone_and_keeps_dtype() -> None:
    table = sincos_pos_embed_2d(32, 768, 8).unsqueeze(0).double()
    assert torch.equal(extend_positions(table, 768), table)
    assert extend_positions(table[:, :80], 768).dtype == torch.float64
