"""Tests for the pre-training core: decoder, EMA, targets/losses and EATPretrainingModel."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eat_fairseq.model.decoder import CNNDecoder
from eat_fairseq.model.ema import ema_decay_at, ema_update_
from eat_fairseq.model.encoder import EncoderConfig
from eat_fairseq.model.masking import inverse_block_mask
from eat_fairseq.model.objective import frame_errors, teacher_targets, ufo_loss
from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig, count_parameters

# -- EMA ------------------------------------------------------------------------------------------


def test_ema_decay_schedule() -> None:
    assert ema_decay_at(0) == 0.9998
    assert ema_decay_at(100000) == 0.99999
    assert ema_decay_at(250000) == 0.99999
    assert ema_decay_at(50000) == pytest.approx((0.9998 + 0.99999) / 2, abs=1e-12)
    assert ema_decay_at(25000, 0.9, 1.0, 100000) == pytest.approx(0.925)
    assert isinstance(ema_decay_at(10), float)


def test_ema_update_formula_and_buffers() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        student[1].running_mean.fill_(3.0)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    ema_update_(teacher, student, 0.9)
    new = teacher.state_dict()
    for k in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert torch.allclose(new[k], 0.9 * t0[k] + 0.1 * s0[k])
    assert torch.equal(new["1.running_mean"], s0["1.running_mean"])


def test_ema_update_keeps_fp32_teacher_from_bf16_student() -> None:
    student = nn.Linear(4, 4).bfloat16()
    teacher = nn.Linear(4, 4)
    before = teacher.weight.detach().clone()
    ema_update_(teacher, student, 0.5)
    assert teacher.weight.dtype == torch.float32
    assert torch.allclose(teacher.weight, 0.5 * before + 0.5 * student.weight.float())


# -- targets and losses ---------------------------------------------------------------------------


def test_teacher_targets_against_hand_computation() -> None:
    torch.manual_seed(0)
    layers = [torch.randn(2, 1 + 6, 4) * (i + 1) + i for i in range(3)]
    out = teacher_targets(layers, top_k=2)
    acc = torch.zeros(2, 6, 4)
    for t in layers[1:]:
        y = t[:, 1:]
        mu = y.mean(1, keepdim=True)
        var = y.var(1, unbiased=False, keepdim=True)
        acc += (y - mu) / torch.sqrt(var + 1e-5)
    acc /= 2
    mu = acc.mean(-1, keepdim=True)
    var = acc.var(-1, unbiased=False, keepdim=True)
    ref = (acc - mu) / torch.sqrt(var + 1e-5)
    assert out.shape == (2, 6, 4) and out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=1e-5)
    # The CLS row must not influence the targets.
    layers[2][:, 0] += 100.0
    assert torch.allclose(teacher_targets(layers, top_k=2), out)
    with pytest.raises(ValueError):
        teacher_targets(layers, top_k=4)


def test_teacher_targets_fp32_from_half() -> None:
    layers = [torch.randn(1, 5, 8).bfloat16() for _ in range(2)]
    assert teacher_targets(layers, 2).dtype == torch.float32


def test_frame_errors_hand_computed() -> None:
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    err = frame_errors(pred, target)
    assert torch.allclose(err, torch.tensor([(4.0 + 9.0) / 2.0, 4.0 / 2.0]))


def test_ufo_loss_both_reductions() -> None:
    frame = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # M = 6
    utt = torch.tensor([0.5, 1.5])  # B*clone = 2
    loss, n = ufo_loss(frame, utt, utterance_weight=2.0, reduction="release")
    assert n == 6
    assert loss.item() == pytest.approx(21.0 + 2.0 * 6 * 2.0)
    # Per-device net after the trainer's division: frame mean + lambda * utterance SUM.
    assert loss.item() / n == pytest.approx(3.5 + 2.0 * 2.0)
    loss, n = ufo_loss(frame, utt, utterance_weight=2.0, reduction="mean")
    assert loss.item() == pytest.approx(21.0 + 2.0 * 6 * 1.0)
    assert loss.item() / n == pytest.approx(3.5 + 2.0 * 1.0)
    with pytest.raises(ValueError):
        ufo_loss(frame, utt, reduction="sum")


# -- decoder --------------------------------------------------------------------------------------


def test_decoder_shapes_names_and_noise_fill() -> None:
    torch.manual_seed(0)
    dec = CNNDecoder(32, decoder_dim=48, depth=3, kernel_size=3, groups=16, noise_std=0.01)
    names = set(dec.state_dict())
    assert {"blocks.0.conv.weight", "blocks.2.conv.bias", "proj.weight", "proj.bias"} <= names
    assert dec.blocks[0].conv.weight.shape == (48, 2, 3, 3)
    assert dec.blocks[1].conv.weight.shape == (48, 3, 3, 3)
    assert dec.proj.weight.shape == (32, 48)
    grid = (4, 8)
    mask = inverse_block_mask(3, grid, generator=torch.Generator().manual_seed(0))
    v = int((~mask[0]).sum())
    visible = torch.randn(3, v, 32)
    out = dec(visible, mask, grid)
    assert out.shape == (3, 32, 32)


def test_decoder_input_layout_against_manual() -> None:
    torch.manual_seed(0)
    dec = CNNDecoder(16, decoder_dim=16, depth=2, kernel_size=3, groups=4, noise_std=0.0)
    grid = (3, 4)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, [1, 5, 6, 11]] = True
    visible = torch.randn(2, 8, 16)
    out = dec(visible, mask, grid)
    with torch.no_grad():
        full = torch.zeros(2, 12, 16)
        for i in range(2):
            full[i, ~mask[i]] = visible[i]
        x = full.view(2, 3, 4, 16).permute(0, 3, 1, 2)  # (B, D, H, W) time-major
        for blk in dec.blocks:
            y = F.conv2d(x, blk.conv.weight, blk.conv.bias, padding=1, groups=4)
            y = y.permute(0, 2, 3, 1)
            y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-5)
            x = F.gelu(y.permute(0, 3, 1, 2)) + x
        ref = x.permute(0, 2, 3, 1).reshape(2, 12, 16) @ dec.proj.weight.T + dec.proj.bias
    assert torch.allclose(out, ref, atol=1e-5)


def test_decoder_noise_std_and_freshness() -> None:
    dec = CNNDecoder(8, decoder_dim=8, depth=0, groups=1, noise_std=0.5)
    with torch.no_grad():
        dec.proj.weight.copy_(torch.eye(8))
        dec.proj.bias.zero_()
    mask = torch.ones(4, 64 * 8, dtype=torch.bool)
    mask[:, 0] = False
    visible = torch.full((4, 1, 8), 7.0)
    a = dec(visible, mask, (64, 8))
    b = dec(visible, mask, (64, 8))
    assert torch.all(a[:, 0] == 7.0)
    noise = a[:, 1:]
    assert abs(noise.std().item() - 0.5) < 0.02 and abs(noise.mean().item()) < 0.02
    assert not torch.equal(a, b)  # fresh noise each call


# -- the model ------------------------------------------------------------------------------------


def _tiny_model(seed: int = 0, **overrides: object) -> EATPretrainingModel:
    torch.manual_seed(seed)
    return EATPretrainingModel(PretrainConfig.tiny(**overrides))


def test_presets() -> None:
    base, large, tiny = PretrainConfig.base(), PretrainConfig.large(), PretrainConfig.tiny()
    assert base.encoder == EncoderConfig.base() and base.clone_batch == 16
    assert (base.decoder_depth, base.decoder_kernel_size, base.average_top_k_layers) == (6, 3, 12)
    assert large.encoder == EncoderConfig.large()
    assert (large.mask_prob, large.mask_prob_adjust) == (0.75, 0.1)
    assert (large.decoder_dim, large.decoder_depth, large.decoder_kernel_size) == (1024, 3, 5)
    assert (large.average_top_k_layers, large.ema_anneal_end_step) == (24, 150000)
    assert tiny.encoder == EncoderConfig.tiny() and tiny.clone_batch == 2
    assert PretrainConfig() == base


def test_forward_shapes_and_sample_size() -> None:
    model = _tiny_model()
    fbank = torch.randn(3, 1, 128, 128)
    out = model(fbank)
    clone, p = 2, 64
    v = int(p * (1 - 0.8))
    m = 3 * clone * (p - v)
    assert out["frame_err"].shape == (m,)
    assert out["utterance_err"].shape == (3 * clone,)
    assert out["sample_size"] == m and isinstance(out["sample_size"], int)
    assert out["masked_pct"] == pytest.approx((p - v) / p)
    for key in ("target_var", "pred_var"):
        val = out[key]
        assert isinstance(val, (float, torch.Tensor)) and not isinstance(val, bool)
        if isinstance(val, torch.Tensor):
            assert val.ndim == 0 and not val.requires_grad
        assert float(val) > 0
    assert type(out["masked_pct"]) is float
    # (B, T, F) input works too.
    assert model(fbank[:, 0])["frame_err"].shape == (m,)


def test_forward_with_given_mask_matches_manual() -> None:
    model = _tiny_model(mask_noise_std=0.0)
    model.eval()
    fbank = torch.randn(2, 1, 128, 128)
    mask = inverse_block_mask(4, (8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(fbank, mask)
        _, ffn = model.teacher(fbank)
        targets = teacher_targets(ffn, 2).repeat_interleave(2, 0)  # (4, P, D)
        x, _ = model.encoder(fbank.repeat_interleave(2, 0), mask)
        pred = model.decoder(x[:, 1:], mask, (8, 8))
        frame_ref = ((pred[mask] - targets[mask]) ** 2).sum(-1) / 8.0
        utt_ref = ((x[:, 0] - targets.mean(1)) ** 2).sum(-1) / 8.0
    assert torch.allclose(out["frame_err"], frame_ref, atol=1e-5)
    assert torch.allclose(out["utterance_err"], utt_ref, atol=1e-5)


def test_forward_rejects_bad_mask() -> None:
    model = _tiny_model()
    with pytest.raises(ValueError):
        model(torch.randn(2, 1, 128, 128), torch.zeros(2, 64, dtype=torch.bool))


def test_backward_reaches_every_student_param_and_no_teacher_param() -> None:
    model = _tiny_model().train()
    out = model(torch.randn(2, 1, 128, 128))
    loss, n = ufo_loss(out["frame_err"], out["utterance_err"])
    (loss / n).backward()
    for name, p in list(model.encoder.named_parameters()) + list(model.decoder.named_parameters()):
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    for name, p in model.teacher.named_parameters():
        assert p.grad is None and not p.requires_grad, name


def test_teacher_is_eval_and_frozen() -> None:
    model = _tiny_model().train()
    assert model.encoder.training and model.decoder.training
    assert not model.teacher.training
    assert count_parameters(model.teacher, trainable_only=True) == 0
    assert count_parameters(model.teacher) == count_parameters(model.encoder)


def test_teacher_stays_fp32_under_bfloat16_and_half() -> None:
    model = _tiny_model()
    ref = model.teacher.blocks[0].attn.qkv.weight.detach().clone()
    model.bfloat16()
    assert model.encoder.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.decoder.proj.weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in model.teacher.state_dict().values())
    assert torch.equal(model.teacher.blocks[0].attn.qkv.weight, ref)  # no precision lost
    model.half()
    assert model.teacher.pos_embed.dtype == torch.float32
    model.float()
    assert model.encoder.cls_token.dtype == torch.float32
    assert model.num_ema_updates.dtype == torch.long


def test_bfloat16_forward_runs_with_fp32_targets() -> None:
    model = _tiny_model().bfloat16()
    out = model(torch.randn(1, 1, 128, 128).bfloat16())
    assert out["frame_err"].dtype == torch.float32
    assert torch.isfinite(out["frame_err"]).all()


def test_ema_step_moves_teacher_and_counts() -> None:
    model = _tiny_model()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    t_before = model.teacher.blocks[0].mlp.fc1.weight.detach().clone()
    s = model.encoder.blocks[0].mlp.fc1.weight.detach().clone()
    decay = model.ema_step(50000)
    assert decay == pytest.approx((0.9998 + 0.99999) / 2)
    assert torch.allclose(model.teacher.blocks[0].mlp.fc1.weight, decay * t_before + (1 - decay) * s)
    assert int(model.num_ema_updates) == 1
    model.ema_step(50001)
    assert int(model.num_ema_updates) == 2


def test_state_dict_round_trip_keeps_teacher() -> None:
    model = _tiny_model(seed=1)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.5)
    model.ema_step(10)
    state = model.state_dict()
    assert any(k.startswith("teacher.") for k in state)
    assert "num_ema_updates" in state
    other = _tiny_model(seed=2)
    other.load_state_dict(state, strict=True)
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert int(other.num_ema_updates) == 1
    assert not torch.equal(other.teacher.cls_token, other.encoder.cls_token)


def test_seeded_determinism() -> None:
    fbank = torch.randn(2, 1, 128, 128)
    outs = []
    for _ in range(2):
        model = _tiny_model(seed=5)
        torch.manual_seed(11)
        outs.append(model(fbank))
    assert torch.equal(outs[0]["frame_err"], outs[1]["frame_err"])
    assert torch.equal(outs[0]["utterance_err"], outs[1]["utterance_err"])
    torch.manual_seed(12)
    other = _tiny_model(seed=5)
    torch.manual_seed(12)
    third = other(fbank)
    assert not torch.equal(third["utterance_err"], outs[0]["utterance_err"])


def test_extract_features_is_student() -> None:
    model = _tiny_model()
    fbank = torch.randn(1, 128, 128)
    with torch.no_grad():
        assert torch.equal(model.extract_features(fbank), model.encoder.extract_features(fbank))


def test_invalid_top_k() -> None:
    with pytest.raises(ValueError):
        EATPretrainingModel(PretrainConfig.tiny(average_top_k_layers=3))


def test_compute_targets_are_layer_normed_fp32() -> None:
    model = _tiny_model(mask_noise_std=0.0).eval()
    fbank = torch.randn(1, 1, 128, 128)
    with torch.no_grad():
        targets = model.compute_targets(fbank)
    assert targets.shape == (1, 64, 64) and targets.dtype == torch.float32
    assert math.isclose(float(targets[0, 0].mean()), 0.0, abs_tol=1e-5)
    assert math.isclose(float(targets[0, 0].var(unbiased=False)), 1.0, abs_tol=1e-3)
