"""experiments/build_drum_folder.py: drum classes from sample file names, and the labelled folder it
writes from an unpacked package (no apt: a fake package tree)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import soundfile as sf

from helpers import REPO

SCRIPT = REPO / "experiments" / "build_drum_folder.py"
_spec = importlib.util.spec_from_file_location("build_drum_folder", SCRIPT)
drums = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(drums)


@pytest.mark.parametrize("name, label", [
    ("Kick-Soft.wav", "kick"), ("BD 2.flac", "kick"), ("bass drum.wav", "kick"), ("Snare_Rim.wav", "snare"),
    ("OpenHat.wav", "hihat"), ("hh_closed.wav", "hihat"), ("Tom Lo.wav", "tom"), ("Crash-1.wav", "cymbal"),
    ("RideBell.wav", "cymbal"), ("Cowbell.wav", None), ("bottom.wav", None), ("kick_snare.wav", None),
])
def test_class_of_a_sample_name(name: str, label: str | None) -> None:
    assert drums.class_of(name) == label  # none, or two classes at once (kick_snare): left out


def test_build_copies_the_classified_samples_and_refuses_an_existing_out(tmp_path) -> None:
    kits = tmp_path / "deb" / drums.KITS
    for kit, names in {"Kit A": ["Kick.wav", "Snare.wav", "Cowbell.wav"], "KitB": ["Crash 1.flac", "readme.txt"]}.items():
        (kits / kit).mkdir(parents=True)
        for name in names:
            path = kits / kit / name
            if path.suffix == ".txt":
                path.write_text("not audio")
            else:
                sf.write(path, np.zeros(800, dtype=np.float32), 8000)
    counts = drums.build(tmp_path / "deb", tmp_path / "out")
    assert counts == {"kick": 1, "snare": 1, "hihat": 0, "tom": 0, "cymbal": 1}
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["cymbal/KitB__Crash_1.flac", "kick/Kit_A__Kick.wav", "snare/Kit_A__Snare.wav"]
    with pytest.raises(SystemExit, match="exists"):
        drums.build(tmp_path / "deb", tmp_path / "out")
