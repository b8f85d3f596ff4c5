"""fairseq tasks: ``eat_pretraining`` (unlabelled audio) and ``eat_classification`` (labelled audio).

A task maps its config onto the datasets (:mod:`.datasets`), runs the EMA step after each optimizer step
and the online probe (pre-training), keeps the label map and the validation predictions
(classification). Validation metrics of classification: ``accuracy`` is summable and exact in any
setting. ``mAP`` and ``auc`` need every prediction, so :meth:`EATClassificationTask.valid_step` stores
the scores (keyed by clip id) and a derived metric computes them when the aggregated row count equals
the number of stored clips, i.e. at the end of a validation pass (fairseq also evaluates derived
metrics after each batch; those partial calls return NaN instead of paying for a full computation).
In a distributed run fairseq shards the validation batches over the ranks and the predictions are
all-gathered every validation step, so all ranks hold the full set and compute the same metrics. When
the batches do not divide evenly, a rank runs a dummy (padding) batch: fairseq zeroes its summed
logging outputs (so ``n_eval`` counts each clip once), and since the dummy is the subset's own first
batch (``Trainer.get_valid_iterator`` resets it), its gathered predictions repeat real clips with the
same scores and collapse onto their ids. Only rank 0 writes the per-class AP file.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from fairseq import metrics
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.distributed import utils as distributed_utils
from fairseq.logging import meters
from fairseq.models import BaseFairseqModel
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, InterpolationResolutionError

from eat_fairseq.checkpoints.convert import load_ours
from eat_fairseq.data.augment import AugmentConfig
from eat_fairseq.data.features import FeatureConfig
from eat_fairseq.data.identity import manifest_identity
from eat_fairseq.data.labels import LabelError, LabelSet, read_label_descriptors, read_split_labels
from eat_fairseq.data.sampling import WeightedEpochSampler, balanced_weights, read_weights
from eat_fairseq.evaluation.metrics import evaluate_predictions, write_per_class_ap
from eat_fairseq.evaluation.probe import POOLINGS, OnlineProbe, ProbeDataError
from eat_fairseq.model.masking import MaskSpec

from .checkpoint_io import DATA_STATE_KEY
from .checkpoint_io import install as install_checkpoint_io
from .cpu_guard import adapt_to_cpu
from .datasets import EATAudioDataset, EATLabelledDataset, is_placeholder
from .setup_checks import check_data_folder, check_known_keys
from .models import ARCH_FIELDS, cfg_get, unwrap_model

logger = logging.getLogger(__name__)

_FEATURES = FeatureConfig()  # the one source of the feature defaults below
_AUG = AugmentConfig()  # and of the augmentation switches


NUM_THREADS_HELP = (
    "torch CPU threads of the training process; 0 = torch's default ($OMP_NUM_THREADS, else one per core). "
    "On a machine shared with other jobs, 1 is often many times faster for small models"
)


def check_lr_schedule(task_cfg: Any) -> None:
    """Stop at start-up, with the reason, on settings that would crash fairseq later.

    fairseq's cosine scheduler (without ``lr_period_updates``; ``eat_cosine`` runs one per layer-decay
    group) divides by ``max_update - warmup_updates``, so ``max_update == warmup_updates`` ran the whole warm-up and then died with a
    ZeroDivisionError at its last update. The schedule's length is ``lr_scheduler.max_update`` (fairseq
    fills it from ``optimization.max_update``; ``++lr_scheduler.max_update=N`` with a smaller
    ``optimization.max_update`` runs the first updates of a longer schedule exactly). The full config
    is reached through the task node's root (fairseq passes ``cfg.task`` of the composed config); a
    detached task config is not checked.
    """
    if not OmegaConf.is_config(task_cfg):
        return
    root = task_cfg._get_root()
    sched, optim = root.get("lr_scheduler"), root.get("optimization")
    if not OmegaConf.is_config(sched) or not OmegaConf.is_config(optim) or sched.get("_name") not in ("cosine", "eat_cosine"):
        return
    if (sched.get("lr_period_updates") or -1) > 0:
        return
    section = "lr_scheduler" if sched.get("max_update") is not None else "optimization"  # the schedule's length
    name = f"{section}.max_update"
    max_update = int(root[section].get("max_update") or 0)
    warmup = int(sched.get("warmup_updates") or 0)
    if max_update > 0 and max_update == warmup:
        raise ValueError(
            f"{name} ({max_update}) equals lr_scheduler.warmup_updates ({warmup}): fairseq's "
            "cosine schedule would divide by zero at the last update. Use fewer warm-up updates (the recipes "
            f"use about 10%, e.g. lr_scheduler.warmup_updates={max(1, max_update // 10)}) or more updates."
        )


def prepare_run(task_cfg: Any, from_checkpoint: bool) -> None:
    """Start-of-training settings shared by the eat_* tasks: keys nothing reads (a ``+`` typo), the
    schedule check and ``num_threads``.

    Skipped when a task is rebuilt from a checkpoint (evaluation, loading), which must not fail on, or
    change the process because of, how that checkpoint was trained.
    """
    if from_checkpoint:
        return
    check_known_keys(task_cfg)
    install_checkpoint_io()
    check_lr_schedule(task_cfg)
    adapt_to_cpu(task_cfg)
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

    def train_data_identity(self) -> Optional[Dict[str, Any]]:
        """The identity of the training manifest (:mod:`eat_fairseq.data.identity`), computed once.
        Every checkpoint carries it, so that a resume can tell that the data changed."""
        if not hasattr(self, "_train_identity"):
            try:
                manifest = os.path.join(str(self.cfg.data), f"{self.cfg.train_subset}.tsv")
            except Exception:  # a bare task config (no dataset section to interpolate train_subset from)
                manifest = None
            self._train_identity = manifest_identity(manifest) if manifest else None
        return self._train_identity

    def state_dict(self) -> Dict[str, Any]:
        state = dict(super().state_dict())
        identity = self.train_data_identity()
        if identity is not None:
            state[DATA_STATE_KEY] = identity
        return state

    @property
    def source_dictionary(self) -> None:
        return None

    @property
    def target_dictionary(self) -> None:
        return None

    def max_positions(self) -> Optional[int]:
        return None


def _cause(exc: BaseException) -> str:
    """``Type: message`` on one line, for a warning that must not take a screen."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _global_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _training_device(task_cfg: Any) -> torch.device:
    """The device fairseq's trainer will put the model on: CUDA unless ``common.cpu`` (or none)."""
    cpu = False
    if OmegaConf.is_config(task_cfg):
        common = task_cfg._get_root().get("common")
        cpu = bool(OmegaConf.is_config(common) and common.get("cpu"))
    if torch.cuda.is_available() and not cpu:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class EATPretrainingTaskConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "folder with {split}.tsv manifests"})
    sample_rate: int = field(default=_FEATURES.sample_rate, metadata={"help": "audio is resampled to this rate"})
    target_length: int = field(
        default=_FEATURES.target_length, metadata={"help": "fbank frames per clip after zero-padding at the end or cropping"}
    )
    norm_mean: float = field(default=_FEATURES.norm_mean, metadata={"help": "fbank mean for (x - mean) / (2 std)"})
    norm_std: float = field(default=_FEATURES.norm_std, metadata={"help": "fbank std for (x - mean) / (2 std)"})
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
                  "online frozen-feature probe of the student and teacher, checked in full at start-up; "
                  "None disables it"},
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
        default=500,
        metadata={"help": "use at most this many evenly spaced clips of each probe split, which bounds the "
                  "probe's time and memory (0: all clips, however many)"},
    )
    probe_logmel_baseline: bool = field(
        default=True,
        metadata={"help": "also log the log-mel baseline on the same clips and folds (probe_logmel_*; computed "
                  "once, at the first probe), the line the student's curve has to cross"},
    )
    probe_timeout_minutes: float = field(
        default=60.0,
        metadata={"help": "with several processes, how long the other ranks wait at a barrier for rank 0's "
                  "probe (and its start-up check) before the run fails; keep it above the time estimate "
                  "logged at start-up"},
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
    mask_type: str = II("model.mask_type")
    patch_size: int = II("model.patch_size")
    seed: int = II("common.seed")


@register_task("eat_pretraining", dataclass=EATPretrainingTaskConfig)
class EATPretrainingTask(EATAudioTask):
    """Self-supervised EAT pre-training on unlabelled audio from TSV manifests."""

    cfg: EATPretrainingTaskConfig

    def __init__(self, cfg: EATPretrainingTaskConfig) -> None:
        super().__init__(cfg)
        self.probe_on = False  # every rank: whether probes are due (and so the barriers after them)
        self.probe: Optional[OnlineProbe] = None  # rank 0 only: the data and the classifiers
        self.probe_group: Optional[Any] = None  # the gloo group the other ranks wait in while rank 0 probes
        self.last_probe: Dict[str, float] = {}

    @classmethod
    def setup_task(cls, cfg: EATPretrainingTaskConfig, **kwargs: Any) -> "EATPretrainingTask":
        from_checkpoint = bool(kwargs.get("from_checkpoint", False))
        prepare_run(cfg, from_checkpoint)
        task = cls(cfg)
        if cfg.probe_data and not from_checkpoint:
            # only for training: a checkpoint loaded elsewhere must not need the probe's data folder
            task.setup_probe()
        return task

    def setup_probe(self) -> None:
        """Check the probe set in full before the first update, on rank 0, and stop every rank together
        if it is unusable.

        Rank 0 reads all of it (:meth:`OnlineProbe.prepare`: splits, every label line, every clip, the
        classes of each fold) and raises a one-line :class:`ProbeDataError`; the other ranks receive the
        outcome through the probe's own gloo group and raise the same message, so no rank is left
        waiting in a collective for one that died. That group (created here, by every rank, with a
        timeout of ``probe_timeout_minutes``) is also where the other ranks wait while rank 0 checks
        and later probes: waiting in the default group instead would hit its timeout (NCCL's watchdog:
        10 minutes) and kill the job while rank 0 is merely busy.
        """
        self.probe_on = True
        if not float(self.cfg.probe_timeout_minutes) > 0:
            raise ValueError(f"task.probe_timeout_minutes must be positive, got {self.cfg.probe_timeout_minutes}")
        timeout = timedelta(minutes=float(self.cfg.probe_timeout_minutes))
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.probe_group = dist.new_group(backend="gloo", timeout=timeout)
        error: Optional[ProbeDataError] = None
        if _global_rank() == 0:
            start = time.perf_counter()
            folder = os.path.abspath(str(self.cfg.probe_data))
            try:
                probe = OnlineProbe(
                    folder,
                    self.feature_config(),
                    splits=str(self.cfg.probe_splits),
                    layer=int(self.cfg.probe_layer),
                    pooling=str(self.cfg.probe_pooling),
                    max_per_split=int(self.cfg.probe_max_per_split) or None,
                    logmel_baseline=bool(self.cfg.probe_logmel_baseline),
                )
                probe.prepare()
                self.probe = probe
                logger.info("probe set %s checked and loaded in %.1f s: %s", folder, time.perf_counter() - start,
                            probe.describe())
            except ProbeDataError as exc:
                error = exc
            except Exception as exc:  # the constructor's checks: folder, split spec, pooling
                error = ProbeDataError.wrap(folder, exc)
        if self.probe_group is not None:
            outcome = [None if error is None else str(error)]
            dist.broadcast_object_list(outcome, src=0, group=self.probe_group)
            if error is None and outcome[0] is not None:
                error = ProbeDataError(f"{outcome[0]} (checked on rank 0)")
            if error is not None:  # no barrier will follow: let the group's threads end before the process
                dist.destroy_process_group(self.probe_group)
                self.probe_group = None
        if error is not None:
            raise error

    def build_model(self, cfg: Any, from_checkpoint: bool = False) -> BaseFairseqModel:
        """Build the model, then (training with a probe) log how long one probe will take.

        Rank 0 times the student's forward on a few probe clips, on the device training will use, and
        the classifiers on one fold, and warns when the estimate exceeds ``probe_timeout_minutes``:
        with several processes the others would then give up waiting at the probe's barrier.
        """
        model = super().build_model(cfg, from_checkpoint)
        if self.probe_on and not from_checkpoint:
            depth = len(unwrap_model(model).encoder.blocks)
            if not -depth <= int(self.cfg.probe_layer) < depth:  # every rank knows: they stop together
                raise ValueError(f"task.probe_layer={self.cfg.probe_layer} is not a block of the {depth}-block "
                                 f"encoder (0..{depth - 1}, or -{depth}..-1 from the end)")
            if self.probe is not None:
                self._log_probe_estimate(model)
            self._probe_barrier("the probe's time estimate")
        return model

    def _log_probe_estimate(self, model: torch.nn.Module) -> None:
        assert self.probe is not None
        device = _training_device(self.cfg)
        try:
            est = self.probe.estimate_seconds(unwrap_model(model).encoder, num_encoders=2, device=device)
        except Exception as exc:  # an estimate must never stop a run
            logger.warning("probe: no time estimate (%s)", _cause(exc))
            logger.debug("probe estimate failure", exc_info=True)
            return
        logger.info("probe: about %.1f s per probe (student + teacher: %.1f s features on %s, %.1f s classifiers; "
                    "measured at start-up in fp32)", est["total"], est["features"], device, est["classifiers"])
        minutes = float(self.cfg.probe_timeout_minutes)
        if est["total"] > 60 * minutes:
            logger.warning(
                "probe: the estimated %.0f s per probe exceed task.probe_timeout_minutes=%g: with several processes "
                "the other ranks stop waiting for rank 0 and the run fails. Lower task.probe_max_per_split or raise "
                "task.probe_timeout_minutes", est["total"], minutes)

    def _probe_barrier(self, what: str) -> None:
        """Every rank waits here (in the probe's gloo group, not the default group) until rank 0 is done."""
        if self.probe_group is None:
            return
        minutes = float(self.cfg.probe_timeout_minutes)
        try:
            torch.distributed.monitored_barrier(group=self.probe_group, timeout=timedelta(minutes=minutes))
        except RuntimeError as exc:
            raise RuntimeError(
                f"rank {_global_rank()} waited more than task.probe_timeout_minutes={minutes:g} for {what} on rank 0 "
                f"(or rank 0 died): {' '.join(str(exc).split())}"
            ) from exc

    def run_probe(self, model: torch.nn.Module, num_updates: int) -> Dict[str, float]:
        """Probe the student and the teacher now; log ``probe_*`` and return them (rank 0; ``{}`` elsewhere).

        A probe that fails is logged (one line; the traceback at debug level) and skipped: a diagnostic
        must never stop training. Every rank then meets at the probe's barrier, so the others do not
        wait for rank 0 inside the next step's collectives.
        """
        if not self.probe_on:
            return {}
        res: Dict[str, float] = {}
        try:
            if self.probe is not None:
                core = unwrap_model(model)
                start = time.perf_counter()
                try:
                    with torch.no_grad():
                        res = self.probe.run({"student": core.encoder, "teacher": core.teacher})
                except Exception as exc:
                    logger.warning("probe at update %d failed and was skipped, training goes on: %s",
                                   num_updates, _cause(exc))
                    logger.debug("probe failure at update %d", num_updates, exc_info=True)
                    return {}
                self.last_probe = res
                logger.info(
                    "probe at update %d (%.1f s, %s pooling, layer %d): %s",
                    num_updates, time.perf_counter() - start, self.probe.pooling, self.probe.layer,
                    ", ".join(f"{k[len('probe_'):]} {v:.4f}" for k, v in res.items()),
                )
        finally:
            self._probe_barrier(f"the probe at update {num_updates}")
        return res

    def _mask_type(self) -> str:
        """The model's ``mask_type`` (an interpolation of ``model.mask_type``), so that the data loader's
        masks follow the model; a task config rebuilt from a checkpoint of an earlier version has no
        ``model`` section to resolve it from, and those runs all used the release's inverse block masks."""
        try:
            return str(self.cfg.mask_type)
        except (InterpolationResolutionError, ConfigAttributeError, ConfigKeyError):
            return "inverse_block"

    def load_dataset(self, split: str, combine: bool = False, epoch: int = 1, **kwargs: Any) -> None:
        check_data_folder(self.cfg.data)
        manifest = os.path.join(self.cfg.data, f"{split}.tsv")
        if not os.path.exists(manifest):
            raise FileNotFoundError(f"no manifest for split {split!r}: {manifest} does not exist")
        spec = MaskSpec(
            clone_batch=self.cfg.clone_batch,
            mask_prob=self.cfg.mask_prob,
            mask_length=self.cfg.mask_length,
            mask_prob_adjust=self.cfg.mask_prob_adjust,
            patch_size=self.cfg.patch_size,
            mask_type=self._mask_type(),
        )
        features = self.feature_config()
        if spec.mask_type == "inverse_block" and features.target_length:
            grid = spec.grid(features.target_length, features.num_mel_bins)
            if grid[0] > 0 and spec.blocks_per_row(grid) == 0:
                logger.warning(
                    "inverse block masking places no blocks on a %d x %d patch grid (mask_prob=%s, mask_length=%d): "
                    "the masks are uniformly random, as with model.mask_type=random. A smaller model.mask_length "
                    "or a longer task.target_length gives blocks (docs/differences.md)",
                    grid[0], grid[1], spec.mask_prob, spec.mask_length)
        mask = spec if self.cfg.precompute_mask else None
        self.datasets[split] = EATAudioDataset(
            manifest,
            features=features,
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
        core = unwrap_model(model)
        if hasattr(core, "ema_step"):
            core.ema_step(update_num + 1)
        done = update_num + 1
        interval = self.cfg.probe_interval_updates
        if self.probe_on and ((interval > 0 and done % interval == 0) or done == self.cfg.max_update):
            self.run_probe(model, done)


@dataclass
class EATClassificationConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "folder with {split}.tsv, {split}.lbl, label_descriptors.csv"})
    labels: str = field(
        default="label_descriptors.csv", metadata={"help": "label descriptor file (relative to data, or absolute)"}
    )
    multi_label: bool = field(default=True, metadata={"help": "multi-hot targets (AudioSet) or one class per clip"})
    check_clip_ids: bool = field(default=True, metadata={"help": "check that .lbl clip ids name their .tsv rows"})
    sample_rate: int = field(default=_FEATURES.sample_rate, metadata={"help": "audio is resampled to this rate"})
    target_length: int = field(default=_FEATURES.target_length, metadata={"help": "fbank frames after end padding / cropping"})
    norm_mean: float = field(default=_FEATURES.norm_mean, metadata={"help": "fbank mean for (x - mean) / (2 std)"})
    norm_std: float = field(default=_FEATURES.norm_std, metadata={"help": "fbank std for (x - mean) / (2 std)"})
    min_sample_size: int = field(default=0, metadata={"help": "drop clips shorter than this (samples, native rate)"})
    on_bad_file: ChoiceEnum(["raise", "skip"]) = field(  # type: ignore[valid-type]
        default="raise", metadata={"help": "raise on a missing/unreadable file, or skip it"}
    )
    crop: ChoiceEnum(["start", "random"]) = field(default="start", metadata={"help": CROP_HELP})  # type: ignore[valid-type]
    read_whole_file: bool = field(default=False, metadata={"help": WHOLE_FILE_HELP})
    balanced_sampling: bool = field(default=False, metadata={"help": "weighted draws without replacement (AS-2M)"})
    weights_file: Optional[str] = field(
        default=None,
        metadata={"help": "per-row weights (default {data}/{train_subset}.weights; computed from labels if absent)"},
    )
    samples_per_epoch: int = field(default=200000, metadata={"help": "clips drawn per epoch with balanced sampling"})
    roll_and_gain: bool = field(default=_AUG.roll_and_gain, metadata={"help": "training: waveform roll + gain x (Beta(10,10)+0.5)"})
    noise_and_roll: bool = field(default=_AUG.noise_and_roll, metadata={"help": "training: fbank noise U*U/10 + time roll +-10"})
    per_class_ap_dir: Optional[str] = field(
        default=None, metadata={"help": "write per_class_ap_{subset}.tsv here after each validation"}
    )
    num_threads: int = field(default=0, metadata={"help": NUM_THREADS_HELP})
    train_subset: str = II("dataset.train_subset")
    seed: int = II("common.seed")


class _PredictionStore:
    """Validation predictions keyed by clip id (duplicates from padding batches overwrite)."""

    def __init__(self) -> None:
        self.subset: Optional[str] = None
        self.reset()

    def reset(self) -> None:
        self.scores: Dict[int, np.ndarray] = {}
        self.targets: Dict[int, np.ndarray] = {}
        self._cache: Optional[tuple[int, Any]] = None

    def add(self, ids: np.ndarray, scores: np.ndarray, targets: np.ndarray) -> None:
        for i, s, t in zip(ids.tolist(), scores, targets):
            self.scores[i] = s
            self.targets[i] = t
        self._cache = None

    def __len__(self) -> int:
        return len(self.scores)

    def report(self, num_classes: int):
        """Metrics over the stored clips (cached until the next ``add``)."""
        if self._cache is None or self._cache[0] != len(self):
            ids = sorted(self.scores)
            scores = np.stack([self.scores[i] for i in ids])
            targets = np.stack([self.targets[i] for i in ids])
            self._cache = (len(self), evaluate_predictions(targets, scores, num_classes))
        return self._cache[1]


@register_task("eat_classification", dataclass=EATClassificationConfig)
class EATClassificationTask(EATAudioTask):
    """Audio classification from TSV manifests + ``.lbl`` labels (AudioSet, ESC-50, SPC-2, custom)."""

    cfg: EATClassificationConfig

    def __init__(self, cfg: EATClassificationConfig, label_set: Optional[LabelSet]) -> None:
        super().__init__(cfg)
        self.label_set = label_set
        self.predictions = _PredictionStore()
        self._building_from_checkpoint = False

    @classmethod
    def setup_task(cls, cfg: EATClassificationConfig, from_checkpoint: bool = False, **kwargs: Any):
        prepare_run(cfg, from_checkpoint)
        if not from_checkpoint:
            check_data_folder(cfg.data)  # before the label file inside it: a typo names the folder
        path = cfg.labels if os.path.isabs(cfg.labels) else os.path.join(str(cfg.data), cfg.labels)
        if os.path.isfile(path):
            label_set: Optional[LabelSet] = read_label_descriptors(path)
        elif from_checkpoint:
            label_set = None  # restored from task_state by load_state_dict
        else:
            raise LabelError(f"{path}: label descriptor file not found (task.labels / task.data)")
        if label_set is not None:
            logger.info("%d classes from %s", len(label_set), path)
        return cls(cfg, label_set)

    @property
    def num_classes(self) -> int:
        if self.label_set is None:
            raise LabelError("no label map: neither label_descriptors.csv nor a checkpoint task_state")
        return len(self.label_set)

    # task_state keeps the label map, so a checkpoint evaluates without the descriptor file
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        if self.label_set is not None:
            state["labels"] = {label: int(i) for label, i in self.label_set.index.items()}
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict and "labels" in state_dict:
            restored = LabelSet.from_index(dict(state_dict["labels"]))
            if self.label_set is not None and self.label_set.labels != restored.labels:
                logger.warning("label map of the checkpoint differs from %s; using the checkpoint's", self.cfg.labels)
            if self.label_set is not None and self.label_set.labels == restored.labels:
                restored.display_names = self.label_set.display_names
            self.label_set = restored

    def load_dataset(self, split: str, combine: bool = False, epoch: int = 1, **kwargs: Any) -> None:
        check_data_folder(self.cfg.data)
        data = str(self.cfg.data)
        manifest = os.path.join(data, f"{split}.tsv")
        if not os.path.exists(manifest):
            raise FileNotFoundError(f"no manifest for split {split!r}: {manifest} does not exist")
        labels = read_split_labels(
            os.path.join(data, f"{split}.lbl"),
            self.label_set if self.label_set is not None else LabelSet([], []),
            tsv_path=manifest,
            multi_label=self.cfg.multi_label,
            check_ids=self.cfg.check_clip_ids,
        )
        is_train = split == str(self.cfg.train_subset)
        weights = None
        if is_train and self.cfg.balanced_sampling:
            weights_path = self.cfg.weights_file or os.path.join(data, f"{split}.weights")
            if os.path.isfile(weights_path):
                weights = read_weights(weights_path, expected_rows=len(labels))
            else:
                logger.info("%s not found: computing balanced weights from the labels", weights_path)
                weights = balanced_weights(labels, self.num_classes)
        dataset = EATLabelledDataset(
            manifest,
            labels=labels,
            num_classes=self.num_classes,
            multi_label=self.cfg.multi_label,
            augment_clips=is_train,
            roll_and_gain=self.cfg.roll_and_gain,
            noise_and_roll=self.cfg.noise_and_roll,
            features=self.feature_config(),
            min_samples=self.cfg.min_sample_size,
            on_error=str(self.cfg.on_bad_file),
            shuffle=is_train,
            seed=int(self.cfg.seed),
            **self.clip_options(split),
        )
        if weights is not None:
            # one weight per manifest row: keep those of the clips the dataset kept (min_sample_size)
            if dataset.kept_ordinals is not None:
                weights = weights[dataset.kept_ordinals]
            num = min(int(self.cfg.samples_per_epoch), int((weights > 0).sum()))
            dataset.sampler = WeightedEpochSampler(weights, num, seed=int(self.cfg.seed))
        self.datasets[split] = dataset

    def build_model(self, cfg: Any, from_checkpoint: bool = False) -> BaseFairseqModel:
        """Complete the model config before building: classes from the labels and, when starting
        from a pre-training checkpoint, its encoder shape. Written into ``cfg`` itself so the saved
        fine-tuned checkpoint rebuilds the same model without the pre-training file."""
        with open_dict(cfg):
            if int(cfg_get(cfg, "num_classes", 0) or 0) <= 0:
                cfg.num_classes = self.num_classes
            if not from_checkpoint and cfg_get(cfg, "model_path", None):
                pre_cfg = cfg_get(load_ours(str(cfg.model_path), keep=True).get("cfg") or {}, "model", {}) or {}
                for key in ARCH_FIELDS:
                    value = cfg_get(pre_cfg, key, None)
                    if value is not None and value != cfg_get(cfg, key, None):
                        logger.info("encoder %s = %s (from %s)", key, value, cfg.model_path)
                        cfg[key] = value
        self._building_from_checkpoint = from_checkpoint
        try:
            return super().build_model(cfg, from_checkpoint)
        finally:
            self._building_from_checkpoint = False

    def get_batch_iterator(self, dataset: Any, *args: Any, **kwargs: Any):
        if dataset is not self.datasets.get(str(self.cfg.train_subset)):
            self.predictions.reset()  # a new validation pass over this dataset begins
            self.predictions.subset = next((k for k, v in self.datasets.items() if v is dataset), None)
        return super().get_batch_iterator(dataset, *args, **kwargs)

    def valid_step(self, sample: Dict[str, Any], model: Any, criterion: Any):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        scores = logging_output.pop("_scores", None)
        targets = logging_output.pop("_targets", None)
        if is_placeholder(sample):  # no clips, but every rank must still join the gather below
            scores = np.zeros((0, self.num_classes), dtype=np.float32)
            targets = sample["target"].cpu().numpy()
        if scores is not None:
            ids = sample["id"].cpu().numpy()
            if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                gathered: List[Any] = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, (ids, scores, targets))
                for g_ids, g_scores, g_targets in gathered:
                    self.predictions.add(g_ids, g_scores, g_targets)
            else:
                self.predictions.add(ids, scores, targets)
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs: List[Dict[str, Any]], criterion: Any) -> None:
        super().reduce_metrics(logging_outputs, criterion)
        if sum(log.get("n_eval", 0) for log in logging_outputs) <= 0 or self.label_set is None:
            return
        store, num_classes = self.predictions, self.num_classes

        def derived(key: str):
            def fn(meters: Any) -> float:
                if "n_eval" not in meters or len(store) == 0 or int(meters["n_eval"].sum) != len(store):
                    return float("nan")  # mid-validation (per-batch aggregate): not all predictions yet
                return float(getattr(store.report(num_classes), key))

            return fn

        metrics.log_derived("mAP", derived("mAP"), priority=3)
        metrics.log_derived("auc", derived("auc"), priority=4)

    def post_validate(self, model: Any, stats: Dict[str, Any], agg: Any) -> None:
        """Write the per-class AP file of the pass that just finished (fairseq-hydra-train hook)."""
        if distributed_utils.get_global_rank() != 0:
            return  # every rank holds the same gathered predictions; one writer is enough
        if self.cfg.per_class_ap_dir and len(self.predictions) and self.label_set is not None:
            path = os.path.join(str(self.cfg.per_class_ap_dir), f"per_class_ap_{self.predictions.subset or 'valid'}.tsv")
            report = self.predictions.report(self.num_classes)
            write_per_class_ap(path, report, self.label_set.labels, self.label_set.display_names)
            logger.info("per-class AP written to %s", path)


def classification_report_for(task: EATClassificationTask) -> Any:
    """Metrics of the last validation pass (for scripts driving fairseq directly)."""
    return task.predictions.report(task.num_classes) if len(task.predictions) else None
