"""EAT's lightweight 2-D CNN decoder (docs/reference.md section 3, frame branch).

The student encodes only the visible patches; the decoder puts them back on the (time x frequency)
grid, fills the holes with small fresh Gaussian noise (no learned mask token, no positions: the
convolutions see where a patch is from its neighbours), and predicts the teacher's target for every
patch. Convolutions are much cheaper than transformer decoder blocks, which is part of EAT's speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DecoderBlock", "CNNDecoder"]


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
        b, p = mask.shape
        h, w = grid
        if h * w != p:
            raise ValueError(f"grid {grid} has {h * w} patches but the mask has {p}")
        d = visible.shape[-1]
        # Masked positions get fresh N(0, noise_std^2) noise; visible tokens go back in place.
        noise = torch.randn(b, p, d, device=visible.device, dtype=visible.dtype) * self.noise_std
        x = noise.masked_scatter(~mask.unsqueeze(-1), visible)  # (B, P, D)
        x = x.transpose(1, 2).reshape(b, d, h, w)  # (B, D, H, W), time-major rows
        for block in self.blocks:
            y = block(x)
            x = y + x if y.shape == x.shape else y
        x = x.flatten(2).transpose(1, 2)  # (B, P, decoder_dim)
        return self.proj(x)  # (B, P, D)
