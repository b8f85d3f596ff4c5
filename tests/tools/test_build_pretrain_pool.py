"""experiments/build_pretrain_pool.py: its CLI, its refusal to overwrite, and its pure steps (no apt, no root)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from helpers import REPO

SCRIPT = REPO / "experiments" / "build_pretrain_pool.py"
_spec = importlib.util.spec_from_file_location("build_pretrain_pool", SCRIPT)
pool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pool)


def test_help_names_the_output_format_and_sources() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for needle in ("audio/IIIII_KKK.wav", "pool.csv", "16 kHz, mono, 16-bit", "filename", "--force",
                   "tuxpaint-stamps-default", "GPL-2", "CC0", "apt-get download"):
        assert needle in text, needle
    assert "/shared" not in SCRIPT.read_text()  # self-contained: nothing outside the repository


def test_refuses_a_non_empty_out_without_force(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "pool"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    called = []
    monkeypatch.setattr(pool, "ensure_tools", lambda: called.append("apt"))  # must not get that far
    assert pool.main(["--out", str(out), "--cache", str(tmp_path / "cache")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine" and not called
    with pytest.raises(pool.PoolError, match="not empty"):
        pool.check_out(str(out), force=False)
    pool.check_out(str(out), force=True)
    pool.check_out(str(tmp_path / "absent"), force=False)


def test_bad_package_name_is_named(capsys) -> None:
    assert pool.main(["--out", "/nonexistent/pool", "--packages", "sox,Bad_Name"]) == 2
    assert "'Bad_Name'" in capsys.readouterr().err
    assert pool.parse_packages(" a-b , c+d.e ") == ["a-b", "c+d.e"]


def test_split_segments_drops_short_and_silent_chunks() -> None:
    sr = pool.SR
    rng = np.random.default_rng(0)
    loud = (3000 * rng.standard_normal(25 * sr)).astype(np.int16)
    loud[10 * sr:20 * sr] = 5  # chunk 1 nearly silent
    x = loud[: 20 * sr + sr // 2]  # chunk 2 is 0.5 s: too short
    kept = pool.split_segments(x, 10 * sr, sr)
    assert [k for k, _ in kept] == [0]
    assert len(kept[0][1]) == 10 * sr
    x = loud[: 21 * sr + sr // 2]  # chunk 2 now 1.5 s: kept
    assert [(k, len(s)) for k, s in pool.split_segments(x, 10 * sr, sr)] == [(0, 10 * sr), (2, sr + sr // 2)]
    clipped = np.zeros(2 * sr, np.int16)
    clipped[0] = -32768  # int16 abs() overflows; must still count as loud
    assert len(pool.split_segments(clipped, 10 * sr, sr)) == 1


def test_names_order_and_source_filter(tmp_path) -> None:
    assert pool.segment_name(7, 3) == "audio/00007_003.wav"
    root = tmp_path / "root_pkg"
    for rel in ("usr/share/a/b.WAV", "usr/share/a/c.ogg", "usr/share/a/readme.txt",
                "usr/share/doc/pkg/x.wav", "usr/share/g/Data/Sounds/voices/v.ogg", "usr/share/g/Data/Sounds/s.ogg",
                "usr/share/t/symbols/math/m.ogg", "usr/share/t/symbols/other/o.flac", "usr/share/k/kick.gsm"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    os.symlink(root / "usr/share/a/c.ogg", root / "usr/share/a/link.ogg")
    found = pool.list_sources(str(root))
    assert found == ["usr/share/a/b.WAV", "usr/share/a/c.ogg", "usr/share/g/Data/Sounds/s.ogg",
                     "usr/share/k/kick.gsm", "usr/share/t/symbols/other/o.flac"]
    sources = {"p2": ["z.wav", "a.wav"], "p1": ["m.ogg", "b.ogg", "c.ogg"]}
    order = pool.shuffled_sources(sources, seed=0)
    assert sorted(order) == sorted((p, r) for p, rs in sources.items() for r in rs)
    # the order depends on the files and the seed only, not on how they were listed
    assert pool.shuffled_sources({"p1": ["c.ogg", "b.ogg", "m.ogg"], "p2": ["a.wav", "z.wav"]}, 0) == order
    assert any(pool.shuffled_sources(sources, seed=s) != order for s in range(1, 5))


def test_write_wav_is_16k_mono_16bit(tmp_path) -> None:
    x = (np.sin(np.arange(pool.SR) / 10) * 10000).astype(np.int16)
    path = tmp_path / "s.wav"
    pool.write_wav(str(path), x)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    np.testing.assert_array_equal(pool.read_wav(str(path)), x)
    np.testing.assert_array_equal(sf.read(str(path), dtype="int16")[0], x)


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox is not installed")
def test_convert_to_16k_mono(tmp_path) -> None:
    sr = 44100
    t = np.arange(int(1.5 * sr)) / sr
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t)], axis=1)
    src = tmp_path / "in.flac"
    sf.write(str(src), stereo, sr)
    x = pool.convert(str(src), str(tmp_path / "out.wav"))
    assert x.dtype == np.dtype("<i2") and abs(len(x) - int(1.5 * pool.SR)) <= 1
    assert sf.info(str(tmp_path / "out.wav")).samplerate == pool.SR
    np.testing.assert_array_equal(pool.convert(str(src), str(tmp_path / "again.wav")), x)  # repeatable dither
    (tmp_path / "bad.ogg").write_bytes(b"not audio")
    with pytest.raises(pool.UnreadableSound, match="bad.ogg"):
        pool.convert(str(tmp_path / "bad.ogg"), str(tmp_path / "out.wav"))
