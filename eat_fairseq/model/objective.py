"""EAT's targets and Utterance-Frame Objective (UFO) (docs/reference.md section 3).

The teacher's targets are layer-averaged, normalised FFN outputs; the student is scored with a frame
loss on masked patches (decoder predictions) and an utterance loss on its CLS token (against the
patch-mean of the targets). All arithmetic here runs in float32 whatever the input dtype, because the
targets are small normalised values and fp16 squared errors lose precision.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

__all__ = ["teacher_targets", "frame_errors", "ufo_loss", "check_loss_weights", "UTTERANCE_REDUCTIONS",
           "TARGET_POSITIONS", "TARGET_NORMS"]

UTTERANCE_REDUCTIONS = ("release", "mean")


def _instance_norm_patches(y: Tensor) -> Tensor:
    """Normalise ``(B, P, D)`` over P per sample and channel (eps 1e-5, no affine), in fp32."""
    return F.instance_norm(y.float().transpose(1, 2), eps=1e-5).transpose(1, 2)


def _layer_norm_tokens(y: Tensor) -> Tensor:
    """Normalise ``(B, P, D)`` over D per patch (eps 1e-5, no affine), in fp32."""
    return F.layer_norm(y.float(), y.shape[-1:], eps=1e-5)


TARGET_POSITIONS = ("keep", "center")
# how each teacher block's FFN output is normalised before the K blocks are averaged
TARGET_NORMS = ("instance", "layer")


def teacher_targets(ffn_outputs: Sequence[Tensor], top_k: int, position: str = "keep", norm: str = "instance") -> Tensor:
    """Targets ``(B, P, D)`` from the teacher blocks' FFN outputs (each ``(B, 1+P, D)``, CLS first).

    For each of the last ``top_k`` blocks: drop the CLS row and instance-normalise over the patch
    axis (per sample and channel, eps 1e-5, no affine); average the K layers; LayerNorm over D (no
    affine, eps 1e-5). Normalising each layer first keeps any one layer's scale from dominating.

    ``position="center"`` (not in the release) subtracts, before the LayerNorm, the mean over the B
    clips of the batch at each patch position: the part of a target that is the same for every clip
    at that position is predictable from the position alone, so it teaches the student nothing about
    the audio. ``"keep"`` (default) is the release.

    ``norm="layer"`` (not in the release) normalises each block's output per patch over D instead of
    per channel over the patches. The instance norm makes every channel's mean over a clip's patches
    zero, so what is constant over a clip (speaker, recording channel, timbre) is taken out of every
    target, and the utterance target (the targets' patch mean) is left nearly the same for every clip:
    on FSDD its spread across clips is 0.4% of the frame targets' variance (``docs/ablations.md``).
    The per-patch norm keeps that part. ``"instance"`` (default) is the release.
    """
    if not 1 <= top_k <= len(ffn_outputs):
        raise ValueError(f"top_k must be in 1..{len(ffn_outputs)}, got {top_k}")
    if position not in TARGET_POSITIONS:
        raise ValueError(f"position must be one of {TARGET_POSITIONS}, got {position!r}")
    if norm not in TARGET_NORMS:
        raise ValueError(f"target norm must be one of {TARGET_NORMS}, got {norm!r}")
    normalise = _instance_norm_patches if norm == "instance" else _layer_norm_tokens
    y = sum(normalise(t[:, 1:]) for t in ffn_outputs[-top_k:]) / top_k  # (B, P, D)
    if position == "center" and y.shape[0] > 1:
        y = y - y.mean(dim=0, keepdim=True)
    return F.layer_norm(y, y.shape[-1:], eps=1e-5)  # (B, P, D)


def frame_errors(pred: Tensor, target: Tensor) -> Tensor:
    """Per-row error ``sum_d (pred - target)^2 / sqrt(D)``: ``(N, D), (N, D) -> (N,)`` in float32."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    diff = pred.float() - target.float()
    return diff.pow(2).sum(-1) / math.sqrt(pred.shape[-1])


def check_loss_weights(frame_weight: float, utterance_weight: float) -> None:
    """Refuse both UFO weights 0: the loss would be a constant and nothing would train."""
    if frame_weight == 0 and utterance_weight == 0:
        raise ValueError(
            f"frame_loss_weight={frame_weight} and utterance_loss_weight={utterance_weight}: at least one "
            "loss term must have a nonzero weight"
        )


def ufo_loss(
    frame_err: Tensor,
    utterance_err: Tensor,
    utterance_weight: float = 1.0,
    reduction: str = "release",
    frame_weight: float = 1.0,
) -> tuple[Tensor, int]:
    """Combine the frame and utterance errors into ``(loss_sum, sample_size)``.

    ``frame_err`` is ``(M,)`` over the M masked patches of all B*clone rows; ``utterance_err`` is
    ``(B*clone,)``. ``sample_size = M``; the trainer divides ``loss_sum`` by it, so the optimised
    quantity per device is ``loss_sum / M``:

    - ``"release"`` (the authors' code, default):
      ``loss_sum = frame_err.sum() + w * M * utterance_err.sum()``, i.e. per device
      ``mean(frame_err) + w * SUM(utterance_err)``. The utterance term is summed over the B*clone
      rows, so its weight relative to the frame term grows with the per-device batch (192 rows in the
      release: 12 clips x 16 clones).
    - ``"mean"`` (batch-size independent):
      ``loss_sum = frame_err.sum() + w * M * utterance_err.mean()``, i.e. per device
      ``mean(frame_err) + w * mean(utterance_err)``.

    ``w`` is ``utterance_weight`` (lambda in the paper). ``frame_weight`` (an ablation, 1 in the
    release) multiplies ``frame_err.sum()``; ``sample_size`` stays M so the two weights scale their
    terms independently. A weight of 0 multiplies its term by 0 rather than leaving it out, so the
    term's path still reaches the loss (DDP needs every parameter used) but sends exactly zero
    gradient; multiplying by 1.0 is exact, so the default computes the release's loss bit for bit.
    Both weights 0 is a ValueError.
    """
    if reduction not in UTTERANCE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {UTTERANCE_REDUCTIONS}, got {reduction!r}")
    check_loss_weights(frame_weight, utterance_weight)
    sample_size = frame_err.numel()
    frame_err = frame_err.float()
    utterance_err = utterance_err.float()
    utt = utterance_err.sum() if reduction == "release" else utterance_err.mean()
    loss = frame_weight * frame_err.sum() + utterance_weight * sample_size * utt
    return loss, sample_size
