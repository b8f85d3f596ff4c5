"""fairseq models: ``eat`` (pre-training: student, CNN decoder, EMA teacher) and ``eat_classifier``.

Both subclass the pure-PyTorch modules (:mod:`eat_fairseq.model`), so the state-dict names are the
core's and checkpoints written by fairseq load into the fairseq-free API unchanged. The config
dataclasses take their defaults from the core configs (one default per setting).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from fairseq.tasks import FairseqTask
from omegaconf import DictConfig

from eat_fairseq.checkpoints.convert import load_ours
from eat_fairseq.model.classifier import EATClassifier, parameter_lr_scale
from eat_fairseq.model.encoder import EncoderConfig
from eat_fairseq.model.masking import MASK_TYPES
from eat_fairseq.model.objective import TARGET_NORMS
from eat_fairseq.model.pretraining import DECODER_TYPES, EATPretrainingModel, PretrainConfig

logger = logging.getLogger(__name__)

# the core configs are the one source of every default below
_ENCODER = EncoderConfig()
_PRETRAIN = PretrainConfig()


ENCODER_FIELDS = tuple(f.name for f in dataclasses.fields(EncoderConfig))


PRETRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(PretrainConfig) if f.name != "encoder")


# fields that define the weights' shapes/meaning; regularisation (drop path, dropouts) stays per run
ARCH_FIELDS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "in_chans", "num_mel_bins",
               "max_length", "norm_eps")


def encoder_config_from(cfg: Any) -> EncoderConfig:
    """Build the core EncoderConfig from a flat config (fairseq model cfg, dict or DictConfig)."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    return EncoderConfig(**{k: get(k) for k in ENCODER_FIELDS if get(k, None) is not None})


def pretrain_config_from(cfg: Any) -> PretrainConfig:
    """Build the core PretrainConfig from the flat fairseq model config."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    rest = {k: get(k) for k in PRETRAIN_FIELDS if get(k, None) is not None}
    return PretrainConfig(encoder=encoder_config_from(cfg), **rest)


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, (dict, DictConfig)):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The core model inside fairseq's distributed wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


@dataclass
class EATEncoderFields(FairseqDataclass):
    """The encoder's settings, named exactly as :class:`EncoderConfig`'s fields (shared by the
    pre-training and the classification model configs)."""

    embed_dim: int = field(default=_ENCODER.embed_dim, metadata={"help": "transformer width D"})
    depth: int = field(default=_ENCODER.depth, metadata={"help": "number of transformer blocks"})
    num_heads: int = field(default=_ENCODER.num_heads, metadata={"help": "attention heads"})
    mlp_ratio: float = field(default=_ENCODER.mlp_ratio, metadata={"help": "FFN hidden size / D"})
    patch_size: int = field(default=_ENCODER.patch_size, metadata={"help": "square patch size on the (T, F) fbank"})
    in_chans: int = field(default=_ENCODER.in_chans, metadata={"help": "input channels of the patch embedding"})
    num_mel_bins: int = field(default=_ENCODER.num_mel_bins, metadata={"help": "fbank bins F"})
    max_length: int = field(default=_ENCODER.max_length, metadata={"help": "time patches covered by the sin-cos table"})
    norm_eps: float = field(default=_ENCODER.norm_eps, metadata={"help": "LayerNorm epsilon of the encoder"})
    drop_path_rate: float = field(default=_ENCODER.drop_path_rate, metadata={"help": "stochastic depth, linear over blocks"})
    dropout: float = field(default=_ENCODER.dropout, metadata={"help": "dropout after attention/FFN projections"})
    attn_dropout: float = field(default=_ENCODER.attn_dropout, metadata={"help": "dropout on attention weights"})


@dataclass
class EATModelConfig(EATEncoderFields):
    """Pre-training model: the encoder (docs/reference.md section 2; dropouts and drop path 0) plus:"""

    # multi-mask (docs/reference.md section 3)
    clone_batch: int = field(default=_PRETRAIN.clone_batch, metadata={"help": "masked copies per clip (multi-mask)"})
    mask_prob: float = field(default=_PRETRAIN.mask_prob, metadata={"help": "fraction of patches masked"})
    mask_prob_adjust: float = field(default=_PRETRAIN.mask_prob_adjust, metadata={"help": "extra block centres in inverse masking"})
    mask_length: int = field(default=_PRETRAIN.mask_length, metadata={"help": "block side of the inverse block mask"})
    mask_type: ChoiceEnum(list(MASK_TYPES)) = field(  # type: ignore[valid-type]
        default=_PRETRAIN.mask_type,
        metadata={
            "help": "inverse_block: the release's union of visible blocks; random (ablation): the same number "
            "of visible patches per row, chosen uniformly (mask_length and mask_prob_adjust unused)"
        },
    )
    # decoder
    decoder_type: ChoiceEnum(list(DECODER_TYPES)) = field(  # type: ignore[valid-type]
        default=_PRETRAIN.decoder_type,
        metadata={
            "help": "cnn: the release's 2-D CNN decoder; linear / mlp (ablations): one Linear, or "
            "Linear-GELU-Linear of width decoder_dim, per patch, without neighbourhood context; transformer "
            "(ablation): decoder_depth pre-LN transformer blocks of width decoder_dim over every patch"
        },
    )
    decoder_dim: int = field(default=_PRETRAIN.decoder_dim, metadata={"help": "channels of the CNN decoder (width of the mlp / transformer ones)"})
    decoder_depth: int = field(default=_PRETRAIN.decoder_depth, metadata={"help": "conv blocks of the decoder (transformer blocks of the transformer one)"})
    decoder_kernel_size: int = field(default=_PRETRAIN.decoder_kernel_size, metadata={"help": "decoder conv kernel size"})
    decoder_groups: int = field(default=_PRETRAIN.decoder_groups, metadata={"help": "decoder conv groups"})
    mask_noise_std: float = field(default=_PRETRAIN.mask_noise_std, metadata={"help": "std of the noise filling masked positions"})
    # teacher
    average_top_k_layers: int = field(default=_PRETRAIN.average_top_k_layers, metadata={"help": "teacher blocks averaged into targets"})
    ema_decay: float = field(default=_PRETRAIN.ema_decay, metadata={"help": "EMA decay at update 0"})
    ema_end_decay: float = field(default=_PRETRAIN.ema_end_decay, metadata={"help": "EMA decay after the anneal"})
    ema_anneal_end_step: int = field(default=_PRETRAIN.ema_anneal_end_step, metadata={"help": "updates of the linear decay anneal"})
    teacher_precision: ChoiceEnum(["release", "fp32"]) = field(  # type: ignore[valid-type]
        default=_PRETRAIN.teacher_precision,
        metadata={
            "help": "dtype of the teacher's forward under common.fp16/bf16 (its weights stay fp32): release: "
            "the student's half dtype, as the authors' code (faster); fp32: always fp32 (more precise targets)"
        },
    )
    # objective
    utterance_loss_weight: float = field(default=_PRETRAIN.utterance_loss_weight, metadata={"help": "lambda of the utterance loss"})
    frame_loss_weight: float = field(
        default=_PRETRAIN.frame_loss_weight,
        metadata={"help": "weight of the frame loss (1 as the release; 0: utterance loss only; 0 with "
                  "utterance_loss_weight 0 is refused)"},
    )
    utterance_reduction: ChoiceEnum(["release", "mean"]) = field(  # type: ignore[valid-type]
        default=_PRETRAIN.utterance_reduction,
        metadata={
            "help": "release: utterance term summed over the B*clone rows (its weight grows with the "
            "per-device batch, as the authors' code); mean: averaged over rows (batch-size independent)"
        },
    )
    target_position: ChoiceEnum(["keep", "center"]) = field(  # type: ignore[valid-type]
        default=_PRETRAIN.target_position,
        metadata={
            "help": "keep: targets as the release; center: subtract the batch mean at each patch position "
            "from the teacher targets (before their LayerNorm), removing what position alone predicts"
        },
    )
    target_norm: ChoiceEnum(list(TARGET_NORMS)) = field(  # type: ignore[valid-type]
        default=_PRETRAIN.target_norm,
        metadata={
            "help": "instance: each target block normalised per channel over a clip's patches, as the "
            "release (what is constant over a clip leaves the targets); layer (ablation): per patch over "
            "the channels, which keeps it"
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
        _check_task_masks(cfg, task)
        return cls(cfg)

    def forward(self, source: torch.Tensor, mask: Optional[torch.Tensor] = None, **unused: Any) -> Dict[str, Any]:
        return super().forward(source, mask)

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates

    def get_num_updates(self) -> int:
        return self.num_updates


def _check_task_masks(cfg: Any, task: Optional[FairseqTask]) -> None:
    """Refuse a ``mask_type`` the task's data-loader masks would not follow.

    With ``task.precompute_mask`` the dataset draws the masks from the TASK's mask settings, and the
    model trains on whatever it is given. The shipped task follows ``model.mask_type``; a task config
    that sets its own ``mask_type`` otherwise would silently draw other masks, so that is refused.
    """
    wanted = str(cfg_get(cfg, "mask_type", _PRETRAIN.mask_type))
    task_cfg = getattr(task, "cfg", None)
    if wanted == _PRETRAIN.mask_type or task_cfg is None or not cfg_get(task_cfg, "precompute_mask", False):
        return
    drawn = cfg_get(task_cfg, "mask_type", _PRETRAIN.mask_type)
    if str(drawn) != wanted:
        raise ValueError(
            f"model.mask_type={wanted} but the task's data loader draws mask_type={drawn} masks: "
            "set task.precompute_mask=false so that the model draws its own masks"
        )


@dataclass
class EATClassifierConfig(EATEncoderFields):
    """Classifier: the encoder fields (drop path 0.1 when fine-tuning, docs/reference.md section 4) plus:"""

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
        encoder_cfg = EncoderConfig(**{k: cfg_get(cfg, k) for k in ENCODER_FIELDS})
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
            state = load_ours(str(cfg.model_path), keep=True)
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
