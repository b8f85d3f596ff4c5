"""Fine-tuning losses (docs/reference.md section 4).

Every loss returns ``(summed_loss, sample_size)``: fairseq divides the gradient by the sample size
summed over all workers, which makes the normalisation global rather than per device. The
normalised loss is ``summed_loss / sample_size`` (:func:`normalised`).

- ``bce_positive_norm`` (AudioSet): multi-label BCE-with-logits summed over clips and classes,
  divided by the number of positive labels. Mixup keeps that number: mixing a batch with its own
  flip gives ``sum(lam*y + (1-lam)*y_flip) = sum(y)``, so the denominator is ``targets.sum()``.
- ``ce`` (ESC-50): cross-entropy with label smoothing (0.1), mean over clips; targets may be class
  indices or soft distributions (mixup).
- ``bce`` (Speech Commands): BCE-with-logits on one-hot (or mixed) targets, summed over classes and
  averaged over clips (sample_size = batch). The reference only says "BCE"; per-clip averaging keeps
  the gradient scale independent of the number of classes, unlike an element-wise mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("bce_positive_norm", "ce", "bce")


def to_one_hot(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices (B,) -> float one-hot (B, C); float (B, C) targets pass through."""
    if targets.dim() == 2:
        return targets.float()
    return F.one_hot(targets.long(), num_classes).float()


def bce_positive_norm(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed BCE-with-logits and the number of positive labels (at least 1)."""
    targets = to_one_hot(targets, logits.shape[-1]).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum")
    return loss, targets.float().sum().clamp_min(1.0).detach()


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed cross-entropy and the batch size.

    Smoothing mixes the (possibly soft) target with the uniform distribution:
    ``t' = (1 - eps) * t + eps / C``.
    """
    num_classes = logits.shape[-1]
    soft = to_one_hot(targets, num_classes)
    soft = soft * (1.0 - label_smoothing) + label_smoothing / num_classes
    loss = -(soft * F.log_softmax(logits.float(), dim=-1)).sum()
    return loss, torch.tensor(float(logits.shape[0]), device=logits.device)


def bce_per_clip(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed BCE-with-logits on one-hot targets and the batch size (loss per clip, summed over classes)."""
    targets = to_one_hot(targets, logits.shape[-1])
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum")
    return loss, torch.tensor(float(logits.shape[0]), device=logits.device)


def finetune_loss(
    name: str, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch by name (``bce_positive_norm | ce | bce``); returns ``(summed_loss, sample_size)``."""
    if name == "bce_positive_norm":
        return bce_positive_norm(logits, targets)
    if name == "ce":
        return cross_entropy(logits, targets, label_smoothing)
    if name == "bce":
        return bce_per_clip(logits, targets)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")


def normalised(summed_and_size: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``summed_loss / sample_size``: the value one process would optimise on its own."""
    summed, size = summed_and_size
    return summed / size
