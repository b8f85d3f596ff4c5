#!/usr/bin/env python3
"""Build a held-out SPEECH probe set: which letter of the Latin alphabet is spoken (26 classes),
with speakers held out.

Task: spoken letter names, a..z (ISOLET's task, not digits), said by telephone-prompt voices and by
the native speakers who recorded KLettres' alphabets in 14 languages; each clip is one recorded file
of one letter. Every fold holds out whole voices, so the probe must recognise a letter said by a
voice it was never trained on (the names differ between languages: English "jay", French "ji",
Spanish "jota"; most languages are spoken by several voices).

Sources: Debian packages that are NOT in the pre-training pool (experiments/build_pretrain_pool.py);
licences as in each package's usr/share/doc/PACKAGE/copyright:
  asterisk-core-sounds-en-wav    Allison Smith, en_US_f_Allison/letters (en)               CC-BY-SA-3.0
  asterisk-core-sounds-es-wav    Allison Smith, es_MX_f_Allison/letters (es; SAME speaker)  CC-BY-SA-3.0
  asterisk-core-sounds-fr-wav    June Wallack, fr_CA_f_June/letters (fr)                   CC-BY-SA-3.0
  asterisk-core-sounds-it-wav    Carlo Flora, it_IT_m_Carlo/letters (it)                   CC-BY-3.0
  asterisk-core-sounds-ru-wav    Maxim Topal / ivrvoice.ru, ru_RU_f_IvrvoiceRU/letters (ru) CC-BY-3.0
  asterisk-prompt-it-menardi-wav Paola Dal Zot / Marco Menardi, it_IT_f_Menardi/letters (it) CC-BY-SA-3.0 (Italy)
  asterisk-prompt-fr-armelle     Armelle Desjardins, fr/letters (fr, GSM)                   BSD-style (M. Gutierrez)
  klettres-data                  usr/share/klettres/LANG/alpha, the letters LANG/sounds.xml names in its
                                 <alphabet>: cs da de en en_GB es fr hu it lt nb nds nl pt_BR   GPL-2+
The Asterisk letters are 8 kHz telephone recordings, under usr/share/asterisk/sounds/VOICE/letters/X.wav
(or .gsm); KLettres' are 44.1 kHz Ogg files. Only the 26 letters a..z are taken (no accented
letters, digraphs or symbols).

Groups (a group is never split over folds): one per Asterisk voice, Allison's English and Spanish
letters together (one speaker); one per KLettres language, en and en_GB together (the speakers are
not named; regional recordings of one language may be one person). The folds spread each language's
voices too, so that a held-out voice mostly has another voice of its language to learn from.

Output (OUT is --out; see experiments/heldout_common.py for the steps):
  OUT/audio/LETTER/GROUP__LANG__LETTER.wav  16 kHz, mono, 16-bit PCM WAV, one per source file
  OUT/clips.csv                             filename, label, group, package, source, seconds
  OUT/manifests/fold1..K.tsv/.lbl           one split per fold, whole groups per fold (default 5)
  OUT/manifests/label_descriptors.csv (a..z), folds.csv (clip_id,label,group,fold), excluded.tsv

Usage (run as root: apt-get download, and sox is installed when missing):
  python experiments/build_spoken_letters.py --out /data/heldout/spoken_letters
  python experiments/build_spoken_letters.py --out DIR --deb-root ROOT   # packages unpacked into ROOT
  eat-probe --data /data/heldout/spoken_letters/manifests --folds auto CHECKPOINT.pt
Deterministic: same packages and options, same output. Refuses an existing OUT unless --force.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import xml.etree.ElementTree as ET
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import heldout_common as common  # noqa: E402

LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
ASTERISK = {  # package -> (voice folder under usr/share/asterisk/sounds, group, language)
    "asterisk-core-sounds-en-wav": ("en_US_f_Allison", "allison", "en"),
    "asterisk-core-sounds-es-wav": ("es_MX_f_Allison", "allison", "es"),
    "asterisk-core-sounds-fr-wav": ("fr_CA_f_June", "june", "fr"),
    "asterisk-core-sounds-it-wav": ("it_IT_m_Carlo", "carlo", "it"),
    "asterisk-core-sounds-ru-wav": ("ru_RU_f_IvrvoiceRU", "ivrvoiceru", "ru"),
    "asterisk-prompt-it-menardi-wav": ("it_IT_f_Menardi", "menardi", "it"),
    "asterisk-prompt-fr-armelle": ("fr", "armelle", "fr"),
}
KLETTRES = "klettres-data"
KLETTRES_DIR = "usr/share/klettres"
KLETTRES_LANGS = ("cs", "da", "de", "en", "en_GB", "es", "fr", "hu", "it", "lt", "nb", "nds", "nl", "pt_BR")
PACKAGES = tuple(ASTERISK) + (KLETTRES,)
ASTERISK_SOUNDS = "usr/share/asterisk/sounds"
LETTER_FILE = re.compile(r"^([a-z])\.(wav|gsm)$")


def asterisk_letters(folder: str) -> dict[str, str]:
    """``{letter: file}`` of an Asterisk voice's letters/ folder (a.wav or a.gsm .. z; links skipped)."""
    letters = os.path.join(folder, "letters")
    found: dict[str, str] = {}
    for name in sorted(os.listdir(letters)) if os.path.isdir(letters) else []:
        match = LETTER_FILE.match(name)
        path = os.path.join(letters, name)
        if match and not os.path.islink(path) and os.path.isfile(path):
            found.setdefault(match.group(1), path)
    return found


def klettres_letters(base: str, lang: str) -> dict[str, str]:
    """``{letter: file}`` from LANG/sounds.xml's <alphabet> (names A..Z only; files under ``base``)."""
    xml = os.path.join(base, lang, "sounds.xml")
    if not os.path.isfile(xml):
        return {}
    try:
        alphabet = ET.parse(xml).getroot().find(".//alphabet")
    except ET.ParseError as exc:
        raise common.SetError(f"{xml}: {exc}") from None
    found: dict[str, str] = {}
    for sound in alphabet.findall("sound") if alphabet is not None else []:
        name, rel = (sound.get("name") or "").strip().lower(), sound.get("file") or ""
        path = os.path.join(base, rel)
        if name in LETTERS and rel and os.path.isfile(path) and not os.path.islink(path):
            found.setdefault(name, path)
    return found


def collect(roots: dict[str, str]) -> list[common.Source]:
    """The sources of the set from the unpacked packages (``{package: root}``)."""
    sources = []
    for package, (voice, group, lang) in ASTERISK.items():
        folder = os.path.join(roots[package], ASTERISK_SOUNDS, voice)
        for letter, path in sorted(asterisk_letters(folder).items()):
            rel = os.path.relpath(path, roots[package]).replace(os.sep, "/")
            sources.append(common.Source(path, letter, group, f"{group}__{lang}__{letter}", package, rel, lang))
    base = os.path.join(roots[KLETTRES], KLETTRES_DIR)
    for lang in KLETTRES_LANGS:
        group = "klettres_" + lang.split("_")[0]
        for letter, path in sorted(klettres_letters(base, lang).items()):
            rel = os.path.relpath(path, roots[KLETTRES]).replace(os.sep, "/")
            sources.append(common.Source(path, letter, group, f"klettres__{lang}__{letter}", KLETTRES, rel,
                                         lang.split("_")[0]))
    return sources


def build(args: argparse.Namespace) -> common.BuildResult:
    roots = common.package_roots(PACKAGES, args.deb_root, common.default_cache(args))
    sources = collect(roots)
    if not sources:
        raise common.SetError("no letter recordings found: is --deb-root the root the packages were unpacked into?")
    return common.build_set(args.out, sources, LETTERS, num_folds=args.folds, max_seconds=args.max_seconds,
                            force=args.force)


def build_parser() -> argparse.ArgumentParser:
    parser = common.make_parser(__doc__, default_folds=5)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return common.run_main("build_spoken_letters", build, args)


if __name__ == "__main__":
    raise SystemExit(main())
