"""Per-depth learning rate over a whole fine-tuning schedule (issue 11, item 1).

The release gives each layer-decay group its own fairseq cosine schedule (``composite`` optimizer,
``dynamic_groups``): peak ``lr * scale``, warm-up from the UNSCALED start (``min_lr``), decay to the
UNSCALED ``min_lr``, and ``min_lr`` clamped to the peak when the peak is lower (a constant rate).
``eat_adam`` + ``eat_cosine`` must give every parameter that lr at every update; this is checked
against the rule written out here and against fairseq's ``composite`` optimizer itself, i.e. the
machinery the release's configs run.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

pytest.importorskip("fairseq")

from fairseq.optim import build_optimizer  # noqa: E402
from fairseq.optim.composite import FairseqCompositeOptimizer  # noqa: E402
from fairseq.optim.lr_scheduler import build_lr_scheduler  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from eat_fairseq.model.classifier import layer_decay_cosine_lr  # noqa: E402
from eat_fairseq.fairseq_ext import models, optim  # noqa: E402

# the AS-20K recipe (reference section 4) on a 12-block encoder (narrow, so it builds fast)
LR, WARMUP, MAX_UPDATE, MIN_LR, DECAY, DEPTH = 5e-5, 4000, 40000, 1e-6, 0.65, 12
# fairseq sets the lr for update k with step_update(k), k = 0 .. max_update - 1 (at max_update itself
# its cosine would restart, shrunk 10x; no update trains with that value)
LAST = MAX_UPDATE - 1
UPDATES = sorted(set(range(0, MAX_UPDATE, 97)) | {1, 3999, 4000, 4001, 20000, LAST})


def _model() -> models.EATClassifierModel:
    cfg = OmegaConf.structured(models.EATClassifierConfig)
    cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.max_length, cfg.num_classes = 16, DEPTH, 2, 8, 3
    cfg.layer_decay = DECAY
    torch.manual_seed(0)
    return models.EATClassifierModel(cfg)


def _scale(name: str) -> float:
    parts = name.split(".")
    if parts[:2] == ["encoder", "blocks"]:
        return DECAY ** (DEPTH - int(parts[2]))
    return 1.0


def _rule(n: int, scale: float) -> float:
    """The release's rule, written out independently of the code under test."""
    peak = LR * scale
    low = MIN_LR if peak >= MIN_LR else peak  # fairseq clamps min_lr to the peak
    if n < WARMUP:
        return low + (peak - low) * n / WARMUP  # warm-up starts at the (unscaled) min_lr
    t = (n - WARMUP) / (MAX_UPDATE - WARMUP)
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * t))


def _ours(model: torch.nn.Module, schedule: str = "per_group"):
    opt_cfg = OmegaConf.structured(optim.EATAdamConfig)
    opt_cfg.lr, opt_cfg.tpu, opt_cfg.adam_betas = [LR], False, [0.9, 0.95]
    optimizer = optim.EATAdam(opt_cfg, [p for p in model.parameters() if p.requires_grad])
    sched_cfg = OmegaConf.structured(optim.EATCosineConfig)
    sched_cfg.lr, sched_cfg.max_update, sched_cfg.warmup_updates, sched_cfg.min_lr = [LR], MAX_UPDATE, WARMUP, MIN_LR
    sched_cfg.layer_decay_schedule = schedule
    return optimizer, optim.EATCosineSchedule(sched_cfg, optimizer)


def _release(model: torch.nn.Module):
    """fairseq's composite optimizer configured as the release's finetuning.yaml."""
    root = OmegaConf.create({
        "common": {"tpu": False},
        "optimization": {"lr": [LR], "max_update": MAX_UPDATE},
        "optimizer": {
            "_name": "composite",
            "dynamic_groups": True,
            "groups": {"default": {
                "lr_float": LR,
                "optimizer": {"_name": "adam", "adam_betas": [0.9, 0.95], "weight_decay": 0.05},
                "lr_scheduler": {"_name": "cosine", "warmup_updates": WARMUP, "min_lr": MIN_LR},
            }},
        },
    })
    # fairseq keeps the composite's optimizers/schedulers in class-level dicts: start clean
    FairseqCompositeOptimizer.optimizers.clear()
    FairseqCompositeOptimizer.lr_schedulers.clear()
    optimizer = build_optimizer(root.optimizer, [p for p in model.parameters() if p.requires_grad])
    return optimizer, optimizer.lr_scheduler


def _lr_by_name(model: torch.nn.Module, groups) -> dict[str, float]:
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    return {n: lr_of[id(p)] for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def trajectories():
    """lr of every parameter at every sampled update: ours and the release's machinery."""
    ours_model, release_model = _model(), _model()
    opt, sched = _ours(ours_model)
    try:
        r_opt, r_sched = _release(release_model)
        ours, release = {}, {}
        for n in UPDATES:
            sched.step_update(n)
            r_sched.step_update(n)
            ours[n] = _lr_by_name(ours_model, opt.param_groups)
            release[n] = _lr_by_name(release_model, list(r_opt.param_groups))
    finally:
        FairseqCompositeOptimizer.optimizers.clear()
        FairseqCompositeOptimizer.lr_schedulers.clear()
    return ours, release


def test_every_parameter_follows_the_release_schedule_exactly(trajectories) -> None:
    ours, release = trajectories
    for n in UPDATES:
        assert ours[n] == release[n], f"update {n}"  # same fairseq arithmetic: bit-equal


def test_per_depth_lr_matches_the_rule_over_the_whole_schedule(trajectories) -> None:
    ours, _ = trajectories
    names = list(ours[0])
    assert len({_scale(n) for n in names}) == DEPTH + 1  # 12 decayed depths + full rate
    for n in UPDATES:
        for name in names:
            assert ours[n][name] == pytest.approx(_rule(n, _scale(name)), rel=1e-12, abs=0), (n, name)
            assert ours[n][name] == pytest.approx(
                layer_decay_cosine_lr(n, LR, _scale(name), WARMUP, MAX_UPDATE, MIN_LR), rel=1e-12, abs=0
            )


def test_the_numbers_the_issue_names(trajectories) -> None:
    ours, _ = trajectories
    block0 = "encoder.blocks.0.attn.qkv.weight"
    block11 = "encoder.blocks.11.mlp.fc1.weight"
    head = "head.weight"
    # block 0: 5e-5 * 0.65**12 = 2.84e-7 < min_lr -> constant for the whole run
    assert {ours[n][block0] for n in UPDATES} == {LR * DECAY**12}
    assert LR * DECAY**12 == pytest.approx(2.844e-7, rel=1e-3)
    # blocks 0-2 are below min_lr (constant), block 3 (0.65**9 * 5e-5 = 1.04e-6) is not
    for j in (0, 1, 2):
        assert len({ours[n][f"encoder.blocks.{j}.norm1.weight"] for n in UPDATES}) == 1
    assert len({ours[n]["encoder.blocks.3.norm1.weight"] for n in UPDATES}) > 1
    # block 11: 1e-6 -> 3.25e-5 -> 1e-6 (unscaled ends)
    assert ours[0][block11] == pytest.approx(1e-6)
    assert ours[WARMUP][block11] == pytest.approx(LR * 0.65)
    assert ours[LAST][block11] == pytest.approx(1e-6, rel=1e-6)
    # the head: 1e-6 -> 5e-5 -> 1e-6
    assert (ours[0][head], ours[WARMUP][head], ours[LAST][head]) == pytest.approx((1e-6, LR, 1e-6), rel=1e-6)


def test_scaled_option_keeps_the_previous_rule() -> None:
    model = _model()
    opt, sched = _ours(model, schedule="scaled")
    for n in (0, 2000, WARMUP, 30000, LAST):
        lr = sched.step_update(n)
        unscaled = _rule(n, 1.0)
        assert lr == pytest.approx(unscaled) and opt.get_lr() == pytest.approx(unscaled)
        for name, value in _lr_by_name(model, opt.param_groups).items():
            assert value == pytest.approx(unscaled * _scale(name), rel=1e-12)
    # e.g. block 0 ends at 1e-6 * 0.65**12 = 5.7e-9 here instead of the release's constant 2.84e-7
    assert _lr_by_name(model, opt.param_groups)["encoder.blocks.0.norm2.bias"] == pytest.approx(5.69e-9, rel=1e-3)


def test_step_update_reports_the_full_rate_lr_and_plain_cosine_warns(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        opt, sched = _ours(_model())
        assert sched.step_update(WARMUP) == pytest.approx(LR) and opt.get_lr() == pytest.approx(LR)
    assert "eat_cosine" not in caplog.text
    cfg = OmegaConf.create({"_name": "cosine", "lr": [LR], "warmup_updates": WARMUP, "min_lr": MIN_LR,
                            "max_update": MAX_UPDATE})
    opt_cfg = OmegaConf.structured(optim.EATAdamConfig)
    opt_cfg.lr, opt_cfg.tpu = [LR], False
    plain_opt = optim.EATAdam(opt_cfg, list(_model().parameters()))
    with caplog.at_level(logging.WARNING):
        build_lr_scheduler(cfg, plain_opt).step_update(10)
    assert "eat_cosine" in caplog.text


@pytest.mark.parametrize("schedule", ["per_group", "scaled"])
def test_schedule_reaches_the_optimizer_after_its_state_is_loaded(schedule: str) -> None:
    """fairseq resumes by ``optimizer.load_state_dict``, which replaces the param-group dicts; every
    later ``step_update`` must still set the lr the optimizer really uses (issue 20: with kept dicts
    the groups stayed at the checkpoint's lr for the rest of the run)."""
    model = _model()
    opt, sched = _ours(model, schedule)
    sched.step_update(WARMUP)
    saved = opt.state_dict()
    fresh_model = _model()
    fresh_opt, fresh_sched = _ours(fresh_model, schedule)
    fresh_sched.step_update(0)  # fairseq builds the scheduler (update 0) before loading the state
    fresh_opt.load_state_dict(saved)
    for n in (WARMUP + 1, 20000, LAST):
        lr = fresh_sched.step_update(n)
        sched.step_update(n)
        assert _lr_by_name(fresh_model, fresh_opt.param_groups) == _lr_by_name(model, opt.param_groups), n
        assert fresh_sched.real_lrs() == [g["lr"] for g in fresh_opt.param_groups]
        assert max(fresh_sched.real_lrs()) == pytest.approx(lr)
    assert fresh_sched.state_dict()["group_lrs"] == fresh_sched.real_lrs()
