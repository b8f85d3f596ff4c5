"""The torch-free ONNX runner (eat-extract / eat-tag with an .onnx on the CPU): its numpy fbank and
windows against the torch feature path, its embeddings and scores against the torch handle of the same
file, its input checks, and that the CLIs really run without importing torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from eat_fairseq.data.audio import AudioError, to_mono_16k
from eat_fairseq.data.fbank_numpy import fbank_numpy, mel_filterbank_numpy, split_windows_numpy
from eat_fairseq.data.features import FeatureConfig, fbank_of, mel_filterbank, split_windows
from eat_fairseq.inference.api import GRANULARITIES, load_model
from eat_fairseq.inference.onnx_export import export_onnx
from eat_fairseq.inference.onnx_runner import OnnxRunner, load_runner

from test_api import tone, write_classifier, write_pretrained

ROOT = Path(__file__).resolve().parents[2]
FSDD = ROOT.parent / "shared" / "data" / "fsdd" / "recordings"
RTOL = 1e-4  # the .onnx promise: within 1e-4 of the output scale


def close(got: np.ndarray, want: np.ndarray, rtol: float = RTOL) -> bool:
    return got.shape == want.shape and float(np.abs(got - want).max()) <= rtol * (float(np.abs(want).max()) or 1.0)


def signals() -> list[np.ndarray]:
    """A tone, white noise, a very quiet clip (where float32 rounding weighs most), a clip with a DC
    offset, and a clip of one frame plus a few samples."""
    rng = np.random.default_rng(7)
    quiet = (1e-4 * rng.standard_normal(12000)).astype(np.float32)
    offset = (tone(1.3, seed=2) + 0.5).astype(np.float32)
    return [tone(2.1, seed=1), (0.1 * rng.standard_normal(30000)).astype(np.float32), quiet, offset, tone(0.0275)]


# ------------------------------------------------------------------------------------------------
# the numpy feature path against the torch one


def test_numpy_filterbank_matches_the_torch_one() -> None:
    for bins, rate in ((128, 16000), (64, 22050)):
        got, want = mel_filterbank_numpy(bins, rate), mel_filterbank(bins, rate).numpy()
        assert got.shape == want.shape and got.dtype == np.float32
        assert float(np.abs(got - want).max()) < 1e-4  # float32 log rounding of the mel scale


@pytest.mark.parametrize("index", range(5))
def test_numpy_fbank_matches_fbank_of(index: int) -> None:
    wave = signals()[index]
    cfg = FeatureConfig()
    got, want = fbank_numpy(wave, cfg), fbank_of(torch.from_numpy(wave), 16000, cfg).numpy()
    assert got.shape == want.shape and got.dtype == np.float32
    diff = np.abs(got - want)
    # float32 rounding of two FFTs: tiny on average, up to ~2e-3 in the log of near-empty mel bins
    assert float(diff.mean()) < 2e-5 and float(diff.max()) < 5e-3


def test_numpy_fbank_of_fsdd_clips() -> None:
    if not FSDD.is_dir():
        pytest.skip("the shared FSDD copy is absent")
    cfg = FeatureConfig()
    for path in sorted(FSDD.glob("*.wav"))[::300]:
        data, sr = sf.read(path, dtype="float32")
        wave = to_mono_16k(torch.from_numpy(data), sr).numpy()
        diff = np.abs(fbank_numpy(wave, cfg) - fbank_of(torch.from_numpy(wave), 16000, cfg).numpy())
        assert float(diff.mean()) < 2e-5 and float(diff.max()) < 5e-3, path.name


def test_shorter_than_a_frame_gives_no_frames() -> None:
    assert fbank_numpy(np.zeros(399, np.float32), FeatureConfig()).shape == (0, 128)


def test_numpy_windows_equal_split_windows() -> None:
    cfg = FeatureConfig(target_length=128)
    fbank = np.random.default_rng(0).standard_normal((300, 128)).astype(np.float32)
    got, got_valid = split_windows_numpy(fbank, cfg)
    want, want_valid = split_windows(torch.from_numpy(fbank), cfg)
    assert got_valid == want_valid == [128, 128, 44]
    assert got.dtype == np.float32 and np.allclose(got, want.numpy(), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# the runner against the torch handle of the same file


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("runner")
    pre, single = write_pretrained(d / "pre.pt"), write_classifier(d / "single.pt", multi_label=False)
    multi = write_classifier(d / "multi.pt", multi_label=True)
    for name, src in (("pre", pre), ("single", single), ("multi", multi)):
        export_onnx(load_model(src), d / f"{name}.onnx")
    export_onnx(load_model(pre), d / "pre_int8.onnx", int8=True)
    return {"pre": d / "pre.onnx", "pre_int8": d / "pre_int8.onnx", "pre.pt": pre, "single": d / "single.onnx",
            "multi": d / "multi.onnx"}


def clips() -> list[np.ndarray]:
    """Shorter than a window, exactly one window of 1.28 s, three windows (the last padded)."""
    return [tone(0.7, seed=3), tone(1.295, seed=4), tone(3.1, seed=5)]


@pytest.mark.parametrize("name", ["pre", "pre_int8"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_runner_embeddings_equal_the_torch_handle(models: dict, name: str, granularity: str) -> None:
    runner, handle = load_runner(models[name], threads=1), load_model(models[name])
    assert isinstance(runner, OnnxRunner) and runner.embed_dim == handle.embed_dim
    # int8 quantises the activations at run time, so the fbank's float32 rounding can move a value
    # across a quantisation step: measured up to 2.6e-4 of the scale per patch on this model
    rtol = RTOL if name == "pre" else 1e-3
    for got, want in zip(runner.extract(clips(), granularity=granularity), handle.extract(clips(), granularity=granularity)):
        if granularity == "all":
            assert set(got) == set(want)
            assert all(close(got[k], want[k], rtol) for k in want)
            assert np.array_equal(got["timestamps"], want["timestamps"])
        else:
            assert got.dtype == np.float32 and close(got, want, rtol)


def test_runner_matches_the_checkpoint_itself(models: dict) -> None:
    got = load_runner(models["pre"]).extract(clips(), granularity="frame")
    want = load_model(models["pre.pt"]).extract(clips(), granularity="frame")
    assert all(close(g, w) for g, w in zip(got, want))


def test_runner_inputs_are_read_as_the_handle_reads_them(models: dict, tmp_path: Path) -> None:
    runner, handle = load_runner(models["pre"]), load_model(models["pre"])
    stereo = tone(1.0, seed=9, channels=2)
    pcm = (tone(1.0, seed=10) * 20000).astype(np.int16)
    at_8k = tone(1.5, sr=8000, seed=11)  # resampled by torch's resampler, as in the handle
    sf.write(tmp_path / "c.flac", tone(0.9, seed=12), 16000)
    for audio, rate in ((stereo, None), (pcm, None), (at_8k, 8000), (str(tmp_path / "c.flac"), None)):
        assert close(runner.extract(audio, sample_rate=rate), handle.extract(audio, sample_rate=rate))
    assert runner.extract([]) == []
    with pytest.raises(ValueError, match="looks like"):
        runner.extract(np.zeros((16000, 2), np.float32))
    with pytest.raises(AudioError, match="shorter than one 25 ms frame"):
        runner.extract(np.zeros(300, np.float32))
    with pytest.raises(AudioError, match="NaN"):
        runner.extract(np.full(16000, np.nan, np.float32))
    with pytest.raises(ValueError, match="granularity"):
        runner.extract(tone(1.0), granularity="patch")


@pytest.mark.parametrize("name", ["single", "multi"])
@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_runner_scores_equal_the_torch_handle(models: dict, name: str, aggregate: str) -> None:
    runner, handle = load_runner(models[name]), load_model(models[name])
    assert runner.labels == handle.labels and runner.multi_label == handle.multi_label
    for got, want in zip(runner.predict_scores(clips(), aggregate=aggregate), handle.predict_scores(clips(), aggregate=aggregate)):
        assert np.allclose(got, want, rtol=0, atol=RTOL)
    with pytest.raises(ValueError, match="without a classification head"):
        load_runner(models["pre"]).predict_scores(tone(1.0))


def test_runner_layer_is_the_exported_block(models: dict) -> None:
    runner = load_runner(models["pre"])
    runner.check_layer(None), runner.check_layer(1), runner.check_layer(-1)
    with pytest.raises(ValueError, match="holds block 1 only"):
        runner.check_layer(0)
    with pytest.raises(ValueError, match=r"layer must be in \[-2, 1\]"):
        runner.check_layer(2)


# ------------------------------------------------------------------------------------------------
# the CLIs with an .onnx never import torch


def test_eat_extract_and_eat_tag_on_onnx_do_not_import_torch(models: dict, tmp_path: Path) -> None:
    folder = tmp_path / "audio"
    folder.mkdir()
    for i, seconds in enumerate((0.6, 2.0)):
        sf.write(folder / f"c{i}.wav", tone(seconds, seed=30 + i), 16000)
    script = (
        "import json, sys\n"
        "from eat_fairseq.cli.extract import main as extract\n"
        "from eat_fairseq.cli.tag import main as tag\n"
        f"a = extract([{str(folder)!r}, '--checkpoint', {str(models['pre'])!r}, '--out', {str(tmp_path / 'out')!r},"
        " '--granularity', 'all', '--threads', '1'])\n"
        f"b = tag(['--checkpoint', {str(models['single'])!r}, '--json', {str(folder)!r}])\n"
        "print(json.dumps({'status': [a, b], 'torch': 'torch' in sys.modules}), file=sys.stderr)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report == {"status": [0, 0], "torch": False}, done.stderr
    assert json.loads(done.stdout)["results"].keys() == {str(folder / "c0.wav"), str(folder / "c1.wav")}
    with np.load(tmp_path / "out" / "c1.npz") as got:
        want = load_model(models["pre"]).extract(str(folder / "c1.wav"), granularity="all")
        assert all(close(got[k], want[k]) for k in want)


def test_threads_reach_the_session_and_the_resampler(models: dict) -> None:
    runner = load_runner(models["pre"], threads=1)
    assert runner.session.get_session_options().intra_op_num_threads == 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runner.extract(tone(1.0, sr=8000, seed=13), sample_rate=8000)  # resampled by torch
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
