"""``eat-extract``: EAT embeddings of audio files, folders or manifests, one array per clip.

    eat-extract --checkpoint CKPT INPUT... --out DIR [--granularity utterance|frame|all]
                [--layer N] [--batch-size B] [--device cpu|cuda] [--trust-checkpoint] [--use-teacher]

INPUT is an audio file, a folder (searched recursively for audio files) or a TSV manifest
(first line the root folder, then ``relative/path<TAB>...`` rows, as written by ``eat-manifest``).

Outputs:
- files and folders: one file per clip under DIR mirroring its relative path (a folder's files are
  named relative to the folder, a loose file by its name): ``.npy`` holding ``(D,)`` for
  ``utterance`` or ``(H, D)`` for ``frame`` (one row per 160 ms time patch); ``.npz`` with
  ``utterance``, ``frame``, ``patches`` ``(H, 8, D)`` and ``timestamps`` (seconds) for ``all``;
- a manifest ``NAME.tsv``: ``DIR/NAME.npz`` and ``DIR/NAME.index.tsv``. The ``.npz`` holds
  ``utterance`` ``(N, D)`` and/or ``frame`` ``(sum H, D)`` (+ ``patches``) with ``offsets``
  ``(N + 1,)``: clip ``i``'s rows are ``offsets[i]:offsets[i + 1]``, ``timestamps`` per row. The index
  lists ``row, path, manifest_line, num_patches`` for every clip that succeeded.

Files that cannot be read (or are shorter than 25 ms) are skipped and listed at the end and in
``DIR/errors.tsv``; the run goes on. Exit status: 0 when at least one clip succeeded, 1 when all
failed or the checkpoint cannot be used, 2 for bad arguments. Uses only the pure core (no fairseq).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from eat_fairseq.api import GRANULARITIES, EATModelHandle, load_model
from eat_fairseq.core.audio import AudioError
from eat_fairseq.core.checkpoint import CheckpointError

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".w64", ".caf"})
"""Suffixes picked up inside folders (files named on the command line are tried whatever their suffix)."""


class InputError(ValueError):
    """An input argument that cannot be used at all (a malformed or missing manifest)."""


@dataclass
class AudioItem:
    """One clip: where to read it and the relative name its output is filed under."""

    path: str
    relative: str
    line: int = 0  # 1-based manifest line, 0 for files and folders


# ------------------------------------------------------------------------------------------------
# inputs (shared with eat-tag)


def read_manifest(path: str) -> list[AudioItem]:
    """Rows of a TSV manifest: line 1 the root folder (relative roots are relative to the manifest)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise InputError(f"{path}: cannot read manifest: {exc}") from exc
    if not lines or not lines[0].strip():
        raise InputError(f"{path}: empty manifest (expected the root folder on line 1)")
    root = lines[0].strip()
    if not os.path.isabs(root):
        root = os.path.join(os.path.dirname(os.path.abspath(path)), root)
    return [
        AudioItem(os.path.join(root, line.split("\t")[0]), line.split("\t")[0], line=lineno)
        for lineno, line in enumerate(lines[1:], start=2)
        if line.strip()
    ]


def folder_items(folder: str) -> list[AudioItem]:
    """Audio files under ``folder``, recursively, in sorted order, named relative to it."""
    items = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in AUDIO_EXTENSIONS:
                full = os.path.join(dirpath, name)
                items.append(AudioItem(full, os.path.relpath(full, folder)))
    return items


def expand_inputs(inputs: Iterable[str], manifests: bool = True) -> tuple[list[AudioItem], dict[str, list[AudioItem]]]:
    """Command-line inputs -> ``(loose clips from files and folders, {manifest path: its clips})``.

    A missing audio file is kept (it is reported per file, like an unreadable one); a ``.tsv``
    argument is a manifest (an :class:`InputError` when ``manifests`` is false).
    """
    loose: list[AudioItem] = []
    groups: dict[str, list[AudioItem]] = {}
    for arg in inputs:
        if os.path.isdir(arg):
            loose.extend(folder_items(arg))
        elif arg.lower().endswith(".tsv"):
            if not manifests:
                raise InputError(f"{arg}: manifests are not accepted here; pass audio files or folders")
            groups[arg] = read_manifest(arg)
        else:
            loose.append(AudioItem(arg, os.path.basename(arg)))
    return loose, groups


def progress(total: int, desc: str) -> Any:
    """A tqdm bar on stderr, silent when stderr is not a terminal (logs, pipes, tests)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="file", file=sys.stderr, disable=not sys.stderr.isatty())


def one_line(exc: BaseException) -> str:
    """An exception as one TSV-safe line."""
    text = str(exc) or type(exc).__name__
    return " ".join(text.replace("\t", " ").split())


CLIP_ERRORS = (AudioError, OSError, ValueError, RuntimeError)
"""Per-clip failures that skip the clip instead of stopping the run."""


def run_batches(
    handle: EATModelHandle,
    items: list[AudioItem],
    compute: Callable[[list[torch.Tensor]], list[Any]],
    batch_size: int,
    bar: Any,
) -> Iterator[tuple[AudioItem, Any, Optional[str]]]:
    """Yield ``(item, result, None)`` or ``(item, None, error message)`` for every item, in order.

    Clips are loaded one by one (a bad file only fails itself), then ``batch_size`` clips go through
    ``compute`` together; if a batch fails, its clips are retried one at a time so that only the
    culprit is reported.
    """
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        loaded: list[tuple[int, torch.Tensor]] = []
        failed: dict[int, str] = {}
        for i, item in enumerate(chunk):
            try:
                loaded.append((i, handle.prepare(item.path)))
            except CLIP_ERRORS as exc:
                failed[i] = one_line(exc)
        results: dict[int, Any] = {}
        if loaded:
            try:
                outputs = compute([wave for _, wave in loaded])
                results = {i: out for (i, _), out in zip(loaded, outputs)}
            except CLIP_ERRORS:
                for i, wave in loaded:
                    try:
                        results[i] = compute([wave])[0]
                    except CLIP_ERRORS as exc:
                        failed[i] = one_line(exc)
        for i, item in enumerate(chunk):
            yield item, results.get(i), failed.get(i)
            bar.update(1)


def report_errors(errors: list[tuple[str, str]], out_dir: Optional[Path], total: int, prog: str) -> None:
    """Print the failures to stderr and (with ``out_dir``) write ``errors.tsv`` there."""
    path = out_dir / "errors.tsv" if out_dir is not None else None
    if path is not None and path.exists():
        path.unlink()  # a stale list from an earlier run would be misleading
    if not errors:
        return
    print(f"{prog}: {len(errors)} of {total} files failed:", file=sys.stderr)
    for name, message in errors:
        print(f"  {name}: {message}", file=sys.stderr)
    if path is not None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("path\terror\n")
            handle.writelines(f"{name}\t{message}\n" for name, message in errors)
        print(f"{prog}: the list is in {path}", file=sys.stderr)


def load_for_cli(args: argparse.Namespace, prog: str) -> Optional[EATModelHandle]:
    """The model, or None after printing why it cannot be used."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"{prog}: error: --device {args.device} but CUDA is not available", file=sys.stderr)
        return None
    try:
        return load_model(
            args.checkpoint,
            device=args.device,
            trusted=args.trust_checkpoint,
            use_teacher=getattr(args, "use_teacher", False),
            batch_size=args.batch_size,
        )
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"{prog}: error: cannot load {args.checkpoint}: {one_line(exc)}", file=sys.stderr)
        return None


# ------------------------------------------------------------------------------------------------
# eat-extract


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eat-extract",
        description="Write EAT embeddings of audio files, folders (recursive) or TSV manifests.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="audio file, folder or .tsv manifest")
    parser.add_argument("--checkpoint", required=True, help="EAT checkpoint (pre-training, fine-tuned or converted)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        default="utterance",
        help="utterance: (D,) CLS; frame: (H, D) per 160 ms time patch; all: .npz with both and every patch",
    )
    parser.add_argument("--layer", type=int, default=None, help="transformer block to read (0-based; default last)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips loaded / windows encoded together")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="read the checkpoint with full unpickling (your own files only)"
    )
    parser.add_argument("--use-teacher", action="store_true", help="pre-training checkpoints: use the EMA teacher")
    return parser


def _save_clip(path: Path, result: Any, granularity: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if granularity == "all":
        np.savez(path, **result)
    else:
        np.save(path, result)


def _write_manifest_outputs(
    out_dir: Path, stem: str, rows: list[tuple[AudioItem, Any]], granularity: str, handle: EATModelHandle
) -> None:
    arrays: dict[str, np.ndarray] = {}
    d = handle.embed_dim
    if granularity == "utterance":
        arrays["utterance"] = np.stack([r for _, r in rows]) if rows else np.zeros((0, d), np.float32)
        sizes = [0] * len(rows)
    else:
        frames = [r if granularity == "frame" else r["frame"] for _, r in rows]
        sizes = [f.shape[0] for f in frames]
        arrays["frame"] = np.concatenate(frames) if rows else np.zeros((0, d), np.float32)
        arrays["offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        arrays["timestamps"] = (
            np.concatenate([handle.timestamps(n) for n in sizes]) if rows else np.zeros(0)
        )
        if granularity == "all":
            arrays["utterance"] = np.stack([r["utterance"] for _, r in rows]) if rows else np.zeros((0, d), np.float32)
            w = handle.num_freq_patches
            arrays["patches"] = np.concatenate([r["patches"] for _, r in rows]) if rows else np.zeros((0, w, d), np.float32)
    np.savez(out_dir / f"{stem}.npz", **arrays)
    with open(out_dir / f"{stem}.index.tsv", "w", encoding="utf-8") as handle_out:
        handle_out.write("row\tpath\tmanifest_line\tnum_patches\n")
        for row, ((item, _), size) in enumerate(zip(rows, sizes)):
            patches = size if granularity != "utterance" else ""
            handle_out.write(f"{row}\t{item.relative}\t{item.line}\t{patches}\n")


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``eat-extract``; returns the exit status (module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    try:
        loose, manifests = expand_inputs(args.inputs)
    except InputError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    stems = [Path(m).stem for m in manifests]
    if len(set(stems)) != len(stems):
        print(f"{prog}: error: two manifests share a name ({stems}); their outputs would collide", file=sys.stderr)
        return 2
    total = len(loose) + sum(len(v) for v in manifests.values())
    if total == 0:
        print(f"{prog}: error: no audio files found in {args.inputs}", file=sys.stderr)
        return 1
    handle = load_for_cli(args, prog)
    if handle is None:
        return 1
    if args.layer is not None and not -handle.num_layers <= args.layer < handle.num_layers:
        print(f"{prog}: error: --layer must be in [-{handle.num_layers}, {handle.num_layers - 1}]", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def compute(waves: list[torch.Tensor]) -> list[Any]:
        return handle.extract(waves, sample_rate=handle.sample_rate, granularity=args.granularity, layer=args.layer)

    suffix = ".npz" if args.granularity == "all" else ".npy"
    errors: list[tuple[str, str]] = []
    written = 0
    with progress(total, prog) as bar:
        claimed: dict[Path, str] = {}
        for item, result, error in run_batches(handle, loose, compute, args.batch_size, bar):
            target = out_dir / Path(item.relative).with_suffix(suffix)
            if error is None and target in claimed:
                error = f"output {target} would overwrite the output of {claimed[target]}"
            if error is not None:
                errors.append((item.path, error))
                continue
            claimed[target] = item.path
            _save_clip(target, result, args.granularity)
            written += 1
        for manifest, items in manifests.items():
            rows: list[tuple[AudioItem, Any]] = []
            for item, result, error in run_batches(handle, items, compute, args.batch_size, bar):
                if error is not None:
                    errors.append((item.path, error))
                else:
                    rows.append((item, result))
            _write_manifest_outputs(out_dir, Path(manifest).stem, rows, args.granularity, handle)
            written += len(rows)
    report_errors(errors, out_dir, total, prog)
    print(f"{prog}: {written} of {total} files embedded ({args.granularity}) into {out_dir}", file=sys.stderr)
    return 0 if written > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
