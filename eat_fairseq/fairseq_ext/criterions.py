"""fairseq criterions: ``eat_ufo`` (the utterance-frame objective) and ``eat_classification``.

The losses themselves live in :mod:`eat_fairseq.model.objective` and
:mod:`eat_fairseq.model.finetune_losses`; the criterions apply the training-time batch augmentations
(mixup, SpecAugment), log what a user needs to watch a run, and reduce the logs over workers.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask

from eat_fairseq.data import augment
from eat_fairseq.model.finetune_losses import finetune_loss
from eat_fairseq.model.objective import ufo_loss

from .models import unwrap_model

_AUG = augment.AugmentConfig()  # the one source of the augmentation defaults

logger = logging.getLogger(__name__)


@dataclass
class EATUFOCriterionConfig(FairseqDataclass):
    pass


@register_criterion("eat_ufo", dataclass=EATUFOCriterionConfig)
class EATUFOCriterion(FairseqCriterion):
    """Utterance-frame objective: frame loss on masked patches + lambda * utterance (CLS) loss.

    The weights and reduction come from the model config (``utterance_loss_weight``,
    ``frame_loss_weight``, ``utterance_reduction``); see :func:`eat_fairseq.model.objective.ufo_loss`.
    """

    def __init__(self, cfg: EATUFOCriterionConfig, task: FairseqTask) -> None:
        super().__init__(task)
        self.last_gradient_norms: Dict[str, float] = {}
        self.gradient_norms_failed = False

    def forward(self, model: torch.nn.Module, sample: Dict[str, Any], reduce: bool = True):
        core = unwrap_model(model)
        net_input = sample["net_input"]
        out = model(source=net_input["source"], mask=net_input.get("mask"))
        weight = core.cfg.utterance_loss_weight
        frame_weight = float(core.cfg.frame_loss_weight)
        reduction = str(core.cfg.utterance_reduction)
        loss, sample_size = ufo_loss(out["frame_err"], out["utterance_err"], utterance_weight=weight,
                                     reduction=reduction, frame_weight=frame_weight)
        frame_sum = out["frame_err"].detach().float().sum().item()
        frame_term = frame_weight * frame_sum
        utt = out["utterance_err"].detach().float()
        n_rows = utt.numel()
        logging_output = {
            "loss": loss.detach().float().item(),
            "frame_loss": frame_sum,
            "utterance_loss": utt.sum().item(),
            # the weighted utterance contribution, in the units of loss (loss = frame_term + utterance_term;
            # frame_term = frame_loss unless frame_loss_weight is set)
            "utterance_term": loss.detach().float().item() - frame_term,
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
        if frame_weight != 1.0:
            # only then does the weighted frame part differ from frame_loss: the default logs stay as they were
            logging_output["frame_term"] = frame_term
        interval = int(getattr(getattr(self.task, "cfg", None), "diagnostics_interval_updates", 0) or 0)
        if (model.training and torch.is_grad_enabled() and interval > 0 and core.num_updates % interval == 0
                and not self.gradient_norms_failed):
            try:
                self.last_gradient_norms = self.gradient_norms(core, out, weight, reduction, frame_weight)
            except RuntimeError as exc:  # a diagnostic must never stop a run (e.g. an exotic wrapper)
                self.gradient_norms_failed = True
                logger.warning("gradient-share diagnostic disabled: %s", exc)
        if model.training and self.last_gradient_norms:
            # the latest measurement is repeated until the next one, so no log line shows a gap
            logging_output.update(self.last_gradient_norms, ngrad=1)
        return loss, sample_size, logging_output

    @staticmethod
    def gradient_norms(core: torch.nn.Module, out: Dict[str, Any], weight: float, reduction: str,
                       frame_weight: float = 1.0) -> Dict[str, float]:
        """Norm of the gradient each weighted loss term sends to the student encoder (this rank's batch).

        Two extra backward passes through the retained graph; ``torch.autograd.grad`` returns the
        gradients without touching ``.grad``, so training is unchanged.
        """
        params = [p for p in core.encoder.parameters() if p.requires_grad]
        frame_term = frame_weight * out["frame_err"].float().mean()
        utt = out["utterance_err"].float()
        utt_term = weight * (utt.sum() if reduction == "release" else utt.mean())

        def norm(term: torch.Tensor) -> float:
            if not term.requires_grad:
                return 0.0
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            squares = [g.float().pow(2).sum() for g in grads if g is not None]
            # a term that reaches no encoder parameter has norm 0 (sum([]) is int 0, which torch.sqrt refuses)
            return float(torch.sqrt(sum(squares)).item()) if squares else 0.0

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
            if any("frame_term" in log for log in logging_outputs):
                metrics.log_scalar("frame_term", total("frame_term") / sample_size, sample_size, round=4)
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


def _as_float(x: Any) -> float:
    """A plain Python float: numpy or tensor scalars in logs break weights_only checkpoint loading."""
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().item())
    value = float(x)
    return 0.0 if math.isnan(value) else value


@dataclass
class EATClassificationCriterionConfig(FairseqDataclass):
    loss: ChoiceEnum(["bce_positive_norm", "ce", "bce"]) = field(  # type: ignore[valid-type]
        default="bce_positive_norm",
        metadata={"help": "bce_positive_norm (AudioSet) | ce with label smoothing (ESC-50) | bce per clip (SPC-2)"},
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "for loss=ce"})
    mixup_alpha: float = field(default=_AUG.mixup_alpha, metadata={"help": "Beta(alpha, alpha) of the batch mixup"})
    mixup_prob: float = field(default=_AUG.mixup_prob, metadata={"help": "probability of mixing a training batch (0 = off)"})
    specaug_freq_ratio: float = field(default=_AUG.specaug_freq_ratio, metadata={"help": "frequency mask width < F * ratio (0 = off)"})
    specaug_time_ratio: float = field(default=_AUG.specaug_time_ratio, metadata={"help": "time mask width < T * ratio (0 = off)"})


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
