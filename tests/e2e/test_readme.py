"""The README and docs/ work as written: every hydra option they name composes with every shipped recipe it
applies to, their commands parse, and the README's pre-train -> fine-tune -> evaluate -> plot block runs."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import typing
from pathlib import Path

import pytest

from helpers import BIN, REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
# README.md plus the pages of docs/ (most of the README moved there): their options and commands are checked
# alike. experiments.md is left out: it records commands run on eat_small only (e.g. model.mask_prob, which
# eat_tiny does not list), not options that work with every recipe.
DOCS = "\n".join([README, *(page.read_text(encoding="utf-8") for page in sorted((REPO / "docs").glob("*.md"))
                           if page.name != "experiments.md")])
SECTIONS = ("common", "checkpoint", "task", "dataset", "model", "criterion", "optimization", "optimizer",
            "lr_scheduler", "distributed_training")
OPTION = re.compile(r"(?<![\w.$/-])(\+{0,2})((?:" + "|".join(SECTIONS) + r")\.[a-z_][a-z0-9_]*)(=[^\s`]*)?")
NOT_OPTIONS = {"model.safetensors"}  # a file name in the eat-convert example
PLACEHOLDER_VALUES = {"N": "2", "M": "1"}  # `task.num_threads=N` and the like
ENV = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}  # for the ${oc.env:...} examples


def _value(raw: str) -> str:
    """A README value as a shell would pass it: quotes stripped, shell variables filled in."""
    raw = raw.strip("'\"")
    raw = re.sub(r"\$\(?[A-Za-z_]+\)?", "/tmp/x", raw.replace("$PWD", "/tmp/x"))
    return PLACEHOLDER_VALUES.get(raw, raw)


def readme_options() -> list[tuple[str, str, str | None]]:
    """``(plus signs, section.key, value or None when only the name is mentioned)`` for every option."""
    found = {(plus, key, eq[1:] if eq else None) for plus, key, eq in OPTION.findall(DOCS) if key not in NOT_OPTIONS}
    return sorted(found, key=lambda o: (o[1], o[0], o[2] or ""))


def _families():
    from fairseq.dataclass.configs import FairseqConfig

    from eat_fairseq.fairseq_ext import criterions, models, optim, tasks

    from fairseq.optim.lr_scheduler.cosine_lr_scheduler import CosineLRScheduleConfig

    pre = {"task": tasks.EATPretrainingTaskConfig, "model": models.EATModelConfig,
           "criterion": criterions.EATUFOCriterionConfig, "lr_scheduler": CosineLRScheduleConfig}
    ft = {"task": tasks.EATClassificationConfig, "model": models.EATClassifierConfig,
          "criterion": criterions.EATClassificationCriterionConfig, "optimizer": optim.EATAdamConfig,
          "lr_scheduler": optim.EATCosineConfig}
    hints = typing.get_type_hints(FairseqConfig)
    typed = {name: hint if dataclasses.is_dataclass(hint) else None for name, hint in hints.items()}
    recipes = {"eat_pretraining": [], "eat_classification": []}
    from omegaconf import OmegaConf

    for path in sorted((REPO / "examples").glob("*/*.yaml")):
        recipes[str(OmegaConf.load(path).task._name)].append(path)
    return {"eat_pretraining": pre, "eat_classification": ft}, typed, recipes


def test_readme_options_work_with_every_shipped_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fairseq")
    from omegaconf import OmegaConf

    from helpers import compose_recipe

    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    families, typed, recipes = _families()
    options = readme_options()
    assert len(options) > 25, options  # the extraction found the README's options
    overrides: dict[str, list[str]] = {"eat_pretraining": [], "eat_classification": []}
    for plus, key, value in options:
        section, field = key.split(".", 1)
        if typed.get(section) is not None:  # a typed fairseq section: the key exists in every recipe
            assert field in typed[section].__dataclass_fields__, f"README names unknown {key}"
            targets = list(recipes)
        else:  # free-form in the yaml (task, model, criterion, optimizer, lr_scheduler)
            targets = [f for f, dcs in families.items()
                       if section not in dcs or field in dcs[section].__dataclass_fields__]
            assert targets, f"README names {key}, which no eat_* config has"
            for family in targets:
                for path in recipes[family]:
                    listed = field in (OmegaConf.to_container(OmegaConf.load(path)).get(section) or {})  # ??? too
                    if plus == "+":
                        assert not listed, f"README writes +{key} but {path.name} lists {key} (drop the +)"
                    elif not plus:
                        assert listed, f"README names {key} without +, but {path.relative_to(REPO)} does not list it"
        if value is not None:
            for family in targets:
                overrides[family].append(f"{plus}{key}={_value(value)}")
    for family, paths in recipes.items():
        for path in paths:
            # all of the family's README options at once (later values win), as a user could type them
            cfg = compose_recipe(path.parent, path.stem, ["task.data=/tmp/x", *overrides[family]])
            assert cfg.task._name == family


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", DOCS, flags=re.S)


def _commands() -> list[list[str]]:
    """Every command line of the README's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in _bash_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


CLI_PARSERS = {
    "eat-extract": "eat_fairseq.cli.extract",
    "eat-tag": "eat_fairseq.cli.tag",
    "eat-export": "eat_fairseq.cli.export",
    "eat-evaluate": "eat_fairseq.cli.evaluate",
    "eat-plot": "eat_fairseq.cli.plot",
    "eat-convert": "eat_fairseq.cli.convert",
    "eat-probe": "eat_fairseq.cli.probe",
}


def test_readme_commands_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Console-script lines parse with their parsers; fairseq-hydra-train lines compose with their recipe."""
    import importlib

    pytest.importorskip("fairseq")
    from helpers import compose_recipe

    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    checked = {"cli": 0, "hydra": 0, "manifests": 0}
    for words in _commands():
        if words[0] in CLI_PARSERS:
            parser = importlib.import_module(CLI_PARSERS[words[0]]).build_parser()
            parser.parse_args([_value(w) for w in words[1:]])
            checked["cli"] += 1
        elif len(words) > 1 and words[0] == "python" and words[1].startswith("manifests/"):
            module = importlib.import_module(f"eat_fairseq.prep.{Path(words[1]).stem}")
            module.build_parser().parse_args([_value(w) for w in words[2:]])
            checked["manifests"] += 1
        if any(w.endswith("fairseq-hydra-train") or w == "$(which" for w in words):
            start = next(i for i, w in enumerate(words) if w == "--config-dir")
            config_dir, config_name = words[start + 1], words[words.index("--config-name") + 1]
            overrides = [_value(w) for w in words[start + 4 :] if "=" in w]
            cfg = compose_recipe(REPO / config_dir, config_name, overrides)
            assert cfg.common.user_dir == "/tmp/x"
            checked["hydra"] += 1
    assert checked["cli"] >= 8 and checked["hydra"] >= 8 and checked["manifests"] >= 8, checked


def test_readme_says_how_to_set_threads_view_curves_and_pass_arrays() -> None:
    for needle in ("task.num_threads", "OMP_NUM_THREADS", "--threads N", "tensorboard --logdir", "eat-plot",
                   "probe_", "data.T", "`(channels, samples)`", "--force", "checkpoints/finetune_NAME"):
        assert needle in DOCS, needle


@pytest.mark.fairseq
def test_readme_path_runs_as_written(tmp_path: Path) -> None:
    """The README's pre-train -> fine-tune -> evaluate -> plot block, run by bash as written, from a
    folder that looks like the repository root (examples/ and manifests/ linked)."""
    pytest.importorskip("fairseq")
    pytest.importorskip("matplotlib")
    block = re.search(r"<!-- readme-path: begin -->\n```bash\n(.*?)```\n<!-- readme-path: end -->", README, re.S)
    assert block, "the README's tested block is missing"
    for name in ("examples", "manifests"):
        (tmp_path / name).symlink_to(REPO / name)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONWARNINGS="ignore")
    env.pop("OMP_NUM_THREADS", None)  # the block sets it itself
    proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block.group(1)], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:]
    pre, ft = tmp_path / "checkpoints" / "eat_tiny", tmp_path / "checkpoints" / "finetune_folder_cpu"
    assert (pre / "checkpoint_last.pt").exists() and (ft / "checkpoint_best.pt").exists()
    # fine-tuning started from the pre-trained encoder (it did not try to resume the pre-training run)
    assert "encoder initialised from" in out and "Cannot load model parameters" not in out
    assert list((pre / "tb" / "train_inner").glob("*tfevents*")) and list((ft / "tb" / "valid").glob("*tfevents*"))
    result = json.loads(next(line for line in out.splitlines() if line.startswith('{"split"')))
    assert result["split"] == "valid" and result["clips"] > 0 and result["accuracy"] >= 0.8, result  # issue 23
    for png in ("eat_tiny_curves.png", "finetune_curves.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "validation metrics" in out  # eat-plot found the fine-tuning run's accuracy / mAP
