"""Feature settings without torch: the constants, :class:`FeatureConfig` and the frame geometry.

They live apart from :mod:`eat_fairseq.data.features` (which computes the fbank with torch) so that
code which only needs the settings, such as the torch-free ONNX runner
(:mod:`eat_fairseq.inference.onnx_runner`) and the row reader, does not pay torch's import time.
:mod:`eat_fairseq.data.features` re-exports every name here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = [
    "DEFAULT_TARGET_LENGTH",
    "AUDIOSET_MEAN",
    "AUDIOSET_STD",
    "ESC50_MEAN",
    "ESC50_STD",
    "SPEECHCOMMANDS_MEAN",
    "SPEECHCOMMANDS_STD",
    "FRAME_LENGTH_MS",
    "FRAME_SHIFT_MS",
    "PREEMPHASIS",
    "LOW_FREQ",
    "LOG_FLOOR",
    "FeatureConfig",
    "frame_geometry",
    "num_frames",
]

AUDIOSET_MEAN = -4.268
AUDIOSET_STD = 4.569
ESC50_MEAN = -6.627
ESC50_STD = 5.359
SPEECHCOMMANDS_MEAN = -6.846
SPEECHCOMMANDS_STD = 5.565

# the release's input window: 1024 frames = 10.24 s at a 10 ms shift (AudioSet's 10 s clips)
DEFAULT_TARGET_LENGTH = 1024

FRAME_LENGTH_MS = 25
FRAME_SHIFT_MS = 10
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
# Kaldi floors the mel energies at numeric_limits<float>::epsilon() whatever the compute dtype.
LOG_FLOOR = float(np.finfo(np.float32).eps)


@dataclass
class FeatureConfig:
    """Feature settings shared by datasets, inference and tagging.

    ``sample_rate`` is the rate the fbank runs at (inputs at other rates are resampled to it);
    ``target_length`` is the number of frames after padding/cropping (``None`` keeps every frame);
    ``norm_mean``/``norm_std`` are the dataset statistics used by :func:`normalize`.
    """

    sample_rate: int = 16000
    num_mel_bins: int = 128
    target_length: Optional[int] = DEFAULT_TARGET_LENGTH
    norm_mean: float = AUDIOSET_MEAN
    norm_std: float = AUDIOSET_STD

    def __post_init__(self) -> None:
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")
        if self.num_mel_bins <= 3:
            raise ValueError(f"num_mel_bins must be > 3 (Kaldi's limit), got {self.num_mel_bins}")
        if self.target_length is not None and self.target_length <= 0:
            raise ValueError(f"target_length must be positive or None, got {self.target_length}")
        if not self.norm_std > 0:
            raise ValueError(f"norm_std must be positive, got {self.norm_std}")

    @classmethod
    def audioset(cls) -> "FeatureConfig":
        """AudioSet (and pre-training): 1024 frames, AudioSet statistics."""
        return cls()

    @classmethod
    def esc50(cls) -> "FeatureConfig":
        """ESC-50 (5 s clips): 512 frames, ESC-50 statistics."""
        return cls(target_length=512, norm_mean=ESC50_MEAN, norm_std=ESC50_STD)

    @classmethod
    def speech_commands(cls) -> "FeatureConfig":
        """Speech Commands v2 (1 s clips): 128 frames, Speech Commands statistics."""
        return cls(target_length=128, norm_mean=SPEECHCOMMANDS_MEAN, norm_std=SPEECHCOMMANDS_STD)


def frame_geometry(sample_rate: int = 16000) -> tuple[int, int, int]:
    """Return ``(window, shift, n_fft)`` in samples: 25 ms window, 10 ms shift, FFT size rounded up
    to a power of two (Kaldi's ``round_to_power_of_two``); 16 kHz gives (400, 160, 512)."""
    window = int(sample_rate * FRAME_LENGTH_MS // 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS // 1000)
    if window < 2 or shift < 1:
        raise ValueError(f"sample_rate {sample_rate} is too low for a 25 ms / 10 ms frame")
    n_fft = 1 << (window - 1).bit_length()
    return window, shift, n_fft


def num_frames(num_samples: int, sample_rate: int = 16000) -> int:
    """Number of Kaldi frames (``snip_edges``: only frames that fit entirely): 10 s -> 998."""
    window, shift, _ = frame_geometry(sample_rate)
    if num_samples < window:
        return 0
    return 1 + (num_samples - window) // shift
