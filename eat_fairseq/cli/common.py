"""What the inference console scripts share: the ``--threads`` and ``--device`` options, one-line
error messages, and the checkpoint-refusal wording.

This module imports nothing heavy at module level (torch is imported when an option is applied), so a
script's ``--help`` answers without waiting for torch.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import warnings
from typing import Any, Callable, Optional

THREADS_HELP = (
    "CPU threads of torch and of onnxruntime for .onnx models (default: $OMP_NUM_THREADS when set, "
    "else one per physical core); "
    "on a machine shared with other jobs, 1-2 is often several times faster"
)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)


def apply_threads(parser: argparse.ArgumentParser, threads: Optional[int]) -> None:
    """Set torch's intra-op thread count (``parser.error``, exit 2, for a value below 1)."""
    if threads is None:
        return
    if threads < 1:
        parser.error(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def device_error(device: str) -> Optional[str]:
    """Why ``device`` cannot be used here (None when it can): only cpu, cuda and cuda:N are supported."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        return f"--device must be cpu, cuda or cuda:N, got {device!r}"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return f"--device {device} but CUDA is not available"
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            return f"--device {device} but only {torch.cuda.device_count()} CUDA device(s) are visible"
    return None


def checkpoint_path_error(path: str) -> Optional[str]:
    """Why ``--checkpoint`` names no checkpoint file (None when it names a file).

    A missing file is a bad argument (exit status 2, as for the other arguments naming inputs), not a
    checkpoint that "cannot be used" (status 1, for a file that exists but does not load)."""
    import os

    if os.path.isdir(path):
        return f"--checkpoint {path} is a folder, not a checkpoint file"
    if not os.path.exists(path):
        return f"--checkpoint {path}: no such file"
    return None


def one_line(exc: BaseException) -> str:
    """An exception as one TSV-safe line."""
    text = str(exc) or type(exc).__name__
    return " ".join(text.replace("\t", " ").split())


def checkpoint_message(exc: BaseException) -> str:
    """One line for a checkpoint that cannot be loaded, with the CLI's spelling of the opt-in to full
    unpickling (the library says ``trusted=True``)."""
    return one_line(exc).replace("load it with trusted=True", "pass --trust-checkpoint")


def fail(prog: str, message: str, status: int) -> int:
    """Print ``prog: error: message`` to stderr and return ``status`` (for ``return fail(...)``)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status



def plain_warnings(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a CLI ``main``: while it runs, this package's warnings are printed as one line,
    ``prog: warning: message``, without Python's file and source line (which name our code, not the
    user's problem); other libraries' warnings are shown as Python shows them."""
    package = os.sep + "eat_fairseq" + os.sep

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            with warnings.catch_warnings():
                other = warnings.showwarning

                def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                         line: Any = None) -> None:
                    if package in filename:
                        print(f"{prog}: warning: {message}", file=sys.stderr)
                    else:
                        other(message, category, filename, lineno, file, line)

                warnings.showwarning = show
                return main(*args, **kwargs)

        return run

    return decorate
