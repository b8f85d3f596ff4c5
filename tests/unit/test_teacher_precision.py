"""``teacher_precision`` (issue 11, item 4): the option changes the dtype of the teacher's forward
and nothing else. Checked on CPU with a bf16 student (what fairseq's ``common.bf16`` does)."""
from __future__ import annotations

import copy

import pytest
import torch

from eat_fairseq.model.objective import teacher_targets
from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig

FRAMES = 64


def _pair(dtype: torch.dtype):
    """Two models with identical weights, one per precision, both cast to ``dtype``."""
    torch.manual_seed(0)
    release = EATPretrainingModel(PretrainConfig.tiny(teacher_precision="release"))
    fp32 = EATPretrainingModel(PretrainConfig.tiny(teacher_precision="fp32"))
    fp32.load_state_dict(release.state_dict())
    return release.to(dtype), fp32.to(dtype)


def _record_teacher_dtypes(model: EATPretrainingModel) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    for block in model.teacher.blocks:
        block.register_forward_hook(lambda mod, args, out: seen.append(args[0].dtype))
    return seen


def _fbank(dtype: torch.dtype) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, FRAMES, 128).to(dtype)


def test_default_is_the_release_behaviour() -> None:
    assert PretrainConfig().teacher_precision == "release"
    with pytest.raises(ValueError, match="teacher_precision"):
        EATPretrainingModel(PretrainConfig.tiny(teacher_precision="fp16"))


def test_bf16_student_teacher_forward_dtype_follows_the_option() -> None:
    release, fp32 = _pair(torch.bfloat16)
    for model in (release, fp32):  # the weights themselves stay fp32 either way (EMA master copy)
        assert {p.dtype for p in model.teacher.parameters()} == {torch.float32}
        assert model.teacher.pos_embed.dtype == torch.float32
        assert model.encoder.cls_token.dtype == torch.bfloat16
    seen_release, seen_fp32 = _record_teacher_dtypes(release), _record_teacher_dtypes(fp32)
    fbank = _fbank(torch.bfloat16)
    t_release = release.compute_targets(fbank)
    t_fp32 = fp32.compute_targets(fbank)
    assert set(seen_release) == {torch.bfloat16} and len(seen_release) == 2
    assert set(seen_fp32) == {torch.float32} and len(seen_fp32) == 2
    assert t_release.dtype == t_fp32.dtype == torch.float32

    # each equals its definition: a bf16 copy of the fp32 teacher on bf16 input, or the fp32 teacher
    half_teacher = copy.deepcopy(fp32.teacher).to(torch.bfloat16)
    with torch.no_grad():
        want_release = teacher_targets(half_teacher(fbank)[1], 2)
        want_fp32 = teacher_targets(fp32.teacher(fbank.float())[1], 2)
    torch.testing.assert_close(t_release, want_release, rtol=0, atol=0)
    torch.testing.assert_close(t_fp32, want_fp32, rtol=0, atol=0)
    rel = ((t_release - t_fp32).norm() / t_fp32.norm()).item()
    assert 1e-3 < rel < 5e-2  # bf16 rounding of the teacher, nothing larger


def test_bf16_student_everything_but_the_teacher_forward_is_unchanged() -> None:
    release, fp32 = _pair(torch.bfloat16)
    preds: dict[str, torch.Tensor] = {}
    for name, model in (("release", release), ("fp32", fp32)):
        model.decoder.register_forward_hook(lambda mod, args, out, name=name: preds.__setitem__(name, out.detach()))
    fbank = _fbank(torch.bfloat16)
    mask = release.make_mask(2 * release.cfg.clone_batch, release.encoder.grid(FRAMES), fbank.device)
    outs = {}
    for name, model in (("release", release), ("fp32", fp32)):
        torch.manual_seed(5)  # the decoder's noise
        outs[name] = model(fbank, mask)
    assert torch.equal(preds["release"], preds["fp32"])  # student + decoder: identical
    assert outs["release"]["sample_size"] == outs["fp32"]["sample_size"]
    assert not torch.equal(outs["release"]["frame_err"], outs["fp32"]["frame_err"])  # only via the targets

    # the EMA update: same fp32 master weights afterwards
    for model in (release, fp32):
        model.ema_step(1)
    for (name, a), (_, b) in zip(release.teacher.state_dict().items(), fp32.teacher.state_dict().items()):
        assert a.dtype == torch.float32 and torch.equal(a, b), name


def test_fp32_student_both_options_give_identical_targets() -> None:
    release, fp32 = _pair(torch.float32)
    fbank = _fbank(torch.float32)
    assert torch.equal(release.compute_targets(fbank), fp32.compute_targets(fbank))
