"""`make demo` (eat_fairseq.cli.demo): the corpus-only mode the README uses, and the full demo ending with
the training-curves plot and the list of its outputs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from eat_fairseq.cli.demo import main as demo_main
from helpers import run


def test_corpus_only_writes_class_folders_and_refuses_a_used_folder(tmp_path: Path, capsys) -> None:
    target = tmp_path / "sounds"
    assert demo_main(["--corpus-only", str(target), "--clips", "8"]) == 0
    assert sorted(p.name for p in target.iterdir()) == ["_broken", "kind0", "kind1", "kind2", "kind3"]
    assert sum(1 for _ in target.rglob("clip*")) == 8
    with pytest.raises(SystemExit) as exc:
        demo_main(["--corpus-only", str(target)])
    assert exc.value.code == 2 and "not empty" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.fairseq
def test_demo_ends_with_the_curves_and_lists_its_outputs(tmp_path: Path) -> None:
    pytest.importorskip("fairseq")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    printed = run([sys.executable, "-m", "eat_fairseq.cli.demo", "--out", str(out), "--clips", "16", "--updates", "20"],
                  cwd=tmp_path)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "checkpoints" / "tb" / "train_inner").glob("*tfevents*"))
    listing = printed[printed.index(f"outputs in {out}"):]
    for entry in ("corpus/", "manifests/", "checkpoints/tb/", "tensorboard --logdir", "curves.png", "eat-plot"):
        assert entry in listing, entry


def test_demo_reads_manifests_through_the_row_reader(tmp_path: Path) -> None:
    """A span row (a window of a file) is read as training reads it, not split by hand as a path."""
    import numpy as np
    import soundfile as sf
    import torch

    from eat_fairseq.cli.demo import manifest_features
    from eat_fairseq.data.features import FeatureConfig, waveform_to_features

    wave = np.random.default_rng(0).standard_normal(32000).astype("float32") * 0.1
    sf.write(tmp_path / "a.wav", wave, 16000, subtype="FLOAT")  # read back exactly
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{tmp_path}\na.wav\t32000\na.wav:8000:16000\t16000\n")
    cfg = FeatureConfig(target_length=128)
    whole, span = manifest_features(manifest, cfg)
    assert torch.equal(whole, waveform_to_features(torch.from_numpy(wave), 16000, cfg))
    assert torch.equal(span, waveform_to_features(torch.from_numpy(wave[8000:24000]), 16000, cfg))
    assert len(manifest_features(manifest, cfg, limit=1)) == 1
