"""Embedding throughput on the CPU: PyTorch eager against onnxruntime fp32 and int8, side by side.

For each model size (random weights built from the project's own configs, so nothing is downloaded)
the script writes a checkpoint, exports it with ``eat-export`` (fp32 and ``--int8``), writes
``--clips`` WAV files of ``--seconds`` (generated test signals) and measures, for every backend
(``torch`` = the .pt, ``onnx-fp32``, ``onnx-int8``; with ``--backends`` also ``onnx-fp32-portable`` and
``onnx-int8-portable``, exported with standard ONNX attention, and ``onnx-int8-cls``, with the CLS
row's activations rounded once like the rest, ``eat-export --int8-cls``, and ``onnx-int8-s8`` / ``-s7`` /
``-u8``, each form of ``eat-export --int8-weights``; ``onnx-int8`` is the default, which follows the CPU)
and every thread count:

- **end to end**: ``eat-extract`` run as a user runs it (a fresh process: start-up, model loading,
  decoding, fbank, encoder, writing), clips/s over the wall time;
- **start-up**: the same command on one 0.5 s clip, less the encoder time of its one window
  (imports and model loading);
- **encoder alone**: clips/s of the encoder forward on the clips' windows, in-process, after a warm-up;
- **outside the encoder**: what is left per clip, ``(end to end - start-up - encoder) / clips``
  (decode, fbank, windowing, pooling, writing).

Speed-ups are against ``torch`` at the same size and thread count. With ``--fsdd RECORDINGS`` (the
``recordings/`` folder of the Free Spoken Digit Dataset) it also measures what int8 costs in accuracy:
``eat-probe`` (logistic regression and kNN on frozen CLS / mean-pooled features, leave-one-speaker-out)
on the .pt, the fp32 .onnx and the int8 .onnx of the same model (``--probe-checkpoint`` for a trained
one; default the random ``--probe-size`` model).

    python benchmarks/extract_throughput.py [--sizes base large] [--threads 1 all] [--clips 12]
        [--seconds 10] [--batch-size 4] [--granularity utterance] [--repeats 1] [--fsdd RECORDINGS_DIR]
        [--probe-size base] [--probe-checkpoint CKPT] [--probe-per-split 100] [--json FILE]

Quick check of the script itself: ``--sizes tiny --clips 2 --seconds 2 --threads 1``. EAT-large needs
about 6 GB of disk in the work folder (``--workdir``, default a temporary one) and 8 GB of memory.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import soundfile as sf
import torch

from eat_fairseq.checkpoints.convert import build_checkpoint
from eat_fairseq.evaluation.probe import L2_FOLDS
from eat_fairseq.inference.api import load_model
from eat_fairseq.inference.onnx_export import check_waves
from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig

BACKENDS = ("torch", "onnx-fp32", "onnx-int8", "onnx-int8-cls", "onnx-int8-s8", "onnx-int8-s7", "onnx-int8-u8",
            "onnx-fp32-portable", "onnx-int8-portable")
DEFAULT_BACKENDS = BACKENDS[:3]
EXPORT_FLAGS = {  # eat-export flags of each ONNX backend
    "onnx-fp32": [],
    "onnx-int8": ["--int8"],
    "onnx-int8-cls": ["--int8", "--int8-cls"],
    "onnx-int8-s8": ["--int8", "--int8-weights", "s8"],
    "onnx-int8-s7": ["--int8", "--int8-weights", "s7"],
    "onnx-int8-u8": ["--int8", "--int8-weights", "u8"],
    "onnx-fp32-portable": ["--portable"],
    "onnx-int8-portable": ["--int8", "--portable"],
}
SIZES = {"tiny": PretrainConfig.tiny, "base": PretrainConfig.base, "large": PretrainConfig.large}


@dataclass
class Row:
    size: str
    threads: int
    backend: str
    e2e_clips_per_s: float
    startup_s: float
    encoder_clips_per_s: float
    outside_ms_per_clip: float
    e2e_speedup: float = 1.0
    encoder_speedup: float = 1.0


def int8_features(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's int8 product instructions that decide int8 speed, as the header names them: VNNI and
    AMX from ``/proc/cpuinfo``'s flags, else a plain "no VNNI flag" (not Linux, not x86, or neither)."""
    from eat_fairseq.inference.onnx_format import cpuinfo_flags

    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            flags = cpuinfo_flags(handle.read()) or set()
    except OSError:
        flags = set()
    named = [name for flag, name in (("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"), ("amx_int8", "AMX-INT8"))
             if flag in flags]
    return ", ".join(named) if named else "no VNNI flag"


def machine() -> str:
    """One line naming the CPU, its cores and the library versions."""
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime

    from eat_fairseq.inference.onnx_format import default_int8_weights, int8_saturates

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    vnni = "no VNNI: signed int8 products saturate" if int8_saturates() else int8_features()
    return (
        f"{datetime.date.today().isoformat()}, {cpu} ({vnni}; eat-export --int8 writes "
        f"{default_int8_weights()} weights), {cores} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    )


def run_cli(module: str, argv: list[str], threads: int) -> tuple[float, str]:
    """Run the console script ``module.main`` in a fresh process, as a user would (what the
    ``eat-*`` entry points do); returns ``(wall seconds, stdout)``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    code = f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def random_checkpoint(path: Path, size: str) -> None:
    """An EAT pre-training checkpoint of ``size`` with random weights (seed 0, AudioSet feature settings)."""
    torch.manual_seed(0)
    cfg = SIZES[size]()
    model = EATPretrainingModel(cfg)
    torch.save(build_checkpoint("pretrained", model.state_dict(), cfg), path)
    del model
    gc.collect()


def export_all(
    checkpoint: Path, folder: Path, threads: int, backends: tuple[str, ...] = DEFAULT_BACKENDS
) -> tuple[dict[str, Path], list[str]]:
    """``{backend: model file}`` for ``backends`` (``torch`` is the checkpoint itself), and what
    eat-export printed."""
    files = {"torch": checkpoint}
    printed: list[str] = []
    for backend in backends:
        if backend == "torch":
            continue
        extra = EXPORT_FLAGS[backend]
        out = folder / f"{checkpoint.stem}.{backend}.onnx"
        _, stdout = run_cli(
            "eat_fairseq.cli.export", [str(checkpoint), str(out), "--force", "--threads", str(threads), *extra], threads
        )
        printed += [line for line in stdout.splitlines() if line.strip()]
        files[backend] = out
    return files, printed


def write_clips(folder: Path, count: int, seconds: float) -> list[Path]:
    """``count`` 16-bit WAV files of ``seconds`` at 16 kHz (generated test signals, as a corpus is stored)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, wave in enumerate(check_waves(16000, seconds, count=count, seed=1)):
        path = folder / f"clip{i:03d}.wav"
        sf.write(path, wave.numpy(), 16000, subtype="PCM_16")
        paths.append(path)
    return paths


def encoder_rate(model: Path, waves: list[torch.Tensor], threads: int, batch: int) -> tuple[float, float]:
    """``(clips/s, seconds per window)`` of the encoder alone over the clips' windows (``batch``
    windows per call, after one warm-up call)."""
    torch.set_num_threads(threads)  # before loading: an ONNX session takes torch's thread count
    handle = load_model(model, batch_size=batch)
    windows, _ = handle.windows(waves)
    with torch.no_grad():
        handle.encoder.extract_features(windows[:batch])
        start = time.perf_counter()
        for i in range(0, windows.shape[0], batch):
            handle.encoder.extract_features(windows[i : i + batch])
        seconds = time.perf_counter() - start
    count = windows.shape[0]
    del handle
    gc.collect()
    return len(waves) / seconds, seconds / count


def throughput(
    size: str, work: Path, args: argparse.Namespace, thread_counts: list[int]
) -> tuple[list[Row], list[str], dict[str, Path]]:
    """Every backend x thread count for one model size; also returns eat-export's output and the files."""
    folder = work / size
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / f"eat_{size}_random.pt"
    random_checkpoint(checkpoint, size)
    files, export_lines = export_all(checkpoint, folder, max(thread_counts), tuple(args.backends))
    clips = write_clips(folder / "audio", args.clips, args.seconds)
    short = write_clips(folder / "short", 1, 0.5)
    waves = [torch.from_numpy(sf.read(p, dtype="float32")[0]) for p in clips]
    rows = []
    for threads in thread_counts:
        for backend in args.backends:
            common = [
                "--checkpoint",
                str(files[backend]),
                "--force",
                "--no-progress",
                "--threads",
                str(threads),
                "--batch-size",
                str(args.batch_size),
                "--granularity",
                args.granularity,
            ]
            # the best of a few runs: on a machine shared with other jobs one run can be seconds off
            one_clip = min(
                run_cli(
                    "eat_fairseq.cli.extract",
                    [*common, str(short[0].parent), "--out", str(folder / "out_short")],
                    threads,
                )[0]
                for _ in range(2)
            )
            wall = min(
                run_cli(
                    "eat_fairseq.cli.extract", [*common, str(folder / "audio"), "--out", str(folder / "out")], threads
                )[0]
                for _ in range(args.repeats)
            )
            enc, per_window = encoder_rate(files[backend], waves, threads, args.batch_size)
            startup = one_clip - per_window  # the short clip is one (padded) window
            outside = (wall - startup - args.clips / enc) / args.clips
            rows.append(Row(size, threads, backend, args.clips / wall, startup, enc, 1000.0 * outside))
            print(
                f"  {size} {threads} thread(s) {backend}: end to end {rows[-1].e2e_clips_per_s:.2f} clips/s, "
                f"encoder {enc:.2f} clips/s, start-up {startup:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    for row in rows:
        ref = (
            next(r for r in rows if r.threads == row.threads and r.backend == "torch")
            if "torch" in args.backends
            else row
        )
        row.e2e_speedup = row.e2e_clips_per_s / ref.e2e_clips_per_s
        row.encoder_speedup = row.encoder_clips_per_s / ref.encoder_clips_per_s
    return rows, export_lines, files


def table(rows: list[Row]) -> str:
    """The side-by-side markdown table of every setting."""
    head = (
        "| model | threads | backend | end to end clips/s | speed-up | encoder clips/s | speed-up | "
        "start-up s | outside encoder ms/clip |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| EAT-{r.size} | {r.threads} | {r.backend} | {r.e2e_clips_per_s:.2f} | {r.e2e_speedup:.2f}x | "
            f"{r.encoder_clips_per_s:.2f} | {r.encoder_speedup:.2f}x | {r.startup_s:.1f} | {r.outside_ms_per_clip:.0f} |"
        )
    return "\n".join(lines)


def probe(args: argparse.Namespace, work: Path, files: dict[str, Path], threads: int) -> tuple[str, dict[str, Any]]:
    """eat-probe on FSDD (one split per speaker, leave-one-speaker-out) for the .pt and its exports."""
    data = work / "fsdd_speakers"
    run_cli(
        "eat_fairseq.prep.fsdd",
        [str(args.fsdd), "--dest", str(data), "--split-by", "speaker", "--quiet", "--force"],
        threads,
    )
    out = work / "probe.json"
    models = [str(files[b]) for b in BACKENDS if b in files]
    run_cli(
        "eat_fairseq.cli.probe",
        [
            "--data",
            str(data),
            "--folds",
            "auto",
            *models,
            "--layers",
            "last",
            "--pooling",
            "cls,mean",
            "--no-logmel",
            "--target-length",
            str(args.probe_target_length),
            "--max-per-split",
            str(args.probe_per_split),
            "--l2-folds",
            args.probe_l2_folds,
            "--threads",
            str(threads),
            "--json",
            str(out),
        ],
        threads,
    )
    result = json.loads(out.read_text())
    names = {Path(m).name: b for b, m in zip([b for b in BACKENDS if b in files], models)}
    lines = [
        "| backend | pooling | logistic regression % | kNN % | logreg vs torch | kNN vs torch |",
        "|---|---|---|---|---|---|",
    ]
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for row in result["rows"]:
        backend = next((b for n, b in names.items() if row["model"].split(":")[0] == n), row["model"])
        by_key[(backend, row["pooling"])] = row
    for (backend, pooling), row in by_key.items():
        ref = by_key.get(("torch", pooling), row)
        lr, knn = 100 * row["logreg"], 100 * row["knn"]
        lines.append(
            f"| {backend} | {pooling} | {lr:.1f} | {knn:.1f} | {lr - 100 * ref['logreg']:+.1f} | "
            f"{knn - 100 * ref['knn']:+.1f} |"
        )
    return "\n".join(lines), result


def main(argv: Optional[list[str]] = None) -> int:
    """Run every measurement the arguments ask for and print the tables (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=["base", "large"])
    parser.add_argument(
        "--backends", nargs="+", choices=BACKENDS, default=list(DEFAULT_BACKENDS),
        help="what to run; the -portable files use standard ONNX attention (eat-export --portable)",
    )
    parser.add_argument("--threads", nargs="+", default=["1", "all"], help="thread counts; 'all' = every core")
    parser.add_argument("--clips", type=int, default=12, help="clips per end-to-end run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    parser.add_argument("--batch-size", type=int, default=4, help="eat-extract --batch-size (clips / windows per pass)")
    parser.add_argument("--granularity", default="utterance", choices=("utterance", "frame", "all"))
    parser.add_argument("--repeats", type=int, default=1, help="end-to-end runs per setting (the fastest counts)")
    parser.add_argument(
        "--fsdd", default=None, metavar="RECORDINGS_DIR", help="FSDD recordings/ folder: also probe int8's accuracy"
    )
    parser.add_argument("--probe-size", choices=tuple(SIZES), default="base", help="random model probed on FSDD")
    parser.add_argument("--probe-checkpoint", default=None, help="probe this checkpoint instead (exported here)")
    parser.add_argument(
        "--probe-per-split", type=int, default=100, help="eat-probe --max-per-split (clips per speaker)"
    )
    parser.add_argument(
        "--probe-l2-folds", choices=L2_FOLDS, default="others",
        help="eat-probe --l2-folds: the L2 strength chosen on every other speaker (default; one speaker's choice "
        "flips on features that differ by 1e-6 and moves that fold by points) or on the next one (eat-probe's default)",
    )
    parser.add_argument("--probe-target-length", type=int, default=128, help="eat-probe --target-length (frames)")
    parser.add_argument(
        "--workdir", default=None, help="keep checkpoints, exports and clips here (default: a temporary folder)"
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every number as JSON")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    thread_counts = sorted({cores if t == "all" else int(t) for t in args.threads})
    if args.fsdd and not os.path.isdir(args.fsdd):
        parser.error(f"--fsdd {args.fsdd}: not a folder")

    header = (
        f"{machine()}; {args.clips} clips of {args.seconds:g} s, batch {args.batch_size}, "
        f"granularity {args.granularity}, random weights"
    )
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows: list[Row] = []
        exports: dict[str, list[str]] = {}
        probe_files: dict[str, Path] = {}
        for size in args.sizes:
            size_rows, lines, files = throughput(size, work, args, thread_counts)
            rows += size_rows
            exports[size] = lines
            if size == args.probe_size:
                probe_files = files
        print("\n" + table(rows))
        for size, lines in exports.items():
            print(f"\neat-export, EAT-{size}:\n  " + "\n  ".join(lines))
        report: dict[str, Any] = {"machine": header, "rows": [asdict(r) for r in rows], "exports": exports}
        if args.fsdd:
            if args.probe_checkpoint:
                probe_files, lines = export_all(
                    Path(args.probe_checkpoint), work, max(thread_counts), tuple(args.backends)
                )
                probe_files["torch"] = Path(args.probe_checkpoint)
            elif not probe_files:
                folder = work / args.probe_size
                folder.mkdir(parents=True, exist_ok=True)
                checkpoint = folder / f"eat_{args.probe_size}_random.pt"
                random_checkpoint(checkpoint, args.probe_size)
                probe_files, _ = export_all(checkpoint, folder, max(thread_counts), tuple(args.backends))
            what = args.probe_checkpoint or f"EAT-{args.probe_size} random weights"
            text, result = probe(args, work, probe_files, max(thread_counts))
            print(
                f"\nint8 accuracy cost, FSDD leave-one-speaker-out, eat-probe on {what} "
                f"(last block, {args.probe_per_split} clips per speaker, {args.probe_target_length} frames, L2 strength "
                f"chosen on {'every other speaker' if args.probe_l2_folds == 'others' else 'the next speaker'}):\n{text}"
            )
            report["probe"] = result
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
