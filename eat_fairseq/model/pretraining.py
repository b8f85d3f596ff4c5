"""EAT pre-training model: student encoder, CNN decoder and EMA teacher (docs/reference.md section 3).

One forward computes everything the Utterance-Frame Objective needs:

1. the teacher (EMA copy of the encoder: fp32 weights, eval, no grad; its forward in the student's dtype
   by default, see ``compute_targets``) encodes the full unmasked clip and its
   top-K FFN outputs become targets ``(B, P, D)``;
2. the student embeds the clip once, repeats it ``clone_batch`` times (multi-mask), keeps each copy's
   visible patches and encodes them with CLS;
3. the decoder (the release's CNN; ``decoder_type`` picks a per-patch ablation) predicts every
   patch; the frame error is taken on masked patches only, the utterance error between the student CLS and the patch-mean of the targets.

The loss reduction itself lives in :func:`eat_fairseq.model.objective.ufo_loss` so that a trainer can
divide by ``sample_size`` like fairseq does.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from eat_fairseq.model.decoder import CNNDecoder, LinearDecoder, MLPDecoder, TransformerDecoder
from eat_fairseq.model.ema import ema_decay_at, ema_update_
from eat_fairseq.model.encoder import EATEncoder, EncoderConfig
from eat_fairseq.model.masking import MASK_LENGTH, MASK_PROB, MASK_PROB_ADJUST, MaskSpec, check_mask_type
from eat_fairseq.model.objective import TARGET_NORMS, check_loss_weights, frame_errors, teacher_targets

__all__ = [
    "PretrainConfig",
    "EATPretrainingModel",
    "count_parameters",
    "positional_share",
    "feature_spread",
    "TEACHER_PRECISIONS",
    "DECODER_TYPES",
    "build_decoder",
    "check_decoder_type",
]

TEACHER_PRECISIONS = ("release", "fp32")

# the release's CNN decoder, and two per-patch ablations without neighbourhood context
DECODER_TYPES = ("cnn", "linear", "mlp", "transformer")


def check_decoder_type(decoder_type: str) -> str:
    """``decoder_type`` as a plain string if it is one of :data:`DECODER_TYPES`, else a one-line ValueError."""
    if str(decoder_type) not in DECODER_TYPES:
        raise ValueError(f"decoder_type must be one of {DECODER_TYPES}, got {decoder_type!r}")
    return str(decoder_type)


@dataclass
class PretrainConfig:
    """Everything that defines EAT pre-training except the optimiser. Defaults are EAT-base.

    ``frame_loss_weight``, ``mask_type`` and ``decoder_type`` are ablations (docs/differences.md);
    their defaults (1.0, ``"inverse_block"``, ``"cnn"``) are the release's and compute it bit for bit.
    """

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    clone_batch: int = 16
    mask_prob: float = MASK_PROB
    mask_prob_adjust: float = MASK_PROB_ADJUST
    mask_length: int = MASK_LENGTH
    mask_type: str = "inverse_block"
    decoder_type: str = "cnn"
    decoder_dim: int = 768
    decoder_depth: int = 6
    decoder_kernel_size: int = 3
    decoder_groups: int = 16
    mask_noise_std: float = 0.01
    average_top_k_layers: int = 12
    ema_decay: float = 0.9998
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int = 100000
    utterance_loss_weight: float = 1.0
    frame_loss_weight: float = 1.0
    utterance_reduction: str = "release"
    target_position: str = "keep"
    target_norm: str = "instance"
    teacher_precision: str = "release"

    def mask_spec(self) -> MaskSpec:
        """The masking of this model (the one spec for data-loader workers and the model itself)."""
        return MaskSpec(clone_batch=self.clone_batch, mask_prob=self.mask_prob, mask_length=self.mask_length,
                        mask_prob_adjust=self.mask_prob_adjust, patch_size=self.encoder.patch_size,
                        mask_type=self.mask_type)

    @classmethod
    def base(cls, **overrides: Any) -> "PretrainConfig":
        """EAT-base (12 x 768, decoder 6 blocks k3)."""
        return cls(**{"encoder": EncoderConfig.base(), **overrides})

    @classmethod
    def large(cls, **overrides: Any) -> "PretrainConfig":
        """EAT-large: 24 x 1024, mask_prob 0.75 / adjust 0.1, decoder 3 blocks k5 dim 1024, anneal 150k."""
        values: dict[str, Any] = {
            "encoder": EncoderConfig.large(),
            "mask_prob": 0.75,
            "mask_prob_adjust": 0.1,
            "decoder_dim": 1024,
            "decoder_depth": 3,
            "decoder_kernel_size": 5,
            "average_top_k_layers": 24,
            "ema_anneal_end_step": 150000,
        }
        return cls(**{**values, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> "PretrainConfig":
        """CPU-sized model for tests: 2 x 64 encoder, 2-block decoder of width 64, 2 clones."""
        values: dict[str, Any] = {
            "encoder": EncoderConfig.tiny(),
            "decoder_dim": 64,
            "decoder_depth": 2,
            "average_top_k_layers": 2,
            "clone_batch": 2,
        }
        return cls(**{**values, **overrides})


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``module`` (optionally only those with requires_grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def positional_share(targets: Tensor) -> Tensor:
    """Share of the targets' variance explained by patch position alone, ``(B, P, D)`` -> 0-dim in [0, 1].

    Between-position variance of the clip-averaged targets over total variance, with the
    finite-batch bias removed (with no positional effect, the per-position mean of B clips still
    varies by about ``within / (B - 1)``). Near 1 means a target is predictable from where the
    patch is, without looking at the audio: a shortcut the student can learn instead of features.
    """
    y = targets.detach().float()
    b = y.shape[0]
    if b < 2:
        return y.new_zeros(())
    grand = y.mean(dim=(0, 1))  # (D,)
    per_pos = y.mean(dim=0)  # (P, D)
    total = (y - grand).pow(2).sum(-1).mean()
    within = (y - per_pos).pow(2).sum(-1).mean()  # biased (1/B) within-position variance
    between = (per_pos - grand).pow(2).sum(-1).mean() - within / (b - 1)
    return (between / total.clamp(min=1e-12)).clamp(0.0, 1.0)


def feature_spread(x: Tensor) -> Tensor:
    """Spread of per-clip vectors ``(B, D)`` across clips, relative to their size: 0-dim in [0, 1].

    Mean over channels of the std across clips, divided by the root mean square of all entries.
    0 means every clip gets the same vector (collapse), whatever the targets' normalisation says.
    """
    x = x.detach().float()
    if x.shape[0] < 2:
        return x.new_zeros(())
    return x.std(dim=0, unbiased=False).mean() / x.pow(2).mean().sqrt().clamp(min=1e-12)


def build_decoder(cfg: PretrainConfig) -> nn.Module:
    """The decoder ``cfg.decoder_type`` names, all with the signature ``(visible, mask, grid) -> (B, P, D)``.

    ``"cnn"`` builds exactly the release's CNNDecoder (same parameters, names and init draws), so the
    default model's parameters and random stream are unchanged. ``"linear"`` / ``"mlp"`` ignore the
    depth, kernel and groups settings; ``"mlp"`` uses ``decoder_dim`` as its hidden width;
    ``"transformer"`` uses ``decoder_dim`` and ``decoder_depth`` (blocks), not the kernel and groups.
    """
    kind = check_decoder_type(cfg.decoder_type)
    if kind == "linear":
        return LinearDecoder(cfg.encoder.embed_dim, noise_std=cfg.mask_noise_std)
    if kind == "mlp":
        return MLPDecoder(cfg.encoder.embed_dim, decoder_dim=cfg.decoder_dim, noise_std=cfg.mask_noise_std)
    if kind == "transformer":
        return TransformerDecoder(cfg.encoder.embed_dim, decoder_dim=cfg.decoder_dim, depth=cfg.decoder_depth,
                                  noise_std=cfg.mask_noise_std)
    return CNNDecoder(
        cfg.encoder.embed_dim,
        decoder_dim=cfg.decoder_dim,
        depth=cfg.decoder_depth,
        kernel_size=cfg.decoder_kernel_size,
        groups=cfg.decoder_groups,
        noise_std=cfg.mask_noise_std,
    )


def _mean_std(x: Tensor) -> Tensor:
    """Mean over channels of the std across rows: a collapse detector (near 0 = collapsed)."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    if x.shape[0] < 2:
        return x.new_zeros(())
    return torch.sqrt(x.var(dim=0) + 1e-6).mean()


class EATPretrainingModel(nn.Module):
    """Student ``encoder``, ``decoder`` and EMA ``teacher`` for EAT pre-training.

    ``__init__`` calls ``super().__init__()`` with no arguments so that a fairseq shell can subclass
    this together with ``BaseFairseqModel``.
    """

    def __init__(self, cfg: PretrainConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else PretrainConfig()
        self.cfg = cfg
        if str(cfg.teacher_precision) not in TEACHER_PRECISIONS:
            raise ValueError(f"teacher_precision must be one of {TEACHER_PRECISIONS}, got {cfg.teacher_precision!r}")
        # every choice is checked before any parameter exists, so a bad config fails at once
        check_mask_type(cfg.mask_type)
        check_decoder_type(cfg.decoder_type)
        check_loss_weights(cfg.frame_loss_weight, cfg.utterance_loss_weight)
        if str(cfg.target_norm) not in TARGET_NORMS:
            raise ValueError(f"target_norm must be one of {TARGET_NORMS}, got {cfg.target_norm!r}")
        if not 1 <= cfg.average_top_k_layers <= cfg.encoder.depth:
            raise ValueError(
                f"average_top_k_layers={cfg.average_top_k_layers} must be in 1..depth={cfg.encoder.depth}"
            )
        self.encoder = EATEncoder(cfg.encoder)
        self.decoder = build_decoder(cfg)
        self.teacher = copy.deepcopy(self.encoder)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        # How many EMA updates the teacher has received; persistent so a resumed run is exact.
        self.register_buffer("num_ema_updates", torch.zeros((), dtype=torch.long), persistent=True)

    # -- teacher housekeeping ---------------------------------------------------------------------

    def train(self, mode: bool = True) -> "EATPretrainingModel":
        """Switch student/decoder mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "EATPretrainingModel":
        """Like ``nn.Module._apply``, but the teacher only follows device moves, never dtype casts.

        ``model.half()`` / ``.bfloat16()`` (e.g. fairseq's fp16 mode) would otherwise turn the teacher
        into fp16; a cast is detected from ``fn``'s result and replaced by a device move of the
        original fp32 tensor, so no precision is lost.
        """
        if recurse:
            for name, module in self.named_children():
                module._apply(_keep_float32(fn) if name == "teacher" else fn)
        return super()._apply(fn, recurse=False)

    def ema_decay_at(self, num_updates: int) -> float:
        """EMA decay this model uses after ``num_updates`` optimizer updates."""
        return ema_decay_at(
            num_updates, self.cfg.ema_decay, self.cfg.ema_end_decay, self.cfg.ema_anneal_end_step
        )

    @torch.no_grad()
    def ema_step(self, num_updates: int) -> float:
        """Move the teacher towards the student (call after each optimizer step); returns the decay."""
        decay = self.ema_decay_at(num_updates)
        ema_update_(self.teacher, self.encoder, decay)
        self.num_ema_updates += 1
        return decay

    # -- forward ----------------------------------------------------------------------------------

    @torch.no_grad()
    def compute_targets(self, fbank: Tensor) -> Tensor:
        """Teacher targets ``(B, P, D)`` in fp32 from the full unmasked input.

        The teacher's weights are always kept in fp32 (the EMA's master copy, see :meth:`_apply`);
        ``cfg.teacher_precision`` picks the precision of its forward:

        - ``"release"`` (the authors' code): the forward runs in the student's dtype, i.e. under
          fp16/bf16 training (``model.half()``/``.bfloat16()``) on a half-precision copy of the fp32
          weights and input (an fp32 student under autocast: the fp32 teacher under that autocast).
          The targets are then normalised in fp32. Cheaper on GPUs; bf16 targets differ from fp32
          ones by about 1e-2 relative.
        - ``"fp32"``: the forward runs in fp32 with autocast disabled, whatever the student's dtype.

        With an fp32 student and no autocast (e.g. CPU fp32 training) both give the same targets.
        """
        dtype = self.encoder.cls_token.dtype
        if str(self.cfg.teacher_precision) == "fp32":
            with torch.autocast(device_type=fbank.device.type, enabled=False):
                _, ffn_outputs = self.teacher(fbank.float())
                return teacher_targets(ffn_outputs, self.cfg.average_top_k_layers, self.cfg.target_position,
                               self.cfg.target_norm)
        if dtype == torch.float32:
            _, ffn_outputs = self.teacher(fbank.float())  # an active autocast applies, as in the release
        else:
            # the release's teacher is an fp16/bf16 module restored from its fp32 EMA copy each step
            state = {k: v.to(dtype) for k, v in self.teacher.state_dict(keep_vars=True).items()}
            _, ffn_outputs = torch.func.functional_call(self.teacher, state, (fbank.to(dtype),))
        return teacher_targets(ffn_outputs, self.cfg.average_top_k_layers, self.cfg.target_position,
                               self.cfg.target_norm)

    def make_mask(self, batch_size: int, grid: tuple[int, int], device: torch.device) -> Tensor:
        """Masks ``(batch_size, P)`` with this model's settings and ``mask_type`` (global RNG)."""
        return self.cfg.mask_spec().draw(batch_size, grid, device=device)

    def forward(self, fbank: Tensor, mask: Tensor | None = None) -> dict[str, Any]:
        """Errors for the UFO loss.

        ``fbank`` ``(B, 1, T, F)`` or ``(B, T, F)``; ``mask`` ``(B*clone, P)`` bool (True = masked),
        rows ``i*clone .. i*clone+clone-1`` belonging to clip i, or None to draw masks here.
        Returns ``frame_err (M,)``, ``utterance_err (B*clone,)``, ``sample_size`` (M, int),
        ``target_var``, ``pred_var`` (0-dim detached tensors), ``masked_pct`` (float) and the
        diagnostics ``pos_share`` (:func:`positional_share` of the targets), ``student_spread`` /
        ``cls_spread`` (:func:`feature_spread` of the student's mean visible patch output / CLS
        across clips, first masked copy of each).
        """
        clone = self.cfg.clone_batch
        targets = self.compute_targets(fbank)  # (B, P, D) fp32

        x = self.encoder.embed(fbank)  # (B, P, D)
        b, p, d = x.shape
        grid = self.encoder.grid(fbank.shape[-2])
        x = x.repeat_interleave(clone, dim=0)  # (B*clone, P, D)
        if mask is None:
            mask = self.make_mask(b * clone, grid, x.device)
        mask = mask.to(device=x.device, dtype=torch.bool)
        if mask.shape != (b * clone, p):
            raise ValueError(f"mask must have shape {(b * clone, p)} (B*clone, P), got {tuple(mask.shape)}")
        visible = self.encoder.gather_visible(x, mask)  # (B*clone, V, D)
        x, _ = self.encoder.encode(visible)  # (B*clone, 1+V, D)

        pred = self.decoder(x[:, 1:], mask, grid)  # (B*clone, P, D)
        pred = pred[mask]  # (M, D)
        target = targets.repeat_interleave(clone, dim=0)  # (B*clone, P, D)
        frame_err = frame_errors(pred, target[mask])  # (M,)

        utterance_target = targets.mean(dim=1).repeat_interleave(clone, dim=0)  # (B*clone, D)
        utterance_err = frame_errors(x[:, 0], utterance_target)  # (B*clone,)

        sample_size = int(frame_err.numel())
        first = x[::clone]  # (B, 1+V, D): the first masked copy of each clip
        return {
            "frame_err": frame_err,
            "utterance_err": utterance_err,
            "sample_size": sample_size,
            "target_var": _mean_std(target[mask]),
            "pred_var": _mean_std(pred),
            "masked_pct": sample_size / float(b * clone * p),
            "pos_share": positional_share(targets),
            "student_spread": feature_spread(first[:, 1:].mean(dim=1)),
            "cls_spread": feature_spread(first[:, 0]),
        }

    def extract_features(self, fbank: Tensor, layer: int | None = None) -> Tensor:
        """Unmasked student features ``(B, 1+P, D)``; see :meth:`EATEncoder.extract_features`."""
        return self.encoder.extract_features(fbank, layer=layer)


def _keep_float32(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Wrap an ``_apply`` function so float32 tensors keep their dtype and only change device."""

    def apply(t: Tensor) -> Tensor:
        out = fn(t)
        if t.dtype == torch.float32 and out.dtype != torch.float32:
            return t.to(device=out.device)
        return out

    return apply
