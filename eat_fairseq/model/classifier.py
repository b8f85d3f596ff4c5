"""EAT fine-tuning model: encoder -> pooled token -> LayerNorm -> Linear (docs/reference.md section 4).

Parameter names are ``encoder.*`` (the core :class:`EATEncoder`), ``fc_norm.*`` and ``head.*`` so
``checkpoints.weights`` can map them to the released fine-tuned layout (``model.`` prefix + ``fc_norm``/``head``).

Layer-wise learning-rate decay (:func:`layer_decay_scales`): with N blocks, block ``j`` (0-based,
``j = 0`` next to the input) gets ``layer_decay ** (N - j)``; the patch embedding, CLS token, position
table, pre-LN, ``fc_norm`` and ``head`` stay at full lr. For EAT-base (N = 12) block 0 trains at
0.65**12 ~ 0.0057x and block 11 at 0.65x, the reference's "block j of 12 gets 0.65^(12-j)" read with
0-based j, which is also what the authors' code does (blocks numbered from 1 in a table of N + 2
scales whose entry N + 1 is the full-lr head).

The release gives each scale its own cosine schedule (:func:`layer_decay_cosine_lr`): the peak is
scaled, the warm-up start and ``min_lr`` are not, and a group whose scaled peak is below ``min_lr``
trains at that constant peak.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from eat_fairseq.model.encoder import EATEncoder, EncoderConfig

POOLINGS = ("cls", "mean")


class EncoderLoadError(KeyError):
    """Pre-training weights that do not fit the classifier's encoder; the message lists the keys."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class EATClassifier(nn.Module):
    """Clip classifier on top of the EAT encoder.

    Args:
        encoder_cfg: encoder hyper-parameters (set ``drop_path_rate=0.1`` for fine-tuning).
        num_classes: output logits C.
        pooling: ``"cls"`` (the CLS output, reference default) or ``"mean"`` (mean of patch tokens).
        freeze_encoder: linear probing; the encoder runs without grad and in eval mode.
    """

    def __init__(
        self, encoder_cfg: EncoderConfig, num_classes: int, pooling: str = "cls", freeze_encoder: bool = False
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.encoder_cfg = encoder_cfg
        self.num_classes = num_classes
        self.pooling = pooling
        self.freeze_encoder = freeze_encoder
        d = encoder_cfg.embed_dim
        self.encoder = EATEncoder(encoder_cfg)
        self.fc_norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> "EATClassifier":
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # no drop-path/dropout in a frozen feature extractor
        return self

    def pool(self, x: Tensor) -> Tensor:
        """(B, 1+P, D) -> (B, D)."""
        return x[:, 0] if self.pooling == "cls" else x[:, 1:].mean(dim=1)

    def features(self, fbank: Tensor) -> Tensor:
        """Pooled, normalised embedding (B, D) that the head sees."""
        if self.freeze_encoder:
            with torch.no_grad():
                x, _ = self.encoder(fbank)
        else:
            x, _ = self.encoder(fbank)
        return self.fc_norm(self.pool(x))

    def forward(self, fbank: Tensor) -> Tensor:
        """fbank (B, T, F) or (B, 1, T, F), normalised -> logits (B, C)."""
        return self.head(self.features(fbank))

    def load_encoder_from_pretraining(self, state: Mapping[str, Tensor], prefix: str = "encoder.") -> None:
        """Load the encoder from a pre-training state dict (``encoder.*`` = student, ``teacher.*`` = EMA).

        Keys outside ``prefix`` (decoder, the other encoder copy) are ignored; within it the match
        is strict, and a mismatch raises :class:`EncoderLoadError` listing missing, unexpected and
        wrongly shaped keys.
        """
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            sample = sorted(state)[:8]
            raise EncoderLoadError(f"no '{prefix}*' keys in the pre-training state dict (first keys: {sample})")
        own = self.encoder.state_dict()
        missing = sorted(set(own) - set(sub))
        unexpected = sorted(set(sub) - set(own))
        shapes = sorted(
            f"{k}: checkpoint {tuple(sub[k].shape)} vs model {tuple(own[k].shape)}"
            for k in set(own) & set(sub)
            if tuple(sub[k].shape) != tuple(own[k].shape)
        )
        if missing or unexpected or shapes:
            raise EncoderLoadError(
                f"pre-training weights ('{prefix}*') do not fit the encoder: missing {missing}, "
                f"unexpected {unexpected}, shape mismatches {shapes}"
            )
        self.encoder.load_state_dict(sub, strict=True)


def layer_decay_scales(num_blocks: int, layer_decay: float) -> list[float]:
    """lr scale of block j (0-based): ``layer_decay ** (num_blocks - j)``."""
    return [layer_decay ** (num_blocks - j) for j in range(num_blocks)]


def parameter_lr_scale(name: str, num_blocks: int, layer_decay: float) -> float:
    """lr scale of a classifier parameter by name: decayed for ``encoder.blocks.{j}.*``, else 1."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "encoder" and parts[1] == "blocks":
        j = int(parts[2])
        return layer_decay ** (num_blocks - j)
    return 1.0


def layer_decay_param_groups(
    model: EATClassifier,
    base_lr: float | None = None,
    layer_decay: float = 0.65,
    weight_decay: float = 0.05,
    no_weight_decay_1d: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with per-depth lr scales.

    Each group has ``params``, ``lr_scale``, ``weight_decay``, ``names`` (for inspection; drop it
    before handing the groups to a plain torch optimizer, or use :func:`torch_param_groups`) and,
    if ``base_lr`` is given, ``lr = base_lr * lr_scale`` (the group's peak). Schedule each group with
    :func:`layer_decay_cosine_lr` to train as the release does (the fairseq optimizer ``eat_adam`` with
    the scheduler ``eat_cosine`` does exactly that). Weight decay applies to every
    parameter, as in the reference; ``no_weight_decay_1d`` exempts biases, norms and the CLS token.
    Frozen parameters are left out.
    """
    num_blocks = len(model.encoder.blocks)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = parameter_lr_scale(name, num_blocks, layer_decay)
        decay = 0.0 if (no_weight_decay_1d and (param.ndim <= 1 or name.endswith("cls_token"))) else weight_decay
        group = groups.setdefault(
            (scale, decay), {"params": [], "names": [], "lr_scale": scale, "weight_decay": decay}
        )
        group["params"].append(param)
        group["names"].append(name)
    result = sorted(groups.values(), key=lambda g: (g["lr_scale"], g["weight_decay"]))
    if base_lr is not None:
        for group in result:
            group["lr"] = base_lr * group["lr_scale"]
    return result


def torch_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups without the ``names`` key (torch optimizers keep unknown keys such as ``lr_scale``)."""
    return [{k: v for k, v in g.items() if k != "names"} for g in groups]


def layer_decay_cosine_lr(
    num_updates: int,
    lr: float,
    lr_scale: float,
    warmup_updates: int,
    max_update: int,
    min_lr: float = 1e-6,
    warmup_init_lr: float = -1.0,
    lr_shrink: float = 0.1,
) -> float:
    """Learning rate of one layer-decay group after ``num_updates``, as the release schedules it.

    The release runs fairseq's cosine schedule once per group with peak ``lr * lr_scale`` and the
    UNSCALED ``min_lr`` and ``warmup_init_lr`` (default: ``min_lr``). When the peak is below
    ``min_lr``, ``min_lr`` becomes the peak, so the group trains at a constant rate. Warm-up is
    linear from ``warmup_init_lr`` to the peak over ``warmup_updates``; then a half cosine to
    ``min_lr`` over ``max_update - warmup_updates`` updates (later periods restart, shrunk by
    ``lr_shrink``, as fairseq's scheduler does).
    """
    peak = lr * lr_scale
    floor = min(min_lr, peak)
    start = floor if warmup_init_lr < 0 else warmup_init_lr
    if num_updates < warmup_updates:
        return start + num_updates * (peak - start) / warmup_updates
    period = max_update - warmup_updates
    if period <= 0:
        raise ValueError(f"max_update ({max_update}) must exceed warmup_updates ({warmup_updates})")
    done = num_updates - warmup_updates
    cycle = math.floor(done / period)
    shrink = lr_shrink**cycle
    low, high = floor * shrink, peak * shrink
    return low + 0.5 * (high - low) * (1 + math.cos(math.pi * (done - period * cycle) / period))
