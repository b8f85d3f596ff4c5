"""fairseq shells for EAT fine-tuning: task/criterion ``eat_classification``, model ``eat_classifier``,
optimizer ``eat_adam`` (Adam with one parameter group per layer-decay scale) and lr scheduler
``eat_cosine`` (fairseq's cosine schedule run once per layer-decay group, as the release does).

The computation lives in the core (:mod:`eat_fairseq.core.classifier`, ``augment``,
``finetune_losses``, ``metrics``, ``labels``, ``sampling``); this module maps configs onto it.

Validation metrics: ``accuracy`` is summable and exact in any setting. ``mAP`` and ``auc`` need every
prediction, so :meth:`EATClassificationTask.valid_step` stores the scores (keyed by clip id) and a
derived metric computes them when the aggregated row count equals the number of stored clips, i.e.
at the end of a validation pass (fairseq also evaluates derived metrics after each batch; those
partial calls return NaN instead of paying for a full computation). In a distributed run fairseq
shards the validation batches over the ranks and the predictions are all-gathered every validation
step, so all ranks hold the full set and compute the same metrics. When the batches do not divide
evenly, a rank runs a dummy (padding) batch: fairseq zeroes its summed logging outputs (so ``n_eval``
counts each clip once), and since the dummy is the subset's own first batch
(``Trainer.get_valid_iterator`` resets it), its gathered predictions repeat real clips with the same
scores and collapse onto their ids. Only rank 0 writes the per-class AP file. Tested single-process
and with 2 gloo processes on CPU (odd clip count, against ``eat-evaluate``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from fairseq import metrics
from fairseq.distributed import utils as distributed_utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from fairseq.optim import FairseqOptimizer, register_optimizer
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig
from fairseq.optim.lr_scheduler import FairseqLRScheduler, register_lr_scheduler
from fairseq.optim.lr_scheduler.cosine_lr_scheduler import CosineLRSchedule, CosineLRScheduleConfig
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING, DictConfig, open_dict

from eat_fairseq.core import augment
from eat_fairseq.core.audio import to_mono_16k
from eat_fairseq.core.classifier import EATClassifier, parameter_lr_scale
from eat_fairseq.core.encoder import EncoderConfig
from eat_fairseq.core.features import AUDIOSET_MEAN, AUDIOSET_STD, waveform_to_features
from eat_fairseq.core.finetune_losses import finetune_loss
from eat_fairseq.core.labels import LabelError, LabelSet, read_label_descriptors, read_split_labels
from eat_fairseq.core.metrics import evaluate_predictions, write_per_class_ap
from eat_fairseq.core.sampling import WeightedEpochSampler, balanced_weights, read_weights

from .data import EATAudioDataset, is_placeholder
from .pretraining import CROP_HELP, NUM_THREADS_HELP, WHOLE_FILE_HELP, EATAudioTask, EATEncoderFields, prepare_run

logger = logging.getLogger(__name__)

ENCODER_FIELDS = tuple(f.name for f in dataclasses.fields(EncoderConfig))
# fields that define the weights' shapes/meaning; regularisation (drop path, dropouts) stays per run
ARCH_FIELDS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "in_chans", "num_mel_bins",
               "max_length", "norm_eps")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, (dict, DictConfig)):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


_STATE_CACHE: Dict[tuple, Dict[str, Any]] = {}


def load_trusted_state(path: str) -> Dict[str, Any]:
    """Read a pre-training checkpoint without executing code, in our layout.

    Uses the project's restricted loader; a released EAT file (the authors' layout, numpy scalars and
    all) is converted in memory as ``eat-convert`` would, so ``model.model_path`` takes either. The
    last file read is cached: building the model reads it twice (config, then weights).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    key = (os.path.abspath(path), os.path.getmtime(path))
    if key not in _STATE_CACHE:
        from eat_fairseq.core.checkpoint import load_checkpoint
        from eat_fairseq.core.convert import convert_released, detect_source

        state = dict(load_checkpoint(path))
        if detect_source(state)[0] == "released":
            state, summary = convert_released(state)
            logger.info("%s is a released EAT checkpoint; converted in memory:\n%s", path, "\n".join(summary.lines()))
        _STATE_CACHE.clear()
        _STATE_CACHE[key] = state
    return _STATE_CACHE[key]


# --------------------------------------------------------------------------------------------------
# dataset


class EATLabelledDataset(EATAudioDataset):
    """:class:`EATAudioDataset` plus a ``target`` per clip and the clip-level training augmentations.

    ``target`` in a batch is a multi-hot float (B, C) (multi-label) or class indices (B,) (single
    label). With ``sampler`` set, each epoch is the sampler's weighted draw (balanced sampling).
    """

    def __init__(
        self,
        manifest: str,
        labels: List[List[int]],
        num_classes: int,
        multi_label: bool,
        augment_clips: bool = False,
        roll_and_gain: bool = False,
        noise_and_roll: bool = False,
        sampler: Optional[WeightedEpochSampler] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manifest, **kwargs)
        data_lines = _data_line_numbers(manifest)
        if len(data_lines) != len(labels):
            raise LabelError(f"{manifest}: {len(data_lines)} rows but {len(labels)} label lines")
        ordinal = {line: k for k, line in enumerate(data_lines)}
        # the base class may have dropped short clips: keep the labels of the surviving rows
        self.labels = [labels[ordinal[row.line]] for row in self.rows]
        self.num_classes = num_classes
        self.multi_label = multi_label
        self.augment_clips = augment_clips
        self.use_roll_and_gain = roll_and_gain
        self.use_noise_and_roll = noise_and_roll
        self.sampler = sampler

    def _clip_generator(self, index: int) -> torch.Generator:
        """Per-clip, per-epoch seed: reproducible whatever the number of loader workers."""
        key = (int(self.seed) * 1_000_003 + int(self.epoch)) * 10_000_019 + int(index)
        return torch.Generator().manual_seed(key % (2**63))

    def load_features(self, index: int) -> torch.Tensor:
        if not (self.augment_clips and (self.use_roll_and_gain or self.use_noise_and_roll)):
            return super().load_features(index)
        wave, sr = self.load_wave(index)
        gen = self._clip_generator(index)
        mono = to_mono_16k(wave, sr, self.features.sample_rate)
        if self.use_roll_and_gain:
            mono = augment.roll_and_gain(mono, generator=gen)
        feats = waveform_to_features(mono, self.features.sample_rate, self.features)
        if self.use_noise_and_roll:
            feats = augment.noise_and_roll(feats, generator=gen)
        return feats

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = super().__getitem__(index)
        item["target"] = self.labels[item["id"]]  # the id of a replacement clip when one stood in
        return item

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = super().collater(samples)
        if not batch:
            return batch
        labels = [self.labels[i] for i in batch["id"].tolist()]
        if self.multi_label:
            target = torch.zeros(len(labels), self.num_classes)
            for row, classes in enumerate(labels):
                target[row, classes] = 1.0
        else:
            target = torch.tensor([classes[0] for classes in labels], dtype=torch.long)
        batch["target"] = target
        return batch

    def ordered_indices(self) -> np.ndarray:
        if self.sampler is not None:
            return self.sampler.indices(self.epoch)
        return super().ordered_indices()


def _data_line_numbers(manifest: str) -> List[int]:
    """1-based line numbers of the non-empty data rows (the base dataset identifies rows by line)."""
    with open(manifest, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    return [i for i, line in enumerate(lines[1:], start=2) if line.strip()]


# --------------------------------------------------------------------------------------------------
# task


@dataclass
class EATClassificationConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "folder with {split}.tsv, {split}.lbl, label_descriptors.csv"})
    labels: str = field(
        default="label_descriptors.csv", metadata={"help": "label descriptor file (relative to data, or absolute)"}
    )
    multi_label: bool = field(default=True, metadata={"help": "multi-hot targets (AudioSet) or one class per clip"})
    check_clip_ids: bool = field(default=True, metadata={"help": "check that .lbl clip ids name their .tsv rows"})
    sample_rate: int = field(default=16000, metadata={"help": "audio is resampled to this rate"})
    target_length: int = field(default=1024, metadata={"help": "fbank frames after end padding / cropping"})
    norm_mean: float = field(default=AUDIOSET_MEAN, metadata={"help": "fbank mean for (x - mean) / (2 std)"})
    norm_std: float = field(default=AUDIOSET_STD, metadata={"help": "fbank std for (x - mean) / (2 std)"})
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
    roll_and_gain: bool = field(default=True, metadata={"help": "training: waveform roll + gain x (Beta(10,10)+0.5)"})
    noise_and_roll: bool = field(default=True, metadata={"help": "training: fbank noise U*U/10 + time roll +-10"})
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
        if self.label_set is None:
            return {}
        return {"labels": {label: int(i) for label, i in self.label_set.index.items()}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict and "labels" in state_dict:
            restored = LabelSet.from_index(dict(state_dict["labels"]))
            if self.label_set is not None and self.label_set.labels != restored.labels:
                logger.warning("label map of the checkpoint differs from %s; using the checkpoint's", self.cfg.labels)
            if self.label_set is not None and self.label_set.labels == restored.labels:
                restored.display_names = self.label_set.display_names
            self.label_set = restored

    def load_dataset(self, split: str, combine: bool = False, epoch: int = 1, **kwargs: Any) -> None:
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
        sampler = None
        if is_train and self.cfg.balanced_sampling:
            weights_path = self.cfg.weights_file or os.path.join(data, f"{split}.weights")
            if os.path.isfile(weights_path):
                weights = read_weights(weights_path, expected_rows=len(labels))
            else:
                logger.info("%s not found: computing balanced weights from the labels", weights_path)
                weights = balanced_weights(labels, self.num_classes)
            dataset_rows = self._kept_rows(manifest)
            weights = weights[dataset_rows] if dataset_rows is not None else weights
            num = min(int(self.cfg.samples_per_epoch), int((weights > 0).sum()))
            sampler = WeightedEpochSampler(weights, num, seed=int(self.cfg.seed))
        self.datasets[split] = EATLabelledDataset(
            manifest,
            labels=labels,
            num_classes=self.num_classes,
            multi_label=self.cfg.multi_label,
            augment_clips=is_train,
            roll_and_gain=self.cfg.roll_and_gain,
            noise_and_roll=self.cfg.noise_and_roll,
            sampler=sampler,
            features=self.feature_config(),
            min_samples=self.cfg.min_sample_size,
            on_error=str(self.cfg.on_bad_file),
            shuffle=is_train,
            seed=int(self.cfg.seed),
            **self.clip_options(split),
        )

    def _kept_rows(self, manifest: str) -> Optional[np.ndarray]:
        """Row ordinals the base dataset keeps after ``min_sample_size`` (None = all)."""
        if self.cfg.min_sample_size <= 0:
            return None
        with open(manifest, encoding="utf-8") as handle:
            rows = [line for line in handle.read().splitlines()[1:] if line.strip()]
        keep = [k for k, row in enumerate(rows) if int(row.split("\t")[1]) >= max(self.cfg.min_sample_size, 1)]
        return np.array(keep, dtype=np.int64)

    def build_model(self, cfg: Any, from_checkpoint: bool = False) -> BaseFairseqModel:
        """Complete the model config before building: classes from the labels and, when starting
        from a pre-training checkpoint, its encoder shape. Written into ``cfg`` itself so the saved
        fine-tuned checkpoint rebuilds the same model without the pre-training file."""
        with open_dict(cfg):
            if int(_get(cfg, "num_classes", 0) or 0) <= 0:
                cfg.num_classes = self.num_classes
            if not from_checkpoint and _get(cfg, "model_path", None):
                pre_cfg = _get(load_trusted_state(str(cfg.model_path)).get("cfg") or {}, "model", {}) or {}
                for key in ARCH_FIELDS:
                    value = _get(pre_cfg, key, None)
                    if value is not None and value != _get(cfg, key, None):
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


# --------------------------------------------------------------------------------------------------
# model


@dataclass
class EATClassifierConfig(EATEncoderFields):
    """Classifier: the encoder fields (drop path 0.1 when fine-tuning, reference section 4) plus:"""

    drop_path_rate: float = field(default=0.1, metadata={"help": "stochastic depth, linear over blocks"})
    # head
    num_classes: int = field(default=0, metadata={"help": "logits; 0 = from the task's label descriptors"})
    pooling: ChoiceEnum(["cls", "mean"]) = field(default="cls", metadata={"help": "CLS output or mean of patches"})  # type: ignore[valid-type]
    freeze_encoder: bool = field(default=False, metadata={"help": "linear probing"})
    layer_decay: float = field(default=0.65, metadata={"help": "block j of N trains at lr * layer_decay**(N-j)"})
    no_weight_decay_1d: bool = field(
        default=False, metadata={"help": "exempt biases/norms/CLS from weight decay (reference: decay all)"}
    )
    # initialisation
    model_path: Optional[str] = field(default=None, metadata={"help": "pre-training checkpoint of ours (eat model)"})
    use_teacher_weights: bool = field(default=False, metadata={"help": "initialise from the EMA teacher"})


@register_model("eat_classifier", dataclass=EATClassifierConfig)
class EATClassifierModel(EATClassifier, BaseFairseqModel):
    """The core classifier as a fairseq model (same state-dict names as the core)."""

    def __init__(self, cfg: EATClassifierConfig) -> None:
        encoder_cfg = EncoderConfig(**{k: _get(cfg, k) for k in ENCODER_FIELDS})
        super().__init__(encoder_cfg, int(cfg.num_classes), str(cfg.pooling), bool(cfg.freeze_encoder))
        self.fairseq_cfg = cfg
        self.mark_layer_decay(float(cfg.layer_decay), bool(cfg.no_weight_decay_1d))

    @classmethod
    def build_model(cls, cfg: EATClassifierConfig, task: Optional[FairseqTask] = None) -> "EATClassifierModel":
        if int(cfg.num_classes) <= 0:
            if task is None:
                raise ValueError("model.num_classes is 0 and no task to take it from")
            cfg.num_classes = task.num_classes
        model = cls(cfg)
        from_checkpoint = bool(getattr(task, "_building_from_checkpoint", False))
        if cfg.model_path and not from_checkpoint:
            state = load_trusted_state(str(cfg.model_path))
            weights = state.get("model", state)
            prefix = "teacher." if cfg.use_teacher_weights else "encoder."
            model.load_encoder_from_pretraining(weights, prefix=prefix)
            logger.info("encoder initialised from %s (%s*)", cfg.model_path, prefix)
        return model

    def mark_layer_decay(self, layer_decay: float, no_weight_decay_1d: bool) -> None:
        """Attach fairseq ``optim_overrides`` (``lr_scale``, ``weight_decay_scale``) to each parameter.

        The ``eat_adam`` optimizer turns them into real parameter groups; fairseq's ``composite``
        optimizer with ``dynamic_groups`` reads the same attribute.
        """
        num_blocks = len(self.encoder.blocks)
        for name, param in self.named_parameters():
            overrides: Dict[str, float] = {"lr_scale": parameter_lr_scale(name, num_blocks, layer_decay)}
            if no_weight_decay_1d and (param.ndim <= 1 or name.endswith("cls_token")):
                overrides["weight_decay_scale"] = 0.0
            param.optim_overrides = {"optimizer": overrides}

    def forward(self, source: torch.Tensor, **unused: Any) -> torch.Tensor:
        return EATClassifier.forward(self, source)


# --------------------------------------------------------------------------------------------------
# optimizer


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
    """Lets one fairseq scheduler drive the lr of one torch param group."""

    def __init__(self, group: Dict[str, Any]) -> None:
        super().__init__(None)
        self.group = group

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
                CosineLRSchedule(_cosine_config(cfg, base_lr * float(g.get("lr_scale", 1.0))), _GroupLR(g))
                for g in groups
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
        return lrs[self.report]


# --------------------------------------------------------------------------------------------------
# criterion


@dataclass
class EATClassificationCriterionConfig(FairseqDataclass):
    loss: ChoiceEnum(["bce_positive_norm", "ce", "bce"]) = field(  # type: ignore[valid-type]
        default="bce_positive_norm",
        metadata={"help": "bce_positive_norm (AudioSet) | ce with label smoothing (ESC-50) | bce per clip (SPC-2)"},
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "for loss=ce"})
    mixup_alpha: float = field(default=0.8, metadata={"help": "Beta(alpha, alpha) of the batch mixup"})
    mixup_prob: float = field(default=0.9, metadata={"help": "probability of mixing a training batch (0 = off)"})
    specaug_freq_ratio: float = field(default=0.2, metadata={"help": "frequency mask width < F * ratio (0 = off)"})
    specaug_time_ratio: float = field(default=0.2, metadata={"help": "time mask width < T * ratio (0 = off)"})


@register_criterion("eat_classification", dataclass=EATClassificationCriterionConfig)
class EATClassificationCriterion(FairseqCriterion):
    """Training: mixup, then SpecAugment, then the loss. Evaluation: plain forward, predictions
    handed to the task (``_scores``/``_targets``, removed again by the task's ``valid_step``)."""

    def __init__(self, cfg: EATClassificationCriterionConfig, task: FairseqTask) -> None:
        super().__init__(task)
        self.cfg = cfg
        self.multi_label = bool(getattr(task.cfg, "multi_label", True))

    def forward(self, model: torch.nn.Module, sample: Dict[str, Any], reduce: bool = True):
        source = sample["net_input"]["source"]
        target = sample["target"]
        num_classes = model.num_classes if hasattr(model, "num_classes") else None
        if model.training:
            if self.cfg.mixup_prob > 0 and self.cfg.mixup_alpha > 0:
                hot = target.float() if target.dim() == 2 else torch.nn.functional.one_hot(target, num_classes).float()
                source, mixed, lam = augment.mixup(source, hot, self.cfg.mixup_alpha, self.cfg.mixup_prob)
                if lam != 1.0:
                    target = mixed
            if self.cfg.specaug_freq_ratio > 0 or self.cfg.specaug_time_ratio > 0:
                source = augment.spec_augment(source, self.cfg.specaug_freq_ratio, self.cfg.specaug_time_ratio)
        logits = model(source)
        loss, sample_size = finetune_loss(str(self.cfg.loss), logits, target, self.cfg.label_smoothing)
        batch = logits.shape[0]
        logging_output: Dict[str, Any] = {
            "loss": loss.item(),
            "sample_size": float(sample_size.item()),
            "nsentences": batch,
            "ntokens": batch,
            "skipped": int(sample.get("skipped", 0)),  # unreadable clips (task.on_bad_file=skip)
        }
        if not model.training:
            with torch.no_grad():
                probs = torch.sigmoid(logits.float()) if self.multi_label else torch.softmax(logits.float(), -1)
                predicted = logits.argmax(-1)
                if target.dim() == 2:
                    correct = target.gather(1, predicted[:, None]).squeeze(1) > 0.5
                else:
                    correct = predicted == target
            logging_output["correct"] = int(correct.sum().item())
            logging_output["n_eval"] = batch
            logging_output["_scores"] = probs.cpu().numpy()
            logging_output["_targets"] = target.cpu().numpy()
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs: List[Dict[str, Any]]) -> None:
        loss = sum(float(log.get("loss", 0.0)) for log in logging_outputs)
        size = sum(float(log.get("sample_size", 0.0)) for log in logging_outputs)
        metrics.log_scalar("loss", loss / max(size, 1e-8), size, round=4)
        skipped = sum(int(log.get("skipped", 0)) for log in logging_outputs)
        if skipped:
            metrics.log_scalar_sum("skipped_files", skipped, round=0)
        n_eval = sum(int(log.get("n_eval", 0)) for log in logging_outputs)
        if n_eval > 0:
            metrics.log_scalar_sum("n_eval", n_eval)
            metrics.log_scalar_sum("_correct", sum(int(log.get("correct", 0)) for log in logging_outputs))
            metrics.log_derived(
                "accuracy",
                lambda meters: float(meters["_correct"].sum / meters["n_eval"].sum)
                if meters["n_eval"].sum > 0
                else float("nan"),
                priority=2,
            )

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        # the task removes the per-clip predictions before logging outputs are reduced
        return True


def classification_report_for(task: EATClassificationTask) -> Any:
    """Metrics of the last validation pass (for scripts driving fairseq directly)."""
    return task.predictions.report(task.num_classes) if len(task.predictions) else None


__all__ = [
    "EATLabelledDataset",
    "EATClassificationConfig",
    "EATClassificationTask",
    "EATClassifierConfig",
    "EATClassifierModel",
    "EATAdam",
    "EATCosineSchedule",
    "EATClassificationCriterion",
    "load_trusted_state",
    "classification_report_for",
]
