"""``eat-export``: an EAT checkpoint as an ONNX file that eat-extract, eat-tag, load_model and HEAR run.

    eat-export CHECKPOINT OUT.onnx [--int8] [--int8-weights s8|s7|u8] [--fp32-blocks N] [--int8-cls]
               [--portable] [--layer N]
               [--use-teacher] [--check-audio FILE ...] [--batch-size B] [--threads N] [--trust-checkpoint]
               [--force]

CHECKPOINT is anything ``load_model`` reads: our pre-training or fine-tuned checkpoints, converted
files, the released ``.pt`` and the Hugging Face ``.safetensors``. The file holds the encoder from
normalised fbank windows (dynamic batch and length) to the tokens of one block (``--layer``, default
the last), plus the head of a fine-tuned model, and in its metadata the feature settings and labels:
it is all eat-extract / eat-tag need. One file serves every ``--granularity`` of eat-extract (the
pooling is done outside the graph). ``--int8`` quantises the weight matrices with onnxruntime
(per-channel dynamic quantisation; the CLS token's activations kept ~16-bit precise unless
``--int8-cls``; the weights' form, ``--int8-weights``, by default suits the exporting CPU: signed 8-bit
products saturate on x86 CPUs without VNNI) and prints what that costs against fp32 on a few windows: ``--check-audio`` names
clips to measure on (default: generated test signals). The attention is written as onnxruntime's fused
``MultiHeadAttention`` (faster); ``--portable`` writes standard ONNX ops only, for other runtimes.

Needs ``pip install 'eat_fairseq[onnx]'`` (onnx and onnxruntime). Exit status: 0 written, 1 the
checkpoint cannot be used or the export failed, 2 bad arguments or OUT exists (without ``--force``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from eat_fairseq.cli.common import (
    add_threads_argument,
    apply_threads,
    checkpoint_message,
    checkpoint_path_error,
    fail,
    one_line,
)
from eat_fairseq.inference.onnx_format import INT8_WEIGHTS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eat-export",
        description="Export an EAT checkpoint to ONNX (fp32 or int8) for eat-extract, eat-tag, load_model and HEAR.",
        epilog="exit status: 0 written, 1 the checkpoint cannot be used or the export failed, 2 bad arguments "
        "or OUT exists",
    )
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="EAT checkpoint (pre-training, fine-tuned, converted or released)"
    )
    parser.add_argument("out", metavar="OUT.onnx", help="ONNX file to write")
    parser.add_argument(
        "--int8", action="store_true", help="int8 weights (onnxruntime dynamic quantisation); prints the accuracy cost"
    )
    parser.add_argument(
        "--fp32-blocks",
        type=int,
        default=0,
        metavar="N",
        help="with --int8: keep the weights of the last N exported blocks in fp32 (closer to fp32, a little slower)",
    )
    parser.add_argument(
        "--int8-weights",
        choices=INT8_WEIGHTS,
        default=None,
        help="with --int8: s8 = signed 8-bit (fastest; its products saturate on x86 CPUs with AVX2 but without "
        "VNNI), s7 = signed 7-bit (no saturation, about as fast, coarser), u8 = unsigned 8-bit (no saturation; "
        "20%% slower on AVX2); default: u8 if THIS CPU saturates, else s8. For a file that will run on CPUs "
        "you do not know, choose u8 or s7",
    )
    parser.add_argument(
        "--int8-cls",
        action="store_true",
        help="with --int8: round the CLS token's activations to int8 once, like the patches' (a little faster; "
        "by default they are rounded in two steps, ~16-bit precise, which keeps the utterance embedding "
        "close to fp32)",
    )
    parser.add_argument(
        "--portable",
        action="store_true",
        help="standard ONNX ops only (attention as MatMul/Softmax), for runtimes other than onnxruntime; "
        "default: onnxruntime's fused MultiHeadAttention (faster)",
    )
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="transformer block whose tokens the file outputs (0-based; default last)",
    )
    parser.add_argument("--use-teacher", action="store_true", help="pre-training checkpoints: export the EMA teacher")
    parser.add_argument(
        "--check-audio",
        nargs="+",
        default=None,
        metavar="FILE",
        help="clips for the accuracy check (default: generated test signals)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass in the accuracy check")
    add_threads_argument(parser)
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="read the checkpoint with full unpickling (your own files only)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``eat-export``; returns the exit status (module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    if not args.out.lower().endswith(".onnx"):
        parser.error(f"OUT must end in .onnx (load_model recognises ONNX files by it), got {args.out}")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    problem = checkpoint_path_error(args.checkpoint)
    if problem:
        parser.error(problem.replace("--checkpoint ", "CHECKPOINT ", 1))
    if os.path.isdir(args.out):
        return fail(prog, f"{args.out} is a folder", 2)
    if os.path.exists(args.out) and not args.force:
        return fail(prog, f"refusing to overwrite {args.out} (use --force)", 2)
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        return fail(prog, f"the folder of {args.out} does not exist", 2)
    apply_threads(parser, args.threads)

    from eat_fairseq.checkpoints.load import CheckpointError
    from eat_fairseq.data.audio import AudioError
    from eat_fairseq.inference.api import load_model
    from eat_fairseq.inference.onnx_backend import OnnxUnavailableError, is_onnx_path
    from eat_fairseq.inference.onnx_export import export_onnx, require_export_packages

    if is_onnx_path(args.checkpoint):
        return fail(prog, f"{args.checkpoint} is already an ONNX file; export from the checkpoint it came from", 2)
    try:
        require_export_packages()
    except OnnxUnavailableError as exc:
        return fail(prog, str(exc), 1)
    try:
        handle = load_model(
            args.checkpoint, trusted=args.trust_checkpoint, use_teacher=args.use_teacher, batch_size=args.batch_size
        )
    except (CheckpointError, OSError, ValueError) as exc:
        return fail(prog, f"cannot load {args.checkpoint}: {checkpoint_message(exc)}", 1)
    try:
        handle.check_layer(args.layer)
    except ValueError as exc:
        return fail(prog, f"--layer: {exc}", 2)
    if args.fp32_blocks and not args.int8:
        return fail(prog, "--fp32-blocks goes with --int8", 2)
    if args.int8_cls and not args.int8:
        return fail(prog, "--int8-cls goes with --int8", 2)
    if args.int8_weights and not args.int8:
        return fail(prog, "--int8-weights goes with --int8", 2)
    check = None
    if args.check_audio:
        try:
            check = [handle.prepare(path) for path in args.check_audio]
        except (AudioError, OSError, ValueError) as exc:
            return fail(prog, f"--check-audio: {one_line(exc)}", 2)
    print(f"{prog}: exporting {handle!r}", file=sys.stderr)
    try:
        report = export_onnx(handle, args.out, layer=args.layer, int8=args.int8, check=check,
                             fp32_blocks=args.fp32_blocks, portable=args.portable,
                             int8_cls=args.int8_cls, int8_weights=args.int8_weights)
    except (RuntimeError, ValueError, OSError) as exc:
        return fail(prog, f"export failed: {one_line(exc)}", 1)
    for line in report.lines():
        print(f"{prog}: {line}")
    if report.fp32_relative > 1e-4:
        print(
            f"{prog}: warning: the fp32 graph differs from PyTorch by more than 1e-4 of the output scale",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
