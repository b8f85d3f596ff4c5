"""EAT input features: Kaldi-compatible log-mel filterbanks, padding and normalisation.

The released EAT checkpoints were trained on ``torchaudio.compliance.kaldi.fbank`` features computed
one clip at a time. This module reproduces those numbers (within float32 rounding) but for a whole
zero-padded batch in one call, on any device, so feature extraction can run on the GPU next to the
model instead of being the data loader's bottleneck. See ``docs/reference.md`` section 1.

Pipeline (:func:`waveform_to_features`): resample -> subtract the waveform mean (DC) -> fbank ->
zero-pad at the end / crop from frame 0 -> ``(x - mean) / (2 * std)``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict
from typing import Optional, Union, overload

import torch
import torch.nn.functional as nnf
import torchaudio.functional as taf

__all__ = [
    "DEFAULT_TARGET_LENGTH",
    "AUDIOSET_MEAN",
    "AUDIOSET_STD",
    "ESC50_MEAN",
    "ESC50_STD",
    "SPEECHCOMMANDS_MEAN",
    "SPEECHCOMMANDS_STD",
    "FeatureConfig",
    "FbankExtractor",
    "frame_geometry",
    "num_frames",
    "frame_counts",
    "mel_filterbank",
    "remove_dc",
    "kaldi_fbank",
    "pad_or_crop",
    "normalize",
    "release_fbank",
    "fbank_of",
    "to_window",
    "split_windows",
    "waveform_to_features",
]

from eat_fairseq.data.feature_settings import (
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    DEFAULT_TARGET_LENGTH,
    ESC50_MEAN,
    ESC50_STD,
    FRAME_LENGTH_MS,  # noqa: F401  (re-exported: it used to be defined here)
    FRAME_SHIFT_MS,
    LOG_FLOOR,
    LOW_FREQ,
    PREEMPHASIS,
    SPEECHCOMMANDS_MEAN,
    SPEECHCOMMANDS_STD,
    FeatureConfig,
    frame_geometry,
    num_frames,
)


def frame_counts(lengths: torch.Tensor, sample_rate: int = 16000) -> torch.Tensor:
    """Vectorised :func:`num_frames` for a LongTensor of sample counts."""
    window, shift, _ = frame_geometry(sample_rate)
    lengths = lengths.long()
    counts = torch.div(lengths - window, shift, rounding_mode="floor") + 1
    return torch.where(lengths >= window, counts, torch.zeros_like(counts))


@functools.lru_cache(maxsize=32)
def _cached_filterbank(
    num_mel_bins: int,
    n_fft: int,
    sample_rate: int,
    low_freq: float,
    high_freq: float,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    # Kaldi (BaseFloat) and torchaudio both evaluate the triangle weights in float32 with this exact
    # sequence of operations; the released models saw those rounded weights, and low mel bins hold
    # only a couple of FFT bins, so more accurate weights would move them by ~1e-4. Hence float32
    # here whatever the compute dtype. Created outside inference mode so the cached tensor stays
    # usable in autograd-enabled code later.
    with torch.inference_mode(False), torch.no_grad():
        mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
        mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
        delta = (mel_high - mel_low) / (num_mel_bins + 1)
        index = torch.arange(num_mel_bins, dtype=torch.float32).unsqueeze(1)
        left = mel_low + index * delta
        centre = mel_low + (index + 1.0) * delta
        right = mel_low + (index + 2.0) * delta
        # Kaldi weights the bins 0 .. n_fft/2 - 1; the Nyquist bin gets weight 0.
        bin_freq = (sample_rate / n_fft) * torch.arange(n_fft // 2, dtype=torch.float32)
        bin_mel = (1127.0 * (1.0 + bin_freq / 700.0).log()).unsqueeze(0)
        up = (bin_mel - left) / (centre - left)
        down = (right - bin_mel) / (right - centre)
        weights = torch.clamp(torch.minimum(up, down), min=0.0)
        weights = nnf.pad(weights, (0, 1))
        return weights.t().contiguous().to(device=device, dtype=dtype)


def mel_filterbank(
    num_mel_bins: int = 128,
    sample_rate: int = 16000,
    device: Union[torch.device, str, None] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Kaldi's triangular mel filterbank as ``(n_fft // 2 + 1, num_mel_bins)`` (ready for
    ``power @ bank``), from 20 Hz to Nyquist on the ``1127 ln(1 + f / 700)`` mel scale.

    Cached per (settings, device, dtype): a batch on the GPU must not rebuild or re-upload it.
    """
    _, _, n_fft = frame_geometry(sample_rate)
    high = 0.5 * sample_rate
    if not 0.0 <= LOW_FREQ < high:
        raise ValueError(f"sample_rate {sample_rate} leaves no band above {LOW_FREQ} Hz")
    return _cached_filterbank(
        num_mel_bins, n_fft, sample_rate, LOW_FREQ, high, torch.device(device or "cpu"), dtype
    )


@functools.lru_cache(maxsize=32)
def _cached_window(window: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Kaldi's "hanning" is the symmetric Hann window 0.5 - 0.5 cos(2 pi n / (N - 1)); generated
    # directly in the compute dtype like torchaudio does, so framing is bit-identical to it.
    with torch.inference_mode(False), torch.no_grad():
        return torch.hann_window(window, periodic=False, device=device, dtype=dtype)


def _check_lengths(lengths: torch.Tensor, batch: int, num_samples: int, device: torch.device) -> torch.Tensor:
    lengths = torch.as_tensor(lengths, device=device).long()
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    if bool(((lengths < 0) | (lengths > num_samples)).any()):
        raise ValueError(f"lengths must lie in [0, {num_samples}], got {lengths.tolist()}")
    return lengths


def _valid_samples(lengths: torch.Tensor, num_samples: int) -> torch.Tensor:
    return torch.arange(num_samples, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def remove_dc(wave: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Subtract each clip's mean over its valid samples (reference 1.1); padding stays zero.

    Kaldi's per-frame DC removal makes this step a mathematical no-op for the fbank, but the release
    does it, and it keeps float32 framing well conditioned for clips with a large offset.
    ``wave`` is (S,) or (B, S); ``lengths`` (B,) counts the valid samples of a zero-padded batch.
    """
    if lengths is None:
        return wave - wave.mean(dim=-1, keepdim=True)
    batched = wave if wave.dim() == 2 else wave.unsqueeze(0)
    lengths = _check_lengths(lengths, batched.shape[0], batched.shape[-1], batched.device)
    valid = _valid_samples(lengths, batched.shape[-1])
    total = torch.where(valid, batched, torch.zeros_like(batched)).sum(dim=-1, keepdim=True)
    mean = total / lengths.clamp(min=1).unsqueeze(1).to(batched.dtype)
    out = torch.where(valid, batched - mean, torch.zeros_like(batched))
    return out if wave.dim() == 2 else out.squeeze(0)


# Frames processed per block (all clips together). On CPU ~2k frames (a few MB per intermediate)
# keep the FFT and matmul in cache: a 32 x 10 s batch in one piece ran 3-6x slower per clip than
# in blocks. On GPUs, blocks only bound the memory of very large batches.
_FRAMES_PER_BLOCK = {"cpu": 2048, "cuda": 1 << 17}


def _log_mel(frames: torch.Tensor, window: torch.Tensor, bank: torch.Tensor, n_fft: int) -> torch.Tensor:
    # Same operations in the same order as torchaudio's Kaldi port, so float32 rounding matches it:
    # low mel bins hold little energy after pre-emphasis and are sensitive to every rounding step.
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat((frames[..., :1], frames[..., :-1]), dim=-1)  # x[max(0, j - 1)]
    frames = (frames - PREEMPHASIS * previous) * window
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2.0)  # (..., n_fft // 2 + 1)
    return torch.matmul(power, bank).clamp(min=LOG_FLOOR).log()


@overload
def kaldi_fbank(
    waveform: torch.Tensor, sample_rate: int = ..., num_mel_bins: int = ..., lengths: None = ...
) -> torch.Tensor: ...


@overload
def kaldi_fbank(
    waveform: torch.Tensor, sample_rate: int = ..., num_mel_bins: int = ..., *, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]: ...


def kaldi_fbank(
    waveform: torch.Tensor,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    lengths: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Batched Kaldi log-mel fbank with EAT's settings, on the waveform's device and dtype.

    Equals ``torchaudio.compliance.kaldi.fbank(clip[None], htk_compat=True, sample_frequency=sr,
    use_energy=False, window_type='hanning', num_mel_bins=F, dither=0.0, frame_shift=10)`` per clip:
    25 ms symmetric Hann window, 10 ms shift, per-frame DC removal, pre-emphasis 0.97, zero-padded
    power-of-two FFT, power spectrum, mel bins 20 Hz..Nyquist, natural log floored at float eps.

    ``waveform`` is (S,) -> (T, F) or (B, S) -> (B, T, F) with ``T = num_frames(S)``. For clips of
    different lengths, zero-pad them to a common S and pass ``lengths`` (B,): the call then returns
    ``(feats, counts)`` where ``counts[b] = num_frames(lengths[b])`` and frames from ``counts[b]`` on
    are zero. Valid frames never touch the padding, so they equal the per-clip result.
    The whole-waveform DC removal of the reference is :func:`remove_dc` (done by
    :func:`waveform_to_features`). On GPUs, keep TF32 matmuls off for exact parity.
    """
    squeeze = waveform.dim() == 1
    batched = waveform.unsqueeze(0) if squeeze else waveform
    if batched.dim() != 2:
        raise ValueError(f"expected a (S,) or (B, S) waveform, got shape {tuple(waveform.shape)}")
    if not batched.is_floating_point():
        batched = batched.float()
    batch, num_samples = batched.shape
    device, dtype = batched.device, batched.dtype
    window, shift, n_fft = frame_geometry(sample_rate)
    if lengths is not None:
        lengths = _check_lengths(lengths, batch, num_samples, device)

    t = num_frames(num_samples, sample_rate)
    window_fn = _cached_window(window, device, dtype)
    bank = mel_filterbank(num_mel_bins, sample_rate, device, dtype)
    block = max(1, _FRAMES_PER_BLOCK.get(device.type, _FRAMES_PER_BLOCK["cuda"]) // max(batch, 1))
    if t == 0:
        feats = batched.new_zeros(batch, 0, num_mel_bins)
    else:
        frames = batched.unfold(-1, window, shift)  # (B, T, window), a view: no copy of the audio
        if block >= t:
            feats = _log_mel(frames, window_fn, bank, n_fft)
        else:
            # Blocks of time frames across the WHOLE batch: each block stays cache-sized on CPU
            # and bounded in GPU memory. Every op is per frame, so the result equals one pass.
            feats = batched.new_empty(batch, t, num_mel_bins)
            for start in range(0, t, block):
                stop = min(start + block, t)
                feats[:, start:stop] = _log_mel(frames[:, start:stop], window_fn, bank, n_fft)

    if lengths is None:
        return feats.squeeze(0) if squeeze else feats
    counts = frame_counts(lengths, sample_rate)
    if t > 0:
        valid = torch.arange(t, device=device).unsqueeze(0) < counts.unsqueeze(1)
        feats = feats.masked_fill(~valid.unsqueeze(-1), 0.0)
    if squeeze:
        return feats.squeeze(0), counts.squeeze(0)
    return feats, counts


def pad_or_crop(fbank: torch.Tensor, target_length: int) -> torch.Tensor:
    """Zero-pad at the END or crop from frame 0 along time (dim -2) to ``target_length`` frames.

    Deterministic on purpose: EAT never crops at random, so evaluation and training see the same
    frames. Works for (T, F) and (B, T, F).
    """
    if target_length < 0:
        raise ValueError(f"target_length must be >= 0, got {target_length}")
    frames = fbank.shape[-2]
    if frames < target_length:
        return nnf.pad(fbank, (0, 0, 0, target_length - frames))
    return fbank[..., :target_length, :]


def normalize(fbank: torch.Tensor, mean: float = AUDIOSET_MEAN, std: float = AUDIOSET_STD) -> torch.Tensor:
    """``(x - mean) / (2 * std)``: the release's scaling (twice the std), applied AFTER padding, so
    padded frames become ``-mean / (2 * std)`` (about +0.467 with AudioSet statistics), not 0."""
    return (fbank - mean) / (2.0 * std)


def _resampled_lengths(lengths: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    # torchaudio.functional.resample returns ceil(new * S / orig) samples; ceil division is exact.
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    return torch.div(lengths * new + orig - 1, orig, rounding_mode="floor")


def release_fbank(wave: torch.Tensor, sample_rate: int = 16000, num_mel_bins: int = 128) -> torch.Tensor:
    """``torchaudio.compliance.kaldi.fbank`` of one mono clip ``(S,)`` called exactly as the release calls it.

    The yardstick of :func:`kaldi_fbank` (tests, ``benchmarks/features.py``): one clip at a time, CPU.
    """
    import torchaudio.compliance.kaldi as kaldi

    return kaldi.fbank(wave[None], htk_compat=True, sample_frequency=sample_rate, use_energy=False,
                       window_type="hanning", num_mel_bins=num_mel_bins, dither=0.0, frame_shift=FRAME_SHIFT_MS)


def fbank_of(
    wave: torch.Tensor,
    sr: int,
    cfg: Optional[FeatureConfig] = None,
    lengths: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mono waveform(s) at ``sr`` -> log-mel fbank at ``cfg.sample_rate``, not yet windowed or normalised.

    (S,) -> (T, F), (B, S) -> (B, T, F): resample (when ``sr`` differs), remove the DC offset, Kaldi
    fbank. For a zero-padded batch pass ``lengths`` (valid samples at ``sr``): each row then equals
    processing its clip alone. Multi-channel audio must be mixed down first
    (:func:`eat_fairseq.data.audio.to_mono_16k`). The first half of :func:`waveform_to_features`;
    inference cuts its result into several windows (:func:`split_windows`), training takes one
    (:func:`to_window`).
    """
    cfg = cfg if cfg is not None else FeatureConfig()
    if wave.dim() not in (1, 2):
        raise ValueError(f"expected a mono (S,) or (B, S) waveform, got shape {tuple(wave.shape)}")
    if not wave.is_floating_point():
        wave = wave.float()
    if lengths is not None:
        batch = 1 if wave.dim() == 1 else wave.shape[0]
        lengths = _check_lengths(lengths.reshape(-1), batch, wave.shape[-1], wave.device)
    if sr != cfg.sample_rate:
        wave = taf.resample(wave, sr, cfg.sample_rate)
        if lengths is not None:
            lengths = _resampled_lengths(lengths, sr, cfg.sample_rate).clamp(max=wave.shape[-1])
    squeeze = wave.dim() == 1
    batched = wave.unsqueeze(0) if squeeze else wave
    batched = remove_dc(batched, lengths)
    if lengths is None:
        feats = kaldi_fbank(batched, cfg.sample_rate, cfg.num_mel_bins)
    else:
        feats, _ = kaldi_fbank(batched, cfg.sample_rate, cfg.num_mel_bins, lengths=lengths)
    return feats.squeeze(0) if squeeze else feats


def to_window(fbank: torch.Tensor, cfg: Optional[FeatureConfig] = None) -> torch.Tensor:
    """The model's input window of an fbank ``(T, F)`` or ``(B, T, F)``: zero-pad at the end / crop from
    frame 0 to ``cfg.target_length`` (kept as is when it is None), then ``(x - mean) / (2 * std)``."""
    cfg = cfg if cfg is not None else FeatureConfig()
    if cfg.target_length is not None:
        fbank = pad_or_crop(fbank, cfg.target_length)
    return normalize(fbank, cfg.norm_mean, cfg.norm_std)


def split_windows(fbank: torch.Tensor, cfg: FeatureConfig) -> tuple[torch.Tensor, list[int]]:
    """A whole clip's fbank ``(T, F)`` as consecutive model windows: ``(N, target_length, F)`` normalised
    (the last zero-padded at the end, as :func:`to_window` pads), and the real frames of each window.

    Window 0 equals ``to_window(fbank, cfg)``: what training sees of a clip is what inference sees first.
    """
    length = int(cfg.target_length)
    total = fbank.shape[0]
    count = max(1, math.ceil(total / length))
    padded = nnf.pad(fbank, (0, 0, 0, count * length - total))
    windows = normalize(padded.reshape(count, length, fbank.shape[-1]), cfg.norm_mean, cfg.norm_std)
    return windows, [min(length, total - k * length) for k in range(count)]


def waveform_to_features(
    wave: torch.Tensor,
    sr: int,
    cfg: Optional[FeatureConfig] = None,
    lengths: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mono waveform(s) at ``sr`` -> normalised EAT features: (S,) -> (T, F), (B, S) -> (B, T, F).

    THE feature path (waveform -> normalised fbank window) of the datasets, the API, HEAR and the probe:
    :func:`fbank_of` (resample, DC, fbank) then :func:`to_window` (pad/crop, normalise). For a
    zero-padded batch pass ``lengths`` (valid samples at ``sr``).
    """
    cfg = cfg if cfg is not None else FeatureConfig()
    return to_window(fbank_of(wave, sr, cfg, lengths), cfg)


class FbankExtractor(torch.nn.Module):
    """Module form of :func:`waveform_to_features` for waveforms already at ``cfg.sample_rate``.

    ``forward(wave (B, S), lengths (B,) | None) -> (B, target_length, num_mel_bins)``, normalised.
    It has no parameters or buffers (the filterbank is cached per device), so it can sit inside a
    model, a dataset or an inference pipeline and follow the input's device.
    """

    def __init__(self, cfg: Optional[FeatureConfig] = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else FeatureConfig()

    def forward(self, wave: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return waveform_to_features(wave, self.cfg.sample_rate, self.cfg, lengths)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.cfg).items())
