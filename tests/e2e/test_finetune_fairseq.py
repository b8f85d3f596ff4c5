"""Fine-tuning through fairseq: dataset targets, layer-decayed optimizer groups, criterion modes,
pre-training initialisation, and an end-to-end fairseq-hydra-train + eat-evaluate run."""
from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("fairseq")

from omegaconf import OmegaConf  # noqa: E402

import eat_fairseq  # noqa: E402
from helpers import DDP_CPU_OVERRIDES  # noqa: E402
from eat_fairseq.data.labels import LabelError  # noqa: E402
from eat_fairseq.fairseq_ext import criterions, models, optim, tasks  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY_MODEL = {"embed_dim": 64, "depth": 2, "num_heads": 4, "max_length": 64}
CLASSES = [("/m/low", "Low tone"), ("/m/mid", "Mid, tone"), ("/m/high", "High tone")]
FREQS = {"/m/low": 300.0, "/m/mid": 1200.0, "/m/high": 4000.0}


def make_labelled_corpus(root: Path, clips_per_split: int = 12, multi_label: bool = True) -> Path:
    """Tones at three pitches (a clip may hold two when multi-label); train/valid manifests + labels."""
    rng = np.random.default_rng(0)
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    data.mkdir(exist_ok=True)
    names = [c for c, _ in CLASSES]
    header = "index,mid,display_name\n"
    rows = "".join(f'{i},{mid},"{name}"\n' for i, (mid, name) in enumerate(CLASSES))
    (data / "label_descriptors.csv").write_text(header + rows)
    for split in ("train", "valid"):
        tsv, lbl = [str(audio)], []
        for i in range(clips_per_split):
            labels = [names[i % 3]]
            if multi_label and i % 4 == 3:
                labels.append(names[(i + 1) % 3])
            sr = 16000 if i % 2 else 22050
            t = np.arange(int(1.3 * sr)) / sr
            x = sum(0.3 * np.sin(2 * np.pi * FREQS[lab] * t) for lab in labels) + 0.02 * rng.standard_normal(len(t))
            rel = f"{split}_{i:02d}.wav"
            sf.write(audio / rel, x.astype(np.float32), sr)
            tsv.append(f"{rel}\t{len(t)}")
            lbl.append(f"{split}_{i:02d}\t{','.join(labels)}")
        (data / f"{split}.tsv").write_text("\n".join(tsv) + "\n")
        (data / f"{split}.lbl").write_text("\n".join(lbl) + "\n")
    return data


def make_task(data: Path, **overrides):
    cfg = OmegaConf.structured(tasks.EATClassificationConfig)
    cfg.data = str(data)
    cfg.target_length = 128
    cfg.train_subset = "train"
    cfg.seed = 1
    for key, value in overrides.items():
        cfg[key] = value
    return tasks.EATClassificationTask.setup_task(cfg)


def model_cfg(**overrides):
    cfg = OmegaConf.structured(models.EATClassifierConfig)
    for key, value in {**TINY_MODEL, **overrides}.items():
        cfg[key] = value
    cfg._name = "eat_classifier"
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_labelled_corpus(tmp_path_factory.mktemp("labelled"))


def test_dataset_targets_and_balanced_sampling(corpus):
    task = make_task(corpus)
    assert task.num_classes == 3 and task.label_set.display_names[1] == "Mid, tone"
    task.load_dataset("valid")
    ds = task.dataset("valid")
    batch = ds.collater([ds[i] for i in range(4)])
    assert batch["net_input"]["source"].shape == (4, 1, 128, 128)
    torch.testing.assert_close(batch["target"][3], torch.tensor([1.0, 1.0, 0.0]))
    assert batch["target"].dtype == torch.float32

    balanced = make_task(corpus, balanced_sampling=True, samples_per_epoch=5)
    balanced.load_dataset("train")
    train = balanced.dataset("train")
    order = train.ordered_indices()
    assert len(order) == 5 and len(set(order.tolist())) == 5
    train.set_epoch(2)
    assert not np.array_equal(order, train.ordered_indices())
    state = task.state_dict()
    assert state["labels"] == {"/m/low": 0, "/m/mid": 1, "/m/high": 2}
    # the training manifest's identity, which a resume compares with the data it is started on
    assert state["train_data"]["rows"] == 12 and state["train_data"]["manifest"] == str(corpus / "train.tsv")


def test_single_label_targets_and_label_errors(tmp_path):
    data = make_labelled_corpus(tmp_path, clips_per_split=6, multi_label=False)
    task = make_task(data, multi_label=False)
    task.load_dataset("train")
    ds = task.dataset("train")
    batch = ds.collater([ds[i] for i in range(3)])
    assert batch["target"].tolist() == [0, 1, 2]
    (data / "train.lbl").write_text((data / "train.lbl").read_text().replace("/m/mid", "/m/nope", 1))
    with pytest.raises(LabelError, match="train.lbl:2: unknown label '/m/nope'"):
        task.load_dataset("train")


def test_eat_adam_applies_layer_decay(corpus):
    task = make_task(corpus)
    model = task.build_model(model_cfg(layer_decay=0.5, drop_path_rate=0.0))
    opt_cfg = OmegaConf.structured(optim.EATAdamConfig)
    opt_cfg.lr = [1e-2]
    opt_cfg.weight_decay = 0.0
    opt_cfg.tpu = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optim.EATAdam(opt_cfg, params)
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {"encoder.blocks.0.": 0.25, "encoder.blocks.1.": 0.5}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            scale = next((s for prefix, s in expected.items() if name.startswith(prefix)), 1.0)
            assert group["lr"] == pytest.approx(1e-2 * scale), name
    optimizer.set_lr(2e-3)
    assert optimizer.get_lr() == pytest.approx(2e-3)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([5e-4, 1e-3, 2e-3])

    # one real Adam step: the first update of each weight is +-lr (m / sqrt(v) = +-1), so the largest
    # change per tensor shows the lr it actually trained with
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    logits = model(torch.randn(2, 1, 128, 128))
    logits.sum().backward()
    optimizer.step()
    steps = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    assert steps["head.weight"] == pytest.approx(2e-3, rel=1e-3)
    assert steps["encoder.blocks.1.mlp.fc1.weight"] == pytest.approx(1e-3, rel=1e-3)
    assert steps["encoder.blocks.0.attn.qkv.weight"] == pytest.approx(5e-4, rel=1e-3)
    assert steps["encoder.patch_embed.proj.weight"] == pytest.approx(2e-3, rel=1e-3)


def test_criterion_augments_only_in_training(corpus):
    task = make_task(corpus)
    task.load_dataset("valid")
    ds = task.dataset("valid")
    sample = ds.collater([ds[i] for i in range(4)])
    source = sample["net_input"]["source"].clone()
    model = task.build_model(model_cfg(drop_path_rate=0.0))
    crit_cfg = OmegaConf.structured(criterions.EATClassificationCriterionConfig)
    crit_cfg.mixup_prob = 1.0
    criterion = criterions.EATClassificationCriterion(crit_cfg, task)

    model.eval()
    with torch.no_grad():
        first = criterion(model, sample)
        second = criterion(model, sample)
    assert first[0].item() == second[0].item()
    assert first[2]["_scores"].shape == (4, 3) and first[2]["n_eval"] == 4
    assert first[1].item() == pytest.approx(float(sample["target"].sum()))
    torch.testing.assert_close(sample["net_input"]["source"], source)

    model.train()
    torch.manual_seed(0)
    trained = criterion(model, sample)
    assert "_scores" not in trained[2]
    assert trained[0].item() != pytest.approx(first[0].item())
    # mixing with the flipped batch keeps the number of positives (the loss normaliser)
    assert trained[1].item() == pytest.approx(float(sample["target"].sum()))


def test_model_initialised_from_pretraining_checkpoint(corpus, tmp_path):
    from eat_fairseq.model.encoder import EncoderConfig
    from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig

    torch.manual_seed(0)
    pre = EATPretrainingModel(
        PretrainConfig(encoder=EncoderConfig(**TINY_MODEL), decoder_dim=64, decoder_depth=2, average_top_k_layers=2)
    )
    state = pre.state_dict()
    ckpt = tmp_path / "pre.pt"
    torch.save({"cfg": {"model": {"_name": "eat", **TINY_MODEL}}, "model": state}, ckpt)
    task = make_task(corpus)
    cfg = model_cfg(model_path=str(ckpt), embed_dim=768, depth=12, num_heads=12, max_length=768)
    model = task.build_model(cfg)
    # the encoder shape came from the pre-training checkpoint and was written back into the config
    assert cfg.embed_dim == 64 and cfg.depth == 2 and cfg.num_classes == 3
    torch.testing.assert_close(model.encoder.blocks[1].attn.qkv.weight, state["encoder.blocks.1.attn.qkv.weight"])
    teacher = task.build_model(model_cfg(model_path=str(ckpt), use_teacher_weights=True))
    torch.testing.assert_close(teacher.encoder.pre_norm.weight, state["teacher.pre_norm.weight"])


def _hydra_train_cmd(overrides: list[str]) -> list[str]:
    """The plain fairseq-hydra-train command a user runs (the user dir registers everything)."""
    exe = shutil.which("fairseq-hydra-train", path=str(BIN)) or "fairseq-hydra-train"
    return [exe, "--config-dir", str(REPO / "examples" / "finetuning"), "--config-name", "tiny",
            f"common.user_dir={eat_fairseq.USER_DIR}", *overrides]


def test_end_to_end_finetune_and_evaluate(tmp_path):
    from tests.helpers import json_logs, run

    data = make_labelled_corpus(tmp_path / "corpus", clips_per_split=8)
    # a brief real pre-training run (eat_tiny, 3 updates) on the same audio, labels unused
    pretrain = tmp_path / "pretrain"
    exe = shutil.which("fairseq-hydra-train", path=str(BIN)) or "fairseq-hydra-train"
    run([exe, "--config-dir", str(REPO / "examples" / "pretraining"), "--config-name", "eat_tiny",
         f"common.user_dir={eat_fairseq.USER_DIR}", f"task.data={data}", f"checkpoint.save_dir={pretrain}",
         "optimization.max_update=3"], cwd=tmp_path)
    save = tmp_path / "ckpt"
    out = run(
        _hydra_train_cmd(
            [f"task.data={data}", f"checkpoint.save_dir={save}", f"task.per_class_ap_dir={save}",
             "optimization.max_update=4", f"model.model_path={pretrain / 'checkpoint_last.pt'}"]
        ),
        cwd=tmp_path,
    )
    assert "encoder initialised from" in out
    valid = json_logs(out, "valid")
    assert valid, out[-3000:]
    last = valid[-1]
    assert 0.0 <= float(last["valid_mAP"]) <= 1.0 and 0.0 <= float(last["valid_accuracy"]) <= 1.0
    assert 0.0 <= float(last["valid_auc"]) <= 1.0
    assert (save / "checkpoint_best.pt").exists() and (save / "per_class_ap_valid.tsv").exists()

    eval_out = tmp_path / "ap.tsv"
    printed = run(
        [sys.executable, "-m", "eat_fairseq.cli.evaluate", "--checkpoint", str(save / "checkpoint_last.pt"),
         "--data", str(data), "--split", "valid", "--batch-size", "3", "--out", str(eval_out), "--no-progress"],
        cwd=tmp_path,
    )
    result = json.loads(printed.strip().splitlines()[-1])
    assert result["clips"] == 8
    # eat-evaluate recomputes the last validation of the same weights: same numbers
    assert result["mAP"] == pytest.approx(float(last["valid_mAP"]), abs=1e-3)
    assert result["accuracy"] == pytest.approx(float(last["valid_accuracy"]), abs=1e-3)
    lines = eval_out.read_text().splitlines()
    assert len(lines) == 4 and lines[2].split("\t")[2] == "Mid, tone"
    _check_evaluate_user_errors(save / "checkpoint_last.pt", pretrain / "checkpoint_last.pt", data, tmp_path)


def _check_evaluate_user_errors(ckpt: Path, pretrained: Path, data: Path, tmp_path: Path) -> None:
    """eat-evaluate answers user mistakes with one line and the documented exit status, no traceback."""
    import contextlib
    import io

    from eat_fairseq.cli.evaluate import main as evaluate_main

    def call(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = evaluate_main([*args, "--no-progress", "--out", str(tmp_path / "ap_errors.tsv")])
            except SystemExit as exc:  # argparse usage errors
                rc = int(exc.code)
        return rc, out.getvalue(), err.getvalue()

    # the default split is the one the checkpoint was validated on ("valid" here; there is no eval.tsv)
    rc, out, err = call("--checkpoint", str(ckpt), "--data", str(data))
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["split"] == "valid"
    rc, _, err = call("--checkpoint", str(ckpt), "--data", str(data), "--split", "eval")
    assert rc == 2 and "no split 'eval'" in err and "splits there: train, valid" in err, err
    rc, _, err = call("--checkpoint", str(tmp_path / "missing.pt"), "--data", str(data))
    assert rc == 2 and "checkpoint not found" in err, err
    rc, _, err = call("--checkpoint", str(pretrained), "--data", str(data))
    assert rc == 2 and "task is 'eat_pretraining'" in err, err
    rc, _, err = call("--checkpoint", str(ckpt), "--data", str(tmp_path / "nowhere"))
    assert rc == 2 and "is not a folder" in err, err
    for bad in (["--batch-size", "0"], ["--device", "tpu"], ["--threads", "0"]):
        rc, _, err = call("--checkpoint", str(ckpt), "--data", str(data), *bad)
        assert rc == 2 and "error:" in err and "Traceback" not in err, (bad, err)
    broken = tmp_path / "broken_labels"
    shutil.copytree(data, broken)
    lbl = (broken / "valid.lbl").read_text().splitlines()
    (broken / "valid.lbl").write_text("\n".join([lbl[0].split("\t")[0] + "\t/m/unknown", *lbl[1:]]) + "\n")
    rc, _, err = call("--checkpoint", str(ckpt), "--data", str(broken))
    assert rc == 2 and "valid.lbl:1" in err and "/m/unknown" in err and len(err.strip().splitlines()) == 1, err
    (broken / "valid.lbl").write_text("\n".join(lbl[:-1]) + "\n")  # one label line short
    rc, _, err = call("--checkpoint", str(ckpt), "--data", str(broken))
    assert rc == 2 and "label lines but" in err, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reverse_split(data: Path, split: str) -> None:
    """Reverse the row order of a split (manifest and labels together), so clip index k of this split
    no longer has the labels of clip index k of the other split (ids are row indices in both)."""
    tsv = (data / f"{split}.tsv").read_text().splitlines()
    lbl = (data / f"{split}.lbl").read_text().splitlines()
    (data / f"{split}.tsv").write_text("\n".join([tsv[0], *reversed(tsv[1:])]) + "\n")
    (data / f"{split}.lbl").write_text("\n".join(reversed(lbl)) + "\n")


def test_distributed_finetune_validation_two_process_cpu(tmp_path):
    """torchrun, 2 gloo processes: validation is sharded over the ranks, predictions are all-gathered,
    and the metrics equal a single-process eat-evaluate of the saved weights.

    9 valid clips in batches of 2 -> 5 batches: rank 0 runs 3, rank 1 runs 2 plus one dummy (padding)
    batch, which fairseq zeroes in the summed logging outputs but which still goes through the task's
    valid_step (and its all_gather)."""
    from tests.helpers import json_logs, run

    torchrun = shutil.which("torchrun", path=str(BIN))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    num_valid = 9
    data = make_labelled_corpus(tmp_path / "corpus", clips_per_split=num_valid)
    _reverse_split(data, "valid")
    rows = [r for r in (data / "valid.tsv").read_text().splitlines()[1:] if r.strip()]
    assert len(rows) == num_valid
    save, ap_dir = tmp_path / "ckpt", tmp_path / "ap"
    dist = list(DDP_CPU_OVERRIDES)
    cmd = _hydra_train_cmd(
        [f"task.data={data}", f"checkpoint.save_dir={save}", f"task.per_class_ap_dir={ap_dir}",
         "checkpoint.best_checkpoint_metric=mAP", "optimization.max_update=3", "dataset.batch_size_valid=2",
         *dist]
    )
    out = run([torchrun, "--nproc_per_node=2", f"--master_port={_free_port()}", *cmd], cwd=tmp_path,
              env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert "distributed init (rank 1)" in out or "rank 1" in out, out[-3000:]
    valid = json_logs(out, "valid")
    # 9 train clips, batch 4, 2 ranks: 2 updates per epoch -> validations after epochs 1 and 2 (update 3)
    passes = out.count('begin validation on "valid" subset')
    assert passes == 2 and len(valid) == passes, out[-3000:]
    assert [int(v["valid_num_updates"]) for v in valid] == [2, 3]
    for stats in valid:
        # every valid clip evaluated exactly once, over both ranks (the dummy batch counts 0)
        assert int(float(stats["valid_n_eval"])) == len(rows), stats
        for key in ("valid_mAP", "valid_accuracy", "valid_auc"):
            assert 0.0 <= float(stats[key]) <= 1.0, (key, stats)  # NaN when not all predictions are held
    assert sorted(p.name for p in ap_dir.iterdir()) == ["per_class_ap_valid.tsv"]
    assert len((ap_dir / "per_class_ap_valid.tsv").read_text().splitlines()) == 1 + len(CLASSES)

    printed = run(
        [sys.executable, "-m", "eat_fairseq.cli.evaluate", "--checkpoint", str(save / "checkpoint_last.pt"),
         "--data", str(data), "--split", "valid", "--batch-size", "4", "--out", str(tmp_path / "eval_ap.tsv"),
         "--no-progress"],
        cwd=tmp_path,
    )
    result = json.loads(printed.strip().splitlines()[-1])
    assert result["clips"] == num_valid
    last = valid[-1]
    assert result["mAP"] == pytest.approx(float(last["valid_mAP"]), abs=1e-3)
    assert result["accuracy"] == pytest.approx(float(last["valid_accuracy"]), abs=1e-3)
    assert result["auc"] == pytest.approx(float(last["valid_auc"]), abs=1e-3)
    # the distributed per-class file (written by rank 0 only) holds the same positives and APs
    dist_rows = [r.split("\t") for r in (ap_dir / "per_class_ap_valid.tsv").read_text().splitlines()[1:]]
    eval_rows = [r.split("\t") for r in (tmp_path / "eval_ap.tsv").read_text().splitlines()[1:]]
    assert [r[:4] for r in dist_rows] == [r[:4] for r in eval_rows]
    assert [float(r[4]) for r in dist_rows] == pytest.approx([float(r[4]) for r in eval_rows], abs=1e-3)


@pytest.mark.parametrize("name", ["tiny", "as20k", "as2m", "esc50", "spc2", "custom"])
def test_recipe_configs_use_known_fields(name):
    cfg = OmegaConf.load(REPO / "examples" / "finetuning" / f"{name}.yaml")
    assert cfg.hydra.run.dir == "."
    assert "user_dir" not in cfg.common  # given on the command line (eat-user-dir)
    sections = {
        "task": tasks.EATClassificationConfig,
        "model": models.EATClassifierConfig,
        "criterion": criterions.EATClassificationCriterionConfig,
        "optimizer": optim.EATAdamConfig,
    }
    for section, dataclass in sections.items():
        known = set(dataclass.__dataclass_fields__) | {"_name"}
        unknown = set(cfg[section]) - known
        assert not unknown, f"{name}.yaml {section}: unknown keys {unknown}"
    assert cfg.model.layer_decay == 0.65 and cfg.optimizer.weight_decay == 0.05
    assert list(cfg.optimizer.adam_betas) == [0.9, 0.95]


def test_esc50_folds_script(tmp_path):
    from tests.helpers import run

    corpus = make_labelled_corpus(tmp_path / "corpus", clips_per_split=6, multi_label=False)
    fold = tmp_path / "esc" / "fold1"
    fold.mkdir(parents=True)
    for name in ("train.tsv", "train.lbl", "label_descriptors.csv"):
        shutil.copy(corpus / name, fold / name)
    shutil.copy(corpus / "valid.tsv", fold / "eval.tsv")
    shutil.copy(corpus / "valid.lbl", fold / "eval.lbl")
    out = run(
        [sys.executable, str(REPO / "examples" / "finetuning" / "esc50_folds.py"), "--data-root", str(tmp_path / "esc"),
         "--save-root", str(tmp_path / "runs"), "--folds", "1", "--config-name", "tiny", "--batch-size", "3", "--",
         "task.multi_label=false", "criterion.loss=ce", "criterion.mixup_prob=0", "dataset.valid_subset=eval",
         "checkpoint.best_checkpoint_metric=accuracy", "optimization.max_update=3"],
        cwd=tmp_path,
    )
    assert "fold 1: accuracy" in out and "mean accuracy over 1 folds" in out
    summary = json.loads((tmp_path / "runs" / "esc50_summary.json").read_text())
    assert 0.0 <= summary["mean_accuracy"] <= 1.0
