"""The shipped recipes carry the reference's numbers (eat-reference.md sections 3 and 4) and compose
with our registered config dataclasses (no unknown keys)."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

pytest.importorskip("fairseq")

from helpers import REPO  # noqa: E402

import eat_fairseq  # noqa: E402,F401
from eat_fairseq.fairseq_ext.models import EATModelConfig, pretrain_config_from  # noqa: E402
from eat_fairseq.fairseq_ext.tasks import EATPretrainingTaskConfig  # noqa: E402
from eat_fairseq.model.pretraining import PretrainConfig  # noqa: E402

PRE = REPO / "examples" / "pretraining"
FT = REPO / "examples" / "finetuning"


def load(path):
    cfg = OmegaConf.load(path)
    assert cfg.hydra.run.dir == ".", f"{path.name}: hydra.run.dir must be pinned"
    return cfg


@pytest.mark.parametrize(
    "name, lr, preset, anneal",
    [("eat_base", 5e-4, PretrainConfig.base, 100000), ("eat_large", 4e-4, PretrainConfig.large, 150000)],
)
def test_pretraining_recipes_match_reference(name, lr, preset, anneal) -> None:
    cfg = load(PRE / f"{name}.yaml")
    assert list(cfg.optimization.lr) == [lr]
    assert cfg.optimization.max_update == 400000
    assert cfg.optimization.clip_norm == 4.0
    assert cfg.optimizer._name == "adam" and list(cfg.optimizer.adam_betas) == [0.9, 0.95]
    assert cfg.optimizer.weight_decay == 0.05
    assert cfg.lr_scheduler._name == "cosine" and cfg.lr_scheduler.warmup_updates == 53333
    assert cfg.dataset.batch_size == 12 and cfg.distributed_training.distributed_world_size == 4
    assert cfg.task.target_length == 1024 and cfg.common.fp16 is True
    assert cfg.model.clone_batch == 16 and cfg.model.ema_anneal_end_step == anneal
    # the yaml's model section, merged into our dataclass, builds exactly the core preset
    model = OmegaConf.merge(OmegaConf.structured(EATModelConfig), {k: v for k, v in cfg.model.items() if k != "_name"})
    assert pretrain_config_from(model) == preset()
    task_keys = set(cfg.task) - {"_name"}
    assert task_keys <= set(EATPretrainingTaskConfig.__dataclass_fields__)


def test_tiny_pretraining_recipe_is_cpu_sized() -> None:
    cfg = load(PRE / "eat_tiny.yaml")
    model = OmegaConf.merge(OmegaConf.structured(EATModelConfig), {k: v for k, v in cfg.model.items() if k != "_name"})
    core = pretrain_config_from(model)
    assert (core.encoder.depth, core.encoder.embed_dim, cfg.task.target_length) == (2, 64, 128)
    assert cfg.common.cpu is True


# name: batch (total), lr, updates, warm-up, frames, mixup prob, specaug r, loss, norm stats, fbank noise.
# SpecAugment r is the authors' model.mask_ratio per script (finetuning_*.sh); fbank noise + roll is their
# task.noise, set only in finetuning_SPCv2.sh (their finetuning.yaml has noise: false).
FINETUNE = {
    "as20k": (48, 5e-5, 40000, 4000, 1024, 0.9, 0.2, "bce_positive_norm", (-4.268, 4.569), False),
    "as2m": (96, 5e-5, 300000, 30000, 1024, 0.9, 0.2, "bce_positive_norm", (-4.268, 4.569), False),
    "esc50": (48, 5e-5, 4000, 400, 512, 0.0, 0.4, "ce", (-6.627, 5.359), False),
    "spc2": (256, 2e-4, 40000, 4000, 128, 0.9, 0.2, "bce", (-6.846, 5.565), True),
}


@pytest.mark.parametrize("name", sorted(FINETUNE))
def test_finetuning_recipes_match_reference(name) -> None:
    batch, lr, updates, warmup, frames, mixup_p, spec_r, loss, (mean, std), noise = FINETUNE[name]
    cfg = load(FT / f"{name}.yaml")
    world = cfg.get("distributed_training", {}).get("distributed_world_size", 1)
    assert cfg.dataset.batch_size * world * cfg.optimization.get("update_freq", [1])[0] == batch
    assert list(cfg.optimization.lr) == [lr] and cfg.optimization.max_update == updates
    assert cfg.lr_scheduler._name == "eat_cosine" and cfg.lr_scheduler.warmup_updates == warmup
    assert cfg.lr_scheduler.get("layer_decay_schedule", "per_group") == "per_group"
    assert cfg.lr_scheduler.min_lr == 1e-6
    assert list(cfg.optimizer.adam_betas) == [0.9, 0.95] and cfg.optimizer.weight_decay == 0.05
    assert cfg.task.target_length == frames
    assert (cfg.task.norm_mean, cfg.task.norm_std) == (mean, std)
    assert cfg.task.noise_and_roll is noise and cfg.task.roll_and_gain is True
    assert cfg.criterion.loss == loss and cfg.criterion.mixup_prob == mixup_p
    assert cfg.criterion.specaug_freq_ratio == cfg.criterion.specaug_time_ratio == spec_r
    if mixup_p:
        assert cfg.criterion.mixup_alpha == 0.8
    if name == "esc50":
        assert cfg.criterion.label_smoothing == 0.1
    if name == "as2m":
        assert cfg.task.balanced_sampling is True and cfg.task.samples_per_epoch == 200000
    assert cfg.model.drop_path_rate == 0.1 and cfg.model.layer_decay == 0.65


def test_spc2_bce_targets_are_not_smoothed_as_the_release() -> None:
    """The authors' SPC-2 script sets ``model.label_smoothing=0.1``, but their mixup builds the BCE
    targets as ``lam * y + (1 - lam) * y.flip(0)`` and never uses it; our ``bce`` must not smooth either."""
    import torch
    import torch.nn.functional as F

    from eat_fairseq.model.finetune_losses import finetune_loss

    cfg = load(FT / "spc2.yaml")
    logits = torch.randn(4, 35, generator=torch.Generator().manual_seed(0))
    hot = F.one_hot(torch.tensor([0, 3, 7, 34]), 35).float()
    mixed = 0.7 * hot + 0.3 * hot.flip(0)
    loss, size = finetune_loss(cfg.criterion.loss, logits, mixed, cfg.criterion.get("label_smoothing", 0.1))
    expected = F.binary_cross_entropy_with_logits(logits, mixed, reduction="sum")
    assert size.item() == 4 and loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# every recipe: its own save folder, TensorBoard logs inside it, start-up checks

RECIPES = sorted((REPO / "examples").glob("*/*.yaml"))
FAMILY_PREFIX = {"pretraining": "", "finetuning": "finetune_", "fsdd": "fsdd_"}


def test_every_recipe_saves_to_its_own_folder_and_logs_tensorboard_there() -> None:
    from helpers import compose_recipe

    assert len(RECIPES) >= 11  # 3 pre-training, 6 fine-tuning, 2 FSDD
    seen = {}
    for path in RECIPES:
        family, name = path.parent.name, path.stem
        cfg = compose_recipe(path.parent, name, ["task.data=/tmp/data"])
        save_dir = cfg.checkpoint.save_dir
        # the convention the README documents: checkpoints/<name>, checkpoints/finetune_<name>, ...
        assert save_dir == f"checkpoints/{FAMILY_PREFIX[family]}{name}", (path, save_dir)
        assert save_dir not in seen, f"{path} and {seen.get(save_dir)} share {save_dir}"
        seen[save_dir] = path
        assert cfg.common.tensorboard_logdir == f"{save_dir}/tb", path
        if cfg.task._name == "eat_classification":
            assert cfg.task.per_class_ap_dir == save_dir, path
        # written as an interpolation, so overriding checkpoint.save_dir moves the logs along
        raw = OmegaConf.load(path)
        assert OmegaConf.to_container(raw.common)["tensorboard_logdir"] == "${checkpoint.save_dir}/tb", path


def test_cosine_schedule_with_max_update_equal_to_warmup_fails_at_start() -> None:
    from fairseq import tasks

    from helpers import compose_recipe

    cfg = compose_recipe(PRE, "eat_tiny", ["task.data=/tmp/data", "optimization.max_update=20"])
    assert cfg.lr_scheduler.warmup_updates == 20
    with pytest.raises(ValueError, match=r"max_update \(20\) equals lr_scheduler.warmup_updates \(20\)"):
        tasks.setup_task(cfg.task)
    tasks.setup_task(cfg.task, from_checkpoint=True)  # loading a finished run's checkpoint is not refused
    ok = compose_recipe(PRE, "eat_tiny", ["task.data=/tmp/data", "optimization.max_update=21"])
    tasks.setup_task(ok.task)
    # the schedule's own length counts: the first 10 updates of a 20-update schedule would still crash
    short = compose_recipe(PRE, "eat_tiny", ["task.data=/tmp/data", "optimization.max_update=10",
                                             "++lr_scheduler.max_update=20"])
    with pytest.raises(ValueError, match=r"lr_scheduler.max_update \(20\) equals"):
        tasks.setup_task(short.task)
    early = compose_recipe(PRE, "eat_tiny", ["task.data=/tmp/data", "optimization.max_update=20",
                                             "++lr_scheduler.max_update=200"])
    tasks.setup_task(early.task)  # the first 20 updates of the recipe's 200-update schedule
    ft = compose_recipe(FT, "tiny", ["task.data=/tmp/data", "optimization.max_update=2"])
    with pytest.raises(ValueError, match="warm-up"):
        tasks.setup_task(ft.task, from_checkpoint=False)


def test_early_stop_keeps_the_long_runs_schedule() -> None:
    """docs/pretraining.md: optimization.max_update=N ++lr_scheduler.max_update=M runs the first N
    updates of an M-update run at that run's learning rates (without the + key the cosine is shorter)."""
    import torch
    from fairseq.optim import build_optimizer
    from fairseq.optim.lr_scheduler import build_lr_scheduler

    from helpers import compose_recipe

    def rates(overrides: list[str], steps: int) -> list[float]:
        cfg = compose_recipe(PRE, "eat_tiny", ["task.data=/tmp/data", "lr_scheduler.warmup_updates=5",
                                               *overrides])
        opt = build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])
        sched = build_lr_scheduler(cfg.lr_scheduler, opt)
        return [sched.step_update(step) for step in range(steps)]

    long = rates(["optimization.max_update=200"], 30)
    early = rates(["optimization.max_update=30", "++lr_scheduler.max_update=200"], 30)
    short = rates(["optimization.max_update=30"], 30)
    assert early == long
    assert short[:5] == long[:5] and short[20] < long[20]  # same warm-up, then a 30-update cosine


def test_task_num_threads_sets_torch_threads() -> None:
    import torch
    from fairseq import tasks

    from helpers import compose_recipe

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        tasks.setup_task(compose_recipe(PRE, "eat_tiny", ["task.data=/tmp/data"]).task)
        assert torch.get_num_threads() == 1  # the tiny recipes use one thread
        torch.set_num_threads(2)
        tasks.setup_task(compose_recipe(PRE, "eat_tiny", ["task.data=/tmp/data", "task.num_threads=0"]).task)
        assert torch.get_num_threads() == 2  # 0 leaves torch's setting alone
    finally:
        torch.set_num_threads(before)
