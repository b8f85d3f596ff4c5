"""eat_fairseq.inference.hear: the HEAR 2021 API (shapes, sizes, timestamps in milliseconds)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import eat_fairseq.inference.hear as hear
from eat_fairseq.inference.api import load_model as load_handle
from eat_fairseq.data.features import num_frames

from test_api import WINDOW, tone, write_classifier, write_pretrained


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pretrained(tmp_path_factory.mktemp("hear") / "pre.pt")


@pytest.fixture(scope="module")
def model(ckpt: Path) -> hear.HearModel:
    return hear.load_model(str(ckpt), device="cpu")


def batch(n: int, seconds: float) -> torch.Tensor:
    return torch.from_numpy(np.stack([tone(seconds, seed=i) for i in range(n)]))


def test_model_attributes(model: hear.HearModel) -> None:
    assert isinstance(model, torch.nn.Module)
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == 64
    assert model.timestamp_embedding_size == 64
    assert any(name.startswith("encoder.") for name, _ in model.named_parameters())


def test_scene_embeddings(model: hear.HearModel, ckpt: Path) -> None:
    audio = batch(3, 1.0)
    emb = hear.get_scene_embeddings(audio, model)
    assert emb.shape == (3, model.scene_embedding_size)
    assert emb.dtype == torch.float32
    handle = load_handle(ckpt)
    for i in range(3):
        np.testing.assert_allclose(emb[i].numpy(), handle.extract(audio[i].numpy()), atol=1e-5)


def test_timestamp_embeddings(model: hear.HearModel, ckpt: Path) -> None:
    audio = batch(2, 1.0)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    h = math.ceil(num_frames(16000) / 16)
    assert emb.shape == (2, h, model.timestamp_embedding_size)
    assert ts.shape == (2, h)
    assert torch.all(ts[:, 1:] > ts[:, :-1])
    # milliseconds: centres of 160 ms time patches (each spans 175 ms of audio); the last patch holds
    # only frames 96-97 of the 98 and is centred on them, inside the 1000 ms sound
    expected = 87.5 + 160.0 * np.arange(h)
    expected[-1] = (96 * 160 + 97 * 160 + 400) / 2 / 16.0
    np.testing.assert_allclose(ts[0].numpy(), expected, atol=1e-3)
    assert float(ts.max()) < 1000.0
    assert torch.equal(ts[0], ts[1])
    handle = load_handle(ckpt)
    np.testing.assert_allclose(emb[1].numpy(), handle.extract(audio[1].numpy(), granularity="frame"), atol=1e-5)


def test_long_sounds_span_several_windows(model: hear.HearModel) -> None:
    seconds = 3.0  # > 2 windows of 1.28 s
    emb, ts = hear.get_timestamp_embeddings(batch(2, seconds), model)
    n = num_frames(int(seconds * 16000))
    assert n > 2 * WINDOW
    assert emb.shape[1] == math.ceil(n / 16) == ts.shape[1]
    assert ts[0, -1].item() < seconds * 1000.0
    assert hear.get_scene_embeddings(batch(2, seconds), model).shape == (2, 64)


def test_layer_attribute(ckpt: Path) -> None:
    audio = batch(1, 1.0)
    last = hear.get_scene_embeddings(audio, hear.load_model(str(ckpt), device="cpu"))
    first = hear.get_scene_embeddings(audio, hear.load_model(str(ckpt), device="cpu", layer=0))
    assert not torch.allclose(last, first)


def test_classifier_checkpoints_work_too(tmp_path: Path) -> None:
    model = hear.load_model(str(write_classifier(tmp_path / "cls.pt")), device="cpu")
    assert hear.get_scene_embeddings(batch(2, 0.5), model).shape == (2, 64)


def test_checkpoint_path_from_the_environment(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(hear.CHECKPOINT_ENV, raising=False)
    with pytest.raises(ValueError, match=hear.CHECKPOINT_ENV):
        hear.load_model("")
    monkeypatch.setenv(hear.CHECKPOINT_ENV, str(ckpt))
    assert hear.load_model(device="cpu").scene_embedding_size == 64


def test_bad_audio_shape(model: hear.HearModel) -> None:
    with pytest.raises(ValueError, match="n_sounds, n_samples"):
        hear.get_scene_embeddings(torch.zeros(16000), model)


def test_numpy_input_and_bad_audio(model: hear.HearModel) -> None:
    audio = batch(2, 0.6)
    np.testing.assert_allclose(
        hear.get_scene_embeddings(audio.numpy(), model).numpy(), hear.get_scene_embeddings(audio, model).numpy(), atol=1e-6
    )
    emb, ts = hear.get_timestamp_embeddings(audio.numpy(), model)
    assert emb.shape[:2] == ts.shape and float(ts.max()) < 600.0
    nan = audio.clone()
    nan[1, 100] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite samples \(sounds \[1\]\)"):
        hear.get_scene_embeddings(nan, model)
    for length in (0, 399):
        with pytest.raises(ValueError, match="at least 400"):
            hear.get_scene_embeddings(torch.zeros(2, length), model)
        with pytest.raises(ValueError, match="at least 400"):
            hear.get_timestamp_embeddings(torch.zeros(2, length), model)
    with pytest.raises(ValueError, match="float samples"):
        hear.get_scene_embeddings(torch.zeros(2, 16000, dtype=torch.int16), model)
    assert hear.get_scene_embeddings(torch.zeros(0, 16000), model).shape == (0, 64)
    assert hear.get_scene_embeddings(torch.zeros(1, 400), model).shape == (1, 64)
