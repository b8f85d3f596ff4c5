"""``eat-extract``: EAT embeddings of audio files, folders or manifests, one array per clip.

    eat-extract --checkpoint CKPT INPUT... --out DIR [--granularity utterance|frame|all]
                [--layer N] [--batch-size B] [--device cpu|cuda] [--threads N] [--force]
                [--trust-checkpoint] [--use-teacher] [--no-progress]

CKPT is any checkpoint ``load_model`` reads, or an ``.onnx`` file written by ``eat-export`` (run by
onnxruntime, several times faster on CPUs; ``--layer`` must then be the exported block). On a
terminal, jobs longer than two seconds show a progress bar with clips/s on stderr.

INPUT is an audio file, a folder (searched recursively for audio files) or a TSV manifest, checked
exactly as training checks it (:func:`eat_fairseq.data.manifest.read_manifest`: line 1 the root
folder, then ``relative/path<TAB>n_samples`` rows, as written by ``eat-manifest``).

Outputs:
- files and folders: one file per clip under DIR, at the clip's path relative to the deepest folder
  that holds all the inputs (one folder: the folder itself; one file: its name), so same-named files
  of several input folders keep their folders apart: ``.npy`` holding ``(D,)`` for ``utterance`` or
  ``(H, D)`` for ``frame`` (one row per 160 ms time patch); ``.npz`` with ``utterance``, ``frame``,
  ``patches`` ``(H, 8, D)`` and ``timestamps`` (seconds) for ``all``. Files that differ only by
  their extension (``a.wav``, ``a.flac``) keep it in the output name (``a.wav.npy``, ``a.flac.npy``);
- a manifest ``NAME.tsv``: ``DIR/NAME.npz`` and ``DIR/NAME.index.tsv``. The ``.npz`` holds
  ``utterance`` ``(N, D)`` and/or ``frame`` ``(sum H, D)`` (+ ``patches``) with ``offsets``
  ``(N + 1,)``: clip ``i``'s rows are ``offsets[i]:offsets[i + 1]``, ``timestamps`` per row. The index
  lists ``row, path, manifest_line, num_patches`` for every clip that succeeded.

Existing outputs (including ``DIR/errors.tsv``) are never overwritten without ``--force``: the run
stops before loading the model. Files that cannot be read (missing, not a regular file, undecodable,
shorter than 25 ms) are skipped, listed at the end and in ``DIR/errors.tsv``, and the run goes on.
Exit status: 0 every clip embedded; 1 some clip failed (the others are written) or the checkpoint
cannot be used; 2 bad arguments (a missing checkpoint file among them), an unusable manifest, or
outputs in the way. Uses only the pure core (no fairseq); torch is imported after the arguments are
parsed, and not at all for an ``.onnx`` model on the CPU (the torch-free runner,
:mod:`eat_fairseq.inference.onnx_runner`, unless a clip needs resampling).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from eat_fairseq.cli.common import (
    add_threads_argument,
    apply_threads,
    checkpoint_message,
    checkpoint_path_error,
    device_error,
    fail,
    one_line,
    plain_warnings,
)

if TYPE_CHECKING:
    from typing import Union

    import torch

    from eat_fairseq.data.manifest import ManifestRow
    from eat_fairseq.inference.api import EATModelHandle
    from eat_fairseq.inference.onnx_runner import OnnxRunner

    Model = Union[EATModelHandle, OnnxRunner]

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".w64", ".caf"})
"""Suffixes picked up inside folders (files named on the command line are tried whatever their suffix)."""

GRANULARITIES = ("utterance", "frame", "all")
"""Same as :data:`eat_fairseq.inference.api.GRANULARITIES` (repeated so ``--help`` does not import torch)."""


class InputError(ValueError):
    """An input argument that cannot be used at all (a malformed or missing manifest)."""


@dataclass
class AudioItem:
    """One clip: where to read it and the relative name its output is filed under."""

    path: str
    relative: str
    line: int = 0  # 1-based manifest line, 0 for files and folders
    row: Optional["ManifestRow"] = None  # the manifest row (spans and shard members are read through it)
    manifest: Optional[str] = None


# ------------------------------------------------------------------------------------------------
# inputs (shared with eat-tag)


def manifest_items(path: str) -> list[AudioItem]:
    """Rows of a TSV manifest, parsed by the core parser training uses (a missing root line, a
    malformed row or a non-integer length is an :class:`InputError` naming the file and line)."""
    from eat_fairseq.data.manifest import ManifestError, read_manifest

    try:
        root, rows = read_manifest(path, check_root=True)
    except (OSError, UnicodeDecodeError, ManifestError) as exc:
        raise InputError(f"{path}: cannot use manifest: {one_line(exc)}") from exc
    return [AudioItem(row.path, _row_name(row, root), line=row.line, row=row, manifest=path) for row in rows]


def _row_name(row: "ManifestRow", root: str) -> str:
    """Output name of a manifest row: the file's path below the root; a span ``long.wav:START:LEN``
    becomes ``long@START.wav`` (the clip id training uses for windows); a shard member is named
    after the address it was packed from (``pack.py`` names members so)."""
    from eat_fairseq.data.manifest import FILE, SHARD, SPAN, parse_address, window_id
    from eat_fairseq.data.shards import source_address

    address = row.rel or os.path.relpath(row.path, root)
    if row.kind == SHARD:
        try:
            address = source_address(row)
        except (KeyError, OSError, ValueError):
            pass  # unreadable shard: reported when the clip is read; keep the row's own address
    path, kind, start, _ = parse_address(address) if row.kind != FILE else (address, FILE, 0, 0)
    if kind == SPAN:
        stem, ext = os.path.splitext(path)
        return window_id(stem, start) + ext
    return path


def folder_files(folder: str) -> list[str]:
    """Audio files under ``folder``, recursively, in sorted order (hidden folders skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, name) for name in sorted(filenames)
                     if Path(name).suffix.lower() in AUDIO_EXTENSIONS)
    return found


def _output_names(files: list[str], base: str) -> list[str]:
    """Relative output names: the path below ``base`` without its extension, or with it where two
    files would otherwise share a name (``a.wav`` and ``a.flac``)."""
    relative = [os.path.relpath(f, base) for f in files]
    stems = [os.path.splitext(r)[0] for r in relative]
    taken: dict[str, int] = {}
    for stem in stems:
        taken[stem] = taken.get(stem, 0) + 1
    return [stem if taken[stem] == 1 else rel for rel, stem in zip(relative, stems)]


def expand_inputs(inputs: Iterable[str], manifests: bool = True) -> tuple[list[AudioItem], dict[str, list[AudioItem]]]:
    """Command-line inputs -> ``(loose clips from files and folders, {manifest path: its clips})``.

    A loose clip's ``relative`` name is its path below the deepest folder holding all file and
    folder inputs, without the extension (kept where two files would collide). The same file named
    twice is embedded once. A missing audio file is kept (it is reported per file, like an unreadable
    one); a ``.tsv`` argument is a manifest (an :class:`InputError` when ``manifests`` is false).
    """
    files: dict[str, str] = {}  # absolute path -> the path as given (shown in messages and results)
    anchors: list[str] = []
    groups: dict[str, list[AudioItem]] = {}
    for arg in inputs:
        if os.path.isdir(arg):
            anchors.append(os.path.abspath(arg))
            for found in folder_files(arg):
                files.setdefault(os.path.abspath(found), found)
        elif arg.lower().endswith(".tsv"):
            if not manifests:
                raise InputError(f"{arg}: manifests are not accepted here; pass audio files or folders")
            groups[arg] = manifest_items(arg)
        else:
            anchors.append(os.path.dirname(os.path.abspath(arg)))
            files.setdefault(os.path.abspath(arg), arg)
    base = os.path.commonpath(anchors) if anchors else ""
    names = _output_names(list(files), base)
    loose = [AudioItem(given, name) for given, name in zip(files.values(), names)]
    return loose, groups


def load_item(handle: "Model", item: AudioItem) -> Any:
    """The one place where an input row becomes audio: a mono waveform at the model's rate.

    Every input, a loose file or a manifest row of any kind (file, span, shard member), is read by the
    one row reader (:func:`eat_fairseq.data.clips.read_row`), as training reads it. Only regular files
    are opened (a FIFO named ``.wav`` would block the decoder forever).
    """
    from eat_fairseq.data.clips import read_row_array
    from eat_fairseq.data.errors import AudioError
    from eat_fairseq.data.manifest import ManifestRow

    row = item.row
    if row is None or row.kind == "file":
        if not os.path.exists(item.path):
            raise AudioError(f"{item.path}: file not found")
        if not os.path.isfile(item.path):
            raise AudioError(f"{item.path}: not a regular file")
    if row is None:
        row = ManifestRow(path=os.path.abspath(item.path), num_samples=0, line=0, rel=item.path)
    wave, sr = read_row_array(row, item.manifest)
    return handle.prepare(wave, sample_rate=sr, source=item.path if row.kind == "file" else row.describe())


def progress(total: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar on stderr with clips/s (never inverted to s/clip) and the time left, for jobs long
    enough to need one.

    It appears after two seconds (a short job prints nothing but its summary) and never when
    ``enabled`` is false (``--no-progress``) or stderr is not a terminal (logs, pipes, tests).
    """
    from tqdm import tqdm

    layout = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"
    return tqdm(total=total, desc=desc, unit=" clips", file=sys.stderr, delay=2.0, bar_format=layout,
                disable=not enabled or not sys.stderr.isatty())


def clip_errors() -> tuple[type[BaseException], ...]:
    """Per-clip failures that skip the clip instead of stopping the run."""
    from eat_fairseq.data.errors import AudioError

    return (AudioError, OSError, ValueError, RuntimeError)


def run_batches(
    handle: "Model",
    items: list[AudioItem],
    compute: Callable[[list["torch.Tensor"]], list[Any]],
    batch_size: int,
    bar: Any,
) -> Iterator[tuple[AudioItem, Any, Optional[str]]]:
    """Yield ``(item, result, None)`` or ``(item, None, error message)`` for every item, in order.

    Clips are loaded one by one (a bad file only fails itself), then ``batch_size`` clips go through
    ``compute`` together; if a batch fails, its clips are retried one at a time so that only the
    culprit is reported.
    """
    errors = clip_errors()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        loaded: list[tuple[int, Any]] = []
        failed: dict[int, str] = {}
        for i, item in enumerate(chunk):
            try:
                loaded.append((i, load_item(handle, item)))
            except errors as exc:
                failed[i] = one_line(exc)
        results: dict[int, Any] = {}
        if loaded:
            try:
                outputs = compute([wave for _, wave in loaded])
                results = {i: out for (i, _), out in zip(loaded, outputs)}
            except errors:
                for i, wave in loaded:
                    try:
                        results[i] = compute([wave])[0]
                    except errors as exc:
                        failed[i] = one_line(exc)
        for i, item in enumerate(chunk):
            yield item, results.get(i), failed.get(i)
            bar.update(1)


def report_errors(errors: list[tuple[str, str]], out_dir: Optional[Path], total: int, prog: str) -> None:
    """Print the failures to stderr and (with ``out_dir``) write ``errors.tsv`` there."""
    if not errors:
        return
    print(f"{prog}: {len(errors)} of {total} files failed:", file=sys.stderr)
    for name, message in errors:
        print(f"  {name}: {message}", file=sys.stderr)
    if out_dir is not None:
        path = out_dir / "errors.tsv"
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("path\terror\n")
            handle.writelines(f"{name}\t{message}\n" for name, message in errors)
        print(f"{prog}: the list is in {path}", file=sys.stderr)


def runs_without_torch(args: argparse.Namespace) -> bool:
    """Whether the model is an ``.onnx`` for the torch-free runner (on the CPU, not ``--use-teacher``,
    which only ``load_model`` can refuse with its own message)."""
    from eat_fairseq.inference.onnx_format import is_onnx_path

    return is_onnx_path(args.checkpoint) and args.device == "cpu" and not getattr(args, "use_teacher", False)


def load_for_cli(args: argparse.Namespace, prog: str) -> Optional["Model"]:
    """The model, or None after printing why it cannot be used (the device was checked before).

    An ``.onnx`` file on the CPU gets the torch-free runner
    (:class:`eat_fairseq.inference.onnx_runner.OnnxRunner`, same outputs, no torch import); every
    other checkpoint :func:`eat_fairseq.inference.api.load_model`'s handle.
    """
    from eat_fairseq.checkpoints.errors import CheckpointError

    try:
        if runs_without_torch(args):
            from eat_fairseq.inference.onnx_runner import load_runner

            return load_runner(args.checkpoint, batch_size=args.batch_size, threads=args.threads)
        from eat_fairseq.inference.api import load_model

        return load_model(
            args.checkpoint,
            device=args.device,
            trusted=args.trust_checkpoint,
            use_teacher=getattr(args, "use_teacher", False),
            batch_size=args.batch_size,
        )
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"{prog}: error: cannot load {args.checkpoint}: {checkpoint_message(exc)}", file=sys.stderr)
        return None


def add_model_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--batch-size``, ``--device``, ``--threads``, ``--trust-checkpoint`` and ``--no-progress``
    (eat-extract and eat-tag)."""
    parser.add_argument(
        "--batch-size", type=int, default=8,
        help=f"clips loaded / windows {what} together (an .onnx runs one or two windows at a time on few threads)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (.onnx files: cpu)")
    add_threads_argument(parser)
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="read the checkpoint with full unpickling (your own files only)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it shows on a terminal only)")


def check_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2) for ``--checkpoint`` and the options of :func:`add_model_arguments`;
    applies ``--threads``."""
    problem = checkpoint_path_error(args.checkpoint)
    if problem:
        parser.error(problem)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    problem = device_error(args.device)
    if problem:
        parser.error(problem)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if not runs_without_torch(args):
        apply_threads(parser, args.threads)  # the torch-free ONNX runner takes them at load_for_cli


# ------------------------------------------------------------------------------------------------
# eat-extract


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eat-extract",
        description="Write EAT embeddings of audio files, folders (recursive) or TSV manifests.",
        epilog="exit status: 0 every clip embedded, 1 some clip failed (listed in OUT/errors.tsv) or the "
        "checkpoint cannot be used, 2 bad arguments (a missing checkpoint file too), an unusable manifest or "
        "outputs in the way",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="audio file, folder or .tsv manifest")
    parser.add_argument(
        "--checkpoint", required=True, help="EAT checkpoint (pre-training, fine-tuned or converted) or eat-export .onnx"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        default="utterance",
        help="utterance: (D,) CLS; frame: (H, D) per 160 ms time patch; all: .npz with both and every patch",
    )
    parser.add_argument("--layer", type=int, default=None, help="transformer block to read (0-based; default last)")
    add_model_arguments(parser, "encoded")
    parser.add_argument("--use-teacher", action="store_true", help="pre-training checkpoints: use the EMA teacher")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs in --out")
    return parser


def _save_clip(path: Path, result: Any, granularity: str) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    if granularity == "all":
        np.savez(path, **result)
    else:
        np.save(path, result)


def _write_manifest_outputs(
    out_dir: Path, stem: str, rows: list[tuple[AudioItem, Any, int]], granularity: str, handle: "Model"
) -> None:
    """``rows``: ``(item, result, samples of its waveform)`` per clip that succeeded."""
    import numpy as np

    arrays: dict[str, np.ndarray] = {}
    d = handle.embed_dim
    if granularity == "utterance":
        arrays["utterance"] = np.stack([r for _, r, _ in rows]) if rows else np.zeros((0, d), np.float32)
        sizes = [0] * len(rows)
    else:
        frames = [r if granularity == "frame" else r["frame"] for _, r, _ in rows]
        sizes = [f.shape[0] for f in frames]
        arrays["frame"] = np.concatenate(frames) if rows else np.zeros((0, d), np.float32)
        arrays["offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        arrays["timestamps"] = (
            np.concatenate([handle.timestamps(n, num_samples=s) for n, (_, _, s) in zip(sizes, rows)])
            if rows
            else np.zeros(0)
        )
        if granularity == "all":
            arrays["utterance"] = np.stack([r["utterance"] for _, r, _ in rows]) if rows else np.zeros((0, d), np.float32)
            w = handle.num_freq_patches
            arrays["patches"] = np.concatenate([r["patches"] for _, r, _ in rows]) if rows else np.zeros((0, w, d), np.float32)
    np.savez(out_dir / f"{stem}.npz", **arrays)
    with open(out_dir / f"{stem}.index.tsv", "w", encoding="utf-8") as handle_out:
        handle_out.write("row\tpath\tmanifest_line\tnum_patches\n")
        for row, ((item, _, _), size) in enumerate(zip(rows, sizes)):
            patches = size if granularity != "utterance" else ""
            handle_out.write(f"{row}\t{item.relative}\t{item.line}\t{patches}\n")


def planned_outputs(
    out_dir: Path, loose: list[AudioItem], manifests: dict[str, list[AudioItem]], granularity: str
) -> tuple[dict[str, Path], list[Path]]:
    """``({loose clip path: its output}, every file the run may write)``; raises :class:`InputError`
    when two inputs would write the same file."""
    suffix = ".npz" if granularity == "all" else ".npy"
    per_clip = {item.path: out_dir / (item.relative + suffix) for item in loose}
    owners: dict[Path, str] = {}
    for source, target in per_clip.items():
        owners[target] = source
    for manifest in manifests:
        stem = Path(manifest).stem
        for target in (out_dir / f"{stem}.npz", out_dir / f"{stem}.index.tsv"):
            if target in owners:
                raise InputError(f"{manifest} and {owners[target]} would both write {target}")
            owners[target] = manifest
    return per_clip, [*owners, out_dir / "errors.tsv"]


@plain_warnings("eat-extract")
def main(argv: Optional[list[str]] = None) -> int:
    """Run ``eat-extract``; returns the exit status (module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    check_model_arguments(parser, args)
    try:
        loose, manifests = expand_inputs(args.inputs)
        stems = [Path(m).stem for m in manifests]
        if len(set(stems)) != len(stems):
            raise InputError(f"two manifests share a name ({stems}); their outputs would collide")
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(f"--out {out_dir} exists and is not a folder")
        per_clip, outputs = planned_outputs(out_dir, loose, manifests, args.granularity)
    except InputError as exc:
        return fail(prog, str(exc), 2)
    total = len(loose) + sum(len(v) for v in manifests.values())
    if total == 0:
        return fail(prog, f"no audio files found in {args.inputs}", 1)
    existing = [p for p in outputs if p.exists()]
    if existing and not args.force:
        shown = ", ".join(str(p) for p in existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        return fail(prog, f"refusing to overwrite existing output(s) (use --force): {shown}", 2)
    handle = load_for_cli(args, prog)
    if handle is None:
        return 1
    try:
        handle.check_layer(args.layer)
    except ValueError as exc:
        return fail(prog, f"--layer: {exc}", 2)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.force and (out_dir / "errors.tsv").exists():
        (out_dir / "errors.tsv").unlink()  # a stale list from an earlier run would be misleading

    def compute(waves: list[Any]) -> list[tuple[Any, int]]:
        """``(embedding, samples of the waveform)`` per clip (the length places the last timestamp)."""
        results = handle.extract(waves, sample_rate=handle.sample_rate, granularity=args.granularity, layer=args.layer)
        return [(result, int(wave.shape[-1])) for result, wave in zip(results, waves)]

    errors: list[tuple[str, str]] = []
    written = 0
    with progress(total, prog, enabled=not args.no_progress) as bar:
        for item, result, error in run_batches(handle, loose, compute, args.batch_size, bar):
            if error is not None:
                errors.append((item.path, error))
                continue
            _save_clip(per_clip[item.path], result[0], args.granularity)
            written += 1
        for manifest, items in manifests.items():
            rows: list[tuple[AudioItem, Any, int]] = []
            for item, result, error in run_batches(handle, items, compute, args.batch_size, bar):
                if error is not None:
                    errors.append((item.path, error))
                else:
                    rows.append((item, *result))
            _write_manifest_outputs(out_dir, Path(manifest).stem, rows, args.granularity, handle)
            written += len(rows)
    report_errors(errors, out_dir, total, prog)
    print(f"{prog}: {written} of {total} files embedded ({args.granularity}) into {out_dir}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
