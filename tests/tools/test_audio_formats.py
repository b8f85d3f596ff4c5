"""The manifest tools' audio checks against files made by real encoders (sox, ffmpeg) in wav, flac,
ogg and mp3, and the exclusion of clips too short for one fbank frame.

Tests that need sox or ffmpeg skip when the tool is not installed (.ci/run installs both when it can).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from eat_fairseq.data.audio import load_audio
from eat_fairseq.prep.audio_folder import write_audio_folder_manifest
from eat_fairseq.prep.common import TOO_SHORT, min_frames, probe_audio
from eat_fairseq.prep.validate import validate_manifest

FORMATS = ("wav", "flac", "ogg", "mp3")
# short clips matter: libsndfile's Vorbis seek failed on 0.3 s and 0.5 s sox OGG files
DURATIONS = (0.3, 0.5, 1.0, 1.7)


def _sox(path: Path, seconds: float, rate: int, channels: int) -> list[str]:
    return ["sox", "-n", "-r", str(rate), "-c", str(channels), str(path), "synth", str(seconds), "sine", "440"]


def _ffmpeg(path: Path, seconds: float, rate: int, channels: int) -> list[str]:
    return ["ffmpeg", "-loglevel", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
            f"sine=frequency=440:duration={seconds}", "-ar", str(rate), "-ac", str(channels), str(path)]


MAKERS = {"sox": _sox, "ffmpeg": _ffmpeg}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def encoded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of sine files written by one tool: every format x duration, mixed rates and channels."""
    tool = request.param
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    root = tmp_path_factory.mktemp(tool)
    for fmt in FORMATS:
        for k, seconds in enumerate(DURATIONS):
            rate = (16000, 44100, 8000, 22050)[k]
            path = root / fmt / f"sine_{seconds}s_{rate}.{fmt}"
            path.parent.mkdir(exist_ok=True)
            cmd = MAKERS[tool](path, seconds, rate, 1 + k % 2)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                pytest.skip(f"{tool} cannot write {fmt} here: {proc.stderr.strip()[-200:]}")
    return root


def test_encoded_files_are_all_kept_with_their_decoded_length(encoded: Path, tmp_path: Path) -> None:
    report = write_audio_folder_manifest(encoded, tmp_path / "m", valid_percent=0)
    assert report.excluded == [], report.excluded
    lines = (tmp_path / "m" / "train.tsv").read_text().splitlines()
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == len(FORMATS) * len(DURATIONS)
    for rel, n in rows:
        wave, _ = load_audio(encoded / rel)  # what training reads
        assert np.isfinite(wave.numpy()).all()
        # the manifest holds the header's length; an MP3 header may be off by less than one MPEG frame
        slack = 1152 if rel.endswith(".mp3") else 0
        assert abs(wave.shape[-1] - int(n)) <= slack, (rel, n, wave.shape)
    assert validate_manifest(tmp_path / "m" / "train.tsv") == []


def _write(path: Path, frames: int, rate: int) -> None:
    t = np.arange(frames) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)


def test_clips_shorter_than_one_fbank_frame_are_excluded(tmp_path: Path) -> None:
    audio = tmp_path / "audio"
    audio.mkdir()
    assert (min_frames(16000), min_frames(8000), min_frames(44100)) == (400, 200, 1103)
    _write(audio / "one_sample.wav", 1, 16000)
    _write(audio / "short_16k.wav", 399, 16000)
    _write(audio / "short_8k.wav", 199, 8000)
    _write(audio / "ok_16k.wav", 400, 16000)
    _write(audio / "ok_8k.wav", 200, 8000)
    report = write_audio_folder_manifest(audio, tmp_path / "m", valid_percent=0)
    assert sorted((e.path, e.reason) for e in report.excluded) == [
        ("one_sample.wav", TOO_SHORT), ("short_16k.wav", TOO_SHORT), ("short_8k.wav", TOO_SHORT)]
    assert "shorter than one 25 ms fbank frame" in probe_audio(str(audio / "one_sample.wav")).detail
    excluded = (tmp_path / "m" / "excluded.tsv").read_text()
    assert "one_sample.wav\ttoo-short\t1 samples at 16000 Hz" in excluded
    kept = [line.split("\t")[0] for line in (tmp_path / "m" / "train.tsv").read_text().splitlines()[1:]]
    assert kept == ["ok_16k.wav", "ok_8k.wav"]
    # a hand-written manifest listing a 1-sample file is reported by the validator
    manifest = tmp_path / "hand.tsv"
    manifest.write_text(f"{audio}\none_sample.wav\t1\nok_16k.wav\t400\n")
    problems = validate_manifest(manifest)
    assert [(p.line, "too short" in p.message) for p in problems] == [(2, True)]
