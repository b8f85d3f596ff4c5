"""fairseq optimizer ``eat_adam`` and lr scheduler ``eat_cosine``: layer-wise lr decay as the release.

``eat_adam`` is Adam with one parameter group per layer-decay scale; ``eat_cosine`` runs fairseq's
cosine schedule once per group, as the release's ``composite`` optimizer with ``dynamic_groups`` does.
"""
from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from fairseq.optim import FairseqOptimizer, register_optimizer
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig
from fairseq.optim.lr_scheduler import FairseqLRScheduler, register_lr_scheduler
from fairseq.optim.lr_scheduler.cosine_lr_scheduler import CosineLRSchedule, CosineLRScheduleConfig

logger = logging.getLogger(__name__)


@dataclass
class EATAdamConfig(FairseqAdamConfig):
    pass


@register_optimizer("eat_adam", dataclass=EATAdamConfig)
class EATAdam(FairseqAdam):
    """fairseq's Adam (decoupled weight decay, i.e. AdamW) with one torch param group per
    (``lr_scale``, ``weight_decay_scale``) found in the parameters' ``optim_overrides``.

    Pair it with ``lr_scheduler._name=eat_cosine``, which gives each group its own cosine schedule
    as the release does. A scheduler that only calls ``set_lr(lr)`` (such as fairseq's ``cosine``)
    scales one schedule instead: each group gets ``lr * lr_scale`` at every update (a warning says
    so). ``get_lr`` reports the lr of the full-rate group (the head). With fp16/bf16 set
    ``common.fp16_no_flatten_grads=true``: flattening merges all parameters into one tensor and the
    per-parameter scales would be lost (a warning is logged).
    """

    def __init__(self, cfg: EATAdamConfig, params: List[torch.nn.Parameter]) -> None:
        params = list(params)
        super().__init__(cfg, params)
        groups: Dict[tuple[float, float], List[torch.nn.Parameter]] = {}
        for p in params:
            opt = (getattr(p, "optim_overrides", None) or {}).get("optimizer", {})
            key = (float(opt.get("lr_scale", 1.0)), float(opt.get("weight_decay_scale", 1.0)))
            groups.setdefault(key, []).append(p)
        if len(groups) == 1 and len(params) == 1:
            logger.warning("eat_adam got one flat parameter: layer-wise lr decay is off (set fp16_no_flatten_grads)")
        base = self.optimizer_config
        param_groups = [
            {"params": ps, "lr_scale": lr_s, "weight_decay": base["weight_decay"] * wd_s}
            for (lr_s, wd_s), ps in sorted(groups.items())
        ]
        self._optimizer = type(self._optimizer)(param_groups, **base)
        self.per_group_schedule = False  # set by eat_cosine, which sets each group's lr itself
        self._warned_scaled = False
        self._set_scaled_lr(base["lr"])

    def get_lr(self) -> float:
        group = max(self.param_groups, key=lambda g: g.get("lr_scale", 1.0))
        return group["lr"] / group.get("lr_scale", 1.0)

    def set_lr(self, lr: float) -> None:
        scales = {g.get("lr_scale", 1.0) for g in self.param_groups}
        if len(scales) > 1 and not self.per_group_schedule and not self._warned_scaled:
            self._warned_scaled = True
            logger.warning(
                "eat_adam: this lr scheduler scales ONE schedule by each layer-decay factor; the release runs "
                "one cosine schedule per group (unscaled warm-up start and min_lr): use lr_scheduler._name=eat_cosine"
            )
        self._set_scaled_lr(lr)

    def _set_scaled_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost fairseq optimizer under fp16/bf16/AMP wrappers."""
    while True:
        inner = getattr(optimizer, "fp32_optimizer", None) or getattr(optimizer, "wrapped_optimizer", None)
        if inner is None or inner is optimizer:
            return optimizer
        optimizer = inner


@dataclass
class EATCosineConfig(CosineLRScheduleConfig):
    layer_decay_schedule: ChoiceEnum(["per_group", "scaled"]) = field(  # type: ignore[valid-type]
        default="per_group",
        metadata={
            "help": "per_group (the release): each layer-decay group runs its own cosine from warmup_init_lr "
            "(default min_lr) to lr * lr_scale and back to min_lr, held constant when lr * lr_scale < min_lr; "
            "scaled: one schedule, every value (warm-up start and min_lr too) multiplied by lr_scale"
        },
    )


class _GroupLR(FairseqOptimizer):
    """Lets one fairseq scheduler drive the lr of one torch param group.

    The group is looked up by its index at every call, never kept: fairseq loads a resumed run's
    optimizer state with ``load_state_dict``, which replaces the optimizer's group dicts, so a
    kept dict would receive every later ``set_lr`` while the real optimizer stayed at the
    checkpoint's rate.
    """

    def __init__(self, optimizer: Any, index: int) -> None:
        super().__init__(None)
        self.owner = optimizer
        self.index = index

    @property
    def group(self) -> Dict[str, Any]:
        return self.owner.param_groups[self.index]

    def get_lr(self) -> float:
        return self.group["lr"]

    def set_lr(self, lr: float) -> None:
        self.group["lr"] = lr


def _cosine_config(cfg: Any, lr: float) -> CosineLRScheduleConfig:
    """A resolved, private copy of the cosine settings with peak ``lr`` (fairseq's scheduler edits it)."""
    return CosineLRScheduleConfig(
        warmup_updates=int(cfg.warmup_updates),
        warmup_init_lr=float(cfg.warmup_init_lr),
        lr=[lr],
        min_lr=float(cfg.min_lr),
        t_mult=float(cfg.t_mult),
        lr_period_updates=float(cfg.lr_period_updates),
        lr_shrink=float(cfg.lr_shrink),
        max_update=int(cfg.max_update),
    )


@register_lr_scheduler("eat_cosine", dataclass=EATCosineConfig)
class EATCosineSchedule(FairseqLRScheduler):
    """fairseq's ``cosine`` schedule, once per layer-decay group, as the release's ``composite``
    optimizer with ``dynamic_groups`` builds it.

    The release gives every group its own scheduler whose peak is ``lr * lr_scale`` while
    ``warmup_init_lr`` and ``min_lr`` stay unscaled; fairseq's cosine then clamps ``min_lr`` to the
    peak when the peak is lower, so the most decayed blocks train at a constant rate. For EAT-base on
    the AS-20K recipe (lr 5e-5, min_lr 1e-6, layer decay 0.65) block 0 stays at 2.84e-7 throughout and
    block 11 warms up from 1e-6 to 3.25e-5 and decays back to 1e-6. Each group here is driven by
    fairseq's own ``CosineLRSchedule`` (same arithmetic as the release). ``layer_decay_schedule=scaled``
    keeps one schedule and multiplies all of it by each group's scale (this project's earlier rule).
    ``step_update`` returns the lr of the full-rate group.
    """

    def __init__(self, cfg: EATCosineConfig, optimizer: Any) -> None:
        super().__init__(cfg, optimizer)
        lrs = list(cfg.lr) if isinstance(cfg.lr, Collection) else [cfg.lr]
        if len(lrs) != 1:
            raise ValueError(f"eat_cosine needs one learning rate, got {lrs}")
        base_lr = float(lrs[0])
        self.per_group = str(cfg.layer_decay_schedule) == "per_group"
        inner = _unwrap_optimizer(optimizer)
        if self.per_group:
            if hasattr(inner, "per_group_schedule"):
                inner.per_group_schedule = True
            groups = list(optimizer.param_groups)
            self.schedules = [
                CosineLRSchedule(_cosine_config(cfg, base_lr * float(g.get("lr_scale", 1.0))), _GroupLR(optimizer, i))
                for i, g in enumerate(groups)
            ]
            scales = [float(g.get("lr_scale", 1.0)) for g in groups]
            self.report = max(range(len(groups)), key=scales.__getitem__)
        else:
            if hasattr(inner, "per_group_schedule"):
                inner._warned_scaled = True  # scaling is what was asked for
            self.schedules = [CosineLRSchedule(_cosine_config(cfg, base_lr), optimizer)]
            self.report = 0

    def step(self, epoch: int, val_loss: Optional[float] = None) -> float:
        super().step(epoch, val_loss)
        return self.optimizer.get_lr()

    def step_update(self, num_updates: int) -> float:
        lrs = [s.step_update(num_updates) for s in self.schedules]
        self._log_real_lrs()
        return lrs[self.report]

    def real_lrs(self) -> List[float]:
        """The learning rates the optimizer's param groups hold now, in group order."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def _log_real_lrs(self) -> None:
        """Log what the optimizer really holds beside fairseq's ``lr`` (the schedule's value):
        ``real_lr`` for the full-rate group and ``real_lr_min`` for the most decayed one. The two
        ``lr`` columns differ only when the schedule no longer reaches the optimizer (the stale
        group dicts a resume once left behind)."""
        groups = self.optimizer.param_groups
        top = max(groups, key=lambda g: float(g.get("lr_scale", 1.0)))
        metrics.log_scalar("real_lr", float(top["lr"]), weight=0, priority=301)
        metrics.log_scalar("real_lr_min", min(self.real_lrs()), weight=0, priority=302)

    def state_dict(self) -> Dict[str, Any]:
        """fairseq's scheduler state plus each group's current lr (a record: the schedule itself is a
        function of the update number, so a resume recomputes it rather than loading it)."""
        return {**super().state_dict(), "group_lrs": self.real_lrs()}
