"""Ablation options of pre-training (issue 21): ``frame_loss_weight``, ``mask_type``, ``decoder_type``.

Each default must leave the release recipe bit-identical (same parameters, random stream, outputs,
loss and gradients); each ablation must do exactly what it says (a zero weight sends exactly zero
gradient, random masks keep the inverse block mask's visible count, the per-patch decoders predict
``(B, P, D)`` and train); bad values are refused naming the value.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from eat_fairseq.model.decoder import CNNDecoder, LinearDecoder, MLPDecoder, TransformerDecoder
from eat_fairseq.model.encoder import EATEncoder
from eat_fairseq.model.masking import MASK_TYPES, MaskSpec, inverse_block_mask, num_visible, random_mask
from eat_fairseq.model.objective import ufo_loss
from eat_fairseq.model.pretraining import DECODER_TYPES, EATPretrainingModel, PretrainConfig

FBANK_SHAPE = (2, 1, 128, 128)  # tiny: 8 x 8 patches of 16
GRID = (8, 8)
DEFAULTS = {"frame_loss_weight": 1.0, "mask_type": "inverse_block", "decoder_type": "cnn"}


def _model(seed: int = 0, **overrides: Any) -> EATPretrainingModel:
    torch.manual_seed(seed)
    return EATPretrainingModel(PretrainConfig.tiny(**overrides)).train()


def _fairseq_model(task: Any = None, **overrides: Any) -> torch.nn.Module:
    """The fairseq ``eat`` model with the tiny core config, built as fairseq builds it."""
    from omegaconf import OmegaConf

    from eat_fairseq.fairseq_ext.models import EATModel, EATModelConfig

    tiny = PretrainConfig.tiny()
    cfg = OmegaConf.merge(OmegaConf.structured(EATModelConfig), {
        "embed_dim": 64, "depth": 2, "num_heads": 4, "decoder_dim": tiny.decoder_dim,
        "decoder_depth": tiny.decoder_depth, "average_top_k_layers": tiny.average_top_k_layers,
        "clone_batch": tiny.clone_batch, **overrides})
    torch.manual_seed(0)
    return EATModel.build_model(cfg, task).train()


def _step(model: EATPretrainingModel, seed: int = 1, mask: torch.Tensor | None = None) -> dict[str, Any]:
    """One forward + backward of ``loss / sample_size`` with the model's weights; returns loss, outputs, grads."""
    torch.manual_seed(seed)
    fbank = torch.randn(FBANK_SHAPE)
    model.zero_grad(set_to_none=True)
    out = model(fbank, mask)
    loss, n = ufo_loss(out["frame_err"], out["utterance_err"], model.cfg.utterance_loss_weight,
                       model.cfg.utterance_reduction, frame_weight=model.cfg.frame_loss_weight)
    (loss / n).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "out": out, "grads": grads, "rng": torch.get_rng_state()}


def _assert_same_step(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert torch.equal(a["loss"], b["loss"])
    for key in ("frame_err", "utterance_err"):
        assert torch.equal(a["out"][key], b["out"][key]), key
    assert a["grads"].keys() == b["grads"].keys()
    for name in a["grads"]:
        assert torch.equal(a["grads"][name], b["grads"][name]), name
    assert torch.equal(a["rng"], b["rng"])


# -- (a) the defaults are the release -------------------------------------------------------------


def test_defaults_are_the_release_values() -> None:
    cfg = PretrainConfig()
    assert {k: getattr(cfg, k) for k in DEFAULTS} == DEFAULTS
    assert cfg.mask_spec().mask_type == "inverse_block"
    assert MASK_TYPES[0] == "inverse_block" and DECODER_TYPES[0] == "cnn"


def test_default_model_builds_the_release_parameters_in_order_with_the_same_random_stream() -> None:
    """Parameters, their order and values, and the RNG state after building: as the release's
    construction (encoder, CNN decoder, teacher copy) written out by hand."""
    implicit = _model()
    rng_implicit = torch.get_rng_state()
    explicit = _model(**DEFAULTS)
    assert torch.equal(rng_implicit, torch.get_rng_state())

    cfg = PretrainConfig.tiny()
    torch.manual_seed(0)
    encoder = EATEncoder(cfg.encoder)
    decoder = CNNDecoder(cfg.encoder.embed_dim, decoder_dim=cfg.decoder_dim, depth=cfg.decoder_depth,
                         kernel_size=cfg.decoder_kernel_size, groups=cfg.decoder_groups, noise_std=cfg.mask_noise_std)
    assert torch.equal(rng_implicit, torch.get_rng_state())
    release = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
               **{f"decoder.{k}": v for k, v in decoder.state_dict().items()}}
    for model in (implicit, explicit):
        state = {k: v for k, v in model.state_dict().items() if k.startswith(("encoder.", "decoder."))}
        assert list(state) == list(release)
        assert all(torch.equal(state[k], release[k]) for k in release)
    assert [k for k in implicit.state_dict() if k.startswith("decoder.")] == [
        "decoder.blocks.0.conv.weight", "decoder.blocks.0.conv.bias",
        "decoder.blocks.1.conv.weight", "decoder.blocks.1.conv.bias",
        "decoder.proj.weight", "decoder.proj.bias",
    ]


def test_default_outputs_loss_and_gradients_are_bit_identical() -> None:
    a = _step(_model())
    b = _step(_model(**DEFAULTS))
    _assert_same_step(a, b)
    # and the loss is the release's formula, bit for bit
    out = a["out"]
    release = out["frame_err"].sum() + 1.0 * out["sample_size"] * out["utterance_err"].sum()
    assert torch.equal(a["loss"], release.detach())


def test_default_masks_and_decoder_noise_are_the_release_draws() -> None:
    spec = PretrainConfig.tiny().mask_spec()
    drawn = spec.draw(6, GRID, generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, inverse_block_mask(6, GRID, generator=torch.Generator().manual_seed(5)))

    decoder = _model().decoder
    mask = inverse_block_mask(4, GRID, generator=torch.Generator().manual_seed(2))
    visible = torch.randn(4, num_visible(64, 0.8), 64)
    torch.manual_seed(9)
    got = decoder(visible, mask, GRID)
    torch.manual_seed(9)  # the release's decoder written out: noise, scatter, conv blocks, projection
    x = torch.randn(4, 64, 64) * decoder.noise_std
    x = x.masked_scatter(~mask.unsqueeze(-1), visible).transpose(1, 2).reshape(4, 64, *GRID)
    for block in decoder.blocks:
        y = block(x)
        x = y + x if y.shape == x.shape else y
    assert torch.equal(got, decoder.proj(x.flatten(2).transpose(1, 2)))


# -- (b) a zero weight sends exactly zero gradient ------------------------------------------------


def test_frame_weight_zero_sends_no_gradient_through_the_frame_term() -> None:
    utt_only = _step(_model(frame_loss_weight=0.0))
    decoder_grads = {k: g for k, g in utt_only["grads"].items() if k.startswith("decoder.")}
    assert decoder_grads and all(torch.count_nonzero(g) == 0 for g in decoder_grads.values())
    # the encoder gets exactly the utterance term's gradient
    model = _model()
    torch.manual_seed(1)
    fbank = torch.randn(FBANK_SHAPE)
    out = model(fbank)
    (out["sample_size"] * out["utterance_err"].sum() / out["sample_size"]).backward()
    for name, p in model.encoder.named_parameters():
        assert torch.equal(utt_only["grads"][f"encoder.{name}"], p.grad), name
    assert torch.equal(utt_only["loss"], (out["sample_size"] * out["utterance_err"].sum()).detach())


def test_utterance_weight_zero_sends_no_gradient_through_the_utterance_term() -> None:
    frame_only = _step(_model(utterance_loss_weight=0.0))
    model = _model()
    torch.manual_seed(1)
    out = model(torch.randn(FBANK_SHAPE))
    (out["frame_err"].sum() / out["sample_size"]).backward()
    # every student gradient (the CLS token's included: it still reaches the frame term through
    # attention) is the frame term's alone
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(frame_only["grads"][name], p.grad), name
    assert torch.equal(frame_only["loss"], out["frame_err"].sum().detach())
    # with both terms the CLS token's gradient differs: the utterance term does reach it
    both = _step(_model())
    assert not torch.equal(both["grads"]["encoder.cls_token"], frame_only["grads"]["encoder.cls_token"])


def test_ufo_loss_weights() -> None:
    frame, utt = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.5])
    assert ufo_loss(frame, utt, 2.0, frame_weight=0.5)[0].item() == pytest.approx(0.5 * 6 + 2.0 * 3 * 2.0)
    assert ufo_loss(frame, utt, 0.0)[0].item() == 6.0
    assert ufo_loss(frame, utt, 1.0, "mean", frame_weight=0.0)[0].item() == pytest.approx(3 * 1.0)


def test_criterion_logs_weighted_parts_that_add_up_to_the_loss() -> None:
    pytest.importorskip("fairseq")
    from eat_fairseq.fairseq_ext.criterions import EATUFOCriterion, EATUFOCriterionConfig

    task = SimpleNamespace(cfg=SimpleNamespace(diagnostics_interval_updates=1))
    for weights in ({}, {"frame_loss_weight": 0.25}, {"frame_loss_weight": 0.0}, {"utterance_loss_weight": 0.0}):
        model = _fairseq_model(**weights)
        criterion = EATUFOCriterion(EATUFOCriterionConfig(), task)
        torch.manual_seed(1)
        sample = {"id": torch.arange(2), "net_input": {"source": torch.randn(FBANK_SHAPE)}}
        loss, _, log = criterion(model, sample)
        assert log["loss"] == loss.item()
        frame_part = log.get("frame_term", log["frame_loss"])
        assert ("frame_term" in log) == ("frame_loss_weight" in weights), weights
        assert frame_part == pytest.approx(model.cfg.frame_loss_weight * log["frame_loss"])
        assert log["loss"] == pytest.approx(frame_part + log["utterance_term"], rel=1e-6), weights
        if model.cfg.frame_loss_weight == 0:
            assert log["grad_frame"] == 0.0 and log["grad_utterance"] > 0
        if model.cfg.utterance_loss_weight == 0:
            assert log["grad_utterance"] == 0.0 and log["grad_frame"] > 0


# -- (c) random masking ----------------------------------------------------------------------------


@pytest.mark.parametrize("grid, mask_prob", [((8, 8), 0.8), ((64, 8), 0.8), ((13, 8), 0.75), ((3, 5), 0.8)])
def test_random_mask_keeps_the_inverse_block_visible_count(grid: tuple[int, int], mask_prob: float) -> None:
    p = grid[0] * grid[1]
    block = inverse_block_mask(32, grid, mask_prob=mask_prob, generator=torch.Generator().manual_seed(0))
    rand = random_mask(32, grid, mask_prob=mask_prob, generator=torch.Generator().manual_seed(0))
    assert rand.shape == block.shape == (32, p) and rand.dtype == torch.bool
    visible = (~rand).sum(1)
    assert torch.equal(visible, (~block).sum(1))
    assert torch.all(visible == num_visible(p, mask_prob))


def _visible_neighbour_share(mask: torch.Tensor, grid: tuple[int, int]) -> float:
    """Share of visible patches with a visible time or frequency neighbour (high for blocks)."""
    vis = (~mask).reshape(-1, *grid).float()  # (B, H, W)
    pad = torch.nn.functional.pad(vis, (1, 1, 1, 1))
    neighbours = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    return float(((neighbours > 0).float() * vis).sum() / vis.sum())


def test_random_mask_differs_from_blocks_and_is_deterministic() -> None:
    grid = (64, 8)
    spec = PretrainConfig.tiny(mask_type="random").mask_spec()
    a = spec.draw(16, grid, generator=torch.Generator().manual_seed(7))
    b = spec.draw(16, grid, generator=torch.Generator().manual_seed(7))
    c = spec.draw(16, grid, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, random_mask(16, grid, generator=torch.Generator().manual_seed(7)))
    block = PretrainConfig.tiny().mask_spec().draw(16, grid, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(a, block)
    # blocks keep visible patches together; uniformly chosen ones often stand alone at 20% visible
    assert _visible_neighbour_share(block, grid) > 0.9
    assert _visible_neighbour_share(a, grid) < 0.75  # about 1 - 0.8**4 away from the edges


def test_an_8_by_8_grid_gets_no_blocks_of_5_so_its_inverse_block_masks_are_random() -> None:
    """eat_small's 128-frame windows: 64 patches, 12 visible, int(64 * 0.27 / 25) = 0 blocks, so the
    release's inverse block mask draws exactly the random mask of the same generator; blocks of 2
    (the `blocks2` ablation) place 4 blocks and keep visible patches together."""
    grid = (8, 8)
    release = MaskSpec(clone_batch=1, mask_prob=0.8, mask_length=5, mask_prob_adjust=0.07, patch_size=16)
    assert release.blocks_per_row(grid) == 0 and release.blocks_per_row((64, 8)) == 5  # 1,024 frames: 5
    for seed in range(3):
        drawn = release.draw(32, grid, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(drawn, random_mask(32, grid, generator=torch.Generator().manual_seed(seed)))
    blocks2 = MaskSpec(clone_batch=1, mask_prob=0.8, mask_length=2, mask_prob_adjust=0.07, patch_size=16)
    assert blocks2.blocks_per_row(grid) == 4
    b = blocks2.draw(256, grid, generator=torch.Generator().manual_seed(0))
    r = release.draw(256, grid, generator=torch.Generator().manual_seed(0))
    assert (~b).sum(1).eq(12).all() and (~r).sum(1).eq(12).all()
    assert _visible_neighbour_share(b, grid) > _visible_neighbour_share(r, grid) + 0.2
    assert MaskSpec(clone_batch=1, mask_prob=0.8, mask_length=5, mask_prob_adjust=0.07, patch_size=16,
                    mask_type="random").blocks_per_row((64, 8)) == 0


def test_the_task_warns_when_inverse_block_masking_places_no_blocks(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("fairseq")
    import logging

    from helpers import REPO, compose_recipe, make_audio_corpus

    import eat_fairseq.fairseq_ext  # noqa: F401  (registers the eat_* components)
    from fairseq import tasks as fairseq_tasks

    data = make_audio_corpus(tmp_path, num_clips=4)
    for extra, warned in (([], True), (["+model.mask_length=2"], False), (["model.mask_type=random"], False)):
        caplog.clear()
        cfg = compose_recipe(REPO / "examples" / "pretraining", "eat_tiny", [f"task.data={data}", *extra])
        assert cfg.task.target_length == 128
        task = fairseq_tasks.setup_task(cfg.task)
        with caplog.at_level(logging.WARNING):
            task.load_dataset("train")
        messages = [r.getMessage() for r in caplog.records if "places no blocks" in r.getMessage()]
        assert bool(messages) == warned, extra
        assert all("8 x 8 patch grid" in m for m in messages)


def test_model_draws_random_masks_with_the_global_rng() -> None:
    model = _model(mask_type="random")
    torch.manual_seed(3)
    drawn = model.make_mask(4, GRID, torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(drawn, random_mask(4, GRID))
    out = _step(model)["out"]
    assert out["sample_size"] == 2 * 2 * (64 - num_visible(64, 0.8))


# -- (d) per-patch decoders -----------------------------------------------------------------------


@pytest.mark.parametrize("decoder_type", ["linear", "mlp"])
def test_per_patch_decoders_predict_every_patch_and_train(decoder_type: str) -> None:
    model = _model(decoder_type=decoder_type)
    expected = {"linear": LinearDecoder, "mlp": MLPDecoder}[decoder_type]
    assert type(model.decoder) is expected
    mask = inverse_block_mask(4, GRID, generator=torch.Generator().manual_seed(1))
    pred = model.decoder(torch.randn(4, num_visible(64, 0.8), 64), mask, GRID)
    assert pred.shape == (4, 64, 64)
    step = _step(model)
    assert torch.isfinite(step["loss"])
    decoder_grads = [g for k, g in step["grads"].items() if k.startswith("decoder.")]
    assert decoder_grads and all(torch.count_nonzero(g) > 0 for g in decoder_grads)
    assert torch.count_nonzero(step["grads"]["encoder.cls_token"]) > 0
    with pytest.raises(ValueError, match="grid"):
        model.decoder(torch.randn(4, num_visible(64, 0.8), 64), mask, (4, 8))


def test_per_patch_decoder_parameters() -> None:
    linear = _model(decoder_type="linear").decoder
    assert [k for k, _ in linear.named_parameters()] == ["proj.weight", "proj.bias"]
    assert linear.proj.weight.shape == (64, 64)
    mlp = _model(decoder_type="mlp", decoder_dim=96).decoder
    assert [(k, tuple(p.shape)) for k, p in mlp.named_parameters()] == [
        ("fc1.weight", (96, 64)), ("fc1.bias", (96,)), ("fc2.weight", (64, 96)), ("fc2.bias", (64,))]


def test_per_patch_decoders_put_visible_tokens_back_and_noise_in_the_holes() -> None:
    """Same mask-token filling as the CNN: an identity Linear returns the visible tokens in place and
    the noise elsewhere; a masked patch's prediction then cannot depend on the visible tokens."""
    decoder = LinearDecoder(8, noise_std=0.5)
    with torch.no_grad():
        decoder.proj.weight.copy_(torch.eye(8))
        decoder.proj.bias.zero_()
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[:, 5] = False
    visible = torch.full((3, 1, 8), 7.0, requires_grad=True)
    out = decoder(visible, mask, (4, 4))
    assert torch.all(out[:, 5] == 7.0)
    assert abs(out[:, torch.arange(16) != 5].std().item() - 0.5) < 0.1
    out[mask].sum().backward()
    assert torch.count_nonzero(visible.grad) == 0


def test_transformer_decoder_predicts_from_the_visible_tokens_and_trains_the_encoder() -> None:
    """Unlike the per-patch decoders, a masked patch's prediction depends on the visible tokens (through
    attention), so the frame loss reaches the encoder; positions make equal inputs at different places
    predict differently; any grid works."""
    model = _model(decoder_type="transformer", decoder_dim=128, decoder_depth=2)
    assert type(model.decoder) is TransformerDecoder
    assert len(model.decoder.blocks) == 2 and model.decoder.blocks[0].attn.num_heads == 2
    mask = inverse_block_mask(4, GRID, generator=torch.Generator().manual_seed(1))
    visible = torch.randn(4, num_visible(64, 0.8), 64, requires_grad=True)
    pred = model.decoder(visible, mask, GRID)
    assert pred.shape == (4, 64, 64)
    pred[mask].sum().backward()
    assert torch.count_nonzero(visible.grad) > 0
    torch.manual_seed(0)
    same = model.decoder(torch.zeros(1, 0, 64), torch.ones(1, 16, dtype=torch.bool), (2, 8))
    assert same.shape == (1, 16, 64) and not torch.allclose(same[0, 0], same[0, 9], atol=1e-3)
    frame_only = _step(_model(decoder_type="transformer", decoder_dim=128, utterance_loss_weight=0.0))
    assert torch.count_nonzero(frame_only["grads"]["encoder.blocks.0.attn.qkv.weight"]) > 0
    with pytest.raises(ValueError, match="grid"):
        model.decoder(visible, mask, (4, 8))


def test_cnn_decoder_state_dict_keys_are_unchanged() -> None:
    names = list(CNNDecoder(16, decoder_dim=16, depth=2, groups=4).state_dict())
    assert names == ["blocks.0.conv.weight", "blocks.0.conv.bias", "blocks.1.conv.weight", "blocks.1.conv.bias",
                     "proj.weight", "proj.bias"]


# -- (e) bad values are refused, naming the value -------------------------------------------------


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"mask_type": "blocks"}, "'blocks'"),
        ({"decoder_type": "conformer"}, "'conformer'"),
        ({"frame_loss_weight": 0.0, "utterance_loss_weight": 0.0}, "frame_loss_weight=0.0"),
    ],
)
def test_bad_options_are_refused(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named) as info:
        EATPretrainingModel(PretrainConfig.tiny(**overrides))
    assert "\n" not in str(info.value)
    if "mask_type" in overrides:
        assert all(choice in str(info.value) for choice in MASK_TYPES)
    if "decoder_type" in overrides:
        assert all(choice in str(info.value) for choice in DECODER_TYPES)


def test_bad_values_are_refused_outside_the_model_too() -> None:
    with pytest.raises(ValueError, match="'stripes'"):
        MaskSpec(clone_batch=2, mask_prob=0.8, mask_length=5, mask_prob_adjust=0.07, patch_size=16, mask_type="stripes")
    with pytest.raises(ValueError, match="utterance_loss_weight=0"):
        ufo_loss(torch.ones(3), torch.ones(2), utterance_weight=0, frame_weight=0)


# -- the fairseq config ---------------------------------------------------------------------------


def test_fairseq_fields_map_to_the_core_config() -> None:
    pytest.importorskip("fairseq")
    from omegaconf import OmegaConf

    from eat_fairseq.fairseq_ext.models import EATModelConfig, pretrain_config_from

    fields = EATModelConfig.__dataclass_fields__
    for name in DEFAULTS:
        assert fields[name].metadata.get("help"), name
    base = OmegaConf.structured(EATModelConfig)
    assert pretrain_config_from(base) == PretrainConfig()
    chosen = {"frame_loss_weight": 0.5, "mask_type": "random", "decoder_type": "mlp"}
    core = pretrain_config_from(OmegaConf.merge(base, chosen))
    assert {k: getattr(core, k) for k in chosen} == chosen
    with pytest.raises(Exception, match="blocks"):
        OmegaConf.merge(base, {"mask_type": "blocks"})


def test_fairseq_model_refuses_a_mask_type_the_data_loader_would_not_draw() -> None:
    pytest.importorskip("fairseq")
    precomputed = SimpleNamespace(cfg=SimpleNamespace(precompute_mask=True))
    with pytest.raises(ValueError, match="task.precompute_mask=false"):
        _fairseq_model(precomputed, mask_type="random")
    in_model = SimpleNamespace(cfg=SimpleNamespace(precompute_mask=False))
    assert _fairseq_model(in_model, mask_type="random").cfg.mask_type == "random"
    agreeing = SimpleNamespace(cfg=SimpleNamespace(precompute_mask=True, mask_type="random"))
    assert _fairseq_model(agreeing, mask_type="random").cfg.mask_type == "random"
    assert _fairseq_model(precomputed).cfg.mask_type == "inverse_block"  # the default needs nothing


def test_the_data_loader_draws_the_models_mask_type(tmp_path: Path) -> None:
    """task.mask_type follows model.mask_type, so a random-masking run's precomputed masks are random."""
    pytest.importorskip("fairseq")
    from helpers import REPO, compose_recipe, make_audio_corpus

    import eat_fairseq.fairseq_ext  # noqa: F401  (registers the eat_* components)
    from fairseq import tasks as fairseq_tasks

    data = make_audio_corpus(tmp_path, num_clips=4)
    for wanted in ("inverse_block", "random"):
        extra = [] if wanted == "inverse_block" else [f"model.mask_type={wanted}"]
        cfg = compose_recipe(REPO / "examples" / "pretraining", "eat_tiny", [f"task.data={data}", *extra])
        assert cfg.task.mask_type == wanted and cfg.task.precompute_mask
        task = fairseq_tasks.setup_task(cfg.task)
        task.load_dataset("train")
        assert task.datasets["train"].mask.mask_type == wanted


# -- (f) target normalisation ---------------------------------------------------------------------


def test_layer_target_norm_keeps_what_is_constant_over_a_clip() -> None:
    """The release's instance norm takes each clip's per-channel constant out of every target, so the
    utterance targets (patch means) of clips that differ only by a constant are equal; the per-patch
    layer norm keeps the difference. The default stays the instance norm."""
    from eat_fairseq.model.objective import teacher_targets

    torch.manual_seed(0)
    shared = torch.randn(1, 17, 32)  # CLS + 16 patches
    clips = [shared + torch.randn(1, 1, 32) * 3 for _ in range(3)]  # + a different constant per clip
    ffn = [torch.cat(clips)] * 2
    release = teacher_targets(ffn, top_k=2)
    assert torch.equal(release, teacher_targets(ffn, top_k=2, norm="instance"))
    assert torch.allclose(release[0].mean(0), release[1].mean(0), atol=1e-5)
    layer = teacher_targets(ffn, top_k=2, norm="layer")
    assert layer.shape == release.shape == (3, 16, 32)
    assert (layer[0].mean(0) - layer[1].mean(0)).abs().max() > 0.1
    assert torch.allclose(layer.mean(-1), torch.zeros(3, 16), atol=1e-5)  # still LayerNormed per patch
    with pytest.raises(ValueError, match="'batch'"):
        teacher_targets(ffn, top_k=2, norm="batch")


def test_target_norm_reaches_the_model_and_is_checked() -> None:
    assert PretrainConfig().target_norm == "instance"
    release, layer = _step(_model()), _step(_model(target_norm="layer"))
    assert not torch.equal(release["loss"], layer["loss"])
    with pytest.raises(ValueError, match="target_norm.*'group'"):
        EATPretrainingModel(PretrainConfig.tiny(target_norm="group"))
    assert _fairseq_model(target_norm="layer").cfg.target_norm == "layer"
