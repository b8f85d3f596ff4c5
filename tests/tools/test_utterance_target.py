"""experiments/utterance_target.py: the release's instance-normalised targets leave (almost) nothing that
is constant over a clip; the per-patch norm keeps some. Run on a tiny random checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from helpers import REPO

sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(REPO / "tests" / "unit"))
import utterance_target  # noqa: E402
from test_probe import write_tone_folder  # noqa: E402

from eat_fairseq.checkpoints.convert import build_checkpoint  # noqa: E402
from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig  # noqa: E402


def test_instance_norm_leaves_less_clip_constant_target_than_layer_norm(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    model = EATPretrainingModel(PretrainConfig.tiny())
    ckpt = tmp_path / "tiny.pt"
    torch.save(build_checkpoint("pretrained", model.state_dict(), model.cfg), ckpt)
    folder = write_tone_folder(tmp_path / "tones", splits=2, per_class=3)
    rows = {r["norm"]: r for r in utterance_target.measure(str(ckpt), str(folder), frames=64, per_split=6)}
    assert rows["instance"]["clips"] == 12
    assert rows["instance"]["clip_constant_share"] < rows["layer"]["clip_constant_share"]
    assert utterance_target.main([str(ckpt), "--data", str(folder), "--frames", "64"]) == 0
    assert "share of frame-target variance" in capsys.readouterr().out
