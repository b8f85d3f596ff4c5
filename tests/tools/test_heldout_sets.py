"""The held-out probe sets (issue 21): eat_fairseq/prep/grouped_folds.py (whole groups per fold) and the
builders experiments/build_spoken_letters.py, build_instrument_family.py and build_sound_events.py,
each run on a tiny fake package tree laid out like the real one (no apt, no network, no sox: the
conversion is replaced by a soundfile + linear-interpolation stand-in)."""
from __future__ import annotations

import csv
import importlib.util
import struct
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from helpers import REPO

from eat_fairseq.evaluation.probe import check_fold_classes, load_probe_data
from eat_fairseq.prep.common import OutputExistsError, PrepError
from eat_fairseq.prep.grouped_folds import GroupedClip, assign_folds, write_grouped_fold_manifests

EXPERIMENTS = REPO / "experiments"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


letters = _load("build_spoken_letters")
instruments = _load("build_instrument_family")
events = _load("build_sound_events")
common = sys.modules["heldout_common"]


def fake_convert(src: str, dst: str) -> np.ndarray:
    """sox's job for the tests: any soundfile-readable file -> 16 kHz mono int16 samples."""
    x, sr = sf.read(src, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    n = max(1, int(round(len(x) * 16000 / sr)))
    y = np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x)
    return np.clip(np.round(y * 32767), -32768, 32767).astype(np.int16)


@pytest.fixture(autouse=True)
def no_sox(monkeypatch):
    monkeypatch.setattr(common.pool, "convert", fake_convert)


def tone(path: Path, seed: int, seconds: float = 0.4, sr: int = 8000) -> None:
    """A short noisy tone, different for every seed (so no two test clips are copies)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * (200 + 37 * (seed % 50)) * t) + 0.05 * rng.standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), sr, format="WAV")


def fold_rows(out: Path) -> list[dict]:
    with open(out / "manifests" / "folds.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def check_groups_whole(rows: list[dict]) -> None:
    folds_of = {}
    for row in rows:
        folds_of.setdefault(row["group"], set()).add(row["fold"])
    assert all(len(f) == 1 for f in folds_of.values()), folds_of


# ---------------------------------------------------------------- the fold writer


def test_assign_folds_keeps_groups_whole_spreads_classes_and_is_deterministic() -> None:
    groups = {f"g{i}": Counter({"a": 3 + i % 3, "b": 2}) for i in range(9)}
    groups["big"] = Counter({"a": 20})
    folds = assign_folds(groups, 3)
    assert folds == assign_folds(dict(reversed(list(groups.items()))), 3)  # order of the input does not matter
    assert set(folds) == set(groups) and set(folds.values()) == {0, 1, 2}
    per_fold = Counter()
    for g, f in folds.items():
        per_fold[f] += sum(groups[g].values())
    assert max(per_fold.values()) - min(per_fold.values()) <= 8
    strata = {g: Counter({"x" if i < 3 else "y": sum(groups[g].values())}) for i, g in enumerate(sorted(groups))}
    spread = assign_folds(groups, 3, strata)
    assert len({spread[g] for g in sorted(groups)[:3]}) == 3  # the three groups of stratum x in three folds
    with pytest.raises(PrepError, match="at least 2 folds"):
        assign_folds(groups, 1)
    with pytest.raises(PrepError, match="cannot fill"):
        assign_folds({"g": Counter({"a": 1})}, 2)


def test_write_grouped_fold_manifests_is_read_by_the_probe(tmp_path) -> None:
    root = tmp_path / "audio"
    clips = []
    for i in range(12):
        label = "ab"[i % 2]
        rel = f"{label}/clip{i}.wav"
        tone(root / rel, i, sr=16000)
        clips.append(GroupedClip(rel, label, f"voice{i // 2}"))  # each voice says a and b
    dest = tmp_path / "manifests"
    report = write_grouped_fold_manifests(root, dest, clips, num_folds=3, labels=["b", "a"])
    assert sorted(report.splits) == ["fold1", "fold2", "fold3"] and report.total_rows == 12
    assert (dest / "label_descriptors.csv").read_text() == "0,b\n1,a\n"
    data = load_probe_data(str(dest), "auto")
    check_fold_classes(data)
    assert data.split_names == ["fold1", "fold2", "fold3"] and len(data) == 12
    with open(dest / "folds.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    check_groups_whole(rows)
    with pytest.raises(OutputExistsError):
        write_grouped_fold_manifests(root, dest, clips, num_folds=3)
    one_voice = [GroupedClip(c.rel_path, "c" if c.group == "voice0" else c.label, c.group) for c in clips]
    with pytest.raises(PrepError, match="one fold only"):
        write_grouped_fold_manifests(root, tmp_path / "m2", one_voice, num_folds=3, labels=["a", "b", "c"])


# ---------------------------------------------------------------- shared steps


def test_helpers_segments_copies_and_held_back_packages() -> None:
    x = np.arange(25 * 16000) % 7
    parts = common.equal_segments(x, 10 * 16000)
    assert len(parts) == 3 and sum(map(len, parts)) == len(x) and max(map(len, parts)) <= 10 * 16000
    assert len(common.equal_segments(x[:16000], 10 * 16000)) == 1
    a = (1000 * np.random.default_rng(0).standard_normal(800)).astype(np.int16)
    assert common.is_duplicate(a, a.copy()) and common.is_duplicate(a, (a * 0.5).astype(np.int16))
    assert not common.is_duplicate(a, a[::-1].copy()) and not common.is_duplicate(a, a[:-1])
    with pytest.raises(common.SetError, match="pre-training pool"):
        common.check_held_back(["klettres-data", "hydrogen-drumkits"])
    for module in (letters, instruments, events):
        packages = getattr(module, "PACKAGES", None) or (module.PACKAGE,)
        assert not set(packages) & set(common.POOL_PACKAGES), module.__name__


@pytest.mark.parametrize("module, needles", [
    (letters, ("asterisk-core-sounds-en-wav", "klettres-data", "CC-BY-SA-3.0", "GPL-2+", "fold1..K", "--force")),
    (instruments, ("fluid-soundfont-gm", "MIT", "fluidsynth", "p000-001-003", "--force")),
    (events, ("0ad-data", "CC-BY-SA-3.0", "public.zip", "ambience", "--force")),
])
def test_help_names_sources_licences_and_format(module, needles) -> None:
    proc = subprocess.run([sys.executable, module.__file__, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for needle in needles + ("16 kHz, mono, 16-bit", "clips.csv", "--deb-root", "eat-probe"):
        assert needle in proc.stdout, needle


# ---------------------------------------------------------------- spoken letters


def fake_letters_root(root: Path) -> None:
    sounds = root / letters.ASTERISK_SOUNDS
    seed = 0
    for voice in ("en_US_f_Allison", "es_MX_f_Allison", "fr_CA_f_June", "it_IT_m_Carlo", "it_IT_f_Menardi", "fr"):
        for name in ("a", "b", "c", "dash", "silence_1"):
            seed += 1
            tone(sounds / voice / "letters" / f"{name}.wav", seed)
    kl = root / letters.KLETTRES_DIR
    for lang, names in {"en": "ABC", "en_GB": "abc", "de": "abcx", "fr": "abc"}.items():
        entries = []
        for i, letter in enumerate(names):
            seed += 1
            file = f"a-{i}.ogg" if lang == "fr" else f"{letter}.ogg"
            tone(kl / lang / "alpha" / file, seed)
            entries.append(f'<sound name="{letter}" file="{lang}/alpha/{file}" />')
        entries.append(f'<sound name="Ä" file="{lang}/alpha/{file}" />')  # not a..z: left out
        (kl / lang / "sounds.xml").write_text("<!-- comment -->\n<klettres><language code='x'><alphabet>"
                                              + "".join(entries) + "</alphabet></language></klettres>",
                                              encoding="utf-8")


def test_spoken_letters_builds_folds_that_hold_voices_out(tmp_path, capsys) -> None:
    deb = tmp_path / "deb"
    fake_letters_root(deb)
    out = tmp_path / "letters"
    assert letters.main(["--out", str(out), "--deb-root", str(deb), "--folds", "3"]) == 0
    rows = fold_rows(out)
    # 6 Asterisk voices x 3 + KLettres en 3 + en_GB 3 + de 3 + fr 3; x (one voice only) is left out
    assert Counter(r["label"] for r in rows) == {"a": 10, "b": 10, "c": 10}
    check_groups_whole(rows)
    groups = {r["group"] for r in rows}
    assert groups == {"allison", "june", "carlo", "menardi", "armelle", "klettres_en", "klettres_de", "klettres_fr"}
    assert {r["clip_id"] for r in rows if r["group"] == "allison"} >= {"a/allison__en__a", "a/allison__es__a"}
    with open(out / "clips.csv", newline="") as handle:
        clips = list(csv.DictReader(handle))
    assert {c["package"] for c in clips} == set(letters.PACKAGES) - {"asterisk-core-sounds-ru-wav"}
    info = sf.info(out / "audio" / "a" / "june__fr__a.wav")
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    data = load_probe_data(str(out / "manifests"), "auto")
    check_fold_classes(data)
    assert data.split_names == ["fold1", "fold2", "fold3"] and data.num_classes == 26
    # an existing --out is refused (exit 2, nothing touched), replaced with --force
    marker = out / "audio" / "a" / "june__fr__a.wav"
    before = marker.stat().st_mtime_ns
    capsys.readouterr()
    assert letters.main(["--out", str(out), "--deb-root", str(deb), "--folds", "3"]) == 2
    assert "--force" in capsys.readouterr().err and marker.stat().st_mtime_ns == before
    assert letters.main(["--out", str(out), "--deb-root", str(deb), "--folds", "3", "--force"]) == 0
    assert fold_rows(out) == rows  # deterministic


# ---------------------------------------------------------------- instrument family


def write_sf2(path: Path, presets: list[tuple[str, int, list[tuple[int, int, int, int]]]], num_samples: int) -> None:
    """A minimal SoundFont 2: ``presets`` are (name, program, zones), a zone (sample, key lo, key hi, root);
    each preset gets its own instrument. Sample s has root key 60 + s unless the zone overrides it."""
    def chunk(cid: bytes, data: bytes) -> bytes:
        return cid + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")

    def name20(text: str) -> bytes:
        return text.encode()[:19].ljust(20, b"\0")

    phdr = pbag = pgen = inst = ibag = igen = b""
    pbag_n = pgen_n = ibag_n = igen_n = 0
    for i, (name, program, zones) in enumerate(presets):
        phdr += name20(name) + struct.pack("<HHHIII", program, 0, pbag_n, 0, 0, 0)
        pbag += struct.pack("<HH", pgen_n, 0)
        pbag_n += 1
        pgen += struct.pack("<HH", 41, i)
        pgen_n += 1
        inst += name20(name) + struct.pack("<H", ibag_n)
        for sample, lo, hi, root in zones:
            ibag += struct.pack("<HH", igen_n, 0)
            ibag_n += 1
            igen += struct.pack("<HBB", 43, lo, hi) + struct.pack("<Hh", 58, root) + struct.pack("<HH", 53, sample)
            igen_n += 3
    phdr += name20("EOP") + struct.pack("<HHHIII", 0, 0, pbag_n, 0, 0, 0)
    pbag += struct.pack("<HH", pgen_n, 0)
    pgen += struct.pack("<HH", 0, 0)
    inst += name20("EOI") + struct.pack("<H", ibag_n)
    ibag += struct.pack("<HH", igen_n, 0)
    igen += struct.pack("<HH", 0, 0)
    shdr = b"".join(name20(f"s{s}") + struct.pack("<IIIIIBbHH", 100 * s, 100 * s + 90, 0, 0, 32000, 60 + s, 0, 0, 1)
                    for s in range(num_samples)) + name20("EOS") + bytes(26)
    pdta = b"pdta" + b"".join(chunk(c, d) for c, d in [(b"phdr", phdr), (b"pbag", pbag), (b"pmod", bytes(10)),
                                                          (b"pgen", pgen), (b"inst", inst), (b"ibag", ibag),
                                                          (b"imod", bytes(10)), (b"igen", igen), (b"shdr", shdr)])
    sdta = b"sdta" + chunk(b"smpl", bytes(200 * num_samples))
    body = b"sfbk" + chunk(b"LIST", b"INFO" + chunk(b"ifil", struct.pack("<HH", 2, 1))) + chunk(b"LIST", sdta) \
        + chunk(b"LIST", pdta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def fake_render(sf2: str, program: int, key: int, hold_s: float, wav: str) -> None:
    """A note per (program, key); programs 0 and 1 sound the same (as FluidR3's pianos nearly do)."""
    t = np.arange(int(2.0 * 16000)) / 16000
    timbre = 0 if program in (0, 1) else program
    x = 0.3 * np.sin(2 * np.pi * 440 * 2 ** ((key - 69) / 12) * t) * np.exp(-t * (1 + timbre % 5))
    x += 0.05 * np.sin(2 * np.pi * (900 + 13 * timbre) * t)
    sf.write(wav, x.astype(np.float32), 16000)


def test_read_presets_keys_and_sample_groups(tmp_path) -> None:
    sf2 = tmp_path / "x.sf2"
    write_sf2(sf2, [("Piano A", 0, [(0, 0, 127, -1), (1, 0, 50, 70)]), ("Piano B", 1, [(1, 0, 127, -1)]),
                    ("Drum", 5, [(2, 60, 61, -1)])], 3)
    presets = instruments.read_presets(str(sf2))
    assert [(p.name, p.program, sorted(p.samples), sorted(p.keys)) for p in presets] == [
        ("Piano A", 0, [0, 1], [50, 60]),  # sample 1's override 70 clamped into 0..50
        ("Piano B", 1, [1], [61]),
        ("Drum", 5, [2], [61]),  # root 62 clamped into 60..61
    ]
    assert instruments.sample_groups(presets) == {0: "p000-001", 1: "p000-001", 5: "p005"}
    assert instruments.family_of(0) == "piano" and instruments.family_of(38) is None
    assert instruments.family_of(73) == "pipe" and instruments.family_of(80) is None
    (tmp_path / "bad.sf2").write_bytes(b"RIFF\0\0\0\0WAVE")
    with pytest.raises(instruments.SoundFontError):
        instruments.read_presets(str(tmp_path / "bad.sf2"))
    mid = tmp_path / "n.mid"
    instruments.midi_note_file(str(mid), 40, 64, 1.5)
    data = mid.read_bytes()
    assert data[:4] == b"MThd" and b"\xc0\x28" in data and b"\x90\x40\x64" in data and data.endswith(b"\xff\x2f\x00")


def test_instrument_family_holds_instruments_out(tmp_path, monkeypatch) -> None:
    deb = tmp_path / "deb"
    write_sf2(deb / instruments.SF2, [
        ("Grand", 0, [(0, 0, 127, 48), (0, 0, 127, 60)]), ("Bright", 1, [(0, 0, 127, 48), (1, 0, 127, 72)]),
        ("EP", 4, [(2, 0, 127, 50), (2, 0, 127, 62)]), ("Nylon", 24, [(3, 0, 127, 52), (3, 0, 127, 64)]),
        ("Steel", 25, [(4, 0, 127, 52), (4, 0, 127, 64)]), ("Jazz", 26, [(5, 0, 127, 55)]),
        ("Violin", 40, [(6, 0, 127, 67)]),  # strings: one group only -> left out
        ("Synth Bass", 38, [(7, 0, 127, 40)]),  # synthesised -> left out
    ], 8)
    monkeypatch.setattr(instruments, "render_note", fake_render)
    monkeypatch.setattr(common, "ensure_commands", lambda commands: None)
    out = tmp_path / "inst"
    assert instruments.main(["--out", str(out), "--deb-root", str(deb), "--folds", "2"]) == 0
    rows = fold_rows(out)
    check_groups_whole(rows)
    # Bright's key 48 is the same note as Grand's: the copy is dropped, both stay in group p000-001
    assert sorted(r["clip_id"] for r in rows) == [
        "guitar/p024_Nylon_n052", "guitar/p024_Nylon_n064", "guitar/p025_Steel_n052", "guitar/p025_Steel_n064",
        "guitar/p026_Jazz_n055", "piano/p000_Grand_n048", "piano/p000_Grand_n060", "piano/p001_Bright_n072",
        "piano/p004_EP_n050", "piano/p004_EP_n062"]
    assert {r["group"] for r in rows} == {"p000-001", "p004", "p024", "p025", "p026"}
    data = load_probe_data(str(out / "manifests"), "auto")
    check_fold_classes(data)
    assert data.class_names == list(instruments.FAMILIES)


@pytest.mark.skipif(not __import__("shutil").which("fluidsynth"), reason="fluidsynth not installed")
def test_render_note_with_fluidsynth_keeps_note_and_release(tmp_path) -> None:
    sf2 = tmp_path / "x.sf2"
    write_sf2(sf2, [("Tone", 0, [(0, 0, 127, 60)])], 1)
    wav = tmp_path / "n.wav"
    instruments.render_note(str(sf2), 0, 60, 0.5, str(wav))
    info = sf.info(wav)
    assert info.samplerate == instruments.RENDER_RATE and abs(info.duration - 1.0) < 0.05


# ---------------------------------------------------------------- sound events


@pytest.mark.parametrize("path, expected", [
    ("actor/fauna/animal/horse_attack1.ogg", ("animal", "animal:horse")),
    ("actor/mounted/death/death_horse_10.ogg", ("animal", "animal:horse")),
    ("voice/global/civ_dog_bark.ogg", ("animal", "animal:dog")),
    ("actor/human/death/male_death_12.ogg", ("human_cry", "human_cry:male_death")),
    ("actor/singlesteps/fs_grass1.ogg", ("footsteps", "footsteps:singlesteps")),
    ("attack/weapon/swordhit_12a.ogg", ("weapon", "weapon:swordhit")),
    ("attack/impact/arrow_wood_03.ogg", ("impact", "impact:arrow")),
    ("resource/lumbering/lumber_treeexpire_02.ogg", ("tool_work", "tool_work:lumber_tree")),
    ("resource/gathering/gather_fruit_01.ogg", ("gathering", "gathering:gather_fruit")),
    ("ambient/weather/rain_11.ogg", ("ambience", "ambience:weather")),
    ("voice/greek/civ/civ_male_yes_1.ogg", None), ("music/Sunrise.ogg", None), ("attack/fire/c_11.ogg", None),
    ("actor/fauna/animal/readme.txt", None),
])
def test_sound_event_classes_and_groups(path, expected) -> None:
    assert events.classify(path) == expected


def test_sound_events_merges_copies_and_cuts_long_sounds(tmp_path) -> None:
    members = {}
    seed = 100
    names = {"actor/fauna/animal": ["cattle_01", "goat_10", "pig_10"], "actor/human/death": ["male_death_01",
             "female_death_01", "death_11"], "attack/impact": ["arrow_wood_01", "shield_metal_01", "sling_stone_01"],
             "attack/weapon": ["sword_attack_01", "bow_attack_01", "spear_attack_01"]}
    for folder, stems in names.items():
        for stem in stems:
            seed += 1
            tone(tmp_path / "w.wav", seed)
            members[f"audio/{folder}/{stem}.wav"] = (tmp_path / "w.wav").read_bytes()
    members["audio/actor/fauna/death/goat_11.wav"] = members["audio/actor/fauna/animal/goat_10.wav"]  # a copy
    members["audio/attack/weapon/sling_22.wav"] = members["audio/attack/impact/sling_stone_01.wav"]  # other class
    tone(tmp_path / "long.wav", 7, seconds=25.0)
    members["audio/ambient/water/river_21.wav"] = (tmp_path / "long.wav").read_bytes()
    tone(tmp_path / "w.wav", 8, seconds=3.0)
    members["audio/ambient/weather/rain_11.wav"] = (tmp_path / "w.wav").read_bytes()
    members["audio/music/Sunrise.wav"] = (tmp_path / "w.wav").read_bytes()
    zpath = tmp_path / "deb" / events.ZIP
    zpath.parent.mkdir(parents=True)
    with zipfile.ZipFile(zpath, "w") as archive:
        for name, data in sorted(members.items()):
            archive.writestr(name, data)
    out = tmp_path / "events"
    assert events.main(["--out", str(out), "--deb-root", str(tmp_path / "deb"), "--folds", "2"]) == 0
    rows = fold_rows(out)
    check_groups_whole(rows)
    ids = {r["clip_id"] for r in rows}
    assert "animal/actor__fauna__death__goat_11" not in ids and "animal/actor__fauna__animal__goat_10" in ids
    assert not any("sling" in i for i in ids)  # one take under two classes: both left out
    assert {i for i in ids if "river" in i} == {f"ambience/ambient__water__river_21_s0{k}" for k in range(3)}
    assert Counter(r["label"] for r in rows) == {"animal": 3, "human_cry": 3, "impact": 2, "weapon": 3,
                                                 "ambience": 4}
    with open(out / "clips.csv", newline="") as handle:
        secs = [float(r["seconds"]) for r in csv.DictReader(handle) if "river" in r["filename"]]
    assert len(secs) == 3 and all(s <= 10.0 for s in secs) and abs(sum(secs) - 25.0) < 0.01
    data = load_probe_data(str(out / "manifests"), "auto")
    check_fold_classes(data)
