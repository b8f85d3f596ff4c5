"""EAT's lightweight 2-D CNN decoder (docs/reference.md section 3, frame branch).

The student encodes only the visible patches; the decoder puts them back on the (time x frequency)
grid, fills the holes with small fresh Gaussian noise (no learned mask token, no positions: the
convolutions see where a patch is from its neighbours), and predicts the teacher's target for every
patch. Convolutions are much cheaper than transformer decoder blocks, which is part of EAT's speed.

``LinearDecoder`` and ``MLPDecoder`` (ablations, ``decoder_type="linear"`` / ``"mlp"``; not in the
release) take the same inputs and fill the holes the same way (:func:`fill_masked`), but predict each
patch from its own token only. A masked patch's prediction then depends on its noise token alone,
never on the visible tokens, so the frame loss sends NO gradient to the encoder with these decoders:
they measure what the CNN's neighbourhood context is worth (with them, the encoder learns from the
utterance loss only).

``TransformerDecoder`` (ablation, ``decoder_type="transformer"``; not in the release) is the MAE /
data2vec alternative to the CNN: the same filled sequence, projected to ``decoder_dim``, plus fixed
2-D sin-cos positions (attention, unlike convolution, cannot tell where a patch is), through
``decoder_depth`` pre-LN transformer blocks attending over every patch, then a Linear back to
``embed_dim``. It sees the whole grid instead of a 3 x 3 neighbourhood per layer, at the cost of
attention over all P patches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eat_fairseq.model.encoder import Attention, Mlp, init_linear_and_norm_, sincos_pos_embed_2d

__all__ = ["DecoderBlock", "CNNDecoder", "LinearDecoder", "MLPDecoder", "TransformerDecoder", "fill_masked"]


def fill_masked(visible: Tensor, mask: Tensor, noise_std: float) -> Tensor:
    """Put the visible tokens back on the patch sequence and fill the masked positions with noise.

    ``visible (B, V, D)`` (no CLS, in the order of the unmasked positions of ``mask (B, P)``) ->
    ``(B, P, D)``. Masked positions get fresh ``N(0, noise_std^2)`` noise drawn from the global RNG
    (one ``randn`` of ``(B, P, D)``, as the release): every decoder shares this so that the decoders
    differ only in how they predict, and the default's random stream stays the release's.
    """
    b, p = mask.shape
    d = visible.shape[-1]
    noise = torch.randn(b, p, d, device=visible.device, dtype=visible.dtype) * noise_std
    return noise.masked_scatter(~mask.unsqueeze(-1), visible)  # (B, P, D)


def _check_grid(mask: Tensor, grid: tuple[int, int]) -> None:
    """Refuse a grid whose H*W is not the mask's P (a caller bug), for every decoder alike."""
    h, w = grid
    if h * w != mask.shape[1]:
        raise ValueError(f"grid {grid} has {h * w} patches but the mask has {mask.shape[1]}")


class DecoderBlock(nn.Module):
    """Conv2d -> LayerNorm over channels (no affine) -> GELU, on ``(B, C, H, W)``."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3, groups: int = 16, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, groups=groups)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)  # (B, C, H, W)
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=self.eps).permute(0, 3, 1, 2)
        return F.gelu(x)


class CNNDecoder(nn.Module):
    """Predict a ``(B, P, embed_dim)`` target for every patch from the student's visible tokens.

    ``forward(visible (B, V, D), mask (B, P), grid (H, W)) -> (B, P, D)``; ``visible`` excludes CLS
    (the caller drops it) and is in the same order as the unmasked positions of ``mask``.
    """

    def __init__(
        self,
        embed_dim: int,
        decoder_dim: int = 768,
        depth: int = 6,
        kernel_size: int = 3,
        groups: int = 16,
        noise_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.decoder_dim = decoder_dim
        self.noise_std = noise_std
        dims = [embed_dim] + [decoder_dim] * depth
        self.blocks = nn.ModuleList(
            DecoderBlock(dims[i], dims[i + 1], kernel_size, groups) for i in range(depth)
        )
        # PyTorch's default Linear init (weight and bias uniform in +-1/sqrt(fan_in)), as the release:
        # its model-wide N(0, 0.02) init is followed by a reset of the decoder's projection.
        self.proj = nn.Linear(decoder_dim if depth else embed_dim, embed_dim)

    def forward(self, visible: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        _check_grid(mask, grid)
        b, (h, w), d = mask.shape[0], grid, visible.shape[-1]
        x = fill_masked(visible, mask, self.noise_std)  # (B, P, D)
        x = x.transpose(1, 2).reshape(b, d, h, w)  # (B, D, H, W), time-major rows
        for block in self.blocks:
            y = block(x)
            x = y + x if y.shape == x.shape else y
        x = x.flatten(2).transpose(1, 2)  # (B, P, decoder_dim)
        return self.proj(x)  # (B, P, D)


class LinearDecoder(nn.Module):
    """Ablation: one Linear ``embed_dim -> embed_dim`` applied to each patch independently.

    ``forward(visible (B, V, D), mask (B, P), grid (H, W)) -> (B, P, D)``, the signature of
    :class:`CNNDecoder`; ``grid`` is only checked against ``mask``. PyTorch's default Linear init, as
    the CNN decoder's projection.
    """

    def __init__(self, embed_dim: int, noise_std: float = 0.01) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.noise_std = noise_std
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, visible: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        _check_grid(mask, grid)
        return self.proj(fill_masked(visible, mask, self.noise_std))  # (B, P, D)


class MLPDecoder(nn.Module):
    """Ablation: Linear ``embed_dim -> decoder_dim`` -> GELU -> Linear ``decoder_dim -> embed_dim``, per patch.

    Same signature as :class:`CNNDecoder`; ``decoder_dim`` is the hidden width (as it is the CNN's
    channel count), so the two ablations and the CNN share one width setting.
    """

    def __init__(self, embed_dim: int, decoder_dim: int = 768, noise_std: float = 0.01) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.decoder_dim = decoder_dim
        self.noise_std = noise_std
        self.fc1 = nn.Linear(embed_dim, decoder_dim)
        self.fc2 = nn.Linear(decoder_dim, embed_dim)

    def forward(self, visible: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        _check_grid(mask, grid)
        x = fill_masked(visible, mask, self.noise_std)  # (B, P, D)
        return self.fc2(F.gelu(self.fc1(x)))  # (B, P, D)


class PreNormBlock(nn.Module):
    """Pre-LN transformer block ``x + attn(norm(x))``, ``x + mlp(norm(x))`` (the MAE decoder's block)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))  # (B, P, C)
        return x + self.mlp(self.norm2(x))


class TransformerDecoder(nn.Module):
    """Ablation: ``decoder_depth`` pre-LN transformer blocks of width ``decoder_dim`` over every patch.

    Same signature as :class:`CNNDecoder`. Heads of 64 channels (at least one); ``depth`` 0 leaves the
    two projections (a per-patch decoder with positions). Positions are the
    fixed 2-D sin-cos table of the grid ``(H, W)``, computed per call, so any grid works.
    """

    def __init__(self, embed_dim: int, decoder_dim: int = 768, depth: int = 2, noise_std: float = 0.01,
                 head_dim: int = 64) -> None:
        super().__init__()
        if decoder_dim % max(decoder_dim // head_dim, 1):
            raise ValueError(f"decoder_dim {decoder_dim} is not a multiple of its {decoder_dim // head_dim} heads")
        self.embed_dim = embed_dim
        self.decoder_dim = decoder_dim
        self.noise_std = noise_std
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.blocks = nn.ModuleList(PreNormBlock(decoder_dim, max(decoder_dim // head_dim, 1)) for _ in range(depth))
        self.blocks.apply(init_linear_and_norm_)  # as the encoder's blocks; embed and proj keep PyTorch's init
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.proj = nn.Linear(decoder_dim, embed_dim)

    def forward(self, visible: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        _check_grid(mask, grid)
        x = self.embed(fill_masked(visible, mask, self.noise_std))  # (B, P, C)
        x = x + sincos_pos_embed_2d(self.decoder_dim, *grid).to(device=x.device, dtype=x.dtype)[None]
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x))  # (B, P, D)
