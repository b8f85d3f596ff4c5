"""manifests/norm_stats.py: the normalisation statistics of a user's own training split.

They must be the statistics of exactly what training feeds the model (the crop window of each clip,
mixed down and resampled, through the one fbank path), without padding, and the tool must behave like
the other preparation CLIs (deterministic, --force to overwrite)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from helpers import REPO

from eat_fairseq.data.audio import load_audio, to_mono_16k
from eat_fairseq.data.features import fbank_of
from eat_fairseq.prep.norm_stats import OUTPUT_NAME, compute_norm_stats

CLI = REPO / "manifests" / "norm_stats.py"


def _folder(root: Path) -> Path:
    """A manifest folder: train clips at three rates, one stereo, one longer than the 128-frame window,
    and a valid clip far louder than the rest (which must not count)."""
    audio = root / "audio"
    audio.mkdir(parents=True)
    rng = np.random.default_rng(3)
    rows = []
    for i, (sr, seconds) in enumerate([(8000, 0.5), (16000, 0.9), (22050, 2.5), (44100, 0.7)]):
        x = 0.2 * rng.standard_normal(int(sr * seconds)) * (1 + i)
        if i == 1:
            x = np.stack([x, 0.5 * x], axis=1)
        sf.write(audio / f"c{i}.wav", x.astype(np.float32), sr)
        rows.append((f"c{i}.wav", x.shape[0]))
    sf.write(audio / "loud.wav", (0.9 * np.sign(rng.standard_normal(16000))).astype(np.float32), 16000)
    data = root / "data"
    data.mkdir()
    (data / "train.tsv").write_text(f"{audio}\n" + "".join(f"{r}\t{n}\n" for r, n in rows))
    (data / "valid.tsv").write_text(f"{audio}\nloud.wav\t16000\n")
    return data


def _direct(data: Path, target_length: int | None) -> tuple[float, float, int]:
    """mean, std and frame count computed independently: whole files through load_audio, cropped after."""
    lines = (data / "train.tsv").read_text().splitlines()
    feats = []
    for line in lines[1:]:
        wave, sr = load_audio(Path(lines[0]) / line.split("\t")[0])
        fbank = fbank_of(to_mono_16k(wave, sr), 16000)
        feats.append(fbank if target_length is None else fbank[:target_length])
    values = torch.cat(feats).double()
    return float(values.mean()), float(values.std(unbiased=False)), sum(f.shape[0] for f in feats)


def test_statistics_equal_a_direct_computation_of_the_training_split(tmp_path: Path) -> None:
    data = _folder(tmp_path)
    for target_length in (128, None):
        stats = compute_norm_stats(data / "train.tsv", target_length)
        mean, std, frames = _direct(data, target_length)
        assert stats.clips == 4 and stats.frames == frames
        # read_row_window decodes only the window of the long clip (DC taken over it): float32 rounding
        assert abs(stats.mean - mean) < 1e-4 and abs(stats.std - std) < 1e-4, (stats, mean, std)
    assert compute_norm_stats(data / "train.tsv").frames < compute_norm_stats(data / "train.tsv", None).frames
    assert compute_norm_stats(data / "valid.tsv").mean > stats.mean + 1  # the loud clip is in valid only


def test_cli_writes_the_overrides_deterministically_and_needs_force_to_overwrite(tmp_path: Path) -> None:
    data = _folder(tmp_path)
    out = data / OUTPUT_NAME

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(CLI), str(data), *args], capture_output=True, text=True)

    first = cli()
    assert first.returncode == 0, first.stderr
    stats = compute_norm_stats(data / "train.tsv")
    line = f"++task.norm_mean={stats.mean:.4f} ++task.norm_std={stats.std:.4f}"
    assert first.stdout.strip() == line and out.read_text() == line + "\n"
    assert "4 clips" in first.stderr

    out.write_text("kept\n")
    refused = cli("--split", "valid")
    assert refused.returncode == 2 and "--force" in refused.stderr and out.read_text() == "kept\n"
    forced = cli("--force")
    assert forced.returncode == 0 and out.read_text() == line + "\n"  # same input, same bytes

    helped = subprocess.run([sys.executable, str(CLI), "--help"], capture_output=True, text=True)
    assert "++task.norm_mean=" in helped.stdout and "--force" in helped.stdout
    missing = cli("--split", "test", "--out", str(tmp_path / "x.txt"))
    assert missing.returncode == 2 and "test.tsv" in missing.stderr and not (tmp_path / "x.txt").exists()
