#!/usr/bin/env python3
"""Build a held-out MUSIC probe set: the instrument family of a single note (10 classes), with
instruments held out.

Task: which of ten General-MIDI families plays a note: piano, chromatic_percussion, organ, guitar,
bass, strings, ensemble, brass, reed, pipe. Every fold holds out whole instruments (and every other
instrument that shares a recorded sample with them), so the probe must recognise the family of an
instrument it was never trained on.

Source: the Debian package fluid-soundfont-gm (NOT in the pre-training pool,
experiments/build_pretrain_pool.py): the Fluid R3 General MIDI SoundFont by Frank Wen and
contributors, "constructed in part from samples found in the public domain ... and largely from
recordings of my own", MIT licence (usr/share/doc/fluid-soundfont-gm/copyright). File:
usr/share/sounds/sf2/FluidR3_GM.sf2.

Notes: for every bank-0 preset of the families above, except the synthesised ones (programs 38-39
synth bass, 50-51 synth strings, 54 synth voice, 55 orchestra hit, 62-63 synth brass), one note is
played at the root key of each recorded sample the preset maps (clamped into the sample's key range),
so each clip sounds a recording at (or next to) its own pitch: at most --notes-per-program (default
12, evenly spaced over the sorted keys). fluidsynth (installed when missing) renders each note alone
at 44.1 kHz, velocity 100, held --note-seconds (1.5 s) then released, reverb and chorus off, and is
kept for the note and 0.5 s of its release (2 s in all); sox converts it to 16 kHz mono.

Groups (a group is never split over folds): the presets that share a sample are one group (e.g.
programs 0, 1 and 3 all play the "P200 Piano" samples; 44 tremolo, 48 and 49 strings share theirs),
named after their programs (p000-001-003). A class whose presets all share one group is left out.

Output (OUT is --out; see experiments/heldout_common.py for the steps):
  OUT/audio/FAMILY/pPPP_NAME_nKKK.wav  16 kHz, mono, 16-bit PCM WAV: program PPP, preset NAME, MIDI key KKK
  OUT/clips.csv                        filename, label, group, package, source (sf2 preset and key), seconds
  OUT/manifests/fold1..K.tsv/.lbl      one split per fold, whole groups per fold (default 5 folds)
  OUT/manifests/label_descriptors.csv, folds.csv (clip_id,label,group,fold), excluded.tsv

Usage (run as root: apt-get download, and sox and fluidsynth are installed when missing):
  python experiments/build_instrument_family.py --out /data/heldout/instrument_family
  python experiments/build_instrument_family.py --out DIR --deb-root ROOT   # package unpacked into ROOT
  eat-probe --data /data/heldout/instrument_family/manifests --folds auto CHECKPOINT.pt
Deterministic: same package and options, same output. Refuses an existing OUT unless --force.
"""
from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Sequence

import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import heldout_common as common  # noqa: E402
from eat_fairseq.evaluation.probe import evenly_spaced  # noqa: E402  (the one evenly-spaced pick)

PACKAGE = "fluid-soundfont-gm"
SF2 = "usr/share/sounds/sf2/FluidR3_GM.sf2"
FAMILIES = ("piano", "chromatic_percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass", "reed",
            "pipe")  # General MIDI programs 0-7, 8-15, ..., 72-79
SYNTHETIC = frozenset({38, 39, 50, 51, 54, 55, 62, 63})
RENDER_RATE = 44100
VELOCITY = 100
RELEASE_S = 0.5

# SoundFont 2 generator numbers
GEN_KEY_RANGE, GEN_INSTRUMENT, GEN_SAMPLE_ID, GEN_ROOT_KEY = 43, 41, 53, 58


class SoundFontError(common.SetError):
    """The file is not a SoundFont 2 bank this tool can read."""


def family_of(program: int) -> Optional[str]:
    """The class of a General-MIDI program (0-based), or None when it is left out."""
    if not 0 <= program < 8 * len(FAMILIES) or program in SYNTHETIC:
        return None
    return FAMILIES[program // 8]


@dataclass
class Preset:
    """One preset of a SoundFont: its program, bank and name, the samples it plays and the keys
    (sample root keys within their key ranges) it is rendered at."""

    name: str
    program: int
    bank: int
    samples: set[int] = field(default_factory=set)
    keys: set[int] = field(default_factory=set)


def _chunks(data: bytes, start: int, end: int):
    while start + 8 <= end:
        cid, size = struct.unpack_from("<4sI", data, start)
        yield cid, start + 8, size
        start += 8 + size + (size & 1)


def _records(blob: bytes, fmt: str) -> list[tuple]:
    n = struct.calcsize(fmt)
    if len(blob) % n:
        raise SoundFontError(f"a pdta sub-chunk of {len(blob)} bytes is not a multiple of {n}")
    return [struct.unpack_from(fmt, blob, i) for i in range(0, len(blob), n)]


def _zones(bags: list[tuple], gens: list[tuple], first: int, last: int) -> list[dict[int, int]]:
    """Generators (oper -> raw 16-bit amount) of the zones ``first..last-1``."""
    return [{oper: amount for oper, amount in gens[bags[b][0]:bags[b + 1][0]]} for b in range(first, last)]


def _key_range(zone: dict[int, int], default: tuple[int, int] = (0, 127)) -> tuple[int, int]:
    if GEN_KEY_RANGE not in zone:
        return default
    amount = zone[GEN_KEY_RANGE]
    return amount & 0xFF, amount >> 8


def read_presets(path: str) -> list[Preset]:
    """The presets of a SoundFont 2 file (RIFF 'sfbk': the pdta hydra), sorted by bank and program."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:4] != b"RIFF" or data[8:12] != b"sfbk":
        raise SoundFontError(f"{path}: not a SoundFont 2 file (no RIFF sfbk header)")
    pdta = None
    for cid, off, size in _chunks(data, 12, len(data)):
        if cid == b"LIST" and data[off:off + 4] == b"pdta":
            pdta = {c.decode("latin-1"): data[o:o + s] for c, o, s in _chunks(data, off + 4, off + size)}
    if pdta is None or not {"phdr", "pbag", "pgen", "inst", "ibag", "igen", "shdr"} <= set(pdta):
        raise SoundFontError(f"{path}: no complete pdta LIST")
    phdr = _records(pdta["phdr"], "<20sHHHIII")
    pbag, pgen = _records(pdta["pbag"], "<HH"), _records(pdta["pgen"], "<HH")
    inst, ibag, igen = _records(pdta["inst"], "<20sH"), _records(pdta["ibag"], "<HH"), _records(pdta["igen"], "<HH")
    shdr = _records(pdta["shdr"], "<20sIIIIIBbHH")
    presets = []
    for p in range(len(phdr) - 1):  # the last record is the terminal EOP
        name = phdr[p][0].split(b"\0")[0].decode("latin-1").strip()
        preset = Preset(name, phdr[p][1], phdr[p][2])
        pzones = _zones(pbag, pgen, phdr[p][3], phdr[p + 1][3])
        pglobal = pzones[0] if pzones and GEN_INSTRUMENT not in pzones[0] else {}
        for pz in pzones:
            if GEN_INSTRUMENT not in pz or pz[GEN_INSTRUMENT] >= len(inst) - 1:
                continue
            plo, phi = _key_range(pz, _key_range(pglobal))
            i = pz[GEN_INSTRUMENT]
            izones = _zones(ibag, igen, inst[i][1], inst[i + 1][1])
            iglobal = izones[0] if izones and GEN_SAMPLE_ID not in izones[0] else {}
            for iz in izones:
                s = iz.get(GEN_SAMPLE_ID)
                if s is None or s >= len(shdr) - 1 or shdr[s][9] & 0x8000:  # none, out of range, or ROM
                    continue
                ilo, ihi = _key_range(iz, _key_range(iglobal))
                lo, hi = max(plo, ilo), min(phi, ihi)
                if lo > hi:
                    continue
                raw_root = iz.get(GEN_ROOT_KEY, iglobal.get(GEN_ROOT_KEY, 0xFFFF))
                root = struct.unpack("<h", struct.pack("<H", raw_root))[0]  # -1: the sample's own pitch
                if not 0 <= root <= 127:
                    root = shdr[s][6] if shdr[s][6] <= 127 else 60
                preset.samples.add(s)
                preset.keys.add(min(max(root, lo), hi))
        presets.append(preset)
    return sorted(presets, key=lambda pr: (pr.bank, pr.program, pr.name))


def sample_groups(presets: Sequence[Preset]) -> dict[int, str]:
    """Program -> group name: presets that share a sample (directly or through others) form one group."""
    parent = {pr.program: pr.program for pr in presets}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    owner: dict[int, int] = {}
    for pr in presets:
        for s in sorted(pr.samples):
            if s in owner:
                a, b = find(owner[s]), find(pr.program)
                parent[max(a, b)] = min(a, b)
            else:
                owner[s] = pr.program
    members: dict[int, list[int]] = {}
    for pr in presets:
        members.setdefault(find(pr.program), []).append(pr.program)
    return {p: "p" + "-".join(f"{q:03d}" for q in sorted(ps)) for ps in members.values() for p in ps}


def midi_note_file(path: str, program: int, key: int, hold_s: float, tail_s: float = RELEASE_S) -> None:
    """A format-0 MIDI file: program change, one note of ``hold_s`` seconds, ``tail_s`` of release."""
    tpq, tempo = 480, 500000  # 480 ticks per quarter note of 0.5 s: 960 ticks per second

    def vlq(n: int) -> bytes:
        out = [n & 0x7F]
        n >>= 7
        while n:
            out.append(0x80 | (n & 0x7F))
            n >>= 7
        return bytes(reversed(out))

    hold, tail = int(round(hold_s * 960)), int(round(tail_s * 960))
    track = (b"\x00\xff\x51\x03" + tempo.to_bytes(3, "big") + b"\x00\xc0" + bytes([program])
             + b"\x00\x90" + bytes([key, VELOCITY]) + vlq(hold) + b"\x80" + bytes([key, 0])
             + vlq(tail) + b"\xff\x2f\x00")
    with open(path, "wb") as handle:
        handle.write(b"MThd" + struct.pack(">IHHH", 6, 0, 1, tpq) + b"MTrk" + struct.pack(">I", len(track)) + track)


def render_note(sf2: str, program: int, key: int, hold_s: float, wav: str) -> None:
    """Render one note with fluidsynth (no reverb or chorus) to a 16-bit WAV at RENDER_RATE."""
    mid = wav[:-4] + ".mid"
    midi_note_file(mid, program, key, hold_s)
    cmd = ["fluidsynth", "-n", "-i", "-q", "-R", "0", "-C", "0", "-r", str(RENDER_RATE), "-T", "wav", "-O", "s16",
           "-F", wav, sf2, mid]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode or not os.path.isfile(wav):
        raise common.SetError(f"fluidsynth failed on program {program} key {key}: {proc.stderr.strip()[-500:]}")
    # fluidsynth renders on until every voice has died away (a harp's release rings for seconds):
    # keep the note and its RELEASE_S of release
    audio, rate = sf.read(wav, dtype="int16", always_2d=True)
    sf.write(wav, audio[: int(round((hold_s + RELEASE_S) * rate))], rate, subtype="PCM_16")


def collect(sf2: str, render_dir: str, notes_per_program: Optional[int] = 12, hold_s: float = 1.5,
            render=None) -> list[common.Source]:
    """Render the notes of the set into ``render_dir`` (with ``render``, default :func:`render_note`);
    returns them as sources."""
    render = render or render_note
    presets = [pr for pr in read_presets(sf2) if pr.bank == 0 and family_of(pr.program) and pr.keys]
    groups = sample_groups(presets)
    per_class: dict[str, set[str]] = {}
    for pr in presets:
        per_class.setdefault(family_of(pr.program), set()).add(groups[pr.program])
    sources = []
    for pr in presets:
        label = family_of(pr.program)
        if len(per_class[label]) < 2:
            continue  # one group only: it could not be held out and still be learnt
        keys = sorted(pr.keys)
        for key in [keys[i] for i in evenly_spaced(len(keys), notes_per_program)]:
            name = common.safe_name(f"p{pr.program:03d}_{pr.name}_n{key:03d}")
            wav = os.path.join(render_dir, f"{name}.wav")
            render(sf2, pr.program, key, hold_s, wav)
            sources.append(common.Source(wav, label, groups[pr.program], name, PACKAGE,
                                         f"{SF2} program {pr.program} ({pr.name}) key {key}"))
    return sources


def build(args: argparse.Namespace) -> common.BuildResult:
    root = common.package_roots([PACKAGE], args.deb_root, common.default_cache(args))[PACKAGE]
    sf2 = os.path.join(root, SF2)
    if not os.path.isfile(sf2):
        raise common.SetError(f"{sf2} not found: is --deb-root the root {PACKAGE} was unpacked into?")
    common.ensure_commands({"fluidsynth": "fluidsynth", "sox": "sox"})
    with tempfile.TemporaryDirectory() as tmp:
        sources = collect(sf2, tmp, args.notes_per_program, args.note_seconds)
        return common.build_set(args.out, sources, FAMILIES, num_folds=args.folds, max_seconds=args.max_seconds,
                                force=args.force)


def build_parser() -> argparse.ArgumentParser:
    parser = common.make_parser(__doc__, default_folds=5)
    parser.add_argument("--notes-per-program", type=int, default=12, help="notes per preset (default 12)")
    parser.add_argument("--note-seconds", type=float, default=1.5, help="how long each note is held (default 1.5)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return common.run_main("build_instrument_family", build, args)


if __name__ == "__main__":
    raise SystemExit(main())
