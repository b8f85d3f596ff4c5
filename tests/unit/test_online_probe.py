"""The online probe of pre-training (task.probe_*) is right and contained.

- the whole probe set is checked when a training run sets up (splits, every label line, every clip,
  the classes of each fold), with a one-line error naming the file and line, before the first update;
- a probe that fails during training is logged and skipped, training goes on;
- with several processes the other ranks wait for rank 0's probe in the probe's own gloo group, so
  the default group's collectives cannot time out meanwhile, and a bad probe set stops every rank;
- features keep only the probed block's output, and are bit for bit those of ``hidden_states``;
- the cost is bounded by default (clips per split) and estimated at set-up;
- set-up and probes leave the global random number generators alone.
"""
from __future__ import annotations

import logging
import os
import random
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

pytest.importorskip("fairseq")

import helpers  # noqa: E402
from helpers import REPO, compose_recipe  # noqa: E402
from test_probe import write_tone_folder  # noqa: E402

from eat_fairseq.data.features import FeatureConfig, normalize, pad_or_crop  # noqa: E402
from eat_fairseq.evaluation.probe import POOLINGS, ProbeData, SplitSpec, _pool, encoder_features  # noqa: E402
from eat_fairseq.fairseq_ext import tasks  # noqa: E402
from eat_fairseq.model.encoder import EATEncoder, EncoderConfig  # noqa: E402
from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig  # noqa: E402
from eat_fairseq.prep.pack import pack_manifests  # noqa: E402

PRETRAINING = REPO / "examples" / "pretraining"


@pytest.fixture(autouse=True)
def no_process_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """setup_task's start-of-training settings (threads, fairseq's checkpoint functions) would outlive
    the test in this process; they are not what is tested here."""
    monkeypatch.setattr(tasks, "prepare_run", lambda cfg, from_checkpoint: None)


def _recipe(data: Path, probe: Path | None, *extra: str):
    overrides = [f"task.data={data}", *extra]
    if probe is not None:
        overrides.append(f"task.probe_data={probe}")
    return compose_recipe(PRETRAINING, "eat_tiny", overrides)


def task_cfg(probe: Path, **probe_fields: object):
    """The task config of the eat_tiny recipe with the probe on ``probe`` and ``task.KEY=VALUE``s."""
    return _recipe(probe, probe, *(f"task.{key}='{value}'" if isinstance(value, str) else f"task.{key}={value}"
                                   for key, value in probe_fields.items())).task


def setup_fails(probe: Path, match: str, **probe_fields: object) -> str:
    """Set the task up for training; it must refuse with a one-line ValueError matching ``match``."""
    with pytest.raises(ValueError, match=match) as info:
        tasks.EATPretrainingTask.setup_task(task_cfg(probe, **probe_fields))
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------------------------------
# the probe set is checked in full at set-up


def test_a_bad_label_line_stops_set_up_naming_file_and_line(tmp_path: Path) -> None:
    folder = write_tone_folder(tmp_path, splits=3, per_class=3)
    lines = (folder / "split1.lbl").read_text().splitlines()
    lines[4] = lines[4].split("\t")[0] + "\tbogus"
    (folder / "split1.lbl").write_text("\n".join(lines) + "\n")
    setup_fails(folder, r"split1\.lbl:5: unknown label 'bogus'")


def test_a_label_line_of_a_clip_left_out_by_the_cap_is_checked_too(tmp_path: Path) -> None:
    folder = write_tone_folder(tmp_path, splits=3, per_class=3)
    lines = (folder / "split2.lbl").read_text().splitlines()
    lines[1] = lines[1].replace("\t", " ")  # row 1 of 6 is not among the 2 evenly spaced clips used
    (folder / "split2.lbl").write_text("\n".join(lines) + "\n")
    setup_fails(folder, r"split2\.lbl:2: expected 'clip_id<TAB>", probe_max_per_split=2)


@pytest.mark.parametrize("used", [True, False], ids=["clip-used", "clip-left-out"])
def test_an_undecodable_clip_stops_set_up_naming_manifest_and_line(tmp_path: Path, used: bool) -> None:
    """A clip the probe uses is decoded in full; one the cap leaves out is opened (header) anyway."""
    folder = write_tone_folder(tmp_path, splits=2, per_class=3)
    row = 0 if used else 1  # evenly_spaced(6, 2) == [0, 5]
    (folder / "audio" / f"s1_c0_{row}.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    setup_fails(folder, rf"s1_c0_{row}\.wav.*split1\.tsv, line {row + 2}\)", probe_max_per_split=2)


def test_a_missing_clip_or_split_stops_set_up(tmp_path: Path) -> None:
    folder = write_tone_folder(tmp_path, splits=3, per_class=2)
    setup_fails(folder, r"split9\.tsv does not exist", probe_splits="split0,split9")
    setup_fails(folder, r"split7\.tsv does not exist", probe_splits="split0/split7")
    (folder / "split2.lbl").unlink()
    setup_fails(folder, r"split2\.lbl: label file not found", probe_splits="split0,split2")
    (folder / "audio" / "s1_c1_1.wav").unlink()
    setup_fails(folder, r"audio file not found: .*s1_c1_1\.wav \(manifest .*split1\.tsv, line 5\)",
                probe_splits="split0,split1")


def test_a_class_missing_from_a_folds_train_side_stops_set_up(tmp_path: Path) -> None:
    folder = write_tone_folder(tmp_path, splits=3, per_class=2)
    for split in ("split1", "split2"):  # "high" is left in split0 only
        lbl = folder / f"{split}.lbl"
        lbl.write_text(lbl.read_text().replace("\thigh", "\tlow"))
    setup_fails(folder, r"split0\.lbl:3: class 'high' has clips only in probe split 'split0'")
    # a fixed pair: the test split's class must be in the train split
    setup_fails(folder, r"split0\.lbl:3: class 'high' of the test split 'split0' has no clip in the train split "
                        r"'split1'", probe_splits="split1/split0")
    tasks.EATPretrainingTask.setup_task(task_cfg(folder, probe_splits="split0/split1"))  # the other way round is fine


def test_the_default_cap_bounds_the_clips_and_a_good_set_is_loaded_at_set_up(tmp_path: Path) -> None:
    """The default caps the clips per split (recipes included); set-up loads them once, capped."""
    assert tasks.EATPretrainingTaskConfig().probe_max_per_split == 500
    for recipe in [*PRETRAINING.glob("*.yaml"), REPO / "examples" / "fsdd" / "pretrain.yaml"]:
        assert OmegaConf.load(recipe).task.probe_max_per_split == 500, recipe.name
    folder = write_tone_folder(tmp_path, splits=2, per_class=3)
    task = tasks.EATPretrainingTask.setup_task(task_cfg(folder))
    assert task.probe.max_per_split == 500 and task.probe._data is not None and len(task.probe.data) == 12
    capped = tasks.EATPretrainingTask.setup_task(task_cfg(folder, probe_max_per_split=4))
    assert len(capped.probe.data) == 8 and capped.probe.data.labels.tolist() == [0, 0, 1, 1] * 2


def _long_recording_folder(root: Path) -> Path:
    """Splits a and b: two low and two high tones each, as spans of one long recording per split."""
    audio = root / "audio"
    audio.mkdir(parents=True)
    sr, n, gap = 16000, 8000, 3000
    (root / "label_descriptors.csv").write_text("0,low\n1,high\n")
    for split in ("a", "b"):
        parts, rows, labels, start = [], [], [], 0
        for k, freq in enumerate((300.0, 320.0, 2500.0, 2600.0)):
            parts += [np.zeros(gap, np.float32), 0.3 * np.sin(2 * np.pi * freq * np.arange(n) / sr).astype(np.float32)]
            start += gap
            rows.append(f"{split}_long.wav:{start}:{n}\t{n}")
            labels.append(f"{split}_long@{start}\t{'low' if k < 2 else 'high'}")
            start += n
        sf.write(audio / f"{split}_long.wav", np.concatenate(parts), sr, subtype="FLOAT")
        (root / f"{split}.tsv").write_text(f"{audio}\n" + "\n".join(rows) + "\n")
        (root / f"{split}.lbl").write_text("\n".join(labels) + "\n")
    return root


def test_span_and_shard_rows_are_read_and_checked_through_the_row_reader(tmp_path: Path) -> None:
    loose = _long_recording_folder(tmp_path / "loose")
    packed = tmp_path / "packed"
    pack_manifests(loose, packed)
    assert ".zip:" in (packed / "a.tsv").read_text()
    for folder in (loose, packed):
        task = tasks.EATPretrainingTask.setup_task(task_cfg(folder, probe_splits="a/b"))
        data = task.probe.data
        assert len(data) == 8 and all(fb.shape[0] == 48 for fb in data.fbank)  # 8000 samples: 48 frames
    # a span past the end of its file, in a row the cap leaves out: found at set-up all the same
    for name, row in (("b.tsv", "b_long.wav:999000:8000\t8000"), ("b.lbl", "b_long@999000\tlow")):
        lines = (loose / name).read_text().splitlines()
        lines[2 if name.endswith(".tsv") else 1] = row
        (loose / name).write_text("\n".join(lines) + "\n")
    setup_fails(loose, r"b\.tsv, line 3\) ends past the end of the file", probe_splits="a/b", probe_max_per_split=2)
    # a shard member that is not audio, again in a row the cap leaves out
    address = (packed / "a.tsv").read_text().splitlines()[2].split("\t")[0]
    shard, offset, _ = address.rsplit(":", 2)
    with open(Path((packed / "a.tsv").read_text().splitlines()[0]) / shard, "r+b") as handle:
        handle.seek(int(offset))
        handle.write(b"JUNK" * 4)
    setup_fails(packed, r"cannot read audio .*a\.tsv, line 3\)", probe_splits="a/b", probe_max_per_split=2)


def test_a_checkpoint_loaded_elsewhere_does_not_need_the_probe_set(tmp_path: Path) -> None:
    task = tasks.EATPretrainingTask.setup_task(task_cfg(tmp_path / "gone"), from_checkpoint=True)
    assert task.probe is None


# --------------------------------------------------------------------------------------------------
# a failing probe is contained


class _Optimizer:
    steps = 0

    def step(self) -> None:
        self.steps += 1


def test_a_failing_probe_is_logged_and_skipped_and_training_goes_on(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    folder = write_tone_folder(tmp_path, splits=2, per_class=2)
    task = tasks.EATPretrainingTask.setup_task(task_cfg(folder, probe_interval_updates=1))
    model = EATPretrainingModel(PretrainConfig.tiny())

    def broken(encoders: dict) -> dict:
        raise RuntimeError("disk\nvanished")

    task.probe.run = broken
    optimizer = _Optimizer()
    with caplog.at_level(logging.DEBUG, logger=tasks.__name__):
        task.optimizer_step(optimizer, model, update_num=0)  # a probe is due after every update
        task.optimizer_step(optimizer, model, update_num=1)
    assert optimizer.steps == 2 and int(model.num_ema_updates) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "probe at update 1 failed and was skipped" in warnings[0].getMessage()
    assert "RuntimeError: disk vanished" in warnings[0].getMessage()
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)  # the traceback, at debug
    assert task.last_probe == {}
    del task.probe.run  # the real probe works again on the next probe
    keys = {f"probe_{m}_{c}" for m in ("student", "teacher", "logmel") for c in ("logreg", "knn")}
    assert set(task.run_probe(model, 3)) == keys


# --------------------------------------------------------------------------------------------------
# features: only the probed block's output is kept, and the values are unchanged


def _synthetic_data(num: int = 4, frames: int = 128) -> ProbeData:
    g = torch.Generator().manual_seed(0)
    return ProbeData(fbank=[torch.randn(frames, 128, generator=g) for _ in range(num)],
                     labels=torch.arange(num) % 2, groups=torch.arange(num) // 2, split_names=["a", "b"],
                     spec=SplitSpec(folds=["a", "b"]), num_classes=2, class_names=["x", "y"])


def test_features_keep_only_the_probed_blocks_output() -> None:
    torch.manual_seed(0)
    enc = EATEncoder(EncoderConfig.tiny(depth=5)).eval()
    depth = len(enc.blocks)
    refs: dict[int, weakref.ref] = {}
    alive_before_probed: list[int] = []

    def watch(i: int):
        def hook(module, args, output) -> None:
            if i == 3:  # the probed block: only its input (block 2's output) may still exist
                alive_before_probed.append(sum(refs[j]() is not None for j in range(2)))
            refs[i] = weakref.ref(output[0])
        return hook

    handles = [block.register_forward_hook(watch(i)) for i, block in enumerate(enc.blocks)]
    try:
        feats = encoder_features(enc, _synthetic_data(), FeatureConfig(target_length=128), layers=[3],
                                 poolings=["cls", "freq"])
    finally:
        for h in handles:
            h.remove()
    assert sorted(refs) == [0, 1, 2, 3] and depth == 5  # block 4 never ran
    assert alive_before_probed == [0]
    assert all(r() is None for r in refs.values())  # no block output outlives the call (cls is a copy)
    assert feats[(3, "cls")].shape == (4, 64)


def test_features_are_bit_identical_to_pooling_hidden_states() -> None:
    """Keeping one block output changes nothing computed (this test passes on the code that kept all)."""
    torch.manual_seed(1)
    enc = EATEncoder(EncoderConfig.tiny(depth=4)).eval()
    data = _synthetic_data(num=6)
    feat = FeatureConfig(target_length=128)
    got = encoder_features(enc, data, feat, layers=[-1, 1], poolings=POOLINGS)
    with torch.no_grad():
        chunk = normalize(torch.stack([pad_or_crop(fb, 128) for fb in data.fbank]), feat.norm_mean, feat.norm_std)
        hidden = enc.hidden_states(chunk)
        for layer in range(4):  # the list of every block equals the separate per-layer path
            assert torch.equal(hidden[layer], enc.extract_features(chunk, layer))
    real = torch.full((6,), 128 // 16)
    for layer in (1, 3):
        for p in POOLINGS:
            assert torch.equal(got[(layer, p)], _pool(hidden[layer].float(), real, enc.cfg.grid_w, p)), (layer, p)


# --------------------------------------------------------------------------------------------------
# cost estimate and random number generators at set-up


def test_set_up_estimates_the_probe_time_and_warns_past_the_timeout(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    folder = write_tone_folder(tmp_path, splits=2, per_class=2)
    cfg = _recipe(folder, folder, "task.probe_timeout_minutes=0.00001")
    with caplog.at_level(logging.INFO, logger=tasks.__name__):
        task = tasks.EATPretrainingTask.setup_task(cfg.task)
        task.build_model(cfg.model)
    text = caplog.text
    assert "probe set" in text and "8 clips (at most 500 per split) of 2 splits" in text
    assert "probe: about" in text and "s per probe" in text and "on cpu" in text
    assert "exceed task.probe_timeout_minutes=1e-05" in text
    with pytest.raises(ValueError, match="task.probe_layer=2 is not a block of the 2-block encoder"):
        tasks.EATPretrainingTask.setup_task(_recipe(folder, folder, "task.probe_layer=2").task).build_model(cfg.model)
    with pytest.raises(ValueError, match="probe_timeout_minutes must be positive"):
        tasks.EATPretrainingTask.setup_task(_recipe(folder, folder, "task.probe_timeout_minutes=0").task)


def _rng_states() -> tuple:
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()


def test_set_up_with_the_probe_builds_and_draws_exactly_as_without(tmp_path: Path) -> None:
    """Set-up reads, decodes and times the probe on rank 0 only, after fairseq seeded every generator:
    the model built and the random streams afterwards must be those of a run without the probe."""
    folder = write_tone_folder(tmp_path, splits=2, per_class=2)
    results = []
    for probe in (None, folder):
        cfg = _recipe(folder, probe)
        random.seed(5), np.random.seed(5), torch.manual_seed(5)
        task = tasks.EATPretrainingTask.setup_task(cfg.task)
        model = task.build_model(cfg.model)
        assert (task.probe is not None) == (probe is not None)
        results.append((model.state_dict(), _rng_states()))
    (w0, r0), (w1, r1) = results
    assert r0[0] == r1[0] and r0[1] == r1[1] and torch.equal(r0[2], r1[2])
    assert set(w0) == set(w1) and all(torch.equal(w0[k], w1[k]) for k in w0)


# --------------------------------------------------------------------------------------------------
# several processes (gloo on CPU): the barrier, and failing together

_WORKER = r"""
import datetime, os, sys, time
import torch
import torch.distributed as dist

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
rank = dist.get_rank()
# the training's collectives: a group with a short timeout, as NCCL's watchdog gives the default group
steps = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=float(os.environ["STEP_TIMEOUT_S"])))
sys.path.insert(0, os.environ["TESTS"])
from helpers import REPO, compose_recipe
from eat_fairseq.fairseq_ext import tasks
from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig

tasks.prepare_run = lambda cfg, from_checkpoint: None
probe = os.environ["PROBE"]
cfg = compose_recipe(REPO / "examples" / "pretraining", "eat_tiny", [f"task.data={probe}", f"task.probe_data={probe}"])
try:
    task = tasks.EATPretrainingTask.setup_task(cfg.task)
except ValueError as exc:
    print(f"rank {rank} refused: {exc}", flush=True)
    dist.destroy_process_group()
    sys.exit(3)
if rank == 0:  # a probe slower than the default group's timeout
    task.probe.run = lambda encoders: (time.sleep(float(os.environ["PROBE_S"])), {"probe_student_knn": 1.0})[1]
task.run_probe(EATPretrainingModel(PretrainConfig.tiny()), 1)
total = torch.ones(1)
dist.all_reduce(total, group=steps)  # the next update's first collective
print(f"rank {rank} all-reduced {total.item():.0f}", flush=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(tmp_path: Path, probe: Path, probe_s: float, step_timeout_s: float) -> list[subprocess.CompletedProcess]:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PROBE=str(probe), PROBE_S=str(probe_s),
                   STEP_TIMEOUT_S=str(step_timeout_s), TESTS=str(Path(helpers.__file__).parent))
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    out = []
    for proc in procs:
        try:
            stdout, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("a rank hung")
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout))
    return out


def test_other_ranks_wait_for_rank_0s_probe_beyond_the_training_collectives_timeout(tmp_path: Path) -> None:
    """Rank 0 probes for 8 s while the training's collectives time out after 3 s: the other rank waits
    in the probe's gloo group (timeout task.probe_timeout_minutes), so the next all-reduce still works."""
    folder = write_tone_folder(tmp_path / "tones", splits=2, per_class=2)
    ranks = _two_ranks(tmp_path, folder, probe_s=8, step_timeout_s=3)
    for rank, proc in enumerate(ranks):
        assert proc.returncode == 0 and f"rank {rank} all-reduced 2" in proc.stdout, proc.stdout[-3000:]


def test_a_bad_probe_set_stops_every_rank_at_set_up(tmp_path: Path) -> None:
    folder = write_tone_folder(tmp_path / "tones", splits=2, per_class=2)
    lbl = folder / "split0.lbl"
    lbl.write_text(lbl.read_text().replace("\tlow", "\tlwo", 1))
    ranks = _two_ranks(tmp_path, folder, probe_s=0, step_timeout_s=60)
    assert ranks[0].returncode == 3 and "rank 0 refused: " in ranks[0].stdout, ranks[0].stdout[-3000:]
    assert ranks[1].returncode == 3 and "rank 1 refused: " in ranks[1].stdout, ranks[1].stdout[-3000:]
    for proc in ranks:
        assert "split0.lbl:1: unknown label 'lwo'" in proc.stdout
    assert "(checked on rank 0)" in ranks[1].stdout
