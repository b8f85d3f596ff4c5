"""``eat-convert``: released EAT checkpoints (fairseq ``.pt`` or the Hugging Face port) <-> ours.

The logic lives in :mod:`eat_fairseq.checkpoints.convert`; this is only argument parsing and reporting.
Source files are read with the restricted unpickler (never full unpickling), so converting a file
from the internet does not run code from it.
"""
from __future__ import annotations

import argparse
import sys

from eat_fairseq.checkpoints.load import CheckpointError
from eat_fairseq.checkpoints.convert import ConversionError, convert_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eat-convert",
        description=(
            "Convert a released EAT checkpoint (fairseq .pt: pre-trained data2vec_multi or fine-tuned "
            "mae_image_classification; or the Hugging Face port's .safetensors, with config.json beside "
            "it for labels) into an eat_fairseq checkpoint that fairseq loads after `import eat_fairseq`, "
            "or (--to released) write one of ours back in the released layout."
        ),
    )
    parser.add_argument("src", help="source checkpoint (.pt or .safetensors)")
    parser.add_argument("dst", help="output .pt file")
    parser.add_argument(
        "--to", choices=("eat", "released"), default="eat", help="output layout (default: eat, i.e. ours)"
    )
    parser.add_argument(
        "--kind",
        choices=("auto", "pretrained", "finetuned"),
        default="auto",
        help="expected model kind; auto detects it (an explicit kind must match the file)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite dst if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns 0 on success, 1 on a conversion/checkpoint error, 2 on bad usage."""
    args = build_parser().parse_args(argv)
    try:
        summary = convert_file(args.src, args.dst, to=args.to, kind=args.kind, force=args.force)
    except (CheckpointError, ConversionError) as exc:
        print(f"eat-convert: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}")
    for line in summary.lines():
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
