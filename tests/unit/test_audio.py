"""Waveform loading, validation and mono/16 kHz conversion."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as taf

from eat_fairseq.data.audio import AudioError, load_audio, load_waveform, to_mono_16k


def tone(num_samples: int, sr: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    """(S, C) float32 test signal; channel c plays freq * (c + 1) so channels differ."""
    t = np.arange(num_samples) / sr
    cols = [0.4 * np.sin(2 * math.pi * freq * (c + 1) * t) for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def test_wav_mono_pcm16_roundtrip(tmp_path: Path) -> None:
    data = tone(8000, 16000)
    path = tmp_path / "mono.wav"
    sf.write(path, data, 16000, subtype="PCM_16")
    wave, sr = load_audio(path)
    assert sr == 16000
    assert wave.dtype == torch.float32 and wave.shape == (1, 8000)
    assert np.abs(wave.numpy().T - data).max() <= 1.0 / 32768 + 1e-7


def test_flac_stereo_44k(tmp_path: Path) -> None:
    data = tone(44100, 44100, channels=2)
    path = tmp_path / "stereo.flac"
    sf.write(path, data, 44100)
    wave, sr = load_audio(str(path))
    assert sr == 44100 and wave.shape == (2, 44100)
    assert np.abs(wave.numpy().T - data).max() < 1e-4


def test_ogg_vorbis_8k(tmp_path: Path) -> None:
    data = tone(8000, 8000)
    path = tmp_path / "clip.ogg"
    sf.write(path, data, 8000, format="OGG", subtype="VORBIS")
    wave, sr = load_audio(path)
    assert sr == 8000 and wave.shape[0] == 1
    assert abs(wave.shape[1] - 8000) <= 64
    assert 0.2 < wave.abs().max().item() < 0.6  # lossy, but clearly the same tone


def test_mp3_when_libsndfile_supports_it(tmp_path: Path) -> None:
    if "MP3" not in sf.available_formats():
        pytest.skip("libsndfile built without MP3")
    path = tmp_path / "clip.mp3"
    try:
        sf.write(path, tone(16000, 16000), 16000, format="MP3")
    except Exception as exc:  # decoding may be available without an encoder
        pytest.skip(f"cannot write mp3 here: {exc}")
    wave, sr = load_audio(path)
    assert sr == 16000 and wave.shape[0] == 1 and wave.shape[1] > 15000


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_samples_rejected(tmp_path: Path, bad: float) -> None:
    data = tone(1600, 16000)
    data[100, 0] = bad
    path = tmp_path / "broken_float.wav"
    sf.write(path, data, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="broken_float.wav") as info:
        load_audio(path)
    assert "NaN or infinite" in str(info.value)


def test_empty_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty_bytes.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="empty_bytes.wav"):
        load_audio(path)


def test_zero_length_wav_rejected(tmp_path: Path) -> None:
    path = tmp_path / "no_samples.wav"
    sf.write(path, np.zeros((0, 1), dtype=np.float32), 16000)
    assert path.stat().st_size > 0  # a valid header with no frames
    with pytest.raises(AudioError, match="no_samples.wav") as info:
        load_audio(path)
    assert "no samples" in str(info.value)


def test_text_file_renamed_wav_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes_not_audio.wav"
    path.write_text("this is not a RIFF file\n" * 20)
    with pytest.raises(AudioError, match="notes_not_audio.wav") as info:
        load_audio(path)
    assert "cannot read" in str(info.value)


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="missing_clip.flac"):
        load_waveform(tmp_path / "missing_clip.flac")


def test_audio_error_is_runtime_error() -> None:
    assert issubclass(AudioError, RuntimeError)


def test_stereo_mixdown_before_resampling() -> None:
    data = torch.from_numpy(tone(44100, 44100, channels=2).T.copy())  # (2, S)
    out = to_mono_16k(data, 44100)
    expected = taf.resample(data.mean(dim=0), 44100, 16000)
    assert out.shape == (16000,)
    assert torch.equal(out, expected)


def test_mono_and_16k_passthrough() -> None:
    wave = torch.from_numpy(tone(1000, 16000)[:, 0].copy())
    assert torch.equal(to_mono_16k(wave, 16000), wave)
    assert torch.equal(to_mono_16k(wave[None], 16000), wave)
    upsampled = to_mono_16k(wave, 8000)
    assert upsampled.shape == (2000,)
    assert torch.equal(upsampled, taf.resample(wave, 8000, 16000))
    with pytest.raises(ValueError):
        to_mono_16k(torch.zeros(1, 2, 3), 16000)
    with pytest.raises(ValueError):
        to_mono_16k(wave, 0)


def test_load_waveform_stereo_8k(tmp_path: Path) -> None:
    data = tone(4000, 8000, channels=2)
    path = tmp_path / "stereo8k.wav"
    sf.write(path, data, 8000, subtype="FLOAT")
    wave = load_waveform(path)
    manual = taf.resample(torch.from_numpy(data).mean(dim=1), 8000, 16000)
    assert wave.shape == (8000,) and wave.dtype == torch.float32
    assert torch.allclose(wave, manual, atol=1e-6)
    assert load_waveform(path, target_sr=8000).shape == (4000,)
