"""Balanced sampling for AudioSet-2M fine-tuning (docs/reference.md section 4).

AudioSet is heavily skewed (speech and music dominate), so each epoch draws a fixed number of clips
(200k in the reference) WITHOUT replacement with probability proportional to a per-clip weight that
favours rare labels: ``w_i = sum over the clip's labels l of 1000 / (count_l + 0.01)``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch


def label_counts(label_lists: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """How many clips carry each class (a clip counts once per distinct label)."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for labels in label_lists:
        for label in set(labels):
            counts[label] += 1
    return counts


def balanced_weights(label_lists: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """Per-clip sampling weights ``sum_l 1000 / (count_l + 0.01)`` (float64, one per clip)."""
    per_class = 1000.0 / (label_counts(label_lists, num_classes) + 0.01)
    return np.array([per_class[sorted(set(labels))].sum() for labels in label_lists], dtype=np.float64)


def read_weights(path: str | os.PathLike, expected_rows: int | None = None) -> np.ndarray:
    """Read a ``{split}.weights`` file (one float per manifest row); checks the row count and sign."""
    with open(path, encoding="utf-8") as handle:
        rows = [line.strip() for line in handle if line.strip()]
    try:
        weights = np.array([float(row) for row in rows], dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: not one float per line ({err})") from None
    if expected_rows is not None and len(weights) != expected_rows:
        raise ValueError(f"{path}: {len(weights)} weights but the manifest has {expected_rows} rows")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or not np.any(weights > 0):
        raise ValueError(f"{path}: weights must be finite, non-negative and not all zero")
    return weights


class WeightedEpochSampler:
    """Draws ``num_samples`` distinct indices per epoch, probability proportional to ``weights``.

    The draw depends only on ``(seed, epoch)``, so a resumed run re-creates the same epoch and every
    distributed rank sees the same order before sharding.
    """

    def __init__(self, weights: np.ndarray | Sequence[float], num_samples: int, seed: int = 1) -> None:
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        positive = int((self.weights > 0).sum())
        if num_samples > positive:
            raise ValueError(
                f"cannot draw {num_samples} samples without replacement from {positive} clips with positive weight"
            )
        if len(self.weights) > 2**24:
            raise ValueError("torch.multinomial supports at most 2**24 categories")
        self.num_samples = int(num_samples)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.num_samples

    def indices(self, epoch: int) -> np.ndarray:
        """The epoch's sampled indices (int64), in draw order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch))
        drawn = torch.multinomial(self.weights, self.num_samples, replacement=False, generator=generator)
        return drawn.numpy().astype(np.int64)
