"""Long recordings: only the frames used are read (whole files, spans, shard members), crops at the
start (release) or at a seeded random window per epoch, and windows cut by manifests/windows.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from eat_fairseq.data import clips
from eat_fairseq.data.audio import load_audio, to_mono_16k
from eat_fairseq.data.clips import choose_start, read_row, read_row_window, window_frames
from eat_fairseq.data.features import FeatureConfig, waveform_to_features
from eat_fairseq.data.manifest import ManifestError, ManifestRow, read_manifest
from helpers import REPO

CFG = FeatureConfig(target_length=128)  # 1.295 s of audio at 16 kHz: 20720 samples


def _tone(path: Path, seconds: float, sr: int, channels: int = 1, seed: int = 0, subtype: str = "PCM_16") -> int:
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t * (1 + t / seconds)) + 0.05 * rng.standard_normal(n)
    x = np.stack([x, 0.5 * x], 1) if channels == 2 else x
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), sr, subtype=subtype)
    return n


class _CountingReads:
    """Records how many frames each SoundFile.read returned."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.frames: list[int] = []
        original = sf.SoundFile.read

        def read(this, *args, **kwargs):
            out = original(this, *args, **kwargs)
            self.frames.append(int(out.shape[0]))
            return out

        monkeypatch.setattr(sf.SoundFile, "read", read)


def _features(wave: torch.Tensor, sr: int, cfg: FeatureConfig = CFG) -> torch.Tensor:
    return waveform_to_features(to_mono_16k(wave, sr), 16000, cfg)


def test_window_frames() -> None:
    assert window_frames(16000, CFG) == 400 + 127 * 160
    assert window_frames(16000, FeatureConfig()) == 164080  # 1024 frames: 10.255 s
    # other rates: the equivalent plus a 2 ms margin for the resampler
    assert window_frames(44100, CFG) == -(-20720 * 44100 // 16000) + 89
    assert window_frames(16000, FeatureConfig(target_length=None)) is None


@pytest.mark.parametrize("sr, channels", [(16000, 1), (44100, 2), (8000, 1)])
def test_long_file_reads_only_the_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sr: int, channels: int) -> None:
    path = tmp_path / "long.wav"
    n = _tone(path, 60.0, sr, channels)
    row = ManifestRow(str(path), n, 2)
    counter = _CountingReads(monkeypatch)
    wave, got_sr = read_row_window(row, CFG)
    assert got_sr == sr and counter.frames == [window_frames(sr, CFG)]  # one read of the window only
    full, _ = load_audio(path)
    assert torch.equal(wave, full[:, : wave.shape[1]])
    # the window's features equal the whole file's up to float32 rounding (the DC offset is taken over
    # the window); whole_file=True is the release's computation bit for bit
    expected = _features(full, sr)
    assert (_features(wave, sr) - expected).abs().max() < 1e-3
    whole, _ = read_row_window(row, CFG, whole_file=True)
    assert torch.equal(_features(whole, sr), expected)


@pytest.mark.parametrize("sr", [16000, 44100])
def test_clips_up_to_the_window_are_read_whole_and_bit_identical(tmp_path: Path, sr: int) -> None:
    """AudioSet-length clips (10 s at 1024 frames) are never cut: features identical to the release path."""
    cfg = FeatureConfig()
    path = tmp_path / "clip.wav"
    n = _tone(path, 10.0, sr, 2)
    wave, got_sr = read_row_window(ManifestRow(str(path), n, 2), cfg)
    full, _ = load_audio(path)
    assert torch.equal(wave, full)
    assert torch.equal(_features(wave, got_sr, cfg), _features(full, sr, cfg))


def test_random_crop_is_seeded_and_in_range() -> None:
    starts = {choose_start(100_000, 20_720, "random", seed=s) for s in range(50)}
    assert len(starts) > 40 and min(starts) >= 0 and max(starts) <= 100_000 - 20_720
    assert choose_start(100_000, 20_720, "random", seed=7) == choose_start(100_000, 20_720, "random", seed=7)
    assert choose_start(10_000, 20_720, "random", seed=7) == 0  # shorter than the window: nothing to crop
    assert choose_start(100_000, 20_720, "start") == 0
    with pytest.raises(ValueError, match="crop must be"):
        choose_start(100_000, 20_720, "middle")


def test_span_rows_read_their_frames_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audio" / "long.flac"
    n = _tone(path, 20.0, 22050, 2)
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{tmp_path / 'audio'}\nlong.flac:44100:66150\t66150\nlong.flac:{n - 1000}:1000\t1000\n")
    _, rows = read_manifest(str(manifest))
    assert [(r.kind, r.offset, r.length) for r in rows] == [("span", 44100, 66150), ("span", n - 1000, 1000)]
    full, _ = load_audio(path)
    wave, sr = read_row(rows[0])
    assert sr == 22050 and torch.equal(wave, full[:, 44100:110250])
    counter = _CountingReads(monkeypatch)
    wave, _ = read_row_window(rows[0], CFG)
    assert counter.frames == [window_frames(22050, CFG)] and torch.equal(wave, full[:, 44100:44100 + wave.shape[1]])
    wave, _ = read_row(rows[1])
    assert torch.equal(wave, full[:, n - 1000:])


def test_bad_span_rows(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    n = _tone(path, 1.0, 16000)
    manifest = tmp_path / "x.tsv"
    manifest.write_text(f"{tmp_path}\na.wav:0:100\t99\n")
    with pytest.raises(ManifestError, match=r"x\.tsv:2: n_samples 99 differs from the span's length 100"):
        read_manifest(str(manifest))
    manifest.write_text(f"{tmp_path}\na.wav:0:0\t0\n")
    with pytest.raises(ManifestError, match=r":2: empty range"):
        read_manifest(str(manifest))
    from eat_fairseq.data.audio import AudioError

    with pytest.raises(AudioError, match=r"a\.wav .*manifest m\.tsv, line 2.*ends past the end of the file"):
        read_row(ManifestRow(str(path), 100, 2, "span", n - 50, 100, f"a.wav:{n - 50}:100"), manifest="m.tsv")


def test_large_shard_member_is_read_through_a_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long recording packed whole: only about the window's bytes are read from the shard."""
    from eat_fairseq.prep.pack import pack_manifests

    audio = tmp_path / "audio"
    n = _tone(audio / "long.wav", 60.0, 16000)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "train.tsv").write_text(f"{audio}\nlong.wav\t{n}\n")
    pack_manifests(tmp_path / "m", tmp_path / "p")
    _, rows = read_manifest(str(tmp_path / "p" / "train.tsv"))
    monkeypatch.setattr(clips, "_WHOLE_MEMBER_BYTES", 1 << 16)  # treat the 1.9 MB member as large
    read_bytes = []
    original = clips._ByteRange.readinto

    def readinto(self, buffer):
        got = original(self, buffer)
        read_bytes.append(got)
        return got

    monkeypatch.setattr(clips._ByteRange, "readinto", readinto)
    wave, _ = read_row_window(rows[0], CFG)
    full, _ = load_audio(audio / "long.wav")
    assert torch.equal(wave, full[:, : wave.shape[1]])
    assert 0 < sum(read_bytes) < 2 * 20720 * 2 and rows[0].length > 40 * 20720 * 2


# ------------------------------------------------------------------------------------ dataset

def _long_corpus(tmp_path: Path) -> Path:
    audio = tmp_path / "audio"
    lines = [str(audio)]
    for i, (sec, sr) in enumerate([(6.0, 16000), (4.0, 44100), (1.0, 16000), (8.0, 22050)]):
        n = _tone(audio / f"c{i}.wav", sec, sr, seed=i)
        lines.append(f"c{i}.wav\t{n}")
    manifest = tmp_path / "train.tsv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_dataset_random_crop_deterministic_across_instances_workers_and_epochs(tmp_path: Path) -> None:
    pytest.importorskip("fairseq")
    from eat_fairseq.fairseq_ext.datasets import EATAudioDataset

    manifest = _long_corpus(tmp_path)

    def items(epoch: int, seed: int = 1, crop: str = "random") -> list[torch.Tensor]:
        ds = EATAudioDataset(str(manifest), CFG, shuffle=False, seed=seed, crop=crop)
        ds.set_epoch(epoch)
        return [ds[i]["source"] for i in range(len(ds))]

    e3 = items(3)
    # a new dataset object (a resumed run) at the same epoch draws the same windows
    assert all(torch.equal(a, b) for a, b in zip(e3, items(3)))
    # other epochs and seeds draw other windows for the long clips; the 1 s clip is never cropped
    e4, s2, start = items(4), items(3, seed=2), items(3, crop="start")
    for i in (0, 1, 3):
        assert not torch.equal(e3[i], e4[i]) and not torch.equal(e3[i], s2[i]) and not torch.equal(e3[i], start[i])
    assert torch.equal(e3[2], e4[2]) and torch.equal(e3[2], start[2])
    # in data-loader worker processes: the same windows
    ds = EATAudioDataset(str(manifest), CFG, shuffle=False, crop="random")
    ds.set_epoch(3)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=ds.collater)
    got = torch.cat([b["net_input"]["source"] for b in loader])
    assert torch.equal(got, torch.stack(e3))


def test_dataset_default_crop_start_reads_window_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fairseq")
    from eat_fairseq.fairseq_ext.datasets import EATAudioDataset

    manifest = _long_corpus(tmp_path)
    ds = EATAudioDataset(str(manifest), CFG, shuffle=False)
    counter = _CountingReads(monkeypatch)
    ds[0]
    assert counter.frames == [20720]
    with pytest.raises(ValueError, match="cannot be combined"):
        EATAudioDataset(str(manifest), CFG, crop="random", whole_file=True)


def test_windows_tool_cuts_long_files(tmp_path: Path) -> None:
    pytest.importorskip("fairseq")
    from eat_fairseq.prep.validate import validate_manifest
    from eat_fairseq.prep.windows import frames_to_seconds, plan_windows

    assert frames_to_seconds(1024) == pytest.approx(10.255)
    assert [(w.start, w.length) for w in plan_windows(25, 10, 3)] == [(0, 10), (10, 10), (20, 5)]
    assert [(w.start, w.length) for w in plan_windows(22, 10, 3)] == [(0, 10), (10, 10)]
    assert [(w.start, w.length) for w in plan_windows(10, 10, 3)] == [(0, 10)]

    audio = tmp_path / "audio"
    src = tmp_path / "m"
    src.mkdir()
    n_long = _tone(audio / "long.wav", 5.5, 16000)
    n_short = _tone(audio / "short.wav", 0.8, 16000)
    (src / "train.tsv").write_text(f"{audio}\nlong.wav\t{n_long}\nshort.wav\t{n_short}\n")
    (src / "train.lbl").write_text("long\tx\nshort\ty\n")
    (src / "train.weights").write_text("2.0\n1.0\n")
    (src / "label_descriptors.csv").write_text("0,x\n1,y\n")
    dest = tmp_path / "w"
    from eat_fairseq.prep.windows import main

    args = [str(src), "--dest", str(dest), "--window", "2", "--min-last", "1", "--quiet", "--workers", "1"]
    assert main(args) == 0
    assert (dest / "train.tsv").read_text().splitlines() == [
        str(audio), "long.wav:0:32000\t32000", "long.wav:32000:32000\t32000", "long.wav:64000:24000\t24000",
        f"short.wav\t{n_short}",
    ]
    assert (dest / "train.lbl").read_text().splitlines() == [
        "long@0\tx", "long@32000\tx", "long@64000\tx", "short\ty"]
    assert (dest / "train.weights").read_text().split() == ["2.0", "2.0", "2.0", "1.0"]
    assert validate_manifest(dest / "train.tsv", labels=dest / "train.lbl",
                             descriptors=dest / "label_descriptors.csv") == []
    assert main(args) == 2  # refuses to overwrite
    # every window is a clip: the dataset reads each one's frames
    from eat_fairseq.fairseq_ext.datasets import EATAudioDataset

    ds = EATAudioDataset(str(dest / "train.tsv"), FeatureConfig(target_length=200), shuffle=False)
    full, _ = load_audio(audio / "long.wav")
    for i, start in enumerate((0, 32000, 64000)):
        piece = full[:, start:start + (32000 if i < 2 else 24000)]
        assert torch.equal(ds[i]["source"][0], _features(piece, 16000, FeatureConfig(target_length=200)))
    # a window id naming another frame is refused
    (dest / "train.lbl").write_text("long@0\tx\nlong@0\tx\nlong@64000\tx\nshort\ty\n")
    problems = validate_manifest(dest / "train.tsv", labels=dest / "train.lbl")
    assert any("does not match manifest line 3" in p.message for p in problems)


def test_random_crop_resume_is_exact(tmp_path: Path) -> None:
    """8 updates straight == 4 updates, stop, resume to 8, with task.crop=random on 3 s clips."""
    pytest.importorskip("fairseq")
    from helpers import hydra_train_cmd, json_logs, make_audio_corpus, run

    data = make_audio_corpus(tmp_path / "corpus", num_clips=12, seconds=3.0)
    # the option set in the yaml, as a recipe would (command-line overrides of task keys absent from
    # a yaml are a separate matter)
    configs = tmp_path / "configs"
    configs.mkdir()
    text = (REPO / "examples" / "pretraining" / "eat_tiny.yaml").read_text()
    assert "\n  crop: start" in text  # the recipe lists the option (README: options work as written)
    (configs / "crop.yaml").write_text(text.replace("\n  crop: start", "\n  crop: random", 1))
    assert "crop: random" in (configs / "crop.yaml").read_text()

    def train(save: Path, max_update: int) -> str:
        return run(hydra_train_cmd(configs, "crop", [
            f"task.data={data}", f"checkpoint.save_dir={save}", f"optimization.max_update={max_update}",
            "common.log_format=json", "common.log_interval=1", "dataset.batch_size=4",
        ]), cwd=tmp_path)

    out = train(tmp_path / "straight", 8)
    assert "(crop=random)" in out
    train(tmp_path / "split", 4)
    out = train(tmp_path / "split", 8)
    assert "Loaded checkpoint" in out and [int(s["num_updates"]) for s in json_logs(out)] == [5, 6, 7, 8]
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pt", map_location="cpu")["model"]
    b = torch.load(tmp_path / "split" / "checkpoint_last.pt", map_location="cpu")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
