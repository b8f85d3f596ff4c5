"""``eat-recipes``: where the shipped recipes (fairseq-hydra-train configs) are, with or without the source tree.

    eat-recipes                 the recipes folder (one sub-folder per family)
    eat-recipes pretraining     the folder to pass as --config-dir (also finetuning, fsdd)
    eat-recipes --list          every recipe as FAMILY/NAME

    fairseq-hydra-train --config-dir "$(eat-recipes pretraining)" --config-name eat_tiny \\
        task.data=/path/to/manifests common.user_dir="$(eat-user-dir)"

In the repository the recipes are ``examples/``; an installed copy (``pip install .``) carries the same
files as ``eat_fairseq/recipes/`` (setup.py maps one onto the other), so both answers name one set of files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

PACKAGE = Path(__file__).resolve().parents[1]


def recipes_dir(family: Optional[str] = None) -> Path:
    """The recipes folder (or one family's folder): ``eat_fairseq/recipes`` when installed, else the
    source tree's ``examples/``. Raises FileNotFoundError naming the places looked at and the families."""
    for root in (PACKAGE / "recipes", PACKAGE.parent / "examples"):
        if (root / "pretraining" / "eat_tiny.yaml").is_file():
            break
    else:
        raise FileNotFoundError(f"no recipes in {PACKAGE / 'recipes'} or {PACKAGE.parent / 'examples'}: reinstall eat_fairseq")
    if family is None:
        return root
    families = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
    if family not in families:
        raise FileNotFoundError(f"no recipe family {family!r}; families: {', '.join(families)}")
    return root / family


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="eat-recipes", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", nargs="?", help="pretraining, finetuning or fsdd (default: the recipes folder)")
    parser.add_argument("--list", action="store_true", help="print every recipe as FAMILY/NAME")
    args = parser.parse_args(argv)
    try:
        folder = recipes_dir(args.family)
    except FileNotFoundError as exc:
        print(f"eat-recipes: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for path in sorted(folder.rglob("*.yaml")):
            print(path.relative_to(folder).with_suffix(""))
    else:
        print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
