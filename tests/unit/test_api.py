"""eat_fairseq.inference.api: checkpoint loading, embeddings at every granularity, long-audio windowing, tagging."""
from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from eat_fairseq.inference.api import EATModelHandle, ModelLoadError, load_model
from eat_fairseq.data.audio import AudioError, to_mono_16k
from eat_fairseq.checkpoints.load import CheckpointError
from eat_fairseq.model.classifier import EATClassifier
from eat_fairseq.checkpoints.convert import build_checkpoint, convert_to_released
from eat_fairseq.model.encoder import EncoderConfig
from eat_fairseq.data.features import FeatureConfig, num_frames, waveform_to_features
from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig

WINDOW = 128  # frames per window of the test models (1.28 s)
LABELS = ["dog", "cat", "bird", "car", "rain"]


def write_pretrained(path: Path, seed: int = 0, perturb_teacher: bool = True) -> Path:
    """A tiny pre-training checkpoint in our layout (what fairseq / eat-convert write)."""
    torch.manual_seed(seed)
    cfg = PretrainConfig.tiny()
    model = EATPretrainingModel(cfg)
    if perturb_teacher:  # a teacher that differs from the student, as after EMA updates
        with torch.no_grad():
            for p in model.teacher.blocks.parameters():
                p.add_(0.05 * torch.randn_like(p))
    ckpt = build_checkpoint("pretrained", model.state_dict(), cfg, task_overrides={"target_length": WINDOW})
    torch.save(ckpt, path)
    return path


def write_classifier(path: Path, multi_label: bool = False, seed: int = 1, task_extra: dict | None = None) -> Path:
    """A tiny fine-tuned checkpoint with a 5-label map."""
    torch.manual_seed(seed)
    enc = EncoderConfig.tiny()
    model = EATClassifier(enc, len(LABELS))
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)  # spread the scores so rankings are meaningful
    overrides = {"target_length": WINDOW, "multi_label": multi_label, **(task_extra or {})}
    labels = {label: i for i, label in enumerate(LABELS)}
    ckpt = build_checkpoint("finetuned", model.state_dict(), PretrainConfig(encoder=enc), len(LABELS), labels, overrides)
    if "multi_label" not in overrides or overrides["multi_label"] is None:
        ckpt["cfg"]["task"].pop("multi_label", None)
    torch.save(ckpt, path)
    return path


def tone(seconds: float, sr: int = 16000, seed: int = 0, channels: int = 0) -> np.ndarray:
    """A noisy tone: (S,) or (channels, S) float32."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.05 * rng.standard_normal(n)
    if channels:
        x = np.stack([x * (1.0 - 0.3 * c) + 0.01 * rng.standard_normal(n) for c in range(channels)])
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpts")
    write_pretrained(d / "pre.pt")
    write_classifier(d / "single.pt", multi_label=False)
    write_classifier(d / "multi.pt", multi_label=True)
    return d


@pytest.fixture(scope="module")
def pre(ckpt_dir: Path) -> EATModelHandle:
    return load_model(ckpt_dir / "pre.pt")


@pytest.fixture(scope="module")
def single(ckpt_dir: Path) -> EATModelHandle:
    return load_model(ckpt_dir / "single.pt")


def direct_window(handle: EATModelHandle, wave: np.ndarray, layer: int | None = None) -> torch.Tensor:
    """Reference: the standard single-clip pipeline (features padded to the window, encoder)."""
    feats = waveform_to_features(torch.from_numpy(wave), 16000, handle.feature_cfg)
    with torch.no_grad():
        return handle.encoder.extract_features(feats.unsqueeze(0), layer=layer)[0]  # (1+P, D)


# ------------------------------------------------------------------------------------------------
# loading


def test_load_pretrained_reads_task_settings(pre: EATModelHandle) -> None:
    assert pre.kind == "pretrained"
    assert pre.embed_dim == 64 and pre.num_layers == 2
    assert pre.window_frames == WINDOW
    assert pre.feature_cfg.norm_mean == pytest.approx(FeatureConfig().norm_mean)
    assert pre.labels is None and pre.multi_label is None
    assert pre.patch_seconds == pytest.approx(0.16)
    assert pre.frame_rate == pytest.approx(6.25)


def test_student_by_default_teacher_on_request(ckpt_dir: Path, pre: EATModelHandle) -> None:
    state = torch.load(ckpt_dir / "pre.pt", weights_only=True)["model"]
    own = pre.encoder.state_dict()
    assert torch.equal(own["blocks.0.attn.qkv.weight"], state["encoder.blocks.0.attn.qkv.weight"])
    teacher = load_model(ckpt_dir / "pre.pt", use_teacher=True)
    assert torch.equal(teacher.encoder.state_dict()["blocks.0.attn.qkv.weight"], state["teacher.blocks.0.attn.qkv.weight"])
    x = tone(1.0)
    assert not np.allclose(teacher.extract(x), pre.extract(x))
    with pytest.raises(ModelLoadError, match="use_teacher"):
        load_model(ckpt_dir / "single.pt", use_teacher=True)


@pytest.mark.parametrize("kind", ["pretrained", "classifier", "fp16"])
def test_loading_draws_no_random_init_and_keeps_nothing_of_the_file(tmp_path: Path, kind: str) -> None:
    """load_model builds the model on the meta device and copies the (memory-mapped) checkpoint's
    tensors into it: it draws nothing from torch's generator (no random init to overwrite), every
    tensor is a float32 CPU tensor equal to the file's (an fp16 file's cast to float32), and
    overwriting the file in place afterwards (as plain fairseq copies over checkpoint_last.pt) leaves
    the loaded model, head included, as it was."""
    path = write_classifier(tmp_path / "m.pt") if kind == "classifier" else write_pretrained(tmp_path / "m.pt")
    if kind == "fp16":
        ckpt = torch.load(path, weights_only=False)
        ckpt["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
        torch.save(ckpt, path)
    stored = torch.load(path, weights_only=False)["model"]
    rng = torch.random.get_rng_state()
    handle = load_model(path)
    assert torch.equal(torch.random.get_rng_state(), rng)
    module = handle.classifier if kind == "classifier" else handle.encoder
    prefix = "" if kind == "classifier" else "encoder."
    for name, tensor in module.state_dict().items():
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.is_contiguous()
        assert torch.equal(tensor, stored[prefix + name].float()), name
    x = tone(1.3, seed=7)
    want = handle.extract(x)
    scores = handle.predict(x, top_k=None) if kind == "classifier" else None
    with open(path, "r+b") as f:  # the same inode, every byte changed
        size = f.seek(0, 2)
        f.seek(0)
        f.write(b"\xff" * size)
    np.testing.assert_array_equal(handle.extract(x), want)
    if kind == "classifier":
        assert handle.predict(x, top_k=None) == scores


def test_a_kept_checkpoint_is_never_mapped(tmp_path: Path) -> None:
    from eat_fairseq.checkpoints.convert import load_ours

    path = write_pretrained(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="keep and mmap"):
        load_ours(path, keep=True, mmap=True)
    assert load_ours(path, mmap=True)["model"].keys() == load_ours(path, keep=True)["model"].keys()


def test_loading_imports_no_compiler(tmp_path: Path) -> None:
    """Building the model on the meta device skips the random init, whose draws on meta tensors would
    import torch._dynamo (about 1 s of a 1.3 s EAT-base load)."""
    import subprocess

    path = write_pretrained(tmp_path / "m.pt")
    code = (
        "import sys; from eat_fairseq.inference.api import load_model; "
        f"load_model({str(path)!r}); assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_feature_settings_come_from_the_task(tmp_path: Path) -> None:
    path = write_classifier(tmp_path / "esc.pt", task_extra={"target_length": 64, "norm_mean": -6.627, "norm_std": 5.359})
    handle = load_model(path)
    assert handle.window_frames == 64
    assert handle.feature_cfg.norm_mean == pytest.approx(-6.627)
    assert handle.feature_cfg.norm_std == pytest.approx(5.359)


def test_released_layout_loads_like_ours(tmp_path: Path, ckpt_dir: Path, single: EATModelHandle) -> None:
    ours = torch.load(ckpt_dir / "single.pt", weights_only=True)
    released, _ = convert_to_released(ours)
    torch.save(released, tmp_path / "released.pt")
    handle = load_model(tmp_path / "released.pt")
    assert handle.kind == "classifier" and handle.labels == LABELS
    x = tone(1.0)
    np.testing.assert_allclose(handle.extract(x), single.extract(x), atol=1e-6)


def test_bad_checkpoints_raise_checkpoint_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_model(junk)
    torch.save({"cfg": {}, "model": {"foo.weight": torch.zeros(2)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt"):
        load_model(tmp_path / "foreign.pt")


# ------------------------------------------------------------------------------------------------
# extraction


def test_extract_shapes_for_each_granularity(pre: EATModelHandle) -> None:
    x = tone(1.0)  # 16000 samples -> 98 frames -> 7 time patches (the last one partly padding)
    frames = num_frames(16000)
    h = math.ceil(frames / 16)
    assert (frames, h) == (98, 7)
    utt = pre.extract(x)
    assert utt.shape == (64,) and utt.dtype == np.float32
    assert pre.extract(x, granularity="frame").shape == (h, 64)
    allg = pre.extract(x, granularity="all")
    assert set(allg) == {"utterance", "frame", "patches", "timestamps"}
    assert allg["patches"].shape == (h, 8, 64)
    np.testing.assert_allclose(allg["frame"], allg["patches"].mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(allg["utterance"], utt, atol=1e-6)
    # patch centres; the last patch (frames 96-97 of 98) is centred on the frames the clip has
    expected = 0.16 * np.arange(h) + 0.0875
    expected[-1] = (96 * 160 + 97 * 160 + 400) / 2 / 16000
    np.testing.assert_allclose(allg["timestamps"], expected)
    assert allg["timestamps"][-1] < 1.0
    assert pre.num_patches(16000) == h
    with pytest.raises(ValueError, match="granularity"):
        pre.extract(x, granularity="frames")


def test_single_window_equals_standard_pipeline(pre: EATModelHandle) -> None:
    x = tone(0.9, seed=3)
    ref = direct_window(pre, x)  # (1 + 8*8, D)
    h = pre.num_patches(len(x))
    np.testing.assert_allclose(pre.extract(x), ref[0].numpy(), atol=1e-5)
    frame_ref = ref[1:].reshape(-1, 8, 64).mean(1)[:h]
    np.testing.assert_allclose(pre.extract(x, granularity="frame"), frame_ref.numpy(), atol=1e-5)


def test_layer_selection(pre: EATModelHandle) -> None:
    x = tone(1.0, seed=4)
    first = pre.extract(x, layer=0)
    np.testing.assert_allclose(first, direct_window(pre, x, layer=0)[0].numpy(), atol=1e-5)
    assert not np.allclose(first, pre.extract(x))
    np.testing.assert_allclose(pre.extract(x, layer=-1), pre.extract(x), atol=1e-6)
    with pytest.raises(ValueError, match="layer"):
        pre.extract(x, layer=2)


def test_long_audio_is_windowed_and_stitched(pre: EATModelHandle) -> None:
    hop = 160
    tail = 50  # frames in the third window
    total_frames = 2 * WINDOW + tail
    x = tone((400 + (total_frames - 1) * hop) / 16000, seed=5)
    assert num_frames(len(x)) == total_frames

    frame = pre.extract(x, granularity="frame")
    expected_patches = 2 * (WINDOW // 16) + math.ceil(tail / 16)
    assert frame.shape == (expected_patches, 64)

    # window k holds frames k*128 .. k*128+127, which are exactly the frames of this audio segment
    starts = [k * WINDOW * hop for k in range(3)]
    segments = [x[s : s + 400 + (WINDOW - 1) * hop] for s in starts]
    refs = [direct_window(pre, seg) for seg in segments]
    assert num_frames(len(segments[2])) == tail
    per_window = WINDOW // 16
    np.testing.assert_allclose(frame[:per_window], refs[0][1:].reshape(-1, 8, 64).mean(1).numpy(), atol=1e-4)
    np.testing.assert_allclose(
        frame[per_window : 2 * per_window], refs[1][1:].reshape(-1, 8, 64).mean(1).numpy(), atol=1e-4
    )
    np.testing.assert_allclose(
        frame[2 * per_window :], refs[2][1:].reshape(-1, 8, 64).mean(1)[: math.ceil(tail / 16)].numpy(), atol=1e-4
    )
    weights = np.array([WINDOW, WINDOW, tail], dtype=np.float64)
    utt_ref = sum(w * r[0].double().numpy() for w, r in zip(weights, refs)) / weights.sum()
    np.testing.assert_allclose(pre.extract(x), utt_ref, atol=1e-4)
    ts = pre.extract(x, granularity="all")["timestamps"]
    assert ts.shape == (expected_patches,) and np.all(np.diff(ts) > 0)


def test_any_rate_and_channels_equal_the_mono_16k_path(tmp_path: Path, pre: EATModelHandle) -> None:
    stereo = tone(1.5, sr=22050, seed=6, channels=2)  # (2, S) at 22.05 kHz
    mono16 = to_mono_16k(torch.from_numpy(stereo), 22050).numpy()
    ref = pre.extract(mono16, granularity="all")
    got = pre.extract(stereo, sample_rate=22050, granularity="all")
    for key in ("utterance", "frame", "patches"):
        np.testing.assert_allclose(got[key], ref[key], atol=1e-5)
    sf.write(tmp_path / "stereo.wav", stereo.T, 22050, subtype="FLOAT")
    np.testing.assert_allclose(pre.extract(str(tmp_path / "stereo.wav")), ref["utterance"], atol=1e-5)
    np.testing.assert_allclose(pre.extract(torch.from_numpy(stereo), sample_rate=22050), ref["utterance"], atol=1e-5)


def test_array_conventions(pre: EATModelHandle) -> None:
    x = tone(1.0, seed=7)
    with pytest.raises(ValueError, match="samples, channels"):
        pre.extract(np.stack([x, x], axis=1))  # (S, 2) instead of (2, S)
    pcm = np.round(x * 32767).astype(np.int16)
    np.testing.assert_allclose(pre.extract(pcm), pre.extract(pcm.astype(np.float32) / 32768), atol=1e-6)
    with pytest.raises(AudioError, match="shorter"):
        pre.extract(np.zeros(399, np.float32))
    with pytest.raises(AudioError, match="NaN"):
        pre.extract(np.full(1600, np.nan, np.float32))


def test_batch_invariance(ckpt_dir: Path) -> None:
    handle = load_model(ckpt_dir / "pre.pt", batch_size=2)
    clips = [tone(0.7, seed=8), tone(3.1, seed=9), tone(1.3, seed=10)]  # 1, 3 and 2 windows
    batched = handle.extract(clips, granularity="all")
    assert isinstance(batched, list) and len(batched) == 3
    for clip, got in zip(clips, batched):
        alone = handle.extract(clip, granularity="all")
        for key in ("utterance", "frame", "patches"):
            np.testing.assert_allclose(got[key], alone[key], atol=1e-5)
    handle.batch_size = 16
    again = handle.extract(clips)
    for got, ref in zip(again, batched):
        np.testing.assert_allclose(got, ref["utterance"], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# tagging


def test_predict_single_label_softmax(single: EATModelHandle) -> None:
    assert single.kind == "classifier" and single.labels == LABELS and single.multi_label is False
    x = tone(1.0, seed=11)
    scores = single.predict_scores(x)
    assert scores.shape == (5,)
    assert scores.sum() == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        feats = waveform_to_features(torch.from_numpy(x), 16000, single.feature_cfg)
        logits = single.classifier(feats.unsqueeze(0))[0]
    np.testing.assert_allclose(scores, torch.softmax(logits, -1).numpy(), atol=1e-5)
    top = single.predict(x, top_k=3)
    assert len(top) == 3
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    assert top[0] == (LABELS[int(np.argmax(scores))], pytest.approx(float(scores.max())))
    assert len(single.predict(x, top_k=50)) == 5


def test_predict_multi_label_sigmoid(ckpt_dir: Path) -> None:
    handle = load_model(ckpt_dir / "multi.pt")
    assert handle.multi_label is True
    x = tone(1.0, seed=12)
    with torch.no_grad():
        feats = waveform_to_features(torch.from_numpy(x), 16000, handle.feature_cfg)
        logits = handle.classifier(feats.unsqueeze(0))[0]
    np.testing.assert_allclose(handle.predict_scores(x), torch.sigmoid(logits).numpy(), atol=1e-5)


def test_multi_label_falls_back_to_the_criterion(tmp_path: Path) -> None:
    path = write_classifier(tmp_path / "ce.pt", task_extra={"multi_label": None})
    ckpt = torch.load(path, weights_only=True)
    assert "multi_label" not in ckpt["cfg"]["task"]
    ckpt["cfg"]["criterion"]["loss"] = "ce"
    torch.save(ckpt, path)
    assert load_model(path).multi_label is False
    ckpt["cfg"]["criterion"]["loss"] = "bce_positive_norm"
    torch.save(ckpt, path)
    assert load_model(path).multi_label is True


def test_long_clip_scores_aggregate(single: EATModelHandle) -> None:
    x = tone(3.0, seed=13)  # 3 windows
    mean = single.predict_scores(x)
    assert mean.sum() == pytest.approx(1.0, abs=1e-5)
    peak = single.predict_scores(x, aggregate="max")
    assert np.all(peak >= mean - 1e-6)
    lists = single.predict([x, tone(0.5, seed=14)], top_k=2)
    assert len(lists) == 2 and all(len(r) == 2 for r in lists)


def test_predict_needs_a_head(pre: EATModelHandle) -> None:
    with pytest.raises(ValueError, match="classification head"):
        pre.predict(tone(1.0))


@pytest.mark.fairseq
def test_real_fairseq_pretraining_checkpoint(tmp_path: Path) -> None:
    """A checkpoint written by fairseq-hydra-train loads and embeds (without fairseq in the path)."""
    pytest.importorskip("fairseq")
    from helpers import REPO, hydra_train_cmd, make_audio_corpus, run

    manifests = make_audio_corpus(tmp_path / "corpus", num_clips=8)
    save_dir = tmp_path / "ckpt"
    cmd = hydra_train_cmd(
        REPO / "examples" / "pretraining",
        "eat_tiny",
        [f"task.data={manifests}", f"checkpoint.save_dir={save_dir}", "optimization.max_update=3"],
    )
    run(cmd, cwd=tmp_path, timeout=300)
    handle = load_model(save_dir / "checkpoint_last.pt")
    assert handle.kind == "pretrained" and handle.window_frames == 128 and handle.embed_dim == 64
    state = torch.load(save_dir / "checkpoint_last.pt", weights_only=True)["model"]
    assert torch.equal(handle.encoder.state_dict()["cls_token"], state["encoder.cls_token"])
    emb = handle.extract(tone(2.0), granularity="frame")
    assert emb.shape == (math.ceil(num_frames(32000) / 16), 64) and np.isfinite(emb).all()


@pytest.mark.fairseq
def test_real_fairseq_finetuned_checkpoint(tmp_path: Path) -> None:
    """A checkpoint written by fairseq fine-tuning (task eat_classification) loads with its label map,
    its single-label setting and its feature settings."""
    pytest.importorskip("fairseq")
    import eat_fairseq
    from helpers import REPO, run

    audio, data = tmp_path / "audio", tmp_path / "data"
    audio.mkdir()
    data.mkdir()
    (data / "label_descriptors.csv").write_text('index,mid,display_name\n0,/m/low,"Low, tone"\n1,/m/high,High tone\n')
    for split in ("train", "valid"):
        tsv, lbl = [str(audio)], []
        for i in range(6):
            sf.write(audio / f"{split}{i}.wav", tone(1.0, seed=i), 16000)
            tsv.append(f"{split}{i}.wav\t16000")
            lbl.append(f"{split}{i}\t{['/m/low', '/m/high'][i % 2]}")
        (data / f"{split}.tsv").write_text("\n".join(tsv) + "\n")
        (data / f"{split}.lbl").write_text("\n".join(lbl) + "\n")
    save = tmp_path / "ckpt"
    exe = shutil.which("fairseq-hydra-train", path=str(Path(sys.executable).parent)) or "fairseq-hydra-train"
    cmd = [
        exe, "--config-dir", str(REPO / "examples" / "finetuning"), "--config-name", "tiny",
        f"common.user_dir={eat_fairseq.USER_DIR}", f"task.data={data}", f"checkpoint.save_dir={save}",
        "optimization.max_update=4", "task.multi_label=false", "criterion.loss=ce", "task.per_class_ap_dir=null",
    ]
    run(cmd, cwd=tmp_path, timeout=300)
    handle = load_model(save / "checkpoint_last.pt")
    assert handle.kind == "classifier" and handle.labels == ["/m/low", "/m/high"]
    assert handle.multi_label is False and handle.window_frames == 128
    scores = handle.predict_scores(str(audio / "valid0.wav"))
    assert scores.sum() == pytest.approx(1.0, abs=1e-5)
    top = handle.predict(str(audio / "valid0.wav"), top_k=2)
    assert {label for label, _ in top} == {"/m/low", "/m/high"}


def test_empty_batches_and_top_k_none(single: EATModelHandle) -> None:
    assert single.extract([]) == [] and single.extract([], granularity="all") == []
    assert single.predict([]) == [] and single.predict_scores([]) == []
    ranked = single.predict(tone(0.5), top_k=None)
    assert [label for label, _ in ranked] and sorted(label for label, _ in ranked) == sorted(single.labels)
    scores = [score for _, score in ranked]
    assert scores == sorted(scores, reverse=True)
    for bad in (0, -1, 2.5, "3"):
        with pytest.raises(ValueError, match="top_k"):
            single.predict(tone(0.5), top_k=bad)
