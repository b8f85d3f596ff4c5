"""One path for each thing: every consumer reads every row kind through the one row reader and computes
features through the one feature path; the pure-PyTorch packages import no fairseq; each fairseq config
default is the core's."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from eat_fairseq.data.clips import read_row
from eat_fairseq.data.features import FeatureConfig, fbank_of, split_windows, to_window, waveform_to_features
from eat_fairseq.data.manifest import read_manifest
from eat_fairseq.prep.pack import pack_manifests
from eat_fairseq.prep.validate import validate_manifest

RATE = 16000
CLIP = 20720  # exactly 128 fbank frames (400 + 127 * 160 samples): one tiny window, read whole
LEAD = 7000  # the clip starts this many samples into the long recording
FEATURES = FeatureConfig(target_length=128)


def _clip() -> np.ndarray:
    rng = np.random.default_rng(3)
    t = np.arange(CLIP) / RATE
    return (0.3 * np.sin(2 * np.pi * 700 * t) + 0.05 * rng.standard_normal(CLIP)).astype(np.float32)


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same audio as a file row, a span of a longer recording and a member of a packed shard."""
    root = tmp_path_factory.mktemp("rows")
    audio = root / "audio"
    audio.mkdir()
    clip = _clip()
    sf.write(audio / "a.wav", clip, RATE, subtype="FLOAT")
    noise = np.random.default_rng(4).standard_normal(LEAD + 9000).astype(np.float32) * 0.1
    sf.write(audio / "long.wav", np.concatenate([noise[:LEAD], clip, noise[LEAD:]]), RATE, subtype="FLOAT")
    loose = root / "loose"
    loose.mkdir()
    (loose / "train.tsv").write_text(f"{audio}\na.wav\t{CLIP}\nlong.wav:{LEAD}:{CLIP}\t{CLIP}\n")
    (loose / "label_descriptors.csv").write_text('index,mid,display_name\n0,/m/a,"A"\n1,/m/b,"B"\n')
    (loose / "train.lbl").write_text("a\t/m/a\nlong@" + str(LEAD) + "\t/m/a\n")
    packed = root / "packed"
    pack_manifests(loose, packed)
    _, (file_row, span_row) = read_manifest(str(loose / "train.tsv"))
    _, shard_rows = read_manifest(str(packed / "train.tsv"))
    assert [r.kind for r in (file_row, span_row, shard_rows[0])] == ["file", "span", "shard"]
    return {"file": (file_row, loose), "span": (span_row, loose), "shard": (shard_rows[0], packed)}


KINDS = ("file", "span", "shard")


def reference() -> torch.Tensor:
    return torch.from_numpy(_clip())[None]


@pytest.mark.parametrize("kind", KINDS)
def test_row_reader(rows: dict, kind: str) -> None:
    wave, sr = read_row(rows[kind][0])
    assert sr == RATE and torch.equal(wave, reference())


@pytest.mark.parametrize("kind", KINDS)
def test_training_dataset(rows: dict, kind: str) -> None:
    """Pre-training, fine-tuning and eat-evaluate read rows through EATAudioDataset."""
    pytest.importorskip("fairseq")
    from eat_fairseq.fairseq_ext.datasets import EATAudioDataset

    row, folder = rows[kind]
    ds = EATAudioDataset(str(folder / "train.tsv"), FEATURES, shuffle=False)
    index = next(i for i, r in enumerate(ds.rows) if r.line == row.line)
    expected = waveform_to_features(reference()[0], RATE, FEATURES)
    assert torch.equal(ds.load_features(index), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_probe(rows: dict, kind: str) -> None:
    """The online probe and eat-probe: the clip's own frames, not its whole file."""
    from eat_fairseq.evaluation.probe import load_probe_data

    row, folder = rows[kind]
    data = load_probe_data(str(folder), splits="train/train")
    fbank = data.fbank[row.line - 2]
    assert torch.equal(fbank, fbank_of(reference()[0], RATE, FEATURES))
    assert fbank.shape[0] == 128


@pytest.mark.parametrize("kind", KINDS)
def test_extract_and_tag(rows: dict, kind: str) -> None:
    """eat-extract and eat-tag load every input with the same function."""
    from eat_fairseq.cli.extract import AudioItem, load_item
    from eat_fairseq.inference.api import load_model
    from eat_fairseq.checkpoints.convert import build_checkpoint
    from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig

    row, folder = rows[kind]
    model = EATPretrainingModel(PretrainConfig.tiny())
    ckpt = folder.parent / "tiny.pt"
    if not ckpt.exists():
        torch.save(build_checkpoint("pretrained", model.state_dict(), model.cfg), ckpt)
    handle = load_model(str(ckpt))
    item = AudioItem(row.path, "x", line=row.line, row=row, manifest=str(folder / "train.tsv"))
    assert torch.equal(load_item(handle, item), reference()[0])


@pytest.mark.parametrize("kind", KINDS)
def test_validate(rows: dict, kind: str) -> None:
    row, folder = rows[kind]
    problems = validate_manifest(folder / "train.tsv")
    assert problems == [], problems


@pytest.mark.parametrize("kind", KINDS)
def test_pack(rows: dict, kind: str, tmp_path: Path) -> None:
    """manifests/pack.py copies (or cuts) the row's exact samples into a shard member of its own."""
    row, folder = rows[kind]
    pack_manifests(folder, tmp_path / "again")
    _, again = read_manifest(str(tmp_path / "again" / "train.tsv"))
    repacked = next(r for r in again if r.line == row.line)
    assert repacked.kind == "shard"
    assert torch.equal(read_row(repacked)[0], reference())


def test_api_and_hear_files(rows: dict) -> None:
    """A file path given to the Python API (and so HEAR) is the file row of the row reader."""
    from eat_fairseq.data.audio import load_audio

    wave, sr = load_audio(rows["file"][0].path)
    assert sr == RATE and torch.equal(wave, reference())


def test_windows_of_the_api_start_with_the_training_window() -> None:
    """Inference cuts a clip into windows with the same padding and normalisation as training."""
    fbank = fbank_of(torch.randn(3 * RATE), RATE)
    cfg = FeatureConfig(target_length=128)
    windows, valid = split_windows(fbank, cfg)
    assert torch.equal(windows[0], to_window(fbank, cfg))
    assert torch.equal(windows[-1], to_window(fbank[128 * (len(valid) - 1):], cfg))
    assert sum(valid) == fbank.shape[0]


PURE = ("eat_fairseq.model", "eat_fairseq.data", "eat_fairseq.checkpoints", "eat_fairseq.evaluation",
        "eat_fairseq.inference", "eat_fairseq.cli.extract", "eat_fairseq.cli.tag", "eat_fairseq.cli.probe",
        "eat_fairseq.cli.convert")


def test_inference_core_imports_no_fairseq() -> None:
    """Everything but fairseq_ext (and the tools that train through it) runs without fairseq."""
    script = f"""
import importlib, pkgutil, sys
import eat_fairseq
for name in {PURE!r}:
    mod = importlib.import_module(name)
    for info in pkgutil.walk_packages(getattr(mod, "__path__", []), name + "."):
        importlib.import_module(info.name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("fairseq", "hydra", "omegaconf"))
print(" ".join(bad) or "clean")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "clean"


def test_fairseq_defaults_are_the_core_defaults() -> None:
    """One default per setting: the registered fairseq dataclasses agree with the core configs."""
    pytest.importorskip("fairseq")
    from eat_fairseq.fairseq_ext.models import EATClassifierConfig, EATModelConfig
    from eat_fairseq.fairseq_ext.tasks import EATClassificationConfig, EATPretrainingTaskConfig
    from eat_fairseq.model.encoder import EncoderConfig
    from eat_fairseq.model.pretraining import PretrainConfig

    def defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    fairseq_model = defaults(EATModelConfig)
    core = {**dataclasses.asdict(EncoderConfig()), **{k: v for k, v in dataclasses.asdict(PretrainConfig()).items()
                                                     if k != "encoder"}}
    assert {k: str(fairseq_model[k]) for k in core} == {k: str(v) for k, v in core.items()}
    classifier = defaults(EATClassifierConfig)
    assert all(classifier[k] == v for k, v in dataclasses.asdict(EncoderConfig()).items() if k != "drop_path_rate")
    features = dataclasses.asdict(FeatureConfig())
    for task in (EATPretrainingTaskConfig, EATClassificationConfig):
        d = defaults(task)
        assert {k: d[k] for k in ("sample_rate", "target_length", "norm_mean", "norm_std")} == {
            k: features[k] for k in ("sample_rate", "target_length", "norm_mean", "norm_std")}
    from eat_fairseq.data.augment import AugmentConfig
    from eat_fairseq.fairseq_ext.criterions import EATClassificationCriterionConfig

    augment = dataclasses.asdict(AugmentConfig())
    registered = {**defaults(EATClassificationCriterionConfig), **defaults(EATClassificationConfig)}
    assert {k: registered[k] for k in augment if k != "max_time_roll"} == {
        k: v for k, v in augment.items() if k != "max_time_roll"}


def test_masks_come_from_the_model_config() -> None:
    """One mask path: the data-loader workers and the model draw with the model's spec and patch size."""
    from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig

    cfg = PretrainConfig.tiny()
    spec = cfg.mask_spec()
    assert (spec.patch_size, spec.mask_prob, spec.clone_batch) == (cfg.encoder.patch_size, cfg.mask_prob, cfg.clone_batch)
    model = EATPretrainingModel(cfg)
    torch.manual_seed(0)
    a = model.make_mask(4, spec.grid(128, 128), torch.device("cpu"))
    torch.manual_seed(0)
    b = spec.draw(4, (8, 8))
    assert torch.equal(a, b)
    wide = dataclasses.replace(spec, patch_size=32)
    assert wide.grid(128, 128) == (4, 4)


def test_nothing_a_user_reads_points_outside_the_repository() -> None:
    """Nothing a user reads points outside the repository (tests may use ../shared, skipping without it)."""
    repo = Path(__file__).resolve().parents[2]
    user_facing = ["README.md", "setup.py", "Makefile", "docs", "examples", "eat_fairseq", "manifests",
                   "benchmarks", "experiments", "tools"]
    hits = []
    for name in user_facing:
        path = repo / name
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        for f in files:
            text = f.read_text(encoding="utf-8", errors="ignore")
            if "../shared" in text or "eat-reference.md" in text:
                hits.append(str(f.relative_to(repo)))
    assert hits == []


def test_pack_flac_keeps_exact_samples(tmp_path: Path) -> None:
    """pack --flac re-encodes integer PCM (files and spans) losslessly: the shard rows read the same samples."""
    audio = tmp_path / "audio"
    audio.mkdir()
    pcm = (np.random.default_rng(5).standard_normal((30000, 2)) * 3000).astype(np.int16)
    sf.write(audio / "stereo.wav", pcm, 22050, subtype="PCM_16")
    src = tmp_path / "loose"
    src.mkdir()
    (src / "train.tsv").write_text(f"{audio}\nstereo.wav\t30000\nstereo.wav:1000:8000\t8000\n")
    report = pack_manifests(src, tmp_path / "packed", flac=True)
    assert report.flac_members == 2
    _, loose = read_manifest(str(src / "train.tsv"))
    _, packed = read_manifest(str(tmp_path / "packed" / "train.tsv"))
    for a, b in zip(loose, packed):
        wa, sra = read_row(a)
        wb, srb = read_row(b)
        assert sra == srb == 22050 and torch.equal(wa, wb)
