"""Encoder hyper-parameters without torch (re-exported by :mod:`eat_fairseq.model.encoder`).

Apart from the encoder so that the ONNX metadata (:mod:`eat_fairseq.inference.onnx_format`) and the
torch-free ONNX runner can read an encoder configuration without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EncoderConfig"]


@dataclass
class EncoderConfig:
    """Encoder hyper-parameters. Defaults are EAT-base; ``max_length`` counts TIME patches."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    in_chans: int = 1
    num_mel_bins: int = 128
    max_length: int = 768
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    attn_dropout: float = 0.0

    @classmethod
    def base(cls, **overrides: object) -> "EncoderConfig":
        """EAT-base: 12 blocks, D 768, 12 heads."""
        return cls(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **overrides})

    @classmethod
    def large(cls, **overrides: object) -> "EncoderConfig":
        """EAT-large: 24 blocks, D 1024, 16 heads."""
        return cls(**{"embed_dim": 1024, "depth": 24, "num_heads": 16, **overrides})

    @classmethod
    def small(cls, **overrides: object) -> "EncoderConfig":
        """The small-scale recipe's encoder (examples/pretraining/eat_small.yaml): 4 blocks, D 192, 3 heads."""
        return cls(**{"embed_dim": 192, "depth": 4, "num_heads": 3, **overrides})

    @classmethod
    def tiny(cls, **overrides: object) -> "EncoderConfig":
        """A CPU-sized encoder for tests: 2 blocks, D 64, 4 heads."""
        return cls(**{"embed_dim": 64, "depth": 2, "num_heads": 4, **overrides})

    @property
    def grid_w(self) -> int:
        """Number of frequency patches W (8 for 128 mel bins)."""
        return self.num_mel_bins // self.patch_size
