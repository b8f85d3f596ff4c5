"""Manifest rows and labels held compactly (issue 20, item 4): flat arrays instead of per-row objects.

At AudioSet-2M scale a list of ``ManifestRow`` objects costs ~800 MB per process, copied page by page
into every forked data-loader worker. These tests pin the compact store to the old behaviour (the
same rows, the same error messages) and measure what a dataset holds per row.
"""
from __future__ import annotations

import gc
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fairseq")

from eat_fairseq.data import manifest as manifest_module  # noqa: E402
from eat_fairseq.data.manifest import ManifestError, ManifestRow, read_manifest  # noqa: E402
from eat_fairseq.fairseq_ext.datasets import EATAudioDataset, EATLabelledDataset  # noqa: E402

MAX_BYTES_PER_ROW = 80
_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))


def _audioset_manifest(path: Path, root: Path, n: int, seed: int = 0) -> Path:
    """``n`` rows like AudioSet's: ``audio/unbalanced/<11-char YouTube id>.wav<TAB>160000``."""
    rng = np.random.default_rng(seed)
    ids = ["".join(chars) for chars in _ALPHABET[rng.integers(0, len(_ALPHABET), size=(n, 11))]]
    path.write_text(f"{root}\n" + "".join(f"audio/unbalanced/{i}.wav\t160000\n" for i in ids))
    return path


def _held_bytes(obj: object, seen: set | None = None) -> int:
    """Bytes reachable from ``obj`` through containers, numpy arrays and this project's objects.

    A real walk (``sys.getsizeof`` of every object reached once, an array's data counted where it
    is owned), so a per-row Python object shows up as bytes that grow with the rows.
    """
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType, types.MethodType)):
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, np.ndarray):
        return size + (_held_bytes(obj.base, seen) if obj.base is not None else 0)
    if isinstance(obj, dict):
        return size + sum(_held_bytes(k, seen) + _held_bytes(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return size + sum(_held_bytes(x, seen) for x in obj)
    if type(obj).__module__.startswith("eat_fairseq"):
        slots = [getattr(obj, s) for c in type(obj).__mro__ for s in getattr(c, "__slots__", ()) if hasattr(obj, s)]
        fields = getattr(obj, "__dict__", {})
        return size + _held_bytes(fields, seen) + sum(_held_bytes(x, seen) for x in slots)
    return size


# ---------------------------------------------------------------------------------------------------
# the store itself


def test_store_gives_back_the_rows_of_read_manifest(tmp_path: Path) -> None:
    """File, span and shard rows (blank lines, CRLF, non-ASCII names) come back as the same ManifestRows."""
    root = tmp_path / "audio"
    root.mkdir()
    text = (
        f"{root}\r\n"
        "clips/a.wav\t16000\r\n"
        "\n"
        "long/b.flac:48000:16000\t16000\n"
        "shard_000.zip:1234:64044\t32000\n"
        "   \n"
        "ünï/cödé.wav\t7\n"
        f"{tmp_path}/abs.wav\t5\n"
    )
    manifest = tmp_path / "m.tsv"
    manifest.write_bytes(text.encode("utf-8"))
    expected = [
        ManifestRow(f"{root}/clips/a.wav", 16000, 2, "file", 0, 0, "clips/a.wav"),
        ManifestRow(f"{root}/long/b.flac", 16000, 4, "span", 48000, 16000, "long/b.flac:48000:16000"),
        ManifestRow(f"{root}/shard_000.zip", 32000, 5, "shard", 1234, 64044, "shard_000.zip:1234:64044"),
        ManifestRow(f"{root}/ünï/cödé.wav", 7, 7, "file", 0, 0, "ünï/cödé.wav"),
        ManifestRow(f"{tmp_path}/abs.wav", 5, 8, "file", 0, 0, f"{tmp_path}/abs.wav"),
    ]
    rows = manifest_module.read_manifest_rows(str(manifest))
    assert rows.root == str(root) and len(rows) == 5
    assert [rows[i] for i in range(5)] == expected == list(rows) == read_manifest(str(manifest))[1]
    assert rows[-1] == expected[-1] and rows[np.int64(2)] == expected[2]
    assert rows[1].describe() == f"{root}/long/b.flac [frames 48000..64000]"
    assert rows[2].describe() == f"{root}/shard_000.zip [bytes 1234..65278]"
    assert rows.sizes.dtype == np.int64 and rows.sizes.tolist() == [16000, 16000, 32000, 7, 5]
    assert rows.lines.tolist() == [2, 4, 5, 7, 8]
    with pytest.raises(IndexError):
        rows[5]
    # filtering, by mask (min_samples) and by index array, keeps order and every field
    assert list(rows.select(rows.sizes >= 16000)) == expected[:3]
    assert list(rows.select(np.array([4, 0, 3]))) == [expected[4], expected[0], expected[3]]
    assert list(rows.select(np.zeros(5, dtype=bool))) == []


def test_select_across_gather_blocks_keeps_every_address(tmp_path: Path, monkeypatch) -> None:
    manifest = _audioset_manifest(tmp_path / "m.tsv", tmp_path, 1000, seed=3)
    rows = manifest_module.read_manifest_rows(str(manifest))
    monkeypatch.setattr(manifest_module, "_SELECT_BLOCK", 7)
    pick = np.random.default_rng(0).permutation(1000)[:600]
    assert list(rows.select(pick)) == [rows[i] for i in pick]


BAD = [
    ("", False, "{m}:1: first line must be the audio root folder, got an empty line"),
    ("a.wav\t10\n", False, "{m}:1: first line must be the audio root folder, got a data row 'a.wav\\t10'"),
    (
        "/no/such/root\na.wav\t10\n",
        True,
        "{m}:1: the audio root folder '/no/such/root' does not exist (line 1 of the manifest must name the folder "
        "the rows are relative to)",
    ),
    ("{root}\na.wav\t1\n\nb.wav\tc\td\n", False,
     "{m}:4: expected 'relative/path<TAB>n_samples', got 3 field(s): 'b.wav\\tc\\td'"),
    ("{root}\nonly_one_field\n", False,
     "{m}:2: expected 'relative/path<TAB>n_samples', got 1 field(s): 'only_one_field'"),
    ("{root}\na.wav\tabc\n", False, "{m}:2: n_samples is not an integer: 'abc'"),
    ("{root}\nlong.wav:5:0\t0\n", False, "{m}:2: empty range in 'long.wav:5:0'"),
    ("{root}\ns.zip:30:0\t10\n", False, "{m}:2: empty range in 's.zip:30:0'"),
    ("{root}\nlong.wav:5:100\t99\n", False, "{m}:2: n_samples 99 differs from the span's length 100: 'long.wav:5:100'"),
]


@pytest.mark.parametrize("text, check_root, message", BAD)
def test_error_messages_are_unchanged(tmp_path: Path, text: str, check_root: bool, message: str) -> None:
    """The messages of the previous parser, word for word, from the store, read_manifest and the dataset."""
    manifest = tmp_path / "bad.tsv"
    manifest.write_text(text.format(root=tmp_path))
    expected = message.format(m=manifest)
    with pytest.raises(ManifestError) as old_way:
        read_manifest(str(manifest), check_root=check_root)
    with pytest.raises(ManifestError) as store:
        manifest_module.read_manifest_rows(str(manifest), check_root=check_root)
    with pytest.raises(ManifestError) as dataset:
        EATAudioDataset(str(manifest), shuffle=False)
    assert str(old_way.value) == str(store.value) == str(dataset.value) == expected


def test_store_bytes_per_row_for_audioset_like_rows(tmp_path: Path) -> None:
    """A measured size (arrays and object headers, walked), not a constant: <= 80 bytes per row."""
    n = 10_000
    manifest = _audioset_manifest(tmp_path / "m.tsv", tmp_path / "audioset_root" / "AudioSet", n)
    rows = manifest_module.read_manifest_rows(str(manifest))
    held = _held_bytes(rows)
    assert held >= rows.nbytes >= n * len("audio/unbalanced/XXXXXXXXXXX.wav")
    assert held / n <= MAX_BYTES_PER_ROW, f"{held / n:.1f} bytes per row"


def test_label_table_round_trips() -> None:
    from eat_fairseq.data.labels import LabelTable

    lists = [[0, 3], [526], [1, 2, 5], [4], []]
    table = LabelTable.from_lists(lists)
    assert list(table) == lists and table[-2] == [4] and len(table) == 5
    assert all(type(c) is int for c in table[2])
    assert list(table.select(np.array([2, 0]))) == [[1, 2, 5], [0, 3]]
    assert LabelTable.from_lists([[70000]]).ids.dtype == np.int32


# ---------------------------------------------------------------------------------------------------
# the datasets (written to run unchanged against the old tree, imports aside)


def _dataset_footprint(tmp_path: Path, n: int, labelled: bool) -> tuple[int, int, int]:
    """(bytes held by a dataset of ``n`` AudioSet-like rows, gc-tracked objects it added, its length)."""
    manifest = _audioset_manifest(tmp_path / f"m{n}.tsv", tmp_path, n, seed=n)
    gc.collect()
    before = len(gc.get_objects())
    if labelled:
        labels = [[k % 527, (k * 7) % 527] for k in range(n)]
        ds = EATLabelledDataset(str(manifest), labels=labels, num_classes=527, multi_label=True, shuffle=False)
        del labels
    else:
        ds = EATAudioDataset(str(manifest), shuffle=False)
    gc.collect()
    added = len(gc.get_objects()) - before
    return _held_bytes(ds), added, len(ds)


@pytest.mark.parametrize("labelled", [False, True], ids=["pretraining", "labelled"])
def test_datasets_hold_no_per_row_python_objects(tmp_path: Path, labelled: bool) -> None:
    """From 1000 to 5000 rows the dataset grows by <= 80 bytes per row and by no Python objects."""
    _dataset_footprint(tmp_path, 10, labelled)  # warm-up: first-use caches and earlier tests' garbage settle
    small_bytes, small_objects, small_len = _dataset_footprint(tmp_path, 1000, labelled)
    big_bytes, big_objects, big_len = _dataset_footprint(tmp_path, 5000, labelled)
    assert (small_len, big_len) == (1000, 5000)
    per_row = (big_bytes - small_bytes) / 4000
    budget = MAX_BYTES_PER_ROW + (2 * 2 + 8 if labelled else 0)  # + two int16 labels and an offset
    assert per_row <= budget, f"the dataset holds {per_row:.0f} bytes per row"
    assert max(small_objects, big_objects) < 100, f"{small_objects} / {big_objects} Python objects added for 1000 / 5000 rows"


def _private_bytes() -> int:
    """USS of this process: Private_Clean + Private_Dirty of /proc/self/smaps_rollup."""
    with open("/proc/self/smaps_rollup") as handle:
        fields = {p[0]: int(p[1]) for p in (line.split() for line in handle) if len(p) == 3 and p[2] == "kB"}
    return (fields["Private_Clean:"] + fields["Private_Dirty:"]) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup") or not hasattr(os, "fork"), reason="Linux only")
def test_forked_worker_walking_the_epoch_copies_no_row_pages(tmp_path: Path) -> None:
    """A forked worker that touches every row as __getitem__ does keeps sharing the rows' pages.

    With one Python object per row each touch writes a reference count, so the worker ends up with a
    private copy of every page holding rows (~18 MB for these 100k rows); arrays are only read.
    """
    manifest = _audioset_manifest(tmp_path / "m.tsv", tmp_path, 100_000, seed=5)
    ds = EATAudioDataset(str(manifest), shuffle=False)
    gc.collect()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: report its private-memory growth over the epoch
        code = 1
        try:
            os.close(read_fd)
            start = _private_bytes()
            touched = sum(len(ds.rows[i].path) + int(ds.sizes[i]) for i in range(len(ds)))
            os.write(write_fd, f"{_private_bytes() - start} {touched}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as handle:
        report = handle.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and report
    growth = int(report.split()[0])
    assert growth < 4 * 2**20, f"the worker copied {growth / 2**20:.1f} MB walking {len(ds)} rows"


def test_dropped_short_rows_keep_rows_and_labels_aligned(tmp_path: Path) -> None:
    root = tmp_path / "audio"
    root.mkdir()
    sizes = [16000, 10, 0, 32000, 5, 16000]
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"{root}\n" + "".join(f"c{k}.wav:0:{s}\t{s}\n" if s else f"c{k}.wav\t{s}\n"
                                              for k, s in enumerate(sizes)))
    labels = [[k] for k in range(len(sizes))]
    ds = EATLabelledDataset(str(manifest), labels=labels, num_classes=6, multi_label=False, shuffle=False,
                            min_samples=100)
    kept = [r for r in read_manifest(str(manifest))[1] if r.num_samples >= 100]
    assert len(ds) == 3 and ds.num_short_skipped == 3
    assert [ds.rows[i] for i in range(3)] == kept
    assert ds.sizes.tolist() == [16000, 32000, 16000]
    assert [ds.labels[i] for i in range(3)] == [[0], [3], [5]]
    batch_labels = [ds.labels[i][0] for i in range(len(ds))]
    assert batch_labels == [int(r.rel[1]) for r in kept]


def test_balanced_sampling_weights_follow_the_kept_rows(tmp_path: Path) -> None:
    """The sampler draws over the dataset's clips: a zero-length row (always dropped) takes its weight along."""
    from omegaconf import OmegaConf

    from eat_fairseq.fairseq_ext import tasks

    audio = tmp_path / "audio"
    audio.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "label_descriptors.csv").write_text("0,/m/a\n1,/m/b\n")
    sizes = [16000, 0, 16000, 16000]
    (data / "train.tsv").write_text(f"{audio}\n" + "".join(f"c{k}.wav\t{s}\n" for k, s in enumerate(sizes)))
    (data / "train.lbl").write_text("".join(f"c{k}\t/m/{'ab'[k % 2]}\n" for k in range(4)))
    (data / "train.weights").write_text("1.0\n2.0\n3.0\n4.0\n")
    cfg = OmegaConf.structured(tasks.EATClassificationConfig)
    cfg.data, cfg.train_subset, cfg.seed, cfg.target_length = str(data), "train", 1, 128
    cfg.balanced_sampling, cfg.samples_per_epoch = True, 3
    task = tasks.EATClassificationTask.setup_task(cfg)
    task.load_dataset("train")
    ds = task.dataset("train")
    assert len(ds) == 3
    assert ds.sampler.weights.tolist() == [1.0, 3.0, 4.0]
    assert sorted(ds.ordered_indices().tolist()) == [0, 1, 2]
