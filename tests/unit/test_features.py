"""Feature extraction against torchaudio's Kaldi fbank (the features EAT was trained on)."""
from __future__ import annotations

import math

import pytest
import torch
import torchaudio.functional as taf

from eat_fairseq.data.audio import to_mono_16k
from eat_fairseq.data.features import (
    release_fbank,
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    ESC50_MEAN,
    ESC50_STD,
    SPEECHCOMMANDS_MEAN,
    SPEECHCOMMANDS_STD,
    FbankExtractor,
    FeatureConfig,
    frame_counts,
    kaldi_fbank,
    mel_filterbank,
    normalize,
    num_frames,
    pad_or_crop,
    remove_dc,
    waveform_to_features,
)

TOL = 1e-4




def reference_features(wave: torch.Tensor, sr: int, target_length: int, mean: float, std: float) -> torch.Tensor:
    """The release's pipeline: resample, subtract the mean, fbank, pad/crop, normalise."""
    if sr != 16000:
        wave = taf.resample(wave, sr, 16000)
    wave = wave - wave.mean()
    fb = release_fbank(wave)
    if fb.shape[0] < target_length:
        fb = torch.nn.functional.pad(fb, (0, 0, 0, target_length - fb.shape[0]))
    fb = fb[:target_length]
    return (fb - mean) / (std * 2)


def make_clip(num_samples: int, seed: int, sr: int = 16000) -> torch.Tensor:
    """Noise plus a tone and a DC offset, roughly at speech/music levels."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples, dtype=torch.float64) / sr
    tone = 0.3 * torch.sin(2 * math.pi * 440.0 * t)
    noise = 0.05 * torch.randn(num_samples, generator=g, dtype=torch.float64)
    return (tone + noise + 0.01).float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def test_constants() -> None:
    assert (AUDIOSET_MEAN, AUDIOSET_STD) == (-4.268, 4.569)
    assert (ESC50_MEAN, ESC50_STD) == (-6.627, 5.359)
    assert (SPEECHCOMMANDS_MEAN, SPEECHCOMMANDS_STD) == (-6.846, 5.565)
    cfg = FeatureConfig()
    assert (cfg.sample_rate, cfg.num_mel_bins, cfg.target_length) == (16000, 128, 1024)
    assert (cfg.norm_mean, cfg.norm_std) == (AUDIOSET_MEAN, AUDIOSET_STD)
    assert FeatureConfig.esc50().target_length == 512
    assert FeatureConfig.speech_commands().target_length == 128


@pytest.mark.parametrize("seconds", [0.3, 1.0, 2.37, 10.0])
def test_single_clip_matches_torchaudio(seconds: float) -> None:
    wave = make_clip(int(seconds * 16000), seed=1)
    ours = kaldi_fbank(wave)
    ref = release_fbank(wave)
    assert ours.shape == ref.shape == (num_frames(wave.numel()), 128)
    assert max_diff(ours, ref) <= TOL
    batched = kaldi_fbank(wave[None])
    assert batched.shape == (1,) + ref.shape
    assert max_diff(batched[0], ref) <= TOL


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 16000])
def test_resampled_stereo_input_matches_torchaudio(sr: int) -> None:
    seconds = 2.37
    left = make_clip(int(seconds * sr), seed=2, sr=sr)
    right = make_clip(int(seconds * sr), seed=3, sr=sr) * 0.5
    mono16 = to_mono_16k(torch.stack([left, right]), sr)
    ref = release_fbank(mono16)
    ours = kaldi_fbank(mono16)
    assert ours.shape == ref.shape
    assert max_diff(ours, ref) <= TOL

    mono = (left + right) / 2
    feats = waveform_to_features(mono, sr, FeatureConfig())
    expected = reference_features(mono, sr, 1024, AUDIOSET_MEAN, AUDIOSET_STD)
    assert feats.shape == (1024, 128)
    assert max_diff(feats, expected) <= TOL


def test_batched_mixed_lengths_match_per_clip() -> None:
    lengths = [int(s * 16000) for s in (0.3, 1.0, 2.37, 10.0)] + [399, 0]
    clips = [make_clip(n, seed=10 + i) for i, n in enumerate(lengths)]
    batch = torch.zeros(len(clips), max(lengths))
    for row, clip in enumerate(clips):
        batch[row, : clip.numel()] = clip
    # 6 clips x 998 frames exceeds one CPU block (2048 frames), so the blocked path runs too.
    feats, counts = kaldi_fbank(batch, lengths=torch.tensor(lengths))
    assert feats.shape == (len(clips), 998, 128)
    assert counts.tolist() == [num_frames(n) for n in lengths] == [28, 98, 235, 998, 0, 0]
    for row, clip in enumerate(clips):
        n = counts[row].item()
        if n:
            assert max_diff(feats[row, :n], release_fbank(clip)) <= TOL
        assert torch.all(feats[row, n:] == 0)


def test_batched_features_with_resampling_match_per_clip() -> None:
    sr = 44100
    lengths = [int(0.75 * sr), int(1.5 * sr), int(3.1 * sr)]
    clips = [make_clip(n, seed=20 + i, sr=sr) for i, n in enumerate(lengths)]
    batch = torch.zeros(len(clips), max(lengths))
    for row, clip in enumerate(clips):
        batch[row, : clip.numel()] = clip
    cfg = FeatureConfig.esc50()
    feats = waveform_to_features(batch, sr, cfg, lengths=torch.tensor(lengths))
    assert feats.shape == (3, 512, 128)
    for row, clip in enumerate(clips):
        expected = reference_features(clip, sr, 512, ESC50_MEAN, ESC50_STD)
        assert max_diff(feats[row], expected) <= TOL
        assert max_diff(feats[row], waveform_to_features(clip, sr, cfg)) <= TOL


def test_frame_counts() -> None:
    assert num_frames(160000) == 998
    assert [num_frames(n) for n in (0, 399, 400, 559, 560, 16000)] == [0, 0, 1, 1, 2, 98]
    lengths = torch.tensor([0, 399, 400, 559, 560, 16000, 160000])
    assert frame_counts(lengths).tolist() == [num_frames(n) for n in lengths.tolist()]
    assert kaldi_fbank(torch.zeros(2, 160000)).shape == (2, 998, 128)
    assert kaldi_fbank(torch.zeros(3, 399)).shape == (3, 0, 128)


def test_silence_hits_the_log_floor() -> None:
    feats = kaldi_fbank(torch.zeros(1, 1600))
    assert torch.allclose(feats, torch.full_like(feats, math.log(torch.finfo(torch.float32).eps)))


def test_filterbank_is_cached_and_kaldi_shaped() -> None:
    bank = mel_filterbank(128)
    assert bank is mel_filterbank(128, 16000, "cpu", torch.float32)
    assert bank.shape == (257, 128)
    assert torch.all(bank[-1] == 0) and torch.all(bank >= 0)
    assert mel_filterbank(128, dtype=torch.float64).dtype == torch.float64
    assert torch.all(bank.max(dim=0).values <= 1.0)
    # With 128 bins on a 512-point FFT, Kaldi's mel bin 3 (~80 Hz) falls between two FFT bins and
    # is empty: it always sits at the log floor, in the reference features too.
    empty = (bank.sum(dim=0) == 0).nonzero().flatten().tolist()
    assert empty == [3]
    peaks = bank.argmax(dim=0)[[i for i in range(128) if i not in empty]]
    assert torch.all(peaks[1:] >= peaks[:-1])


def test_float64_path_matches_torchaudio_float64() -> None:
    wave = make_clip(37920, seed=4).double()
    ours64 = kaldi_fbank(wave)
    assert ours64.dtype == torch.float64
    assert max_diff(ours64, release_fbank(wave)) <= 1e-9
    # float32 rounding only matters in bins far below the frame's energy (low mel bins after
    # pre-emphasis); everywhere it stays well under the features' own noise.
    assert max_diff(kaldi_fbank(wave.float()), ours64) <= 5e-3


def test_pad_or_crop() -> None:
    fb = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3) + 1
    padded = pad_or_crop(fb, 8)
    assert padded.shape == (8, 3)
    assert torch.equal(padded[:5], fb) and torch.all(padded[5:] == 0)
    cropped = pad_or_crop(fb, 2)
    assert torch.equal(cropped, fb[:2])
    batch = torch.stack([fb, -fb])
    assert pad_or_crop(batch, 8).shape == (2, 8, 3)
    assert torch.equal(pad_or_crop(batch, 3), batch[:, :3])
    assert torch.equal(pad_or_crop(fb, 5), fb)


def test_normalize_and_padded_frames_value() -> None:
    x = torch.tensor([AUDIOSET_MEAN, AUDIOSET_MEAN + 2 * AUDIOSET_STD, 0.0])
    out = normalize(x, AUDIOSET_MEAN, AUDIOSET_STD)
    assert torch.allclose(out, torch.tensor([0.0, 1.0, 4.268 / 9.138]))
    feats = waveform_to_features(make_clip(16000, seed=5), 16000, FeatureConfig())
    assert feats.shape == (1024, 128)
    pad_value = -AUDIOSET_MEAN / (2 * AUDIOSET_STD)
    assert abs(pad_value - 0.46706) < 1e-5
    assert torch.allclose(feats[98:], torch.full_like(feats[98:], pad_value))
    assert not torch.allclose(feats[97], torch.full_like(feats[97], pad_value))


def test_crop_keeps_the_first_frames() -> None:
    wave = make_clip(int(12 * 16000), seed=6)
    feats = waveform_to_features(wave, 16000, FeatureConfig())
    expected = normalize(release_fbank(wave - wave.mean())[:1024])
    assert feats.shape == (1024, 128)
    assert max_diff(feats, expected) <= TOL


def test_remove_dc() -> None:
    wave = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 4.0, 4.0, 4.0]])
    out = remove_dc(wave, torch.tensor([3, 4]))
    assert torch.equal(out, torch.tensor([[-1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(remove_dc(wave[0]), wave[0] - 1.5)


def test_shapes_and_extractor() -> None:
    wave = torch.stack([make_clip(32000, seed=7), make_clip(32000, seed=8)])
    assert waveform_to_features(wave[0], 16000).shape == (1024, 128)
    assert waveform_to_features(wave, 16000).shape == (2, 1024, 128)
    uncut = waveform_to_features(wave, 16000, FeatureConfig(target_length=None))
    assert uncut.shape == (2, 198, 128)
    extractor = FbankExtractor(FeatureConfig.speech_commands())
    out = extractor(wave, torch.tensor([32000, 16000]))
    assert out.shape == (2, 128, 128)
    single = waveform_to_features(wave[1, :16000], 16000, FeatureConfig.speech_commands())
    assert max_diff(out[1], single) <= TOL
    assert list(extractor.parameters()) == [] and list(extractor.buffers()) == []


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        kaldi_fbank(torch.zeros(1, 2, 800))
    with pytest.raises(ValueError):
        kaldi_fbank(torch.zeros(2, 800), lengths=torch.tensor([800, 801]))
    with pytest.raises(ValueError):
        kaldi_fbank(torch.zeros(2, 800), lengths=torch.tensor([800]))
    with pytest.raises(ValueError):
        FeatureConfig(norm_std=0.0)


def test_inference_mode_then_autograd() -> None:
    # The cached filterbank must not be an inference tensor, or later autograd use would fail.
    wave = make_clip(4000, seed=9).to(torch.float64)
    settings = dict(sample_rate=8000, num_mel_bins=40)  # a cache key no other test uses
    with torch.inference_mode():
        kaldi_fbank(wave, **settings)
    wave.requires_grad_(True)
    kaldi_fbank(wave, **settings).sum().backward()
    assert wave.grad is not None and torch.isfinite(wave.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    lengths = [int(s * 16000) for s in (0.3, 2.37, 10.0)]
    batch = torch.zeros(3, max(lengths))
    for row, n in enumerate(lengths):
        batch[row, :n] = make_clip(n, seed=30 + row)
    cpu, cpu_counts = kaldi_fbank(batch, lengths=torch.tensor(lengths))
    gpu, gpu_counts = kaldi_fbank(batch.cuda(), lengths=torch.tensor(lengths).cuda())
    assert gpu.device.type == "cuda"
    assert torch.equal(cpu_counts, gpu_counts.cpu())
    # cuFFT rounds differently from MKL; compare against the float64 truth with float32's margin.
    truth, _ = kaldi_fbank(batch.double(), lengths=torch.tensor(lengths))
    assert max_diff(gpu.cpu(), truth) <= 5e-3
    assert max_diff(cpu, truth) <= 5e-3
