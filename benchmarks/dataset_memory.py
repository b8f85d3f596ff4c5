"""Host memory of a dataset's manifest rows at AudioSet scale: in the process, and in forked workers.

Writes a synthetic AudioSet-like manifest (``audio/unbalanced/<11-char id>.wav<TAB>160000`` rows; the
audio files need not exist, the datasets read no audio when they are built) and builds, each in a
fresh process:

- ``list``: the storage of 057a056, the manifest's rows as a list of ``ManifestRow`` objects (and, for
  the labelled dataset, one Python list of class indices per clip);
- ``arrays``: the dataset as it is now, rows in :class:`eat_fairseq.data.manifest.ManifestRows` and
  labels in :class:`eat_fairseq.data.labels.LabelTable` (flat numpy arrays).

Per dataset it prints:

- ``held B/row``: bytes the dataset holds per row, measured with :mod:`tracemalloc` (every block
  Python and numpy allocated while building it that is still alive once it is built, temporaries
  such as the label lists it was given freed); ``RSS B/row``: the process's resident-memory growth
  over the same build, without tracemalloc (includes allocator slack);
- worker memory: ``--workers`` processes are forked from the process holding the dataset and each
  walks the whole epoch's rows as ``__getitem__`` and the collater touch them (``rows[i].path``,
  ``sizes[i]``, ``labels[i]``), without decoding audio. Their USS (Private_Clean + Private_Dirty) and
  PSS from ``/proc/PID/smaps_rollup`` are read right after the fork, at the end of the walk, and after
  a ``gc.collect()`` (a full collection writes to the header of every tracked object, as Python does
  on its own from time to time in a long-running worker). The columns give the mean over the
  workers, and ``all workers MB`` the sum of their USS at the end: the memory forking cost;
- ``build s``: building the dataset (wall clock); ``walk us/row``: one worker's CPU time per row of
  the walk (CPU time, not wall clock, since the workers share the machine's cores).

Run it alone (the ``list`` rows need about 1 GB per worker at 2M rows):

    OMP_NUM_THREADS=1 python benchmarks/dataset_memory.py [--rows 2000000] [--workers 10]
        [--datasets pretraining,labelled] [--tmp DIR]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
NUM_CLASSES = 527
STORAGES = ("list", "arrays")


def write_manifest(path: Path, root: Path, rows: int, seed: int = 0) -> None:
    """``rows`` AudioSet-like rows under ``root`` (created, left empty)."""
    root.mkdir(parents=True, exist_ok=True)
    prefix, suffix = b"audio/unbalanced/", b".wav\t160000\n"
    width = len(prefix) + 11 + len(suffix)
    lines = np.empty((rows, width), dtype=np.uint8)
    lines[:, :len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    alphabet = np.frombuffer(ALPHABET, dtype=np.uint8)
    lines[:, len(prefix):len(prefix) + 11] = alphabet[np.random.default_rng(seed).integers(0, 64, (rows, 11))]
    lines[:, len(prefix) + 11:] = np.frombuffer(suffix, dtype=np.uint8)
    with open(path, "wb") as handle:
        handle.write(f"{root}\n".encode())
        handle.write(lines.tobytes())


def label_lists(rows: int) -> List[List[int]]:
    """1 to 3 distinct sorted class indices per clip (2 on average), as read_split_labels returns them."""
    out = []
    for k in range(rows):
        base = k % NUM_CLASSES
        out.append(sorted([base, (base + 100) % NUM_CLASSES, (base + 200) % NUM_CLASSES][: k % 3 + 1]))
    return out


def build(storage: str, kind: str, manifest: str) -> Any:
    """The dataset of ``kind`` with the rows (and labels) stored as ``storage`` says."""
    from eat_fairseq.fairseq_ext.datasets import EATAudioDataset, EATLabelledDataset

    if kind == "pretraining":
        ds = EATAudioDataset(manifest, shuffle=False)
    else:
        labels = label_lists(_count_rows(manifest))
        ds = EATLabelledDataset(manifest, labels=labels, num_classes=NUM_CLASSES, multi_label=True, shuffle=False)
        if storage == "list":
            ds.labels = list(labels)  # 057a056: a list referring to the per-clip lists it was given
        del labels
    if storage == "list":  # 057a056: read_manifest's ManifestRow objects, sizes built from them
        rows = list(ds.rows)
        ds.rows = rows
        ds.sizes = np.array([r.num_samples for r in rows], dtype=np.int64)
    gc.collect()
    return ds


def _count_rows(manifest: str) -> int:
    with open(manifest, "rb") as handle:
        return sum(1 for line in handle if line.strip()) - 1


def _smaps() -> Dict[str, int]:
    """USS and PSS of this process in bytes (``/proc/self/smaps_rollup``)."""
    fields: Dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return {"uss": fields["Private_Clean"] + fields["Private_Dirty"], "pss": fields["Pss"], "rss": fields["Rss"]}


def _walk(ds: Any, labelled: bool) -> int:
    """Touch every row as ``__getitem__`` (row path and size) and the collater (labels) would."""
    total = 0
    rows, sizes = ds.rows, ds.sizes
    for i in range(len(ds)):
        row = rows[i]
        total += len(row.path) + int(sizes[i])
        if labelled:
            total += len(ds.labels[i])
    return total


def fork_workers(ds: Any, workers: int, labelled: bool) -> List[Dict[str, float]]:
    """Fork ``workers`` processes that each walk the whole epoch; their memory at start, end, after gc."""
    readers = []
    for _ in range(workers):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # worker
            code = 1
            try:
                os.close(read_fd)
                start = _smaps()
                t0 = time.process_time()  # CPU time: the workers share the machine's cores
                _walk(ds, labelled)
                walk = time.process_time() - t0
                end = _smaps()
                gc.collect()
                collected = _smaps()
                report = {"start": start, "end": end, "gc": collected, "walk_s": walk}
                os.write(write_fd, json.dumps(report).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        readers.append((pid, read_fd))
    reports = []
    for pid, read_fd in readers:
        with os.fdopen(read_fd, "rb") as handle:
            data = handle.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not data:
            raise RuntimeError(f"worker {pid} failed (status {status})")
        reports.append(json.loads(data))
    return reports


def measure(storage: str, kind: str, manifest: str, workers: int) -> Dict[str, float]:
    """One configuration, in this (fresh) process."""
    import torch  # noqa: F401  (imported before the baseline, as in a training process)
    import fairseq  # noqa: F401

    gc.collect()
    rss0 = _smaps()["rss"]
    t0 = time.perf_counter()
    ds = build(storage, kind, manifest)
    build_s = time.perf_counter() - t0
    rows = len(ds)
    rss_growth = _smaps()["rss"] - rss0
    reports = fork_workers(ds, workers, kind == "labelled")
    del ds
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    again = build(storage, kind, manifest)
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del again

    def mean(when: str, key: str) -> float:
        return float(np.mean([r[when][key] for r in reports]))

    return {
        "rows": rows,
        "build_s": build_s,
        "held_per_row": held / rows,
        "rss_per_row": rss_growth / rows,
        "uss_start": mean("start", "uss"),
        "uss_end": mean("end", "uss"),
        "uss_gc": mean("gc", "uss"),
        "pss_start": mean("start", "pss"),
        "pss_end": mean("end", "pss"),
        "uss_all_end": float(sum(r["end"]["uss"] for r in reports)),
        "walk_us": float(np.mean([r["walk_s"] for r in reports])) / rows * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="manifest rows (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=10, help="forked workers (default: %(default)s)")
    parser.add_argument("--datasets", default="pretraining,labelled",
                        help="comma-separated: pretraining (EATAudioDataset), labelled (EATLabelledDataset)")
    parser.add_argument("--tmp", help="folder for the synthetic manifest (kept)")
    parser.add_argument("--measure", nargs=3, metavar=("STORAGE", "DATASET", "MANIFEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        storage, kind, manifest = args.measure
        print(json.dumps(measure(storage, kind, manifest, args.workers)))
        return
    kinds = [k.strip() for k in args.datasets.split(",") if k.strip()]
    unknown = set(kinds) - {"pretraining", "labelled"}
    if unknown:
        parser.error(f"unknown dataset(s) {sorted(unknown)}")
    folder = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="eat_dataset_memory_"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / "train.tsv"
        t0 = time.perf_counter()
        write_manifest(manifest, folder / "AudioSet", args.rows)
        print(f"{args.rows} rows written to {manifest} ({manifest.stat().st_size / 2**20:.0f} MB, "
              f"{time.perf_counter() - t0:.1f} s); {args.workers} forked workers walk every row", flush=True)
        header = (f"{'dataset':<12} {'storage':<7} {'build s':>7} {'held B/row':>10} {'RSS B/row':>9} "
                  f"{'USS start MB':>12} {'USS end MB':>10} {'USS gc MB':>9} {'PSS start MB':>12} {'PSS end MB':>10} "
                  f"{'all workers MB':>14} {'walk us/row':>11}")
        lines = []
        for kind in kinds:
            for storage in STORAGES:
                cmd = [sys.executable, os.path.abspath(__file__), "--workers", str(args.workers),
                       "--measure", storage, kind, str(manifest)]
                done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                mb = 2.0**20
                lines.append(
                    f"{kind:<12} {storage:<7} {r['build_s']:>7.1f} {r['held_per_row']:>10.1f} {r['rss_per_row']:>9.1f} "
                    f"{r['uss_start'] / mb:>12.1f} {r['uss_end'] / mb:>10.1f} {r['uss_gc'] / mb:>9.1f} "
                    f"{r['pss_start'] / mb:>12.1f} {r['pss_end'] / mb:>10.1f} {r['uss_all_end'] / mb:>14.1f} "
                    f"{r['walk_us']:>11.2f}"
                )
                print(f"  done: {kind} {storage}", flush=True)
        print()
        print(header)
        print("\n".join(lines))
    finally:
        if not args.tmp:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
