"""The Kaldi fbank and the model windows in numpy, for the torch-free ONNX runner.

:func:`eat_fairseq.data.features.fbank_of` (torch) is THE feature path: training, the ``.pt`` models,
the HEAR module and the probes use it, bit-identical to the release's ``torchaudio`` features. This
module repeats its steps (whole-clip DC removal, 25 ms / 10 ms frames, per-frame DC removal,
pre-emphasis 0.97, symmetric Hann window, 512-point power spectrum, Kaldi mel bins, log floored at
float32 eps) and :func:`~eat_fairseq.data.features.split_windows` in the same order and in float32,
for one reason: ``eat-extract`` / ``eat-tag`` with an ``.onnx`` model then never import torch, whose
import alone takes longer than embedding several clips with an int8 model. The two are kept equal
by tests (``tests/unit/test_onnx_runner.py``: within float32 rounding, about 1e-5 of the log-mel
values) rather than by sharing code. Resampling is not repeated here: clips at another rate go
through torch's resampler (:func:`eat_fairseq.data.audio.to_mono_16k`).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from eat_fairseq.data.feature_settings import LOG_FLOOR, LOW_FREQ, PREEMPHASIS, FeatureConfig, frame_geometry

__all__ = ["mel_filterbank_numpy", "fbank_numpy", "split_windows_numpy"]


@functools.lru_cache(maxsize=8)
def mel_filterbank_numpy(num_mel_bins: int = 128, sample_rate: int = 16000) -> np.ndarray:
    """Kaldi's mel filterbank ``(n_fft // 2 + 1, num_mel_bins)`` float32, evaluated in float32 with the
    operations of :func:`eat_fairseq.data.features.mel_filterbank` (the Nyquist bin weighs 0)."""
    _, _, n_fft = frame_geometry(sample_rate)
    high = 0.5 * sample_rate
    mel_low = 1127.0 * math.log(1.0 + LOW_FREQ / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high / 700.0)
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    f32 = np.float32
    index = np.arange(num_mel_bins, dtype=f32)[:, None]
    left = f32(mel_low) + index * f32(delta)
    centre = f32(mel_low) + (index + f32(1.0)) * f32(delta)
    right = f32(mel_low) + (index + f32(2.0)) * f32(delta)
    bin_freq = f32(sample_rate / n_fft) * np.arange(n_fft // 2, dtype=f32)
    bin_mel = (f32(1127.0) * np.log(f32(1.0) + bin_freq / f32(700.0)))[None, :]
    up = (bin_mel - left) / (centre - left)
    down = (right - bin_mel) / (right - centre)
    weights = np.maximum(np.minimum(up, down), f32(0.0))
    weights = np.pad(weights, ((0, 0), (0, 1)))
    bank = np.ascontiguousarray(weights.T, dtype=f32)
    bank.setflags(write=False)
    return bank


@functools.lru_cache(maxsize=8)
def _hann(window: int) -> np.ndarray:
    n = np.arange(window, dtype=np.float64)
    out = (0.5 - 0.5 * np.cos(2.0 * math.pi * n / (window - 1))).astype(np.float32)
    out.setflags(write=False)
    return out


def fbank_numpy(wave: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Mono float32 waveform ``(S,)`` at ``cfg.sample_rate`` -> log-mel fbank ``(T, F)`` float32,
    not windowed or normalised (:func:`eat_fairseq.data.features.fbank_of` without resampling)."""
    if wave.ndim != 1:
        raise ValueError(f"expected a mono (S,) waveform, got shape {wave.shape}")
    window, shift, n_fft = frame_geometry(cfg.sample_rate)
    wave = np.asarray(wave, dtype=np.float32)
    if wave.shape[0] < window:
        return np.zeros((0, cfg.num_mel_bins), np.float32)
    wave = wave - wave.mean(dtype=np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(wave, window)[::shift]  # (T, window), a view
    frames = frames - frames.mean(axis=-1, keepdims=True, dtype=np.float32)
    previous = np.concatenate((frames[:, :1], frames[:, :-1]), axis=-1)  # x[max(0, j - 1)]
    frames = (frames - np.float32(PREEMPHASIS) * previous) * _hann(window)
    power = np.abs(np.fft.rfft(frames, n=n_fft)) ** 2  # (T, n_fft // 2 + 1); float32 input stays float32
    mel = power.astype(np.float32, copy=False) @ mel_filterbank_numpy(cfg.num_mel_bins, cfg.sample_rate)
    return np.log(np.maximum(mel, np.float32(LOG_FLOOR)))


def split_windows_numpy(fbank: np.ndarray, cfg: FeatureConfig) -> tuple[np.ndarray, list[int]]:
    """:func:`eat_fairseq.data.features.split_windows` in numpy: consecutive windows
    ``(N, target_length, F)`` normalised (the last zero-padded at the end), and the real frames of each."""
    length = int(cfg.target_length)
    total = fbank.shape[0]
    count = max(1, math.ceil(total / length))
    padded = np.pad(fbank, ((0, count * length - total), (0, 0)))
    windows = (padded.reshape(count, length, fbank.shape[-1]) - np.float32(cfg.norm_mean)) / np.float32(2.0 * cfg.norm_std)
    return windows.astype(np.float32, copy=False), [min(length, total - k * length) for k in range(count)]
