"""Tests for eat_fairseq.model.encoder (reference section 2)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eat_fairseq.model.encoder import (
    Block,
    EATEncoder,
    EncoderConfig,
    PatchEmbed,
    sincos_pos_embed_2d,
)
from eat_fairseq.model.masking import inverse_block_mask


@pytest.fixture(scope="module")
def encoder() -> EATEncoder:
    torch.manual_seed(0)
    return EATEncoder(EncoderConfig.tiny()).eval()


def test_presets() -> None:
    base, large, tiny = EncoderConfig.base(), EncoderConfig.large(), EncoderConfig.tiny()
    assert (base.embed_dim, base.depth, base.num_heads) == (768, 12, 12)
    assert (large.embed_dim, large.depth, large.num_heads) == (1024, 24, 16)
    assert (tiny.embed_dim, tiny.depth, tiny.num_heads) == (64, 2, 4)
    assert base.max_length == 768 and base.norm_eps == 1e-6 and base.grid_w == 8
    assert EncoderConfig.tiny(depth=3).depth == 3


def test_sincos_table_against_formula() -> None:
    d, h, w = 64, 20, 8
    table = sincos_pos_embed_2d(d, h, w)
    assert table.shape == (h * w, d) and table.dtype == torch.float32
    quarter = d // 4

    def value(row: int, dim: int) -> float:
        t, f = divmod(row, w)
        half, k = divmod(dim, d // 2)  # half 0: frequency, half 1: time
        pos = f if half == 0 else t
        fn = math.sin if k < quarter else math.cos
        i = k % quarter
        omega = 1.0 / 10000 ** (i / quarter)
        return fn(pos * omega)

    for row in (0, 1, 7, 8, 9, 37, 159):
        for dim in (0, 1, 5, 15, 16, 17, 31, 32, 33, 47, 48, 63):
            assert table[row, dim].item() == pytest.approx(value(row, dim), abs=1e-6)
    # Explicit spot values from the contract: dim 0 of row t*8+f is sin(f), dim D/2 is sin(t).
    t, f = 5, 3
    assert table[t * 8 + f, 0].item() == pytest.approx(math.sin(f), abs=1e-6)
    assert table[t * 8 + f, d // 2].item() == pytest.approx(math.sin(t), abs=1e-6)
    assert table[t * 8 + f, d // 4].item() == pytest.approx(math.cos(f), abs=1e-6)


def test_sincos_non_square_prefix_property() -> None:
    # Time-major: the table for fewer time rows is a prefix of the one for more rows.
    small = sincos_pos_embed_2d(32, 4, 8)
    big = sincos_pos_embed_2d(32, 10, 8)
    assert torch.equal(small, big[: 4 * 8])


def test_pos_embed_buffer(encoder: EATEncoder) -> None:
    assert encoder.pos_embed.shape == (1, 768 * 8, 64)
    assert "pos_embed" in encoder.state_dict()
    assert "pos_embed" not in dict(encoder.named_parameters())
    assert torch.equal(encoder.pos_embed[0], sincos_pos_embed_2d(64, 768, 8))


def test_parameter_names(encoder: EATEncoder) -> None:
    names = set(encoder.state_dict())
    for n in [
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "cls_token",
        "pre_norm.weight",
        "pre_norm.bias",
        "pos_embed",
        "blocks.1.norm1.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.qkv.bias",
        "blocks.1.attn.proj.weight",
        "blocks.1.norm2.bias",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.bias",
    ]:
        assert n in names
    assert encoder.blocks[0].attn.qkv.weight.shape == (192, 64)
    assert encoder.cls_token.shape == (1, 1, 64)


def test_patch_embed_grid_non_square() -> None:
    pe = PatchEmbed(16, 1, 8)
    assert pe.grid(1024) == (64, 8)
    x = torch.randn(2, 1, 48, 128)
    assert pe(x).shape == (2, 24, 8)
    # Time-major: token t*8+f is the patch at rows 16t.., cols 16f..
    with torch.no_grad():
        out = pe(x)
        t, f = 2, 5
        patch = x[:, :, 16 * t : 16 * t + 16, 16 * f : 16 * f + 16]
        direct = torch.einsum("bchw,dchw->bd", patch, pe.proj.weight) + pe.proj.bias
    assert torch.allclose(out[:, t * 8 + f], direct, atol=1e-5)


@pytest.mark.parametrize("frames", [128, 256, 1024])
def test_shapes(encoder: EATEncoder, frames: int) -> None:
    fbank = torch.randn(2, frames, 128)
    with torch.no_grad():
        x, ffn = encoder(fbank)
        x4, _ = encoder(fbank.unsqueeze(1))
    p = frames // 16 * 8
    assert x.shape == (2, 1 + p, 64)
    assert len(ffn) == 2 and all(t.shape == (2, 1 + p, 64) for t in ffn)
    assert torch.equal(x, x4)


def test_embed_adds_positions_before_masking(encoder: EATEncoder) -> None:
    fbank = torch.randn(2, 128, 128)
    with torch.no_grad():
        tokens = encoder.embed(fbank)
        raw = encoder.patch_embed(fbank.unsqueeze(1))
    assert torch.allclose(tokens - raw, encoder.pos_embed[:, :64].expand(2, -1, -1), atol=1e-6)


def test_cls_first_and_encode_matches_manual(encoder: EATEncoder) -> None:
    tokens = torch.randn(3, 10, 64)
    with torch.no_grad():
        x, ffn = encoder.encode(tokens)
        h = torch.cat([encoder.cls_token.expand(3, -1, -1), tokens], 1)
        h = F.layer_norm(h, (64,), encoder.pre_norm.weight, encoder.pre_norm.bias, 1e-6)
        manual_ffn = []
        for blk in encoder.blocks:
            h, t = blk(h)
            manual_ffn.append(t)
    assert torch.allclose(x, h) and all(torch.allclose(a, b) for a, b in zip(ffn, manual_ffn))
    # The CLS row depends on the CLS token; changing it changes row 0.
    with torch.no_grad():
        saved = encoder.cls_token.clone()
        encoder.cls_token.mul_(-1.0)  # a constant shift would vanish in the pre-LN
        x2, _ = encoder.encode(tokens)
        encoder.cls_token.copy_(saved)
    assert not torch.allclose(x2[:, 0], x[:, 0])


def test_mask_gather(encoder: EATEncoder) -> None:
    fbank = torch.randn(2, 128, 128)
    mask = inverse_block_mask(2, (8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x, ffn = encoder(fbank, mask)
        tokens = encoder.embed(fbank)
        visible = torch.stack([tokens[i][~mask[i]] for i in range(2)])
        ref, _ = encoder.encode(visible)
    v = int((~mask[0]).sum())
    assert x.shape == (2, 1 + v, 64) and len(ffn) == 2
    assert torch.allclose(x, ref)


def test_mask_unequal_counts_raise(encoder: EATEncoder) -> None:
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, :5] = True
    with pytest.raises(ValueError, match="same number of visible"):
        encoder(torch.randn(2, 128, 128), mask)


def test_invalid_frames_raise(encoder: EATEncoder) -> None:
    with pytest.raises(ValueError, match="T=100"):
        encoder(torch.randn(1, 100, 128))
    with pytest.raises(ValueError, match="T=12304"):
        encoder.embed(torch.randn(1, 12304, 128))
    with pytest.raises(ValueError, match="mel bins"):
        encoder.embed(torch.randn(1, 128, 64))


def test_extract_features_layers(encoder: EATEncoder) -> None:
    fbank = torch.randn(2, 128, 128)
    with torch.no_grad():
        full, _ = encoder(fbank)
        last = encoder.extract_features(fbank)
        first = encoder.extract_features(fbank, layer=0)
        h = encoder.pre_norm(torch.cat([encoder.cls_token.expand(2, -1, -1), encoder.embed(fbank)], 1))
        h0, _ = encoder.blocks[0](h)
    assert torch.allclose(last, full)
    assert torch.allclose(encoder.extract_features(fbank, layer=-1), full)
    assert torch.allclose(first, h0)
    with pytest.raises(ValueError):
        encoder.extract_features(fbank, layer=2)


def test_post_ln_block_hand_checked() -> None:
    torch.manual_seed(0)
    blk = Block(8, 2, mlp_ratio=2.0).eval()
    x = torch.randn(1, 3, 8)
    with torch.no_grad():
        out, t = blk(x)
        # Attention by hand.
        qkv = x @ blk.attn.qkv.weight.T + blk.attn.qkv.bias  # (1, 3, 24)
        q, k, v = qkv.split(8, dim=-1)
        heads = []
        for hd in range(2):
            sl = slice(4 * hd, 4 * hd + 4)
            w = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / 2.0, dim=-1)
            heads.append(w @ v[..., sl])
        a = torch.cat(heads, -1) @ blk.attn.proj.weight.T + blk.attn.proj.bias

        def ln(z: torch.Tensor, m: torch.nn.LayerNorm) -> torch.Tensor:
            mu = z.mean(-1, keepdim=True)
            var = ((z - mu) ** 2).mean(-1, keepdim=True)
            return (z - mu) / torch.sqrt(var + 1e-6) * m.weight + m.bias

        r = ln(x + a, blk.norm1)
        hidden = r @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        t_ref = hidden @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
        out_ref = ln(r + t_ref, blk.norm2)
    assert torch.allclose(t, t_ref, atol=1e-5)
    assert torch.allclose(out, out_ref, atol=1e-5)


def test_drop_path_only_in_training() -> None:
    torch.manual_seed(0)
    enc = EATEncoder(EncoderConfig.tiny(drop_path_rate=0.5))
    assert enc.blocks[0].drop_path.drop_prob == 0.0
    assert enc.blocks[1].drop_path.drop_prob == 0.5
    fbank = torch.randn(8, 128, 128)
    enc.eval()
    with torch.no_grad():
        a, _ = enc(fbank)
        b, _ = enc(fbank)
    assert torch.equal(a, b)
    enc.train()
    with torch.no_grad():
        c, _ = enc(fbank)
    assert not torch.allclose(a, c)


def test_init_statistics() -> None:
    torch.manual_seed(0)
    enc = EATEncoder(EncoderConfig(embed_dim=256, depth=2, num_heads=4))
    fc1 = enc.blocks[0].mlp.fc1
    assert abs(fc1.weight.std().item() - 0.02) < 0.001
    assert abs(fc1.weight.mean().item()) < 0.001
    assert torch.count_nonzero(fc1.bias) == 0
    assert torch.count_nonzero(enc.blocks[1].attn.qkv.bias) == 0
    assert torch.all(enc.blocks[0].norm1.weight == 1) and torch.all(enc.blocks[0].norm1.bias == 0)
    assert torch.all(enc.pre_norm.weight == 1)
    assert enc.pre_norm.eps == 1e-6 and enc.blocks[0].norm2.eps == 1e-6
    # CLS ~ N(0, 1).
    assert 0.8 < enc.cls_token.std().item() < 1.2
    # Xavier uniform over (D, 256): bound sqrt(6 / (D + 256)).
    w = enc.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (256 + 256))
    assert w.abs().max().item() <= bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.01 * bound / math.sqrt(3) * 10
