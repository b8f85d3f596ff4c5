"""Convert between the released EAT checkpoints (and the Hugging Face port) and OUR checkpoints.

OUR checkpoint is a dict in fairseq's checkpoint layout that
``fairseq.checkpoint_utils.load_model_ensemble_and_task([path])`` loads after ``import eat_fairseq``,
and that ``torch.load(weights_only=True)`` accepts (plain containers and tensors only):

- ``args``: None (fairseq's legacy slot; ``cfg`` is used instead);
- ``cfg``: plain dicts ``common``, ``task`` (``_name`` ``eat_pretraining`` / ``eat_classification``
  plus the feature settings), ``model`` (``_name`` ``eat`` / ``eat_classifier`` with the fields of
  :class:`~eat_fairseq.model.encoder.EncoderConfig` flattened, plus the
  :class:`~eat_fairseq.model.pretraining.PretrainConfig` fields or ``num_classes``), ``criterion``;
- ``model``: the state dict with the core's names (``encoder.* decoder.* teacher.* num_ema_updates``
  or ``encoder.* fc_norm.* head.*``);
- ``criterion`` None, ``optimizer_history`` (one entry, ``num_updates`` 0), ``task_state``
  (``{"labels": {label: int}}`` for a classifier), ``extra_state`` {}.

The model size is read from tensor shapes (:func:`eat_fairseq.checkpoints.weights.infer_encoder_config`),
attention heads from the source cfg when it records them. Older files with a 512-row position
table are extended to 6144 rows (768 time patches) with the same sin-cos formula, after checking
that the stored rows agree with it. Every converted state dict is checked, key by key and shape by
shape, against the model it will be loaded into (built on the ``meta`` device: no memory).

Nothing here imports fairseq; files are read with :func:`eat_fairseq.checkpoints.load.load_checkpoint`
(restricted unpickler) or safetensors, never by full unpickling.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from eat_fairseq.checkpoints.atomic import atomic_write
from eat_fairseq.checkpoints.load import CheckpointError, load_checkpoint, load_safetensors, to_plain
from eat_fairseq.model.encoder import EncoderConfig
from eat_fairseq.model.pretraining import PretrainConfig
from eat_fairseq.checkpoints.released_cfg import finetune_dataset_kind, released_finetuning_cfg, released_pretraining_cfg
from eat_fairseq.checkpoints.weights import (
    RELEASED_HEADS,
    extend_positions,
    from_hf,
    from_released,
    infer_encoder_config,
    to_released,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "ConversionError",
    "ConversionSummary",
    "RELEASED_PRETRAIN_NAME",
    "RELEASED_FINETUNE_NAME",
    "detect_source",
    "convert_released",
    "convert_hf",
    "convert_ours",
    "convert_to_released",
    "build_checkpoint",
    "read_any",
    "load_ours",
    "dig",
    "is_safetensors",
    "convert_file",
]

RELEASED_PRETRAIN_NAME = "data2vec_multi"
RELEASED_PRETRAIN_TASK = "mae_image_pretraining"
RELEASED_FINETUNE_NAME = "mae_image_classification"
OUR_PRETRAIN_MODEL, OUR_PRETRAIN_TASK, OUR_PRETRAIN_CRITERION = "eat", "eat_pretraining", "eat_ufo"
OUR_CLS_MODEL, OUR_CLS_TASK, OUR_CLS_CRITERION = "eat_classifier", "eat_classification", "eat_classification"
KINDS = ("pretrained", "finetuned")
FULL_MAX_LENGTH = 768  # time patches of the current release's table (6144 rows)
_PRETRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(PretrainConfig) if f.name != "encoder")
_ENCODER_FIELDS = tuple(f.name for f in dataclasses.fields(EncoderConfig))


class ConversionError(ValueError):
    """A source that cannot be converted (unknown layout, wrong kind, shapes that do not fit)."""


@dataclass
class ConversionSummary:
    """What a conversion did, for the CLI's report and for tests."""

    source_format: str  # "released" | "huggingface" | "eat"
    kind: str  # "pretrained" | "finetuned"
    size: str  # "base" | "large" | "custom (...)"
    encoder: EncoderConfig
    num_tensors: int = 0
    positions: str = "kept"  # "kept (6144 rows)" or "extended 512 -> 6144 rows"
    positions_extended: bool = False
    num_classes: int | None = None
    num_labels: int | None = None
    target: str = "eat"
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable report, one fact per line."""
        enc = self.encoder
        out = [
            f"source: {self.source_format} {self.kind} checkpoint -> {self.target} layout",
            f"size: {self.size} (embed_dim {enc.embed_dim}, depth {enc.depth}, heads {enc.num_heads})",
            f"tensors: {self.num_tensors}",
            f"positions: {self.positions}",
        ]
        if self.num_classes is not None:
            out.append(f"classes: {self.num_classes}")
        if self.num_labels is not None:
            out.append(f"labels: {self.num_labels}")
        out.extend(f"note: {n}" for n in self.notes)
        return out


# --------------------------------------------------------------------------------------------------
# helpers


def dig(tree: Any, *path: str) -> Any:
    """``tree[path[0]][path[1]]...`` or None when any level is missing."""
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _size_name(cfg: EncoderConfig) -> str:
    if (cfg.embed_dim, cfg.depth) == (768, 12):
        return "base"
    if (cfg.embed_dim, cfg.depth) == (1024, 24):
        return "large"
    return f"custom (D {cfg.embed_dim}, {cfg.depth} blocks)"


def _count_tensors(state: Mapping[str, Any]) -> int:
    """Tensors in a (possibly nested, like the released ``_ema``) state dict."""
    return sum(_count_tensors(v) if isinstance(v, Mapping) else int(isinstance(v, Tensor)) for v in state.values())


def _plain_tensor(value: Any, name: str) -> Tensor:
    """A plain ``torch.Tensor`` (Parameters unwrapped) or ConversionError."""
    if not isinstance(value, Tensor):
        raise ConversionError(f"state entry {name!r} is a {type(value).__name__}, not a tensor")
    return value.detach() if isinstance(value, torch.nn.Parameter) else value


def _heads_from(cfg_model: Any, embed_dim: int, default: int) -> int:
    """Attention heads recorded in a source model cfg (if valid for ``embed_dim``), else ``default``."""
    for path in (("num_heads",), ("pretrained_model_args", "model", "num_heads"), ("num_attention_heads",)):
        value = dig(cfg_model, *path)
        if isinstance(value, int) and value > 0 and embed_dim % value == 0:
            return value
    if embed_dim not in RELEASED_HEADS:
        # shapes fix the released sizes only; a wrong guess would load silently and compute garbage
        raise ConversionError(
            f"cannot tell the number of attention heads of a D={embed_dim} model: the source records none "
            "(released sizes are D 768 / 12 heads and D 1024 / 16 heads)"
        )
    return default


def _expected_shapes(kind: str, pre: PretrainConfig, num_classes: int | None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the model the converted state will be loaded into (built on ``meta``)."""
    with torch.device("meta"):
        if kind == "pretrained":
            from eat_fairseq.model.pretraining import EATPretrainingModel

            model: torch.nn.Module = EATPretrainingModel(pre)
        else:
            from eat_fairseq.model.classifier import EATClassifier

            model = EATClassifier(pre.encoder, int(num_classes or 1))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_against_model(state: Mapping[str, Tensor], kind: str, pre: PretrainConfig, num_classes: int | None) -> None:
    """ConversionError listing missing / unexpected / mis-shaped keys."""
    expected = _expected_shapes(kind, pre, num_classes)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}")
        if wrong:
            parts.append(
                "wrong shapes " + ", ".join(f"{k}: {tuple(state[k].shape)} vs {expected[k]}" for k in wrong[:8])
            )
        raise ConversionError(f"converted {kind} state does not fit the model: " + "; ".join(parts))


def _pretrain_config(state: Mapping[str, Tensor], enc: EncoderConfig, cfg_model: Any) -> PretrainConfig:
    """PretrainConfig: decoder from the decoder tensors, the rest from the source cfg or the size preset."""
    base = PretrainConfig.large() if _size_name(enc) == "large" else PretrainConfig.base()
    values = {name: getattr(base, name) for name in _PRETRAIN_FIELDS}
    values["average_top_k_layers"] = enc.depth
    source = {
        "clone_batch": ("clone_batch",),
        "average_top_k_layers": ("average_top_k_layers",),
        "ema_decay": ("ema_decay",),
        "ema_end_decay": ("ema_end_decay",),
        "ema_anneal_end_step": ("ema_anneal_end_step",),
        "mask_prob": ("modalities", "image", "mask_prob"),
        "mask_prob_adjust": ("modalities", "image", "mask_prob_adjust"),
        "mask_length": ("modalities", "image", "mask_length"),
    }
    for name, path in source.items():
        value = dig(cfg_model, *path)
        if value is None:
            value = dig(cfg_model, name)  # our own flat cfg
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[name] = type(values[name])(value)
    for name in ("utterance_loss_weight", "utterance_reduction", "mask_noise_std", "teacher_precision"):
        value = dig(cfg_model, name)
        if value is not None and isinstance(value, type(values[name])):
            values[name] = value
    if dig(cfg_model, "ema_same_dtype") is False:  # the release's switch for an fp32 teacher forward
        values["teacher_precision"] = "fp32"
    blocks = sorted(
        int(k.split(".")[2]) for k in state if k.startswith("decoder.blocks.") and k.endswith(".conv.weight")
    )
    if blocks:
        w = state[f"decoder.blocks.{blocks[0]}.conv.weight"]  # (decoder_dim, D / groups, k, k)
        values["decoder_dim"] = int(w.shape[0])
        values["decoder_kernel_size"] = int(w.shape[-1])
        values["decoder_groups"] = max(1, enc.embed_dim // int(w.shape[1]))
    values["decoder_depth"] = len(blocks)
    if "decoder.proj.weight" in state and not blocks:
        values["decoder_dim"] = int(state["decoder.proj.weight"].shape[1])
    values["average_top_k_layers"] = min(max(1, int(values["average_top_k_layers"])), enc.depth)
    return PretrainConfig(encoder=enc, **values)


def _extend_tables(state: dict[str, Tensor], enc: EncoderConfig, summary: ConversionSummary) -> EncoderConfig:
    """Extend short position tables (student and teacher) to 768 time patches; updates the summary."""
    keys = [k for k in ("encoder.pos_embed", "teacher.pos_embed") if k in state]
    if not keys:
        return enc
    rows = int(state[keys[0]].shape[1])
    full = FULL_MAX_LENGTH * enc.grid_w
    if rows >= full:
        summary.positions = f"kept ({rows} rows)"
        return dataclasses.replace(enc, max_length=rows // enc.grid_w)
    for key in keys:
        try:
            state[key] = extend_positions(state[key], FULL_MAX_LENGTH, grid_w=enc.grid_w)
        except ValueError as exc:
            raise ConversionError(f"{key}: {exc}") from exc
    summary.positions = f"extended {rows} -> {full} rows (checked against the sin-cos formula)"
    summary.positions_extended = True
    return dataclasses.replace(enc, max_length=FULL_MAX_LENGTH)


def _labels_to_ints(labels: Any) -> dict[str, int]:
    """Released ``{label: "index"}`` (or ``{label: index}``) -> ``{str: int}``; ConversionError if malformed."""
    if not isinstance(labels, Mapping):
        raise ConversionError(f"task_state labels must be a mapping, got {type(labels).__name__}")
    out: dict[str, int] = {}
    for label, index in labels.items():
        try:
            out[str(label)] = int(index)
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"label {label!r} has a non-integer index {index!r}") from exc
    if sorted(out.values()) != list(range(len(out))):
        raise ConversionError("label indices are not a permutation of 0..N-1")
    return out


def _task_defaults(num_classes: int | None) -> dict[str, Any]:
    """Feature settings per dataset: AudioSet (and pre-training), ESC-50 (50 classes), SPC-2 (35), from
    the one source of each (:class:`~eat_fairseq.data.feature_settings.FeatureConfig`'s presets; which
    dataset a head belongs to: :func:`~eat_fairseq.checkpoints.released_cfg.finetune_dataset_kind`)."""
    from eat_fairseq.data.feature_settings import FeatureConfig

    kind = "audioset" if num_classes is None else finetune_dataset_kind(num_classes)
    features = {"audioset": FeatureConfig.audioset, "esc50": FeatureConfig.esc50,
                "spc2": FeatureConfig.speech_commands}[kind]()
    return {"sample_rate": features.sample_rate, "target_length": features.target_length,
            "norm_mean": features.norm_mean, "norm_std": features.norm_std, "multi_label": kind != "esc50"}


# --------------------------------------------------------------------------------------------------
# our checkpoint


def build_checkpoint(
    kind: str,
    state: Mapping[str, Tensor],
    pretrain_cfg: PretrainConfig,
    num_classes: int | None = None,
    labels: Mapping[str, int] | None = None,
    task_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """OUR checkpoint dict (module docstring) for a state dict already in the core's names."""
    if kind not in KINDS:
        raise ConversionError(f"kind must be one of {KINDS}, got {kind!r}")
    enc = pretrain_cfg.encoder
    model_cfg: dict[str, Any] = {k: getattr(enc, k) for k in _ENCODER_FIELDS}
    task = _task_defaults(num_classes if kind == "finetuned" else None)
    if kind == "pretrained":
        model_cfg = {"_name": OUR_PRETRAIN_MODEL, **model_cfg}
        model_cfg.update({k: getattr(pretrain_cfg, k) for k in _PRETRAIN_FIELDS})
        task.pop("multi_label")
        task_cfg = {
            "_name": OUR_PRETRAIN_TASK,
            "data": "",
            **task,
            "clone_batch": pretrain_cfg.clone_batch,
            "mask_prob": pretrain_cfg.mask_prob,
            "mask_length": pretrain_cfg.mask_length,
            "mask_prob_adjust": pretrain_cfg.mask_prob_adjust,
            "seed": 1,
        }
        criterion = OUR_PRETRAIN_CRITERION
    else:
        model_cfg = {"_name": OUR_CLS_MODEL, **model_cfg, "drop_path_rate": 0.1}
        model_cfg.update({"num_classes": int(num_classes or 0), "pooling": "cls"})
        task_cfg = {"_name": OUR_CLS_TASK, "data": "", **task, "seed": 1}
        criterion = OUR_CLS_CRITERION
    task_cfg.update(task_overrides or {})
    return {
        "args": None,
        "cfg": {
            "_name": None,
            "common": {"seed": 1, "cpu": False, "fp16": False, "bf16": False, "user_dir": None},
            "task": task_cfg,
            "model": model_cfg,
            "criterion": {"_name": criterion},
        },
        "model": {k: _plain_tensor(v, k) for k, v in state.items()},
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "EATUFOCriterion" if kind == "pretrained" else "EATClassificationCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {},
                "num_updates": 0,
            }
        ],
        "task_state": {"labels": dict(labels)} if labels else {},
        "extra_state": {},
    }


# --------------------------------------------------------------------------------------------------
# source detection and conversion


def detect_source(ckpt: Mapping[str, Any]) -> tuple[str, str]:
    """``(source_format, kind)`` of a loaded ``.pt`` dict: ``released`` or ``eat``; ``pretrained`` or ``finetuned``.

    The cfg's ``model._name`` decides when present; otherwise the state-dict names do.
    """
    cfg = to_plain(ckpt.get("cfg")) if "cfg" in ckpt else None
    name = dig(cfg, "model", "_name")
    if name is None and ckpt.get("args") is not None:
        args = to_plain(ckpt.get("args"))
        name = dig(args, "arch") or dig(args, "_name")
    by_name = {
        RELEASED_PRETRAIN_NAME: ("released", "pretrained"),
        RELEASED_FINETUNE_NAME: ("released", "finetuned"),
        OUR_PRETRAIN_MODEL: ("eat", "pretrained"),
        OUR_CLS_MODEL: ("eat", "finetuned"),
    }
    if name in by_name:
        return by_name[name]
    state = ckpt.get("model", ckpt)
    if not isinstance(state, Mapping):
        raise ConversionError("no state dict ('model') in the checkpoint")
    keys = list(state)
    if "_ema" in state or any(k.startswith("modality_encoders.") for k in keys):
        return "released", "pretrained"
    if any(k.startswith("model.modality_encoders.") for k in keys):
        return "released", "finetuned"
    if any(k.startswith(("teacher.", "decoder.")) for k in keys):
        return "eat", "pretrained"
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("head.") for k in keys):
        return "eat", "finetuned"
    raise ConversionError(
        f"unrecognised checkpoint (cfg model name {name!r}; first keys {keys[:5]}): "
        "expected a released EAT file (data2vec_multi / mae_image_classification) or one of ours"
    )


def _resolve_kind(requested: str, detected: str) -> str:
    if requested not in ("auto", *KINDS):
        raise ConversionError(f"kind must be auto, pretrained or finetuned, got {requested!r}")
    if requested != "auto" and requested != detected:
        raise ConversionError(f"--kind {requested} was requested but the file holds a {detected} model")
    return detected


def _finish(
    state: dict[str, Tensor],
    kind: str,
    cfg_model: Any,
    summary_format: str,
    labels: dict[str, int] | None,
    notes: list[str],
    task_overrides: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], ConversionSummary]:
    """Shared tail: sizes, heads, positions, config, checks, summary."""
    try:
        enc = infer_encoder_config(state)
    except KeyError as exc:
        raise ConversionError(str(exc)) from exc
    enc = dataclasses.replace(enc, num_heads=_heads_from(cfg_model, enc.embed_dim, enc.num_heads))
    summary = ConversionSummary(summary_format, kind, _size_name(enc), enc, notes=list(notes))
    enc = _extend_tables(state, enc, summary)
    if kind == "pretrained":
        pre = _pretrain_config(state, enc, cfg_model)
        num_classes = None
    else:
        pre = PretrainConfig(encoder=enc)
        if "head.weight" not in state:
            raise ConversionError("a fine-tuned checkpoint needs head.weight")
        num_classes = int(state["head.weight"].shape[0])
        summary.num_classes = num_classes
        if labels is not None:
            summary.num_labels = len(labels)
            if len(labels) != num_classes:
                raise ConversionError(f"the label map has {len(labels)} labels but the head has {num_classes} outputs")
        else:
            summary.notes.append("no label map in the source: task_state has no labels")
    summary.encoder = enc
    _check_against_model(state, kind, pre, num_classes)
    ckpt = build_checkpoint(kind, state, pre, num_classes, labels, task_overrides)
    summary.num_tensors = _count_tensors(ckpt["model"])
    return ckpt, summary


def _released_task_overrides(cfg: Any) -> dict[str, Any]:
    """Feature settings the released task cfg records (only plain numbers are taken)."""
    out: dict[str, Any] = {}
    for key in ("target_length", "norm_mean", "norm_std", "sample_rate"):
        value = dig(cfg, "task", key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


def convert_released(ckpt: Mapping[str, Any], kind: str = "auto") -> tuple[dict[str, Any], ConversionSummary]:
    """A loaded released ``.pt`` (pre-trained ``data2vec_multi`` or fine-tuned
    ``mae_image_classification``) -> ``(our checkpoint, summary)``."""
    fmt, detected = detect_source(ckpt)
    if fmt != "released":
        raise ConversionError(f"not a released EAT checkpoint (looks like {fmt})")
    kind = _resolve_kind(kind, detected)
    cfg = to_plain(ckpt.get("cfg")) or {}
    raw = ckpt.get("model")
    if not isinstance(raw, Mapping):
        raise ConversionError("released checkpoint has no 'model' state dict")
    try:
        state = from_released(raw)
    except KeyError as exc:
        raise ConversionError(f"released state dict: {exc}") from exc
    notes: list[str] = []
    labels = None
    if kind == "pretrained":
        if not any(k.startswith("teacher.") for k in state):
            raise ConversionError("released pre-trained checkpoint has no '_ema' teacher weights")
        if not any(k.startswith("decoder.") for k in state):
            raise ConversionError("released pre-trained checkpoint has no decoder weights")
    else:
        task_labels = dig(to_plain(ckpt.get("task_state")), "labels")
        labels = _labels_to_ints(task_labels) if task_labels is not None else None
    return _finish(dict(state), kind, cfg.get("model"), "released", labels, notes, _released_task_overrides(cfg))


def _hf_labels(config: Mapping[str, Any] | None) -> dict[str, int] | None:
    """Label map from a Hugging Face ``config.json`` (``label2id`` or ``id2label``)."""
    if not config:
        return None
    if isinstance(config.get("label2id"), Mapping) and config["label2id"]:
        return _labels_to_ints(config["label2id"])
    if isinstance(config.get("id2label"), Mapping) and config["id2label"]:
        return _labels_to_ints({v: k for k, v in config["id2label"].items()})
    return None


def convert_hf(
    tensors: Mapping[str, Tensor], config: Mapping[str, Any] | None = None, kind: str = "auto"
) -> tuple[dict[str, Any], ConversionSummary]:
    """The Hugging Face port's tensors (+ its optional ``config.json``) -> ``(our checkpoint, summary)``.

    With a ``head`` the result is a classifier. Without one the port holds only the encoder; the
    result is then a pre-training checkpoint whose EMA teacher starts as a copy of that encoder and
    whose CNN decoder (absent from the port) is freshly initialised with seed 0; the summary says so.
    """
    try:
        state = dict(from_hf(tensors))
    except KeyError as exc:
        raise ConversionError(f"Hugging Face state dict: {exc}") from exc
    detected = "finetuned" if "head.weight" in state else "pretrained"
    kind = _resolve_kind(kind, detected)
    notes: list[str] = []
    if kind == "finetuned":
        notes.append("Hugging Face port: its fc_norm used eps 1e-5, ours uses 1e-6 (weights unchanged)")
    cfg_model = dict(config or {})
    if "encoder.pos_embed" not in state:
        try:
            enc = infer_encoder_config(state)
        except KeyError as exc:
            raise ConversionError(str(exc)) from exc
        from eat_fairseq.model.encoder import sincos_pos_embed_2d

        state["encoder.pos_embed"] = sincos_pos_embed_2d(enc.embed_dim, FULL_MAX_LENGTH, enc.grid_w).unsqueeze(0)
        notes.append("no position table in the source: generated the fixed sin-cos table")
    if kind == "pretrained":
        enc = infer_encoder_config(state)
        enc = dataclasses.replace(enc, num_heads=_heads_from(cfg_model, enc.embed_dim, enc.num_heads))
        for key in [k for k in state if k.startswith("encoder.")]:
            state["teacher." + key[len("encoder.") :]] = state[key]  # shared: saved once, copied on load
        pre = PretrainConfig.large(encoder=enc) if _size_name(enc) == "large" else PretrainConfig.base(encoder=enc)
        from eat_fairseq.model.decoder import CNNDecoder

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            decoder = CNNDecoder(
                enc.embed_dim,
                decoder_dim=pre.decoder_dim,
                depth=pre.decoder_depth,
                kernel_size=pre.decoder_kernel_size,
                groups=pre.decoder_groups,
                noise_std=pre.mask_noise_std,
            )
        state.update({"decoder." + k: v.detach() for k, v in decoder.state_dict().items()})
        state["num_ema_updates"] = torch.zeros((), dtype=torch.long)
        notes.append("encoder-only source: teacher copied from the encoder, CNN decoder freshly initialised (seed 0)")
    labels = _hf_labels(config) if kind == "finetuned" else None
    return _finish(state, kind, cfg_model, "huggingface", labels, notes)


def convert_ours(ckpt: Mapping[str, Any], kind: str = "auto") -> tuple[dict[str, Any], ConversionSummary]:
    """Re-validate one of OUR checkpoints and rewrite it in the canonical layout (training state dropped)."""
    fmt, detected = detect_source(ckpt)
    if fmt != "eat":
        raise ConversionError(f"not an eat_fairseq checkpoint (looks like {fmt})")
    kind = _resolve_kind(kind, detected)
    cfg = to_plain(ckpt.get("cfg")) or {}
    state = ckpt.get("model")
    if not isinstance(state, Mapping):
        raise ConversionError("checkpoint has no 'model' state dict")
    labels = dig(to_plain(ckpt.get("task_state")), "labels")
    labels = _labels_to_ints(labels) if labels is not None else None
    task = {k: v for k, v in (cfg.get("task") or {}).items() if k != "_name" and not isinstance(v, (dict, list))}
    return _finish(dict(state), kind, cfg.get("model"), "eat", labels, [], task)


def convert_to_released(ckpt: Mapping[str, Any], kind: str = "auto") -> tuple[dict[str, Any], ConversionSummary]:
    """One of OUR checkpoints -> ``(released-layout checkpoint, summary)``.

    The state dict is mapped name by name (tensors unchanged; the EMA counter, which the release
    does not store, is dropped). The cfg is the complete one the release's own configs give this
    model (:mod:`eat_fairseq.checkpoints.released_cfg`): model shape, EAT's training fields, the real
    target length and masking, and the run's optimisation settings when ``ckpt`` records them.
    Labels are stored as the release does, ``{label: "index"}``.
    """
    ours, summary = convert_ours(ckpt, kind)
    training = to_plain(ckpt.get("cfg")) or {}
    model_cfg = ours["cfg"]["model"]
    task_cfg = ours["cfg"]["task"]
    state = to_released(ours["model"])
    if summary.kind == "pretrained":
        cfg = released_pretraining_cfg(model_cfg, task_cfg, training)
        if str(model_cfg.get("utterance_reduction", "release")) != "release":
            summary.notes.append(
                "utterance_reduction=mean has no release field: cls_loss keeps the weight, which the release "
                "applies to the SUM over the clip copies"
            )
        task_state: dict[str, Any] = {}
    else:
        size = summary.size
        preset = PretrainConfig.large() if size == "large" else PretrainConfig.base()
        pretrain_model = {**model_cfg, **{k: getattr(preset, k) for k in _PRETRAIN_FIELDS}}
        if size not in ("base", "large"):  # a custom size: a decoder and target depth that fit it
            pretrain_model.update(decoder_dim=model_cfg["embed_dim"], average_top_k_layers=model_cfg["depth"])
        cfg = released_finetuning_cfg(model_cfg, task_cfg, pretrain_model, training)
        summary.notes.append(
            "pretrained_model_args: the size preset's pre-training settings (the classifier does not record them)"
        )
        labels = ours["task_state"].get("labels")
        task_state = {"labels": {k: str(v) for k, v in labels.items()}} if labels else {}
    released = {
        "args": None,
        "cfg": cfg,
        "model": state,
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "ModelCriterion",
                "optimizer_name": "FairseqCompositeOptimizer",
                "lr_scheduler_state": {},
                "num_updates": 0,
            }
        ],
        "task_state": task_state,
        "extra_state": {},
    }
    summary.target = "released"
    summary.num_tensors = _count_tensors(state)
    return released, summary


# --------------------------------------------------------------------------------------------------
# files


def is_safetensors(path: str) -> bool:
    """By suffix, or by the safetensors header (8-byte little-endian length, then a JSON object)."""
    if path.endswith(".safetensors"):
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 32)


def _read_hf_config(path: str) -> dict[str, Any] | None:
    """``config.json`` next to a safetensors file, if any (plain JSON: no code)."""
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(cfg_path):
        return None
    try:
        with open(cfg_path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{cfg_path}: unreadable config.json: {exc}") from exc
    return data if isinstance(data, dict) else None


def _read_source(path: str, kind: str) -> tuple[dict[str, Any], ConversionSummary, Mapping[str, Any] | None]:
    """``(our checkpoint, summary, the loaded .pt when it is one of ours)`` for any source file."""
    try:
        if is_safetensors(path):
            ours, summary = convert_hf(load_safetensors(path), _read_hf_config(path), kind)
            return ours, summary, None
        ckpt = load_checkpoint(path)
        if detect_source(ckpt)[0] == "released":
            ours, summary = convert_released(ckpt, kind)
            return ours, summary, None
        ours, summary = convert_ours(ckpt, kind)
        return ours, summary, ckpt
    except ConversionError as exc:
        raise ConversionError(f"{path}: {exc}") from exc


def read_any(path: str | os.PathLike, kind: str = "auto") -> tuple[dict[str, Any], ConversionSummary]:
    """Read a released ``.pt``, a Hugging Face ``.safetensors`` or one of ours -> ``(our checkpoint, summary)``.

    Errors name the file: :class:`CheckpointError` for unreadable files, :class:`ConversionError`
    for files that are readable but not convertible.
    """
    ours, summary, _ = _read_source(os.fspath(path), kind)
    return ours, summary


_KEPT: dict[tuple, dict[str, Any]] = {}


def load_ours(path: str | os.PathLike, trusted: bool = False, keep: bool = False, mmap: bool = False) -> dict[str, Any]:
    """Any checkpoint the project reads, in our layout: THE checkpoint loader of every consumer.

    ``load_model`` (inference, eat-extract, eat-tag, HEAR), ``eat-evaluate`` and fine-tuning's
    ``model.model_path`` all read checkpoints here. Our own files are used as they are (plain ``cfg``
    and ``task_state`` containers, no re-validation pass); a released ``.pt`` and the Hugging Face
    ``.safetensors`` port are converted in memory by the same code as ``eat-convert``. Reading goes
    through the restricted unpickler (:func:`eat_fairseq.checkpoints.load.load_checkpoint`) unless
    ``trusted``. ``keep``: remember this one file (keyed by path and modification time) for the next
    call, because building a fine-tuning model reads it twice (config, then weights). ``mmap``: map
    the ``.pt``'s tensors instead of reading them (:func:`~eat_fairseq.checkpoints.load.load_checkpoint`),
    so that parts the caller does not use (a pre-training checkpoint's teacher, decoder and optimiser
    state) are never read; the caller must copy what it keeps, since the mapping follows the file
    (and so not with ``keep``, whose cache checks only the modification time).
    Errors name the file: :class:`CheckpointError` for unreadable files, :class:`ConversionError` for
    the rest.
    """
    path = os.fspath(path)
    if keep and mmap:
        raise ValueError("load_ours: keep and mmap do not go together (a kept mapping would follow the file)")
    key = (os.path.abspath(path), os.path.getmtime(path) if os.path.exists(path) else None, trusted, mmap)
    if key in _KEPT:
        return _KEPT[key]
    if is_safetensors(path):
        ours, _ = read_any(path)
    else:
        ckpt = load_checkpoint(path, trusted=trusted, mmap=mmap)
        try:
            if detect_source(ckpt)[0] == "released":
                ours, summary = convert_released(ckpt)
                logger.info("%s is a released EAT checkpoint; converted in memory:\n%s", path, "\n".join(summary.lines()))
            elif not isinstance(ckpt.get("model"), Mapping):
                raise ConversionError("no 'model' state dict in the checkpoint")
            else:
                ours = dict(ckpt)
                ours["cfg"] = to_plain(ckpt.get("cfg")) or {}
                ours["task_state"] = to_plain(ckpt.get("task_state")) or {}
        except ConversionError as exc:
            raise ConversionError(f"{path}: {exc}") from exc
    _KEPT.clear()
    if keep:
        _KEPT[key] = ours
    return ours


def convert_file(
    src: str | os.PathLike, dst: str | os.PathLike, to: str = "eat", kind: str = "auto", force: bool = False
) -> ConversionSummary:
    """Convert ``src`` and write ``dst`` (``to="eat"``: our layout; ``"released"``: the authors' layout).

    Refuses to overwrite ``dst`` unless ``force``. The file is written with ``torch.save`` to a
    temporary name, fsynced and renamed (:func:`eat_fairseq.checkpoints.atomic.atomic_write`), so a failed
    write never leaves a half-written ``dst``.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if to not in ("eat", "released"):
        raise ConversionError(f"--to must be eat or released, got {to!r}")
    if os.path.exists(dst) and not force:
        raise ConversionError(f"{dst}: already exists (use --force to overwrite)")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ConversionError(f"{dst}: source and destination are the same file")
    ours, summary, original = _read_source(src, kind)
    if to == "released":
        try:  # from the original of one of ours: its training cfg (updates, lr, batch) is kept
            out, summary = convert_to_released(original if original is not None else ours)
        except ConversionError as exc:
            raise ConversionError(f"{src}: {exc}") from exc
    else:
        out = ours
    try:
        atomic_write(dst, lambda handle: torch.save(out, handle))
    except (OSError, RuntimeError) as exc:
        raise ConversionError(f"{dst}: cannot write the converted checkpoint: {exc}") from exc
    return summary

