"""Training-only augmentations for fine-tuning (docs/reference.md sections 1.5 and 4).

Batch level, in this order (reference 4): :func:`mixup` on fbank and labels, then
:func:`spec_augment`. Clip level, in the data loader (reference 1.5): :func:`roll_and_gain` on the
waveform and :func:`noise_and_roll` on the fbank. Evaluation must not call any of them; the callers
(model/criterion/dataset) only apply them in training mode.

Every function takes an optional ``torch.Generator`` so runs and tests are reproducible. Beta draws
have no generator-aware torch sampler, so they go through a numpy generator seeded from the torch
generator (:func:`sample_beta`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AugmentConfig:
    """Switches and strengths; defaults are the AudioSet recipe (ESC-50 uses mixup_prob 0)."""

    mixup_alpha: float = 0.8
    mixup_prob: float = 0.9
    specaug_freq_ratio: float = 0.2
    specaug_time_ratio: float = 0.2
    roll_and_gain: bool = True
    noise_and_roll: bool = True
    max_time_roll: int = 10


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.rand(shape, generator=generator).to(device)


def sample_beta(alpha: float, beta: float, size: int = 1, generator: torch.Generator | None = None) -> np.ndarray:
    """Beta(alpha, beta) draws, reproducible from a torch generator."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return np.random.default_rng(seed).beta(alpha, beta, size=size)


def mixup(
    fbank: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.8,
    prob: float = 0.9,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix the batch with its flip: ``x = lam*x + (1-lam)*x.flip(0)`` (same for float targets (B, C)).

    One ``lam ~ Beta(alpha, alpha)`` for the whole batch, applied with probability ``prob``;
    otherwise inputs are returned unchanged and ``lam = 1``. Targets must already be float rows
    (one-hot or multi-hot) so they can be mixed.
    """
    if prob <= 0 or alpha <= 0 or fbank.shape[0] < 2:
        return fbank, targets, 1.0
    if float(_uniform((1,), generator).item()) >= prob:
        return fbank, targets, 1.0
    lam = float(sample_beta(alpha, alpha, 1, generator)[0])
    mixed_x = lam * fbank + (1.0 - lam) * fbank.flip(0)
    mixed_y = lam * targets + (1.0 - lam) * targets.flip(0)
    return mixed_x, mixed_y, lam


def _band_mask(length: int, max_width: float, batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(B, length) bool: one band per row, width uniform in [0, max_width), start uniform over valid starts."""
    width = torch.floor(_uniform((batch,), generator) * max_width).long()
    start = torch.floor(_uniform((batch,), generator) * (length - width + 1).float()).long()
    start = torch.minimum(start, (length - width).clamp_min(0))
    pos = torch.arange(length)[None, :]
    mask = (pos >= start[:, None]) & (pos < (start + width)[:, None])
    return mask.to(device)


def spec_augment(
    fbank: torch.Tensor,
    freq_ratio: float = 0.2,
    time_ratio: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One frequency band (width < F*freq_ratio) and one time band (width < T*time_ratio) per
    example, filled with 0. ``fbank`` is (B, T, F) or (B, 1, T, F); returns a new tensor."""
    squeeze = fbank.dim() == 4
    x = fbank[:, 0] if squeeze else fbank
    batch, frames, bins = x.shape
    keep = torch.ones_like(x, dtype=torch.bool)
    if freq_ratio > 0:
        keep &= ~_band_mask(bins, bins * freq_ratio, batch, generator, x.device)[:, None, :]
    if time_ratio > 0:
        keep &= ~_band_mask(frames, frames * time_ratio, batch, generator, x.device)[:, :, None]
    out = x * keep
    return out[:, None] if squeeze else out


def roll_and_gain(waveform: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Circularly roll each clip by a random offset in [0, S) and scale it by Beta(10, 10) + 0.5.

    ``waveform`` is (S,) or (B, S); each row gets its own offset and gain.
    """
    single = waveform.dim() == 1
    x = waveform[None] if single else waveform
    batch, length = x.shape
    shifts = torch.randint(0, max(length, 1), (batch,), generator=generator)
    gains = torch.as_tensor(sample_beta(10.0, 10.0, batch, generator) + 0.5, dtype=x.dtype)
    rows = [torch.roll(x[i], int(shifts[i])) * gains[i] for i in range(batch)]
    out = torch.stack(rows)
    return out[0] if single else out


def noise_and_roll(fbank: torch.Tensor, max_roll: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x += U(0,1) * u / 10`` (element-wise uniform noise times one uniform scalar ``u`` per clip),
    then roll along time by an integer in [-max_roll, max_roll) per clip.

    ``fbank`` is (T, F), (B, T, F) or (B, 1, T, F).
    """
    shape = fbank.shape
    x = fbank.reshape(-1, shape[-2], shape[-1]) if fbank.dim() != 2 else fbank[None]
    batch = x.shape[0]
    noise = _uniform(tuple(x.shape), generator, x.device).to(x.dtype)
    scale = _uniform((batch, 1, 1), generator, x.device).to(x.dtype)
    x = x + noise * scale / 10.0
    shifts = torch.randint(-max_roll, max_roll, (batch,), generator=generator)
    x = torch.stack([torch.roll(x[i], int(shifts[i]), dims=0) for i in range(batch)])
    return x.reshape(shape)
