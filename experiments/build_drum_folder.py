#!/usr/bin/env python3
"""Build a small LABELLED folder of real recordings (drum one-shots) from Debian's hydrogen-drumkits.

Why: the CPU fine-tuning recipe (examples/finetuning/folder_cpu.yaml) is measured on real audio besides
generated sounds and speech (docs/experiments.md), without a data-set download or a licence agreement.
hydrogen-drumkits ships 14 drum kits recorded or synthesised by different people (licences per kit in
usr/share/doc/hydrogen-drumkits/copyright); their sample file names say which drum each one is.

Classes, from the file name (lower case; a file matching two classes, or none, is left out):
  kick    kick, bass drum ("bd", "bassdrum")        snare   snare
  hihat   hat, hh                                     tom     tom
  cymbal  crash, ride, splash, china
Only *.wav and *.flac files are taken (the labelled-folder preparer reads them), copied unchanged
(mixed sample rates, mono and stereo) as OUT/<class>/<kit>__<file>, names reduced to [A-Za-z0-9_.-].

Usage (the only network access is `apt-get download`, from Debian's archive):
  python experiments/build_drum_folder.py --out /data/drums          # downloads and unpacks the .deb
  python experiments/build_drum_folder.py --out /data/drums --deb-root DIR   # DIR = an unpacked package
  python manifests/labeled_folder.py /data/drums --dest /data/drums_manifests --valid-percent 20
Deterministic: same package, same output. Refuses an existing OUT.
"""
from __future__ import annotations

import argparse
import glob
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

PACKAGE = "hydrogen-drumkits"
KITS = "usr/share/hydrogen/data/drumkits"
CLASSES: dict[str, re.Pattern[str]] = {
    "kick": re.compile(r"kick|(^|[^a-z])bd([^a-z]|$)|bass ?drum"),
    "snare": re.compile(r"snare"),
    "hihat": re.compile(r"hat|(^|[^a-z])hh([^a-z]|$)"),
    "tom": re.compile(r"(^|[^a-z])tom"),
    "cymbal": re.compile(r"crash|ride|splash|china"),
}


def class_of(name: str) -> Optional[str]:
    """The one class whose pattern matches the file name, else None (no match, or several)."""
    stem = name.lower().rsplit(".", 1)[0]
    hits = [label for label, pattern in CLASSES.items() if pattern.search(stem)]
    return hits[0] if len(hits) == 1 else None


def unpack(cache: Path) -> Path:
    """``apt-get download`` the package into ``cache`` and unpack it there; returns the unpacked root."""
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", PACKAGE], cwd=cache, check=True)
    deb = sorted(glob.glob(str(cache / f"{PACKAGE}_*.deb")))[-1]
    root = cache / "root"
    subprocess.run(["dpkg-deb", "-x", deb, str(root)], check=True)
    return root


def build(deb_root: Path, out: Path) -> dict[str, int]:
    """Copy the classified samples into ``out/<class>/``; returns the count per class."""
    if out.exists():
        raise SystemExit(f"error: {out} exists; choose another --out or remove it")
    counts = {label: 0 for label in CLASSES}
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    kits = deb_root / KITS
    if not kits.is_dir():
        raise SystemExit(f"error: {kits} not found: --deb-root must be the unpacked {PACKAGE} package")
    for path in sorted(p for p in kits.rglob("*") if p.is_file() and p.suffix.lower() in (".wav", ".flac")):
        label = class_of(path.name)
        if label is None:
            continue
        kit = re.sub(r"[^A-Za-z0-9_.-]", "_", path.relative_to(kits).parts[0])
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name)
        dest = partial / label / f"{kit}__{name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        counts[label] += 1
    partial.rename(out)
    return counts


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the labelled folder to create")
    parser.add_argument("--deb-root", type=Path, help="an unpacked hydrogen-drumkits (default: download it)")
    args = parser.parse_args(argv)
    if args.deb_root is None:
        with tempfile.TemporaryDirectory() as tmp:
            counts = build(unpack(Path(tmp)), args.out)
    else:
        counts = build(args.deb_root, args.out)
    print(" ".join(f"{label}:{n}" for label, n in counts.items()), f"total:{sum(counts.values())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
