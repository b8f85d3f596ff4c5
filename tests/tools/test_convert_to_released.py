"""``eat-convert ours.pt released.pt --to released`` writes the cfg the authors' tools need and the
release's configs would give the model (issue 11, item 2).

Their loader needs ``supported_modality``, ``modalities.image.num_extra_tokens``, ``prenet_depth`` and
``embed_dim`` (D != 768); every training field left out would fall back to a data2vec default that
is not EAT. The tables below list the fields and the values EAT uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from eat_fairseq.cli.convert import main as cli_main
from eat_fairseq.checkpoints.convert import convert_file, convert_released, read_any
from test_convert import (  # noqa: I001  (tests/ is on sys.path under pytest)
    _assert_plain,
    _cheap_fill,
    _random_fill,
    released_finetuned_state,
    released_pretrained_state,
    write_released,
)

# the release's pre-training yaml sets exactly these task fields; the release rebuilds that task with
# a strict merge when fine-tuning, so nothing else may appear there
RELEASE_PRETRAIN_TASK_KEYS = {
    "_name", "data", "rebuild_batches", "key", "precompute_mask_config", "seed", "downsr_16hz", "audio_mae",
    "h5_format", "target_length", "flexible_mask",
}
EAT_MODEL_FIELDS = {  # data2vec_multi fields whose data2vec default is not EAT's
    "supported_modality": "IMAGE",
    "cls_loss": 1.0,
    "d2v_loss": 1.0,
    "instance_norm_target_layer": True,
    "layer_norm_targets": True,
    "layer_norm_target_layer": False,
    "instance_norm_targets": False,
    "end_of_block_targets": False,
    "ema_encoder_only": False,
    "encoder_dropout": 0.0,
    "post_mlp_drop": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "dropout_input": 0.0,
    "layerdrop": 0.0,
    "layer_norm_first": False,
    "min_target_var": 0.0,
    "min_pred_var": 0.0,
    "norm_eps": 1e-6,
}
EAT_IMAGE_FIELDS = {
    "type": "IMAGE",
    "num_extra_tokens": 1,
    "prenet_depth": 0,
    "init_extra_token_zero": False,
    "ema_local_encoder": True,
    "inverse_mask": True,
    "in_chans": 1,
    "patch_size": 16,
    "use_alibi_encoder": False,
    "fixed_positions": True,
    "transformer_decoder": False,
    "mask_noise_std": 0.01,
}


def _to_ours(tmp_path: Path, kind: str, state: dict[str, Any], heads: int, **write_kw: Any) -> dict[str, Any]:
    src = tmp_path / f"released_{kind}.pt"
    write_released(src, kind, state, heads=heads, **write_kw)
    ours, _ = read_any(src)
    return ours


def _released(tmp_path: Path, ours: dict[str, Any], name: str = "back.pt") -> dict[str, Any]:
    src, dst = tmp_path / f"ours_{name}", tmp_path / name
    torch.save(ours, src)
    assert cli_main([str(src), str(dst), "--to", "released"]) == 0
    out = torch.load(dst, weights_only=True)  # plain containers only
    _assert_plain(out["cfg"])
    return out["cfg"]


def _check_pretraining_model(model: dict[str, Any], dim: int, depth: int, heads: int, target_length: int) -> None:
    for key, value in EAT_MODEL_FIELDS.items():
        assert model[key] == value, key
    assert model["_name"] == "data2vec_multi"
    assert (model["embed_dim"], model["depth"], model["num_heads"]) == (dim, depth, heads)
    assert set(model["modalities"]) == {"image"}
    image = model["modalities"]["image"]
    for key, value in EAT_IMAGE_FIELDS.items():
        assert image[key] == value, key
    assert image["embed_dim"] == dim
    assert image["target_length"] == target_length and image["max_length"] == 768
    assert image["num_alibi_heads"] == heads and image["model_depth"] == depth
    assert image["decoder"]["input_dropout"] == 0.0 and image["decoder"]["decoder_residual"] is True


def test_pretrained_base_carries_every_release_field(tmp_path: Path) -> None:
    ours = _to_ours(tmp_path, "pretrained", released_pretrained_state(768, 12, 6, 3, _cheap_fill()), heads=12)
    cfg = _released(tmp_path, ours)
    model = cfg["model"]
    _check_pretraining_model(model, 768, 12, 12, 1024)
    image = model["modalities"]["image"]
    assert (image["mask_prob"], image["mask_prob_adjust"], image["mask_length"]) == (0.8, 0.07, 5)
    decoder = image["decoder"]
    assert [decoder[k] for k in ("decoder_dim", "decoder_groups", "decoder_kernel", "decoder_layers")] == [768, 16, 3, 6]
    assert (model["average_top_k_layers"], model["clone_batch"]) == (12, 16)
    assert (model["ema_decay"], model["ema_end_decay"], model["ema_anneal_end_step"]) == (0.9998, 0.99999, 100000)
    assert model["ema_same_dtype"] is True  # teacher forward in the student's dtype (teacher_precision=release)
    task = cfg["task"]
    assert set(task) <= RELEASE_PRETRAIN_TASK_KEYS
    assert task["_name"] == "mae_image_pretraining" and task["target_length"] == 1024
    assert task["audio_mae"] is True and task["downsr_16hz"] is True and task["key"] == "source"
    assert task["precompute_mask_config"]["mask_prob"] == 0.8 and task["precompute_mask_config"]["clone_batch"] == 16
    # the release recipe's training settings
    assert cfg["optimization"]["max_update"] == 400000 and cfg["optimization"]["clip_norm"] == 4.0
    assert cfg["optimization"]["lr"] == [0.0005] and model["max_update"] == 400000
    group = cfg["optimizer"]["groups"]["default"]
    assert cfg["optimizer"]["_name"] == "composite" and group["lr_float"] == 0.0005
    assert group["optimizer"]["adam_betas"] == [0.9, 0.95] and group["optimizer"]["weight_decay"] == 0.05
    assert group["lr_scheduler"] == {"_name": "cosine", "warmup_updates": 53333}
    assert cfg["lr_scheduler"] == {"_name": "pass_through"}
    assert cfg["dataset"]["batch_size"] == 12 and cfg["distributed_training"]["distributed_world_size"] == 4
    assert cfg["criterion"]["_name"] == "model" and cfg["common"]["fp16_no_flatten_grads"] is True


def test_pretrained_large_uses_the_large_recipe(tmp_path: Path) -> None:
    ours = _to_ours(tmp_path, "pretrained", released_pretrained_state(1024, 24, 3, 5, _cheap_fill()), heads=16)
    cfg = _released(tmp_path, ours)
    model = cfg["model"]
    _check_pretraining_model(model, 1024, 24, 16, 1024)
    image = model["modalities"]["image"]
    assert (image["mask_prob"], image["mask_prob_adjust"]) == (0.75, 0.1)
    assert (image["decoder"]["decoder_layers"], image["decoder"]["decoder_kernel"]) == (3, 5)
    assert model["ema_anneal_end_step"] == 150000 and model["average_top_k_layers"] == 24
    assert cfg["optimizer"]["groups"]["default"]["lr_float"] == 0.0004


def test_custom_width_records_embed_dim_and_the_run_settings(tmp_path: Path) -> None:
    ours = _to_ours(tmp_path, "pretrained", released_pretrained_state(64, 2, 2, 3, _random_fill()), heads=4)
    # one of ours from a training run: a 512-frame target, our masking, the run's optimisation
    ours["cfg"]["task"]["target_length"] = 512
    ours["cfg"]["model"].update(mask_prob=0.7, mask_prob_adjust=0.05, clone_batch=4, teacher_precision="fp32")
    ours["cfg"].update(optimization={"max_update": 1234, "lr": [0.001], "clip_norm": 2.0},
                       lr_scheduler={"_name": "cosine", "warmup_updates": 99}, dataset={"batch_size": 5},
                       distributed_training={"distributed_world_size": 1})
    cfg = _released(tmp_path, ours)
    model = cfg["model"]
    _check_pretraining_model(model, 64, 2, 4, 512)
    image = model["modalities"]["image"]
    assert (image["mask_prob"], image["mask_prob_adjust"], model["clone_batch"]) == (0.7, 0.05, 4)
    assert cfg["task"]["precompute_mask_config"]["mask_prob"] == 0.7 and cfg["task"]["target_length"] == 512
    assert model["ema_same_dtype"] is False  # teacher_precision=fp32
    assert cfg["optimization"] == {"max_update": 1234, "lr": [0.001], "debug_param_names": True, "clip_norm": 2.0}
    assert model["max_update"] == 1234
    assert cfg["optimizer"]["groups"]["default"]["lr_scheduler"]["warmup_updates"] == 99
    assert cfg["dataset"]["batch_size"] == 5 and cfg["distributed_training"]["distributed_world_size"] == 1
    # and it reads back as the same model
    back, summary = convert_released(torch.load(tmp_path / "back.pt", weights_only=True))
    assert summary.encoder.num_heads == 4 and back["cfg"]["task"]["target_length"] == 512
    assert back["cfg"]["model"]["mask_prob"] == 0.7 and back["cfg"]["model"]["teacher_precision"] == "fp32"


def test_finetuned_esc50_carries_the_classifier_and_its_pretraining_cfg(tmp_path: Path) -> None:
    labels = {f"/m/c{i:02d}": str(i) for i in range(50)}
    ours = _to_ours(tmp_path, "finetuned", released_finetuned_state(768, 12, 50, _cheap_fill()), heads=12,
                    labels=labels)
    assert ours["cfg"]["task"]["target_length"] == 512  # ESC-50
    cfg = _released(tmp_path, ours, "ft.pt")
    model = cfg["model"]
    assert model["_name"] == "mae_image_classification" and model["num_classes"] == 50
    assert model["prediction_mode"] == "CLS_TOKEN" and model["use_fc_norm"] is True
    assert (model["drop_path_rate"], model["layer_decay"], model["target_length"]) == (0.1, 0.65, 512)
    assert model["esc50_eval"] is True and model["spcv2_eval"] is False
    assert (model["mixup"], model["label_smoothing"], model["mask_ratio"], model["specaug"]) == (0.0, 0.1, 0.4, True)
    for key in ("encoder_dropout", "post_mlp_drop", "attention_dropout", "activation_dropout", "dropout_input"):
        assert model[key] == 0.0, key
    pre = model["pretrained_model_args"]
    assert pre["criterion"] is None and pre["lr_scheduler"] is None
    # the pre-training task keeps its own 1024 frames; the model's image modality gets the 512 of ESC-50
    assert set(pre["task"]) <= RELEASE_PRETRAIN_TASK_KEYS and pre["task"]["target_length"] == 1024
    _check_pretraining_model(pre["model"], 768, 12, 12, 512)
    assert pre["model"]["drop_path_rate"] == 0.1
    assert (pre["model"]["start_drop_path_rate"], pre["model"]["end_drop_path_rate"]) == (0.0, 0.1)
    task = cfg["task"]
    assert task["_name"] == "mae_image_classification" and task["target_length"] == 512
    assert task["esc50_eval"] is True and task["roll_aug"] is True and task["labels"] == "lbl"
    assert cfg["optimization"] == {"max_update": 4000, "lr": [5e-5]}
    sched = cfg["optimizer"]["groups"]["default"]["lr_scheduler"]
    assert sched == {"_name": "cosine", "warmup_updates": 400, "min_lr": 1e-6}
    assert cfg["checkpoint"]["best_checkpoint_metric"] == "accuracy" and cfg["dataset"]["batch_size"] == 48
    assert torch.load(tmp_path / "ft.pt", weights_only=True)["task_state"]["labels"] == labels


def test_finetuned_audioset_from_our_training_run(tmp_path: Path) -> None:
    ours = _to_ours(tmp_path, "finetuned", released_finetuned_state(64, 2, 5, _random_fill(2)), heads=4)
    ours["cfg"]["model"]["pooling"] = "mean"
    ours["cfg"].update(
        model={**ours["cfg"]["model"], "layer_decay": 0.75, "drop_path_rate": 0.2, "pooling": "mean"},
        optimization={"max_update": 777, "lr": [1e-4]},
        lr_scheduler={"_name": "eat_cosine", "warmup_updates": 77, "min_lr": 1e-6},
        criterion={"_name": "eat_classification", "loss": "bce_positive_norm", "mixup_alpha": 0.8, "mixup_prob": 0.9,
                   "specaug_freq_ratio": 0.2, "specaug_time_ratio": 0.2},
    )
    cfg = _released(tmp_path, ours, "as.pt")
    model = cfg["model"]
    assert model["prediction_mode"] == "MEAN_POOLING" and (model["layer_decay"], model["drop_path_rate"]) == (0.75, 0.2)
    assert (model["mixup"], model["mixup_prob"], model["mask_ratio"], model["label_smoothing"]) == (0.8, 0.9, 0.2, 0.0)
    assert model["esc50_eval"] is False and model["target_length"] == 1024
    _check_pretraining_model(model["pretrained_model_args"]["model"], 64, 2, 4, 1024)
    assert model["pretrained_model_args"]["model"]["end_drop_path_rate"] == 0.2
    assert cfg["optimization"] == {"max_update": 777, "lr": [1e-4]}
    assert cfg["optimizer"]["groups"]["default"]["lr_scheduler"]["warmup_updates"] == 77
    assert cfg["checkpoint"]["best_checkpoint_metric"] == "mAP"


def test_convert_file_keeps_the_training_cfg_of_one_of_ours(tmp_path: Path) -> None:
    """convert_file reads the original file, not only its canonical re-encoding."""
    ours = _to_ours(tmp_path, "pretrained", released_pretrained_state(64, 2, 2, 3, _random_fill(5)), heads=4)
    ours["cfg"]["optimization"] = {"max_update": 4321, "lr": [0.002]}
    src, dst = tmp_path / "ours.pt", tmp_path / "rel.pt"
    torch.save(ours, src)
    summary = convert_file(src, dst, to="released")
    assert summary.target == "released"
    cfg = torch.load(dst, weights_only=True)["cfg"]
    assert cfg["optimization"]["max_update"] == 4321 and cfg["optimization"]["lr"] == [0.002]
