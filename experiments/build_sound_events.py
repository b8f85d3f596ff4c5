#!/usr/bin/env python3
"""Build a held-out ENVIRONMENTAL probe set: which kind of everyday sound event (8 classes), with the
recordings' sources held out.

Task: animal calls, human cries, footsteps, weapon swings and shots, impacts, tool work (chopping,
mining, sawing, hoeing), gathering (leaves, crops, fruit, meat) and ambience (water, weather,
landscapes, busy places): the foley of a strategy game, recorded or edited from field recordings.

Source: the Debian package 0ad-data (NOT in the pre-training pool, experiments/build_pretrain_pool.py):
the art of 0 A.D. by Wildfire Games, CC-BY-SA-3.0 (usr/share/doc/0ad-data/copyright). Its sounds
are inside usr/share/games/0ad/mods/public/public.zip (audio/...; the .deb is 1.4 GB and unpacks to
3.3 GB; only the sounds below are read from the zip). Music, interface sounds, speech (the civilian
voices), fire, siege, ship and gate sounds are left out.

Classes and groups, from the path in the zip (a group is never split over folds):
  animal      audio/actor/fauna/**, audio/actor/mounted/death/**, audio/voice/global/civ_dog_*
              group: the species in the name (camel, cattle, chicken, dog, elephant, goat, horse, ...)
  human_cry   audio/actor/human/death/**           group: the name without its number (male_death, ...)
  footsteps   audio/actor/singlesteps/**, audio/actor/human/movement/**, audio/actor/mounted/movement/**
              group: the folder
  weapon      audio/attack/weapon/**               group: the weapon, the name's first word (sword, bow, ...)
  impact      audio/attack/impact/**               group: the projectile, the name's first word (arrow, ...)
  tool_work   audio/resource/{construction,farming,lumbering,mining}/**   group: the name without its number
  gathering   audio/resource/{foraging,gathering}/**                      group: the name without its number
  ambience    audio/ambient/**                     group: the folder (building, dayscape, water, weather)
The same take is often filed twice (fs_gravel1 = fs_rock1, a horse's death under two folders): copies
are dropped and their groups merged (experiments/heldout_common.py), and a take filed under two
classes is left out altogether. Numbered takes of one name are cut from one recording session, so
they always share a group; groups are the coarsest the names allow.

Output (OUT is --out; see experiments/heldout_common.py for the steps):
  OUT/audio/CLASS/PATH.wav          16 kHz, mono, 16-bit PCM WAV (PATH: the zip path below audio/,
                                    '/' as '__'); sounds over --max-seconds (10 s: the ambience loops)
                                    are cut into equal segments PATH_sKK.wav, kept in their group
  OUT/clips.csv                     filename, label, group, package, source, seconds
  OUT/manifests/fold1..K.tsv/.lbl   one split per fold, whole groups per fold (default 5)
  OUT/manifests/label_descriptors.csv, folds.csv (clip_id,label,group,fold), excluded.tsv

Usage (run as root: apt-get download, and sox is installed when missing):
  python experiments/build_sound_events.py --out /data/heldout/sound_events
  python experiments/build_sound_events.py --out DIR --deb-root ROOT   # 0ad-data unpacked into ROOT
  eat-probe --data /data/heldout/sound_events/manifests --folds auto CHECKPOINT.pt
Deterministic: same package and options, same output. Refuses an existing OUT unless --force.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import zipfile
from typing import Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import heldout_common as common  # noqa: E402

PACKAGE = "0ad-data"
ZIP = "usr/share/games/0ad/mods/public/public.zip"
CLASSES = ("animal", "human_cry", "footsteps", "weapon", "impact", "tool_work", "gathering", "ambience")
SOUND_EXTS = (".ogg", ".wav")
SPECIES = re.compile(r"camel|cattle|chicken|dog|elephant|flamingo|goat|horse|lion|peacock|pig|sheep")


def _stem(path: str) -> str:
    return path.rsplit("/", 1)[-1].rsplit(".", 1)[0].lower()


def _unnumbered(path: str) -> str:
    """The file name without its take number and 'expire' suffix: lumber_treeexpire_02 -> lumber_tree."""
    stem = re.sub(r"[_ ]?\d+[a-z]?$", "", _stem(path))
    return re.sub(r"expire$", "", stem) or "x"


def _first_word(path: str) -> str:
    return re.split(r"[_\d ]", _stem(path))[0] or "x"


def _species(path: str) -> str:
    match = SPECIES.search(_stem(path))
    return match.group(0) if match else "generic"


def _folder(path: str) -> str:
    if path.startswith("ambient/"):
        return path.split("/")[1]
    return path.rsplit("/", 1)[0].replace("actor/", "").replace("/", "_")


RULES: tuple[tuple[re.Pattern[str], str, Callable[[str], str]], ...] = (
    (re.compile(r"^(actor/fauna/|actor/mounted/death/|voice/global/civ_dog_)"), "animal", _species),
    (re.compile(r"^actor/human/death/"), "human_cry", _unnumbered),
    (re.compile(r"^actor/(singlesteps|human/movement|mounted/movement)/"), "footsteps", _folder),
    (re.compile(r"^attack/weapon/"), "weapon", _first_word),
    (re.compile(r"^attack/impact/"), "impact", _first_word),
    (re.compile(r"^resource/(construction|farming|lumbering|mining)/"), "tool_work", _unnumbered),
    (re.compile(r"^resource/(foraging|gathering)/"), "gathering", _unnumbered),
    (re.compile(r"^ambient/"), "ambience", _folder),
)


def classify(path: str) -> Optional[tuple[str, str]]:
    """``(class, group)`` of a zip member path below ``audio/`` (e.g. ``attack/impact/arrow_wood_03.ogg``),
    or None when the sound is left out."""
    if not path.lower().endswith(SOUND_EXTS):
        return None
    for pattern, label, group in RULES:
        if pattern.search(path):
            return label, f"{label}:{group(path)}"
    return None


def collect(zip_path: str, extract_dir: str) -> list[common.Source]:
    """Extract the classified sounds of ``zip_path`` into ``extract_dir``; returns them as sources."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise common.SetError(f"{zip_path}: {exc}") from None
    sources = []
    with archive:
        for member in sorted(archive.namelist()):
            if not member.startswith("audio/") or member.endswith("/"):
                continue
            rel = member[len("audio/"):]
            found = classify(rel)
            if found is None:
                continue
            label, group = found
            name = common.safe_name(rel.rsplit(".", 1)[0].replace("/", "__"))
            dest = os.path.join(extract_dir, f"{name}.{rel.rsplit('.', 1)[1]}")
            with archive.open(member) as src, open(dest, "wb") as out:
                out.write(src.read())
            sources.append(common.Source(dest, label, group, name, PACKAGE, f"{ZIP}:{member}"))
    return sources


def build(args: argparse.Namespace) -> common.BuildResult:
    root = common.package_roots([PACKAGE], args.deb_root, common.default_cache(args))[PACKAGE]
    zip_path = os.path.join(root, ZIP)
    if not os.path.isfile(zip_path):
        raise common.SetError(f"{zip_path} not found: is --deb-root the root {PACKAGE} was unpacked into?")
    with tempfile.TemporaryDirectory() as tmp:
        sources = collect(zip_path, tmp)
        if not sources:
            raise common.SetError(f"{zip_path} holds none of the sounds this set takes")
        return common.build_set(args.out, sources, CLASSES, num_folds=args.folds, max_seconds=args.max_seconds,
                                force=args.force)


def build_parser() -> argparse.ArgumentParser:
    parser = common.make_parser(__doc__, default_folds=5)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return common.run_main("build_sound_events", build, args)


if __name__ == "__main__":
    raise SystemExit(main())
