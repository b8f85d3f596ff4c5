"""fairseq shells for EAT pre-training: task ``eat_pretraining``, model ``eat``, criterion ``eat_ufo``.

Everything that computes lives in :mod:`eat_fairseq.core`; this module only maps configs to it and
plugs it into fairseq's training loop (data loading, the EMA step after each optimizer step, logging).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import meters
from fairseq.models import BaseFairseqModel, register_model
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING, OmegaConf

from eat_fairseq.core.encoder import EncoderConfig
from eat_fairseq.core.features import AUDIOSET_MEAN, AUDIOSET_STD, FeatureConfig
from eat_fairseq.core.objective import ufo_loss
from eat_fairseq.core.probe import POOLINGS, OnlineProbe
from eat_fairseq.core.pretraining import EATPretrainingModel, PretrainConfig

from .data import EATAudioDataset, MaskSpec, is_placeholder

logger = logging.getLogger(__name__)

ENCODER_FIELDS = tuple(f.name for f in dataclasses.fields(EncoderConfig))
PRETRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(PretrainConfig) if f.name != "encoder")


def encoder_config_from(cfg: Any) -> EncoderConfig:
    """Build the core EncoderConfig from a flat config (fairseq model cfg, dict or DictConfig)."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    return EncoderConfig(**{k: get(k) for k in ENCODER_FIELDS if get(k, None) is not None})


def pretrain_config_from(cfg: Any) -> PretrainConfig:
    """Build the core PretrainConfig from the flat fairseq model config."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    rest = {k: get(k) for k in PRETRAIN_FIELDS if get(k, None) is not None}
    return PretrainConfig(encoder=encoder_config_from(cfg), **rest)


# --------------------------------------------------------------------------------------------------
# task

NUM_THREADS_HELP = (
    "torch CPU threads of the training process; 0 = torch's default ($OMP_NUM_THREADS, else one per core). "
    "On a machine shared with other jobs, 1 is often many times faster for small models"
)


def check_lr_schedule(task_cfg: Any) -> None:
    """Stop at start-up, with the reason, on settings that would crash fairseq later.

    fairseq's cosine scheduler (without ``lr_period_updates``; ``eat_cosine`` runs one per layer-decay
    group) divides by ``max_update - warmup_updates``, so ``max_update == warmup_updates`` ran the whole warm-up and then died with a
    ZeroDivisionError at its last update. The full config is reached through the task node's root
    (fairseq passes ``cfg.task`` of the composed config); a detached task config is not checked.
    """
    if not OmegaConf.is_config(task_cfg):
        return
    root = task_cfg._get_root()
    sched, optim = root.get("lr_scheduler"), root.get("optimization")
    if not OmegaConf.is_config(sched) or not OmegaConf.is_config(optim) or sched.get("_name") not in ("cosine", "eat_cosine"):
        return
    if (sched.get("lr_period_updates") or -1) > 0:
        return
    max_update, warmup = int(optim.get("max_update") or 0), int(sched.get("warmup_updates") or 0)
    if max_update > 0 and max_update == warmup:
        raise ValueError(
            f"optimization.max_update ({max_update}) equals lr_scheduler.warmup_updates ({warmup}): fairseq's "
            "cosine schedule would divide by zero at the last update. Use fewer warm-up updates (the recipes "
            f"use about 10%, e.g. lr_scheduler.warmup_updates={max(1, max_update // 10)}) or more updates."
        )


def prepare_run(task_cfg: Any, from_checkpoint: bool) -> None:
    """Start-of-training settings shared by the eat_* tasks: the schedule check and ``num_threads``.

    Skipped when a task is rebuilt from a checkpoint (evaluation, loading), which must not fail on, or
    change the process because of, how that checkpoint was trained.
    """
    if from_checkpoint:
        return
    check_lr_schedule(task_cfg)
    threads = int(getattr(task_cfg, "num_threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
        logger.info("torch CPU threads: %d (task.num_threads)", threads)


CROP_HELP = (
    "clips longer than target_length: start = their first target_length frames (release); random = a "
    "window at a random start per epoch, drawn from (seed, epoch, manifest line) so any worker and a "
    "resumed run draw the same one (training split only; evaluation always uses start)"
)
WHOLE_FILE_HELP = (
    "decode whole files and crop after the fbank, as the release did: the cost then grows with the file "
    "length. Default: read only the frames used (identical features for clips up to target_length "
    "frames; for longer ones the DC offset is taken over the window, a float32-rounding difference)"
)


@dataclass
class EATPretrainingTaskConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "folder with {split}.tsv manifests"})
    sample_rate: int = field(default=16000, metadata={"help": "audio is resampled to this rate"})
    target_length: int = field(
        default=1024, metadata={"help": "fbank frames per clip after zero-padding at the end or cropping"}
    )
    norm_mean: float = field(default=AUDIOSET_MEAN, metadata={"help": "fbank mean for (x - mean) / (2 std)"})
    norm_std: float = field(default=AUDIOSET_STD, metadata={"help": "fbank std for (x - mean) / (2 std)"})
    min_sample_size: int = field(
        default=0, metadata={"help": "drop clips shorter than this many samples (native rate) at load time"}
    )
    on_bad_file: ChoiceEnum(["raise", "skip"]) = field(  # type: ignore[valid-type]
        default="raise",
        metadata={"help": "raise: stop on a missing/unreadable/NaN file; skip: drop it from its batch and count it"},
    )
    precompute_mask: bool = field(
        default=True, metadata={"help": "compute the inverse block masks in the data-loader workers"}
    )
    probe_data: Optional[str] = field(
        default=None,
        metadata={"help": "labelled manifest folder ({split}.tsv + {split}.lbl + label_descriptors.csv) for an "
                  "online frozen-feature probe of the student and teacher; None disables it"},
    )
    probe_splits: str = field(
        default="auto",
        metadata={"help": "auto (leave-one-split-out over every labelled split), 'a,b,c' (folds) or 'train/test'"},
    )
    probe_interval_updates: int = field(
        default=0, metadata={"help": "probe every N updates (0: only at max_update); needs probe_data"}
    )
    probe_layer: int = field(default=-1, metadata={"help": "encoder block probed (0-based; -1 the last)"})
    probe_pooling: ChoiceEnum(list(POOLINGS)) = field(  # type: ignore[valid-type]
        default="freq",
        metadata={"help": "freq: per-frequency-column time mean (W*D); freqstd: time mean and std per column "
                          "(2*W*D); mean: mean over patches; cls: CLS token"},
    )
    probe_max_per_split: int = field(
        default=0, metadata={"help": "use at most this many clips of each probe split (0: all)"}
    )
    diagnostics_interval_updates: int = field(
        default=100,
        metadata={"help": "every N updates log the gradient norm of each loss term on the student encoder "
                  "(two extra backward passes); 0 disables"},
    )
    max_update: int = II("optimization.max_update")
    crop: ChoiceEnum(["start", "random"]) = field(  # type: ignore[valid-type]
        default="start",
        metadata={"help": CROP_HELP},
    )
    read_whole_file: bool = field(default=False, metadata={"help": WHOLE_FILE_HELP})
    train_subset: str = II("dataset.train_subset")
    num_threads: int = field(default=0, metadata={"help": NUM_THREADS_HELP})
    clone_batch: int = II("model.clone_batch")
    mask_prob: float = II("model.mask_prob")
    mask_length: int = II("model.mask_length")
    mask_prob_adjust: float = II("model.mask_prob_adjust")
    seed: int = II("common.seed")


def restart_stopped_wall_meter() -> None:
    """Start the ``default/wall`` stopwatch again if a checkpoint's metrics left it stopped."""
    wall = metrics.get_meter("default", "wall")
    if isinstance(wall, meters.StopwatchMeter) and wall.start_time is None:
        wall.start()


class EATAudioTask(FairseqTask):
    """What every eat_* task shares: audio in (features from the task's sample_rate, target_length
    and normalisation fields), no token dictionaries, no length limit, and the handling of
    placeholder batches (evaluation batches whose clips were all unreadable with on_bad_file=skip)."""

    def feature_config(self) -> FeatureConfig:
        return FeatureConfig(
            sample_rate=self.cfg.sample_rate,
            target_length=self.cfg.target_length,
            norm_mean=self.cfg.norm_mean,
            norm_std=self.cfg.norm_std,
        )

    def clip_options(self, split: str) -> Dict[str, Any]:
        """Dataset settings that depend on the split: crops and replacement of bad clips only train."""
        is_train = split == str(self.cfg.train_subset)
        return {
            "crop": str(self.cfg.crop) if is_train else "start",
            "whole_file": bool(self.cfg.read_whole_file),
            "replace_bad": is_train,
        }

    def train_step(self, sample: Any, model: Any, criterion: Any, optimizer: Any, update_num: int,
                   ignore_grad: bool = False, **kwargs: Any):
        if is_placeholder(sample):
            # training datasets replace bad clips, so this is a bug, never a step from nothing
            raise RuntimeError("a placeholder batch (all clips unreadable) reached train_step")
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs)

    def valid_step(self, sample: Any, model: Any, criterion: Any):
        if is_placeholder(sample):
            logging_output = {"loss": 0.0, "sample_size": 0, "nsentences": 0, "ntokens": 0,
                              "skipped": int(sample.get("skipped", 0))}
            return torch.zeros(()), 0, logging_output
        return super().valid_step(sample, model, criterion)

    def begin_epoch(self, epoch: int, model: Any) -> None:
        """fairseq restores its ``wall`` stopwatch stopped when a run resumes mid-epoch, so every later
        log line would say ``wall=0``; restart it (it then counts this process's seconds, as fairseq's
        does after a resume at an epoch boundary). Only the logged meter changes, never training."""
        super().begin_epoch(epoch, model)
        restart_stopped_wall_meter()

    @property
    def source_dictionary(self) -> None:
        return None

    @property
    def target_dictionary(self) -> None:
        return None

    def max_positions(self) -> Optional[int]:
        return None


@register_task("eat_pretraining", dataclass=EATPretrainingTaskConfig)
class EATPretrainingTask(EATAudioTask):
    """Self-supervised EAT pre-training on unlabelled audio from TSV manifests."""

    cfg: EATPretrainingTaskConfig

    def __init__(self, cfg: EATPretrainingTaskConfig) -> None:
        super().__init__(cfg)
        self.probe: Optional[OnlineProbe] = None
        self.last_probe: Dict[str, float] = {}

    @classmethod
    def setup_task(cls, cfg: EATPretrainingTaskConfig, **kwargs: Any) -> "EATPretrainingTask":
        from_checkpoint = bool(kwargs.get("from_checkpoint", False))
        prepare_run(cfg, from_checkpoint)
        task = cls(cfg)
        if cfg.probe_data and not from_checkpoint:
            # only for training: a checkpoint loaded elsewhere must not need the probe's data folder
            task.probe = OnlineProbe(
                os.path.abspath(cfg.probe_data),
                task.feature_config(),
                splits=cfg.probe_splits,
                layer=cfg.probe_layer,
                pooling=str(cfg.probe_pooling),
                max_per_split=cfg.probe_max_per_split or None,
            )
        return task

    def run_probe(self, model: torch.nn.Module, num_updates: int) -> Dict[str, float]:
        """Probe the student and the teacher now; log ``probe_*`` and return them (rank 0 only)."""
        if self.probe is None:
            return {}
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return {}
        core = _unwrap(model)
        start = time.perf_counter()
        with torch.no_grad():
            res = self.probe.run({"student": core.encoder, "teacher": core.teacher})
        self.last_probe = res
        logger.info(
            "probe at update %d (%.1f s, %s pooling, layer %d): %s",
            num_updates, time.perf_counter() - start, self.probe.pooling, self.probe.layer,
            ", ".join(f"{k[len('probe_'):]} {v:.4f}" for k, v in res.items()),
        )
        return res

    def load_dataset(self, split: str, combine: bool = False, epoch: int = 1, **kwargs: Any) -> None:
        manifest = os.path.join(self.cfg.data, f"{split}.tsv")
        if not os.path.exists(manifest):
            raise FileNotFoundError(f"no manifest for split {split!r}: {manifest} does not exist")
        mask = None
        if self.cfg.precompute_mask:
            mask = MaskSpec(
                clone_batch=self.cfg.clone_batch,
                mask_prob=self.cfg.mask_prob,
                mask_length=self.cfg.mask_length,
                mask_prob_adjust=self.cfg.mask_prob_adjust,
                seed=self.cfg.seed,
            )
        self.datasets[split] = EATAudioDataset(
            manifest,
            features=self.feature_config(),
            min_samples=self.cfg.min_sample_size,
            on_error=str(self.cfg.on_bad_file),
            mask=mask,
            shuffle=True,
            seed=self.cfg.seed,
            **self.clip_options(split),
        )

    def reduce_metrics(self, logging_outputs: List[Dict[str, Any]], criterion: Any) -> None:
        """The criterion's metrics, plus the latest probe accuracies: derived meters read
        ``last_probe`` when a line is logged, so every log line and tensorboard step shows the most
        recent measurement (and, not being saved in checkpoints, they cannot disturb a resume)."""
        super().reduce_metrics(logging_outputs, criterion)
        for key in self.last_probe:
            metrics.log_derived(key, lambda meters, key=key: round(self.last_probe[key], 4), priority=900)

    def optimizer_step(self, optimizer: Any, model: torch.nn.Module, update_num: int) -> None:
        """Step the optimizer, then move the EMA teacher towards the new student weights.

        The decay is the one for ``update_num + 1`` (the update count once this step is done), as in
        the release. With ``common.amp`` fairseq calls this even when the gradient scaler skips the
        step for an overflow; the teacher is then left alone too.
        """
        scaler = getattr(optimizer, "_grad_scaler", None)
        scale_before = scaler.get_scale() if scaler is not None else None
        super().optimizer_step(optimizer, model, update_num)
        if scaler is not None and scaler.get_scale() < scale_before:
            return  # the AMP scaler found inf/nan gradients and skipped the optimizer step
        core = _unwrap(model)
        if hasattr(core, "ema_step"):
            core.ema_step(update_num + 1)
        done = update_num + 1
        interval = self.cfg.probe_interval_updates
        if self.probe is not None and ((interval > 0 and done % interval == 0) or done == self.cfg.max_update):
            self.run_probe(model, done)


# --------------------------------------------------------------------------------------------------
# model


@dataclass
class EATEncoderFields(FairseqDataclass):
    """The encoder's settings, named exactly as :class:`EncoderConfig`'s fields (shared by the
    pre-training and the classification model configs)."""

    embed_dim: int = field(default=768, metadata={"help": "transformer width D"})
    depth: int = field(default=12, metadata={"help": "number of transformer blocks"})
    num_heads: int = field(default=12, metadata={"help": "attention heads"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "FFN hidden size / D"})
    patch_size: int = field(default=16, metadata={"help": "square patch size on the (T, F) fbank"})
    in_chans: int = field(default=1, metadata={"help": "input channels of the patch embedding"})
    num_mel_bins: int = field(default=128, metadata={"help": "fbank bins F"})
    max_length: int = field(default=768, metadata={"help": "time patches covered by the sin-cos table"})
    norm_eps: float = field(default=1e-6, metadata={"help": "LayerNorm epsilon of the encoder"})
    drop_path_rate: float = field(default=0.0, metadata={"help": "stochastic depth, linear over blocks"})
    dropout: float = field(default=0.0, metadata={"help": "dropout after attention/FFN projections"})
    attn_dropout: float = field(default=0.0, metadata={"help": "dropout on attention weights"})


@dataclass
class EATModelConfig(EATEncoderFields):
    """Pre-training model: the encoder (reference section 2; dropouts and drop path 0) plus:"""

    # multi-mask (reference section 3)
    clone_batch: int = field(default=16, metadata={"help": "masked copies per clip (multi-mask)"})
    mask_prob: float = field(default=0.8, metadata={"help": "fraction of patches masked"})
    mask_prob_adjust: float = field(default=0.07, metadata={"help": "extra block centres in inverse masking"})
    mask_length: int = field(default=5, metadata={"help": "block side of the inverse block mask"})
    # decoder
    decoder_dim: int = field(default=768, metadata={"help": "channels of the CNN decoder"})
    decoder_depth: int = field(default=6, metadata={"help": "conv blocks of the decoder"})
    decoder_kernel_size: int = field(default=3, metadata={"help": "decoder conv kernel size"})
    decoder_groups: int = field(default=16, metadata={"help": "decoder conv groups"})
    mask_noise_std: float = field(default=0.01, metadata={"help": "std of the noise filling masked positions"})
    # teacher
    average_top_k_layers: int = field(default=12, metadata={"help": "teacher blocks averaged into targets"})
    ema_decay: float = field(default=0.9998, metadata={"help": "EMA decay at update 0"})
    ema_end_decay: float = field(default=0.99999, metadata={"help": "EMA decay after the anneal"})
    ema_anneal_end_step: int = field(default=100000, metadata={"help": "updates of the linear decay anneal"})
    teacher_precision: ChoiceEnum(["release", "fp32"]) = field(  # type: ignore[valid-type]
        default="release",
        metadata={
            "help": "dtype of the teacher's forward under common.fp16/bf16 (its weights stay fp32): release: "
            "the student's half dtype, as the authors' code (faster); fp32: always fp32 (more precise targets)"
        },
    )
    # objective
    utterance_loss_weight: float = field(default=1.0, metadata={"help": "lambda of the utterance loss"})
    utterance_reduction: ChoiceEnum(["release", "mean"]) = field(  # type: ignore[valid-type]
        default="release",
        metadata={
            "help": "release: utterance term summed over the B*clone rows (its weight grows with the "
            "per-device batch, as the authors' code); mean: averaged over rows (batch-size independent)"
        },
    )
    target_position: ChoiceEnum(["keep", "center"]) = field(  # type: ignore[valid-type]
        default="keep",
        metadata={
            "help": "keep: targets as the release; center: subtract the batch mean at each patch position "
            "from the teacher targets (before their LayerNorm), removing what position alone predicts"
        },
    )


@register_model("eat", dataclass=EATModelConfig)
class EATModel(EATPretrainingModel, BaseFairseqModel):
    """The core pre-training model (student, CNN decoder, EMA teacher) as a fairseq model.

    Subclassing the core keeps the state-dict names identical to the core's, so checkpoints written
    by fairseq load into the fairseq-free API unchanged.
    """

    def __init__(self, cfg: EATModelConfig) -> None:
        super().__init__(pretrain_config_from(cfg))
        self.fairseq_cfg = cfg
        self.num_updates = 0

    @classmethod
    def build_model(cls, cfg: EATModelConfig, task: Optional[FairseqTask] = None) -> "EATModel":
        return cls(cfg)

    def forward(self, source: torch.Tensor, mask: Optional[torch.Tensor] = None, **unused: Any) -> Dict[str, Any]:
        return super().forward(source, mask)

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates

    def get_num_updates(self) -> int:
        return self.num_updates


# --------------------------------------------------------------------------------------------------
# criterion


@dataclass
class EATUFOCriterionConfig(FairseqDataclass):
    pass


@register_criterion("eat_ufo", dataclass=EATUFOCriterionConfig)
class EATUFOCriterion(FairseqCriterion):
    """Utterance-frame objective: frame loss on masked patches + lambda * utterance (CLS) loss.

    The weight and reduction come from the model config (``utterance_loss_weight``,
    ``utterance_reduction``); see :func:`eat_fairseq.core.objective.ufo_loss`.
    """

    def __init__(self, cfg: EATUFOCriterionConfig, task: FairseqTask) -> None:
        super().__init__(task)
        self.last_gradient_norms: Dict[str, float] = {}
        self.gradient_norms_failed = False

    def forward(self, model: torch.nn.Module, sample: Dict[str, Any], reduce: bool = True):
        core = _unwrap(model)
        net_input = sample["net_input"]
        out = model(source=net_input["source"], mask=net_input.get("mask"))
        weight = core.cfg.utterance_loss_weight
        reduction = str(core.cfg.utterance_reduction)
        loss, sample_size = ufo_loss(out["frame_err"], out["utterance_err"], utterance_weight=weight, reduction=reduction)
        frame_sum = out["frame_err"].detach().float().sum().item()
        utt = out["utterance_err"].detach().float()
        n_rows = utt.numel()
        logging_output = {
            "loss": loss.detach().float().item(),
            "frame_loss": frame_sum,
            "utterance_loss": utt.sum().item(),
            # the weighted utterance contribution, in the units of loss (loss = frame_loss + utterance_term)
            "utterance_term": loss.detach().float().item() - frame_sum,
            "pos_share": _as_float(out.get("pos_share", 0.0)),
            "student_spread": _as_float(out.get("student_spread", 0.0)),
            "cls_spread": _as_float(out.get("cls_spread", 0.0)),
            "ntokens": int(sample_size),
            "nsentences": int(sample["id"].numel()),
            "nrows": n_rows,
            "sample_size": int(sample_size),
            "nbatches": 1,
            "target_var": _as_float(out.get("target_var", 0.0)),
            "pred_var": _as_float(out.get("pred_var", 0.0)),
            "masked_pct": _as_float(out.get("masked_pct", 0.0)),
            "ema_decay": float(core.ema_decay_at(getattr(core, "num_updates", 0) + 1)),
            "skipped": int(sample.get("skipped", 0)),
        }
        interval = int(getattr(getattr(self.task, "cfg", None), "diagnostics_interval_updates", 0) or 0)
        if (model.training and torch.is_grad_enabled() and interval > 0 and core.num_updates % interval == 0
                and not self.gradient_norms_failed):
            try:
                self.last_gradient_norms = self.gradient_norms(core, out, weight, reduction)
            except RuntimeError as exc:  # a diagnostic must never stop a run (e.g. an exotic wrapper)
                self.gradient_norms_failed = True
                logger.warning("gradient-share diagnostic disabled: %s", exc)
        if model.training and self.last_gradient_norms:
            # the latest measurement is repeated until the next one, so no log line shows a gap
            logging_output.update(self.last_gradient_norms, ngrad=1)
        return loss, sample_size, logging_output

    @staticmethod
    def gradient_norms(core: torch.nn.Module, out: Dict[str, Any], weight: float, reduction: str) -> Dict[str, float]:
        """Norm of the gradient each weighted loss term sends to the student encoder (this rank's batch).

        Two extra backward passes through the retained graph; ``torch.autograd.grad`` returns the
        gradients without touching ``.grad``, so training is unchanged.
        """
        params = [p for p in core.encoder.parameters() if p.requires_grad]
        frame_term = out["frame_err"].float().mean()
        utt = out["utterance_err"].float()
        utt_term = weight * (utt.sum() if reduction == "release" else utt.mean())

        def norm(term: torch.Tensor) -> float:
            if not term.requires_grad:
                return 0.0
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            return float(torch.sqrt(sum(g.float().pow(2).sum() for g in grads if g is not None)).item())

        return {"grad_frame": norm(frame_term), "grad_utterance": norm(utt_term)}

    @staticmethod
    def reduce_metrics(logging_outputs: List[Dict[str, Any]]) -> None:
        def total(key: str) -> float:
            return float(sum(log.get(key, 0) for log in logging_outputs))

        sample_size = total("sample_size")
        nrows = total("nrows")
        nbatches = total("nbatches")
        if sample_size > 0:
            metrics.log_scalar("loss", total("loss") / sample_size, sample_size, round=4)
            metrics.log_scalar("frame_loss", total("frame_loss") / sample_size, sample_size, round=4)
        if nrows > 0:
            metrics.log_scalar("utterance_loss", total("utterance_loss") / nrows, nrows, round=4)
        if sample_size > 0:
            metrics.log_scalar("utterance_term", total("utterance_term") / sample_size, sample_size, round=4)
        if nbatches > 0:
            for key in ("target_var", "pred_var", "masked_pct", "pos_share", "student_spread", "cls_spread"):
                metrics.log_scalar(key, total(key) / nbatches, nbatches, round=4)
            metrics.log_scalar("ema_decay", total("ema_decay") / nbatches, nbatches, round=6)
        ngrad = total("ngrad")
        if ngrad > 0:
            g_frame, g_utt = total("grad_frame") / ngrad, total("grad_utterance") / ngrad
            metrics.log_scalar("grad_frame", g_frame, ngrad, round=4)
            metrics.log_scalar("grad_utterance", g_utt, ngrad, round=4)
            if g_frame + g_utt > 0:
                metrics.log_scalar("grad_utt_share", g_utt / (g_frame + g_utt), ngrad, round=4)
        skipped = total("skipped")
        if skipped:
            metrics.log_scalar_sum("skipped_files", skipped, round=0)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        # every entry above is a sum (divided in reduce_metrics); needed for CPU distributed training
        return True


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The core model inside fairseq's distributed wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _as_float(x: Any) -> float:
    """A plain Python float: numpy or tensor scalars in logs break weights_only checkpoint loading."""
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().item())
    value = float(x)
    return 0.0 if math.isnan(value) else value
