"""The complete training cfg the release's own configs give a model (``eat-convert --to released``).

A checkpoint written by the authors' fairseq training holds its whole resolved config. A file we
write for their tools must hold the same: their loader needs the model's shape
(``supported_modality``, ``modalities.image.num_extra_tokens``, ``prenet_depth``, ``embed_dim`` ...),
and any training field left out falls back to a data2vec default that is not EAT (``cls_loss`` 0,
no instance-norm / layer-norm targets, ``ema_encoder_only`` True, dropouts 0.1, ...). So the cfg
below is the release's recipe (``pretraining_AS2M[_large].yaml``, ``finetuning.yaml`` and its
per-dataset scripts) with everything that describes THIS model taken from our config: sizes,
masking, decoder, EMA schedule, target length, position-table length, classes, augmentations, and
the run's optimisation settings when our file records them.

Field names are data2vec 2.0's / EAT's (``data2vec_multi`` model, ``mae_image_pretraining`` and
``mae_image_classification`` tasks). The pre-training TASK section only uses fields that the
release's yaml sets: the release rebuilds that task with a strict merge when fine-tuning, so an
unknown key there would fail. Model sections are merged leniently by fairseq (unknown keys are
dropped), so they carry every field that matters.

Pure Python: no fairseq import.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from eat_fairseq.data.feature_settings import DEFAULT_TARGET_LENGTH

__all__ = ["released_pretraining_cfg", "released_finetuning_cfg", "finetune_dataset_kind"]

# EAT trains without dropout (data2vec's defaults are 0.1); the fine-tuning classifier writes the same
NO_DROPOUT = {
    "encoder_dropout": 0.0,
    "post_mlp_drop": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "dropout_input": 0.0,
    "layerdrop": 0.0,
}
PRETRAIN_LOG_KEYS = ["ema_decay", "target_var", "pred_var", "model_norm", "ema_norm", "masked_pct"]


def _get(tree: Any, *path: str, default: Any = None) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree or tree[key] is None:
            return default
        tree = tree[key]
    return tree


def _first(value: Any) -> Any:
    """fairseq stores ``optimization.lr`` / ``update_freq`` as one-element lists."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _composite_optimizer(lr: float, warmup: int, min_lr: float | None) -> dict[str, Any]:
    scheduler: dict[str, Any] = {"_name": "cosine", "warmup_updates": int(warmup)}
    if min_lr is not None:
        scheduler["min_lr"] = float(min_lr)
    return {
        "_name": "composite",
        "dynamic_groups": True,
        "groups": {
            "default": {
                "lr_float": float(lr),
                "optimizer": {"_name": "adam", "adam_betas": [0.9, 0.95], "weight_decay": 0.05},
                "lr_scheduler": scheduler,
            }
        },
    }


def _run_sections(seed: int, common: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The ``common`` and ``checkpoint`` sections both release yamls share, plus their own entries."""
    return {
        "_name": None,
        "common": {
            "fp16": True,
            "log_format": "json",
            "log_interval": 200,
            "tensorboard_logdir": "tb",
            "fp16_no_flatten_grads": True,
            "user_dir": None,
            "seed": seed,
            **common,
        },
        "checkpoint": {
            "save_interval": 1,
            "save_interval_updates": 10000,
            "keep_interval_updates": 1,
            "no_epoch_checkpoints": True,
            **checkpoint,
        },
    }


def _image_modality(model: Mapping[str, Any], target_length: int) -> dict[str, Any]:
    """``model.modalities.image``: patch embedding, masking, CNN decoder, positions, CLS token."""
    embed_dim = int(model["embed_dim"])
    return {
        "type": "IMAGE",
        "prenet_depth": 0,  # data2vec's default is 4 extra blocks; EAT has none
        "prenet_layerdrop": 0.0,
        "prenet_dropout": 0.0,
        "start_drop_path_rate": 0.0,
        "end_drop_path_rate": 0.0,
        "num_extra_tokens": 1,  # the CLS token
        "init_extra_token_zero": False,  # CLS ~ N(0, 1)
        "mask_noise_std": float(model.get("mask_noise_std", 0.01)),
        "mask_prob_min": None,
        "mask_prob": float(model["mask_prob"]),
        "inverse_mask": True,
        "mask_prob_adjust": float(model["mask_prob_adjust"]),
        "keep_masked_pct": 0.0,
        "mask_length": int(model["mask_length"]),
        "add_masks": False,
        "remove_masks": False,
        "mask_dropout": 0.0,
        "encoder_zero_mask": True,
        "mask_channel_prob": 0.0,
        "mask_channel_length": 64,
        "ema_local_encoder": True,  # the teacher has its own patch embedding (EMA of the student's)
        "local_grad_mult": 1.0,
        "use_alibi_encoder": False,
        "alibi_scale": 1.0,
        "learned_alibi": False,
        "alibi_max_pos": None,
        "learned_alibi_scale": False,
        "learned_alibi_scale_per_head": False,
        "learned_alibi_scale_per_layer": False,
        "num_alibi_heads": int(model["num_heads"]),
        "model_depth": int(model["depth"]),
        "decoder": {
            "decoder_dim": int(model["decoder_dim"]),
            "decoder_groups": int(model["decoder_groups"]),
            "decoder_kernel": int(model["decoder_kernel_size"]),
            "decoder_layers": int(model["decoder_depth"]),
            "input_dropout": 0.0,
            "add_positions_masked": False,
            "add_positions_all": False,
            "decoder_residual": True,
            "projection_layers": 1,
            "projection_ratio": 2.0,
        },
        "input_size": 224,
        "in_chans": int(model.get("in_chans", 1)),
        "patch_size": int(model.get("patch_size", 16)),
        "embed_dim": embed_dim,  # must equal the model's D, else the release inserts a Linear
        "alibi_dims": 2,
        "alibi_distance": "manhattan",
        "fixed_positions": True,
        "transformer_decoder": False,
        "enc_dec_transformer": False,
        "target_length": int(target_length),  # sets the decoder's time grid (target_length / 16)
        "max_length": int(model.get("max_length", 768)),  # time patches of the sin-cos table
    }


def released_pretraining_cfg(
    model: Mapping[str, Any], task: Mapping[str, Any], training: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The release's full cfg for one of our pre-training models.

    ``model``: our flat ``eat`` model cfg (encoder + :class:`~eat_fairseq.model.pretraining.PretrainConfig`
    fields); ``task``: our task cfg (``target_length``); ``training``: the whole cfg of the run that
    produced the weights, if known (``optimization``, ``dataset``, ``lr_scheduler``, ``common``,
    ``distributed_training``), whose values replace the recipe's.
    """
    training = training or {}
    large = (int(model["embed_dim"]), int(model["depth"])) == (1024, 24)
    target_length = int(task.get("target_length", DEFAULT_TARGET_LENGTH))
    max_update = int(_get(training, "optimization", "max_update", default=400000))
    lr = float(_first(_get(training, "optimization", "lr", default=[0.0004 if large else 0.0005])))
    warmup = int(_get(training, "lr_scheduler", "warmup_updates", default=53333))
    clip_norm = float(_get(training, "optimization", "clip_norm", default=4.0))
    seed = int(_get(training, "common", "seed", default=1))
    batch = int(_get(training, "dataset", "batch_size", default=12))
    world = int(_get(training, "distributed_training", "distributed_world_size", default=4))
    teacher_half = str(model.get("teacher_precision", "release")) == "release"
    cfg_model = {
        "_name": "data2vec_multi",
        "loss_beta": 0.0,  # squared error
        "loss_scale": None,  # 1 / sqrt(D)
        "depth": int(model["depth"]),
        "start_drop_path_rate": 0.0,
        "end_drop_path_rate": 0.0,
        "num_heads": int(model["num_heads"]),
        "norm_eps": float(model.get("norm_eps", 1e-6)),
        "norm_affine": True,
        **NO_DROPOUT,
        "embed_dim": int(model["embed_dim"]),
        "mlp_ratio": float(model.get("mlp_ratio", 4.0)),
        "layer_norm_first": False,  # post-LN blocks
        "average_top_k_layers": int(model["average_top_k_layers"]),
        "end_of_block_targets": False,  # targets are the FFN outputs
        "clone_batch": int(model["clone_batch"]),
        "layer_norm_target_layer": False,
        "batch_norm_target_layer": False,
        "instance_norm_target_layer": True,
        "instance_norm_targets": False,
        "layer_norm_targets": True,
        "ema_decay": float(model["ema_decay"]),
        "ema_same_dtype": teacher_half,  # True: teacher forward in the student's dtype
        "log_norms": True,
        "ema_end_decay": float(model["ema_end_decay"]),
        "ema_anneal_end_step": int(model["ema_anneal_end_step"]),
        "ema_encoder_only": False,  # EMA of the whole encoder incl. patch embedding and CLS
        "max_update": max_update,
        "modalities": {"image": _image_modality(model, target_length)},
        "shared_decoder": None,
        "min_target_var": 0.0,
        "min_pred_var": 0.0,
        "supported_modality": "IMAGE",
        "mae_init": False,
        "seed": seed,
        "skip_ema": False,
        "cls_loss": float(model.get("utterance_loss_weight", 1.0)),  # the utterance (CLS) loss
        "recon_loss": 0.0,
        "d2v_loss": 1.0,  # the frame loss
        "decoder_group": False,
    }
    cfg_task = {
        "_name": "mae_image_pretraining",
        "data": "",
        "rebuild_batches": True,
        "key": "source",
        "precompute_mask_config": {
            "patch_size": int(model.get("patch_size", 16)),
            "mask_prob": float(model["mask_prob"]),
            "mask_prob_adjust": float(model["mask_prob_adjust"]),
            "mask_length": int(model["mask_length"]),
            "inverse_mask": True,
            "mask_dropout": 0.0,
            "clone_batch": int(model["clone_batch"]),
            "expand_adjacent": False,
            "non_overlapping": False,
        },
        "seed": seed,
        "downsr_16hz": True,
        "audio_mae": True,
        "h5_format": False,
        "target_length": target_length,
        "flexible_mask": False,
    }
    return {
        **_run_sections(seed, {"min_loss_scale": 1e-6}, {}),
        "task": cfg_task,
        "dataset": {
            "num_workers": 10,
            "batch_size": batch,
            "skip_invalid_size_inputs_valid_test": True,
            "required_batch_size_multiple": 1,
            "disable_validation": True,
        },
        "distributed_training": {"distributed_world_size": world, "ddp_backend": "c10d"},
        "criterion": {"_name": "model", "log_keys": list(PRETRAIN_LOG_KEYS)},
        "optimization": {"max_update": max_update, "lr": [lr], "debug_param_names": True, "clip_norm": clip_norm},
        "optimizer": _composite_optimizer(lr, warmup, None),
        "lr_scheduler": {"_name": "pass_through"},
        "model": cfg_model,
    }


def finetune_dataset_kind(num_classes: int) -> str:
    """Which of the release's fine-tuning scripts a head of this size belongs to."""
    return {50: "esc50", 35: "spc2"}.get(int(num_classes), "audioset")


# per dataset: the release's finetuning.yaml plus the overrides of its scripts (docs/reference.md section 4)
_FINETUNE_RECIPES: dict[str, dict[str, Any]] = {
    "audioset": {"batch": 96, "lr": 5e-5, "max_update": 300000, "warmup": 30000, "target_length": 1024,
                 "mixup": 0.8, "mask_ratio": 0.2, "label_smoothing": 0.0, "noise": False, "seed": 1,
                 "metric": "mAP", "log_keys": ["_predictions", "_targets"]},
    "esc50": {"batch": 48, "lr": 5e-5, "max_update": 4000, "warmup": 400, "target_length": 512,
              "mixup": 0.0, "mask_ratio": 0.4, "label_smoothing": 0.1, "noise": False, "seed": 1,
              "metric": "accuracy", "log_keys": ["correct"]},
    "spc2": {"batch": 256, "lr": 2e-4, "max_update": 40000, "warmup": 4000, "target_length": 128,
             "mixup": 0.8, "mask_ratio": 0.2, "label_smoothing": 0.1, "noise": True, "seed": 42,
             "metric": "accuracy", "log_keys": ["correct"]},
}


def released_finetuning_cfg(
    model: Mapping[str, Any],
    task: Mapping[str, Any],
    pretrain_model: Mapping[str, Any],
    training: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The release's full cfg for one of our fine-tuned classifiers.

    ``model``: our flat ``eat_classifier`` cfg; ``task``: our task cfg (``target_length``);
    ``pretrain_model``: the flat pre-training model cfg of its encoder (our size preset when unknown),
    which becomes ``model.pretrained_model_args`` as the release's classifier records it (drop path,
    dropouts and target length already set for fine-tuning); ``training``: the run's whole cfg if known.
    """
    training = training or {}
    kind = finetune_dataset_kind(int(model["num_classes"]))
    recipe = _FINETUNE_RECIPES[kind]

    def run(key: str, default: Any) -> Any:  # the run's model setting, else ours, else the default
        return _get(training, "model", key, default=model.get(key, default))

    target_length = int(task.get("target_length", recipe["target_length"]))
    drop_path = float(run("drop_path_rate", 0.1))
    depth = int(model["depth"])
    max_update = int(_get(training, "optimization", "max_update", default=recipe["max_update"]))
    lr = float(_first(_get(training, "optimization", "lr", default=[recipe["lr"]])))
    warmup = int(_get(training, "lr_scheduler", "warmup_updates", default=recipe["warmup"]))
    min_lr = float(_get(training, "lr_scheduler", "min_lr", default=1e-6))
    seed = int(_get(training, "common", "seed", default=recipe["seed"]))
    batch = int(_get(training, "dataset", "batch_size", default=recipe["batch"]))
    criterion = _get(training, "criterion", default={}) or {}
    mixup_prob = float(criterion.get("mixup_prob", 0.9 if recipe["mixup"] > 0 else 0.0))
    mixup = float(criterion.get("mixup_alpha", recipe["mixup"])) if mixup_prob > 0 else 0.0
    mask_ratio = float(criterion.get("specaug_time_ratio", recipe["mask_ratio"]))
    # ours smooths labels only with loss=ce; the release smooths in its mixup for ESC-50 and SPC-2
    ce = str(criterion.get("loss", "")) == "ce"
    smoothing = float(criterion.get("label_smoothing", 0.0)) if ce else float(recipe["label_smoothing"])
    layer_decay = float(run("layer_decay", 0.65))
    src_task = _get(training, "task", default={}) or {}
    roll_aug = bool(src_task.get("roll_and_gain", True))
    noise = bool(src_task.get("noise_and_roll", recipe["noise"]))

    # pretrained_model_args: the pre-training cfg as the release's classifier rewrites it
    # its task section stays the pre-training run's (10 s AudioSet clips); the release only rewrites
    # the image modality's target_length for the fine-tuning input (below)
    pre = released_pretraining_cfg(pretrain_model, {"target_length": 1024})
    pre["criterion"] = None
    pre["lr_scheduler"] = None
    pre_model = pre["model"]
    dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # numpy.linspace(0, rate, depth)
    pre_model["drop_path_rate"] = drop_path
    pre_model["start_drop_path_rate"] = dpr[0]
    pre_model["end_drop_path_rate"] = dpr[-1]
    image = pre_model["modalities"]["image"]
    image["start_drop_path_rate"] = dpr[0]
    image["end_drop_path_rate"] = max(0.0, dpr[-1])  # the release indexes dpr[prenet_depth - 1] = dpr[-1]
    image["target_length"] = target_length
    image["prenet_layerdrop"] = 0.0
    image["prenet_dropout"] = 0.0

    cfg_model = {
        "_name": "mae_image_classification",
        "model_path": "",
        "no_pretrained_weights": False,
        "linear_classifier": bool(run("freeze_encoder", False)),
        "num_classes": int(model["num_classes"]),
        "mixup": mixup,
        "cutmix": 0.0,
        "label_smoothing": smoothing,
        "drop_path_rate": drop_path,
        "layer_decay": layer_decay,
        "mixup_prob": mixup_prob,
        "mixup_switch_prob": 0.0,
        "mixup_mode": "batch",
        "pretrained_model_args": pre,
        "data": "",
        "norm_eps": None,
        "remove_alibi": False,
        **NO_DROPOUT,
        "prenet_layerdrop": 0.0,
        "prenet_dropout": 0.0,
        "use_fc_norm": True,
        "prediction_mode": "MEAN_POOLING" if str(run("pooling", "cls")) == "mean" else "CLS_TOKEN",
        "no_decay_blocks": True,
        "audio_mae": True,
        "esc50_eval": kind == "esc50",
        "spcv2_eval": kind == "spc2",
        "target_length": target_length,
        "specaug": mask_ratio > 0,
        "freqm": 25,
        "timem": 200,
        "mask_ratio": mask_ratio,
    }
    cfg_task = {
        "_name": "mae_image_classification",
        "data": "",
        "input_size": 224,
        "local_cache_path": None,
        "rebuild_batches": True,
        "label_descriptors": "label_descriptors.csv",
        "labels": "lbl",
        "seed": seed,
        "downsr_16hz": True,
        "audio_mae": True,
        "target_length": target_length,
        "roll_aug": roll_aug,
        "noise": noise,
        "h5_format": False,
        "weights_file": "",
        "num_samples": 200000,
        "AS2M_finetune": False,
        "spcv1_finetune": False,
        "spcv2_eval": kind == "spc2",
        "esc50_eval": kind == "esc50",
    }
    return {
        **_run_sections(seed, {}, {"best_checkpoint_metric": recipe["metric"], "maximize_best_checkpoint_metric": True}),
        "task": cfg_task,
        "dataset": {
            "num_workers": 6,
            "batch_size": batch,
            "skip_invalid_size_inputs_valid_test": True,
            "required_batch_size_multiple": 2,
            "train_subset": "train",
            "valid_subset": "eval",
        },
        "distributed_training": {"distributed_world_size": 1, "ddp_backend": "c10d"},
        "criterion": {"_name": "model", "log_keys": list(recipe["log_keys"])},
        "optimization": {"max_update": max_update, "lr": [lr]},
        "optimizer": _composite_optimizer(lr, warmup, min_lr),
        "lr_scheduler": {"_name": "pass_through"},
        "model": cfg_model,
    }
