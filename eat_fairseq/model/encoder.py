"""EAT's ViT encoder for log-mel spectrograms (docs/reference.md section 2).

The encoder turns an fbank ``(B, T, F)`` into a grid of 16 x 16 patches (H = T/16 time rows,
W = F/16 frequency columns, flattened TIME-MAJOR), adds fixed 2-D sin-cos positions, optionally drops
masked patches, prepends a CLS token, applies one LayerNorm and then a stack of POST-LN transformer
blocks. There is no final LayerNorm: the blocks already end in one.

Parameter names follow docs/DESIGN.md so that ``checkpoints.weights`` can map them one-to-one to the
released checkpoint layout.
"""
from __future__ import annotations

import functools
import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eat_fairseq.model.config import EncoderConfig

__all__ = [
    "EncoderConfig",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "DropPath",
    "Block",
    "EATEncoder",
    "init_linear_and_norm_",
]


def sincos_pos_embed_1d(embed_dim: int, positions: Tensor) -> Tensor:
    """1-D sin-cos table ``(N, embed_dim)`` in float32: ``[sin(pos * omega), cos(pos * omega)]``.

    ``omega_i = 1 / 10000 ** (i / (embed_dim / 2))`` for ``i < embed_dim / 2``. The release computes
    the table in numpy float32, so ``i / (D/2)``, the power, ``1 / x`` and ``pos * omega`` are each
    rounded to float32 here at the same points. That rounding matters: ``pos * omega`` in float32 moves
    the late rows of a 6144-row table by up to 5.4e-5 from a float64 table. Each step is correctly
    rounded (float64 math, then one rounding to float32; sin/cos likewise), so the table does not
    depend on the CPU or the library build: numpy's SIMD float32 ``power`` (AVX-512 builds) and torch's
    float32 ``pow`` are off by one ulp for some ``omega``, which moves late rows by up to ~6e-5 again.
    """
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for a sin-cos table, got {embed_dim}")
    return torch.from_numpy(_sincos_1d(embed_dim, positions.detach().cpu().numpy()))


def _sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """:func:`sincos_pos_embed_1d` on a numpy array of positions (float32 result)."""
    half = embed_dim // 2
    frac = np.arange(half, dtype=np.float32) / np.float32(half)  # float32 division, exactly rounded
    power = np.array([math.pow(10000.0, float(x)) for x in frac], dtype=np.float64).astype(np.float32)
    omega = (1.0 / power.astype(np.float64)).astype(np.float32)  # (D/2,)
    pos = np.asarray(positions).astype(np.float32).reshape(-1)
    angles = np.multiply.outer(pos, omega).astype(np.float64)  # float32 products, exactly rounded
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)  # (N, D)


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int) -> Tensor:
    """Fixed 2-D sin-cos positions ``(grid_h * grid_w, embed_dim)`` in float32, time-major rows.

    Row ``t * grid_w + f`` holds ``[table_1d(f) (D/2 dims), table_1d(t) (D/2 dims)]``: the first half
    encodes the frequency (column) index, the second half the time (row) index, as in the release.
    Computed in float32 like the release (see :func:`sincos_pos_embed_1d`). Returns a new CPU tensor
    (tables are cached by size: building EAT-base's 6144 x 768 table takes ~0.2 s).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for 2-D sin-cos positions, got {embed_dim}")
    return torch.from_numpy(_sincos_2d(embed_dim, grid_h, grid_w).copy())  # (H*W, D) float32


@functools.lru_cache(maxsize=4)
def _sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    rows = np.repeat(np.arange(grid_h), grid_w)  # (H*W,) time index t
    cols = np.tile(np.arange(grid_w), grid_h)  # (H*W,) frequency index f
    table = np.concatenate([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], axis=1)
    table.flags.writeable = False
    return table


class PatchEmbed(nn.Module):
    """Non-overlapping 16 x 16 patches of a ``(B, C, T, F)`` spectrogram -> ``(B, H*W, D)``.

    The grid is derived from the input (never assumed square); flattening is time-major because the
    conv output is ``(B, D, H, W)`` with time as the slower axis.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        # The release treats the conv like a linear layer over flattened patches.
        nn.init.xavier_uniform_(self.proj.weight.view(embed_dim, -1))

    def grid(self, num_frames: int, num_bins: int = 128) -> tuple[int, int]:
        """Patch grid ``(H, W)`` for ``num_frames`` x ``num_bins`` input."""
        return num_frames // self.patch_size, num_bins // self.patch_size

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, D, H, W)
        return x.flatten(2).transpose(1, 2)  # (B, H*W, D)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)  # (B, N, 3, h, d/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, d/h)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Feed-forward network: fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample, rescaling the kept ones."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """POST-LN transformer block that also returns its FFN output (the teacher's target source).

    ``x = x + attn(x); r = x = norm1(x); t = mlp(x); x = norm2(r + t)``; returns ``(x, t)`` with ``t``
    taken before drop path.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads, attn_drop=attn_dropout, proj_drop=dropout)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x + self.drop_path(self.attn(x))  # (B, N, D)
        r = x = self.norm1(x)
        t = self.mlp(x)  # (B, N, D) FFN output
        x = self.norm2(r + self.drop_path(t))
        return x, t


def init_linear_and_norm_(module: nn.Module) -> None:
    """Release init for ``module.apply``: Linear N(0, 0.02) with zero bias; LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class EATEncoder(nn.Module):
    """EAT encoder: patches + fixed positions -> (mask) -> CLS + LayerNorm -> post-LN blocks."""

    def __init__(self, cfg: EncoderConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else EncoderConfig()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pre_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        # Stochastic depth grows linearly over the blocks (computed in Python: works on the meta device).
        drop_path = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(d, cfg.num_heads, cfg.mlp_ratio, dp, cfg.dropout, cfg.attn_dropout, cfg.norm_eps)
            for dp in drop_path
        )
        if self.cls_token.is_meta:
            # shapes only (load_model then assigns a checkpoint's tensors): nothing to compute or draw, and
            # drawing on meta tensors imports torch._dynamo (1 s)
            pos = torch.empty(1, cfg.max_length * cfg.grid_w, d, dtype=torch.float32, device="meta")
        else:
            pos = sincos_pos_embed_2d(d, cfg.max_length, cfg.grid_w).unsqueeze(0)  # (1, max_length*W, D)
            pos = pos.to(self.cls_token.device)  # follows a default-device context (cuda)
        self.register_buffer("pos_embed", pos, persistent=True)

        if not self.cls_token.is_meta:
            self.apply(init_linear_and_norm_)
            nn.init.normal_(self.cls_token, std=1.0)

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def grid(self, num_frames: int) -> tuple[int, int]:
        """Patch grid ``(H, W)`` for an fbank of ``num_frames`` frames."""
        return self.patch_embed.grid(num_frames, self.cfg.num_mel_bins)

    def _as_image(self, fbank: Tensor) -> Tensor:
        """Validate an fbank ``(B, T, F)`` or ``(B, 1, T, F)`` and return ``(B, 1, T, F)``."""
        if fbank.ndim == 3:
            fbank = fbank.unsqueeze(1)
        if fbank.ndim != 4 or fbank.shape[1] != self.cfg.in_chans:
            raise ValueError(
                f"expected fbank of shape (B, T, F) or (B, {self.cfg.in_chans}, T, F), got {tuple(fbank.shape)}"
            )
        num_frames, num_bins = fbank.shape[-2:]
        ps = self.cfg.patch_size
        if num_bins != self.cfg.num_mel_bins:
            raise ValueError(f"expected {self.cfg.num_mel_bins} mel bins, got F={num_bins}")
        if num_frames % ps:
            raise ValueError(f"T={num_frames} frames is not a multiple of the patch size {ps}; pad or crop first")
        if num_frames > ps * self.cfg.max_length or num_frames == 0:
            raise ValueError(
                f"T={num_frames} frames is outside 1..{ps * self.cfg.max_length} "
                f"(max_length={self.cfg.max_length} time patches)"
            )
        return fbank

    def embed(self, fbank: Tensor) -> Tensor:
        """Patch tokens with positions: ``(B, T, F)`` / ``(B, 1, T, F)`` -> ``(B, P, D)``."""
        x = self.patch_embed(self._as_image(fbank))  # (B, P, D)
        return x + self.pos_embed[:, : x.shape[1]].to(x.dtype)

    def _encode(self, tokens: Tensor, num_blocks: int) -> tuple[Tensor, list[Tensor]]:
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        x = self.pre_norm(torch.cat([cls, tokens], dim=1))  # (B, 1+N, D)
        ffn_outputs = []
        for block in self.blocks[:num_blocks]:
            x, t = block(x)
            ffn_outputs.append(t)
        return x, ffn_outputs

    def encode(self, tokens: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Prepend CLS (no position), pre-LN, all blocks.

        ``tokens (B, N, D)`` -> ``(x (B, 1+N, D), ffn_outputs: list of (B, 1+N, D), one per block)``.
        """
        return self._encode(tokens, len(self.blocks))

    @staticmethod
    def gather_visible(tokens: Tensor, mask: Tensor) -> Tensor:
        """Keep the unmasked tokens of each row, in order: ``(B, P, D), (B, P) -> (B, V, D)``.

        Every row must have the same number V of visible tokens (EAT's masks guarantee it).
        """
        b, p, d = tokens.shape
        if mask.shape != (b, p) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {(b, p)}, got {mask.dtype} {tuple(mask.shape)}")
        visible = ~mask
        counts = visible.sum(1)
        if b and not bool((counts == counts[0]).all()):
            raise ValueError(
                f"every mask row must have the same number of visible patches, got counts {counts.tolist()}"
            )
        num_visible = int(counts[0]) if b else 0
        return tokens[visible].reshape(b, num_visible, d)

    def forward(self, fbank: Tensor, mask: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Encode an fbank, dropping masked patches (True = masked) if a mask is given.

        Returns ``(x (B, 1+V, D), ffn_outputs)`` with V = P when ``mask`` is None.
        """
        x = self.embed(fbank)  # (B, P, D)
        if mask is not None:
            x = self.gather_visible(x, mask.to(x.device))  # (B, V, D)
        return self.encode(x)

    def iter_hidden_states(self, fbank: Tensor, num_blocks: int | None = None) -> Iterator[Tensor]:
        """Unmasked outputs of the first ``num_blocks`` blocks (default all), one ``(B, 1+P, D)`` at a time.

        One pass for every layer a probe wants, instead of one :meth:`extract_features` per layer. A
        generator, so a consumer that keeps only the blocks it uses holds one block output at a time
        (the last block of EAT-large over a 1024-frame batch would otherwise sit beside 23 others).
        """
        num_blocks = len(self.blocks) if num_blocks is None else num_blocks
        cls = self.cls_token.expand(fbank.shape[0], -1, -1)
        x = self.embed(fbank)
        x = self.pre_norm(torch.cat([cls.to(x.dtype), x], dim=1))  # (B, 1+P, D)
        for block in self.blocks[:num_blocks]:
            x, _ = block(x)
            yield x

    def hidden_states(self, fbank: Tensor, num_blocks: int | None = None) -> list[Tensor]:
        """Every output of :meth:`iter_hidden_states` in a list: ``num_blocks`` of ``(B, 1+P, D)``."""
        return list(self.iter_hidden_states(fbank, num_blocks))

    def extract_features(self, fbank: Tensor, layer: int | None = None) -> Tensor:
        """Unmasked features ``(B, 1+P, D)``, CLS first, from block ``layer`` (0-based; default last).

        Negative ``layer`` counts from the end like Python indexing. Only the needed blocks run.
        """
        depth = len(self.blocks)
        if layer is None:
            layer = depth - 1
        if not -depth <= layer < depth:
            raise ValueError(f"layer must be in [-{depth}, {depth - 1}], got {layer}")
        layer %= depth
        x, _ = self._encode(self.embed(fbank), layer + 1)
        return x

