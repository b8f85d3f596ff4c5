"""Waveform I/O: read an audio file, validate it, and bring it to mono 16 kHz.

Every failure is raised as :class:`AudioError` naming the offending file, so a data loader can
report (or skip) a bad clip among millions without guessing which one it was.
"""
from __future__ import annotations

import os
from typing import Union

import torch
import torchaudio.functional as taf

from eat_fairseq.data.errors import AudioError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["AudioError", "load_audio", "to_mono_16k", "load_waveform"]


def load_audio(path: PathLike) -> tuple[torch.Tensor, int]:
    """Read the audio file ``path``: ``(wave (C, S) float32, sample_rate)``.

    A whole file is the simplest manifest row, so this is :func:`eat_fairseq.data.clips.read_row` of
    a file row: every file a user passes (the Python API, HEAR, the demo) is decoded by the same code
    as training reads its manifests. Any format libsndfile reads is accepted (wav, flac, ogg/vorbis,
    and mp3 with libsndfile >= 1.1). Files that cannot be decoded, that hold no samples, or that
    contain NaN/inf samples raise :class:`AudioError` naming the file: such clips would otherwise
    silently turn into NaN features and poison a whole training batch.
    """
    from eat_fairseq.data.clips import read_row
    from eat_fairseq.data.manifest import ManifestRow

    name = os.fspath(path)
    return read_row(ManifestRow(path=name, num_samples=0, line=0, rel=name))


def to_mono_16k(wave: torch.Tensor, sr: int, target_sr: int = 16000) -> torch.Tensor:
    """Mix ``wave`` ((C, S) or (S,)) down to mono, then resample it to ``target_sr``; returns (S',).

    The mix-down happens first on purpose: the EAT release resampled stereo clips along the channel
    axis, and resampling once instead of per channel is also cheaper. Resampling uses
    ``torchaudio.functional.resample`` and is skipped when the rate already matches.
    """
    if sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got sr={sr}, target_sr={target_sr}")
    if wave.dim() == 2:
        mono = wave.mean(dim=0)
    elif wave.dim() == 1:
        mono = wave
    else:
        raise ValueError(f"expected a (C, S) or (S,) waveform, got shape {tuple(wave.shape)}")
    if not mono.is_floating_point():
        mono = mono.float()
    if sr != target_sr:
        mono = taf.resample(mono, sr, target_sr)
    return mono


def load_waveform(path: PathLike, target_sr: int = 16000) -> torch.Tensor:
    """Load ``path`` and return a mono float32 waveform (S,) at ``target_sr``."""
    wave, sr = load_audio(path)
    return to_mono_16k(wave, sr, target_sr)
