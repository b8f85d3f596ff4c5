"""Every Python and shell snippet of README.md and docs/*.md is executed, or listed here with the reason it
cannot run on a test machine and then at least parsed, so an error in the documentation fails the suite.

- ``COVERAGE`` names each fenced ``python`` / ``bash`` / ``sh`` / ``shell`` / ``console`` block by a line it
  contains: ``RUN`` (run below, in document order, page by page), ``README_PATH`` (the README's tested block,
  run by ``test_readme.py``) or the reason it cannot run here. A block missing from the table, or an entry
  that matches no block, fails ``test_every_snippet_is_run_or_listed``.
- Runnable snippets are run verbatim from a scratch folder that holds tiny stand-ins at the paths they name
  (a tiny pre-training and a tiny fine-tuned checkpoint under the documented file names, a few generated
  sounds, miniature AudioSet / ESC-50 / Speech Commands / FSDD layouts); absolute ``/data/`` and ``/ckpt/``
  paths are moved into that folder. Names a Python snippet takes from the surrounding text (``audio``,
  ``fbank``, ...) are defined by a prelude.
- The other snippets are parsed: Python with ``compile``, shell with ``bash -n`` and every command line by
  what it runs (the console scripts' parsers, the recipe composed with its overrides, a script's own
  argparse, a make target of the Makefile).
- Besides: the layout lists name every file of the folders they enumerate, and inline code that passes a
  keyword of the Python API passes it to a function that takes it.

experiments.md and ablations.md are left out: they record the commands of past experiments.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import soundfile as sf

from helpers import BIN, REPO

RECORDS = ("experiments.md", "ablations.md")  # records of past experiments and their commands
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md") if p.name not in RECORDS)]
LANGUAGES = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell", "console": "shell"}

RUN = "run"
README_PATH = "run by tests/e2e/test_readme.py::test_readme_path_runs_as_written"
ONLY_PARSED_REASONS = {
    "setup": "sets up .venv: installs packages from the network and runs the whole suite or the demo "
             "(the demo runs in tests/e2e/test_demo.py)",
    "gpu": "trains EAT-base/large on AudioSet-scale data with GPUs (days)",
    "cluster": "needs several GPU nodes",
    "ddp_cpu": "two training processes for the recipe's full run (minutes on two cores); these overrides run "
               "in tests/e2e with helpers.DDP_CPU_OVERRIDES",
    "pool": "downloads Debian packages as root and clones FSDD (network), then hours of CPU training",
    "hours": "runs for minutes to hours of CPU (the drivers are tested on tiny inputs in tests/tools)",
    "folder_cpu": "trains for a minute; the same commands run in the README's block (tests/e2e/test_readme.py) "
                  "and, shortened, in tests/e2e/test_folder_recipe.py",
}

# (page, a line of the block) -> RUN, README_PATH or a reason it cannot run here
COVERAGE: dict[tuple[str, str], str] = {
    ("README.md", "make demo"): ONLY_PARSED_REASONS["setup"],
    ("README.md", "python3.11 -m venv .venv"): ONLY_PARSED_REASONS["setup"],
    ("README.md", "python -m eat_fairseq.cli.demo --corpus-only sounds"): README_PATH,
    ("README.md", 'm = load_model("eat_base_pt.pt")'): RUN,
    ("README.md", "--config-name eat_base"): ONLY_PARSED_REASONS["gpu"],
    ("README.md", "--config-name as20k"): ONLY_PARSED_REASONS["gpu"],
    ("docs/checkpoints.md", "eat-convert EAT-base_epoch10_pt.pt eat_base_pt.pt"): RUN,
    ("docs/checkpoints.md", "checkpoint_utils.load_model_ensemble_and_task"): RUN,
    ("docs/data.md", "python manifests/audio_folder.py /data/my_audio"): RUN,
    ("docs/data.md", "python manifests/windows.py manifests/my_audio"): RUN,
    ("docs/data.md", "python manifests/pack.py manifests/as2m"): RUN,
    ("docs/finetuning.md", "--config-name as2m"): ONLY_PARSED_REASONS["gpu"],
    ("docs/finetuning.md", "python experiments/finetune_compare.py"): ONLY_PARSED_REASONS["hours"],
    ("docs/finetuning.md", "--config-name folder_cpu"): ONLY_PARSED_REASONS["folder_cpu"],
    ("docs/inference.md", "eat-extract --checkpoint eat_base_pt.pt data/audio/"): RUN,
    ("docs/inference.md", 'm.extract(stereo_44k'): RUN,
    ("docs/inference.md", "eat-export eat_base_pt.pt eat_base.onnx"): RUN,
    ("docs/inference.md", 'm = load_model("eat_base_int8.onnx")'): RUN,
    ("docs/inference.md", "import eat_fairseq.inference.hear as hear"): RUN,
    ("docs/pretraining.md", "# EAT-base, the release's settings"): ONLY_PARSED_REASONS["gpu"],
    ("docs/pretraining.md", "torchrun --nnodes=M"): ONLY_PARSED_REASONS["cluster"],
    ("docs/pretraining.md", "torchrun --nproc_per_node=2"): ONLY_PARSED_REASONS["ddp_cpu"],
    ("docs/pretraining.md", "experiments/build_pretrain_pool.py --out /data/pool"): ONLY_PARSED_REASONS["pool"],
    ("docs/pretraining.md", "eat-probe --data data/fsdd_speakers"): RUN,
    ("docs/pretraining.md", "eat-plot checkpoints/eat_tiny"): RUN,
    ("docs/testing.md", "make test-all"): ONLY_PARSED_REASONS["setup"],
    ("docs/testing.md", "python benchmarks/features.py"): ONLY_PARSED_REASONS["hours"],
    ("docs/testing.md", "python experiments/learning.py"): ONLY_PARSED_REASONS["hours"],
    ("docs/testing.md", "python tools/fingerprint.py --record"): ONLY_PARSED_REASONS["hours"],
}

# names a Python snippet takes from the text around it; private names so that the prelude's own imports
# cannot stand in for an import the snippet forgot
PRELUDES: dict[str, str] = {
    "m.extract(stereo_44k": "import numpy as _np\n"
                            "stereo_44k = 0.1 * _np.random.default_rng(0).standard_normal((2, 44100)).astype('float32')\n",
    "checkpoint_utils.load_model_ensemble_and_task": "import torch as _torch\nfbank = _torch.randn(2, 128, 128)\n",
    "import eat_fairseq.inference.hear as hear": "import numpy as _np\n"
                                                 "audio = 0.1 * _np.random.default_rng(0).standard_normal((2, 16000))"
                                                 ".astype('float32')\n",
}


@dataclass(frozen=True)
class Snippet:
    page: str
    line: int
    language: str  # "python" or "shell"
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(line of the opening fence, info string, body)`` of every fenced block of a markdown text."""
    blocks = []
    for match in re.finditer(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M):
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1).lower(), match.group(2)))
    return blocks


def console_commands(body: str) -> str:
    """The commands of a ``console`` block: its ``$ ``-prompted lines (the rest is output)."""
    return "".join(line[2:] + "\n" for line in body.splitlines() if line.startswith("$ "))


def snippets() -> list[Snippet]:
    found = []
    for page in PAGES:
        for line, info, body in fenced_blocks((REPO / page).read_text(encoding="utf-8")):
            if info in LANGUAGES:
                found.append(Snippet(page, line, LANGUAGES[info], console_commands(body) if info == "console" else body))
    return found


def coverage_of(snippet: Snippet) -> list[tuple[tuple[str, str], str]]:
    return [(key, how) for key, how in COVERAGE.items() if key[0] == snippet.page and key[1] in snippet.text]


def covered(how: str) -> list[Snippet]:
    return [s for s in snippets() if [h for _, h in coverage_of(s)] == [how]]


def test_every_snippet_is_run_or_listed() -> None:
    """Each block has exactly one entry, each entry one block: a new snippet must be run or given a reason."""
    found = snippets()
    assert len(found) >= 25, [str(s) for s in found]
    for snippet in found:
        entries = coverage_of(snippet)
        assert len(entries) == 1, (f"{snippet} ({snippet.language}) must be run or listed in COVERAGE with a reason, "
                                   f"exactly once; matching entries: {entries}\n{snippet.text}")
    for key in COVERAGE:
        matches = [str(s) for s in found if s.page == key[0] and key[1] in s.text]
        assert len(matches) == 1, f"COVERAGE entry {key} matches {matches or 'no snippet'}"
    assert set(PRELUDES) <= {needle for (_, needle), how in COVERAGE.items() if how == RUN}


# ------------------------------------------------------------------------------------------------
# parsing: every snippet, run or not


def command_lines(shell: str) -> list[list[str]]:
    """Command lines of a shell snippet: continuations joined, comments dropped, ``&&`` lists split, leading
    ``VAR=value`` assignments removed (an assignment alone is no command, nor is ``VAR=$(...)``)."""
    commands = []
    for line in shell.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#") or re.fullmatch(r"[A-Za-z_]\w*=\$\(.*\)", line):
            continue  # a comment, or a variable set from a command's output (USER_DIR=$(eat-user-dir))
        for part in line.split("&&"):
            words = shlex.split(part)
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                words = words[1:]
            if words and words[0] != "export":
                commands.append(words)
    return commands


def _placeholder(word: str) -> str:
    """A value as the shell would pass it, with the docs' variables filled in (as test_readme does)."""
    from test_readme import _value

    return _value(word)


from test_readme import CLI_PARSERS  # noqa: E402  (the console scripts whose parsers check command lines)
EXTERNAL = {"git", "tensorboard", ".", "source", "python3.11"}  # nothing of ours to parse

# runs each script's own argparse on its arguments and stops right after parsing (no work is done)
PARSE_DRIVER = r"""
import argparse, json, runpy, sys
class Parsed(Exception):
    pass
parse_args = argparse.ArgumentParser.parse_args
def stop_after_parsing(self, args=None, namespace=None):
    parse_args(self, args, namespace)
    raise Parsed
argparse.ArgumentParser.parse_args = stop_after_parsing
results = []
for target, argv in json.loads(sys.argv[1]):
    sys.argv = [target, *argv]
    try:
        if target.endswith(".py"):
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        results.append("finished without parsing arguments")
    except Parsed:
        results.append("ok")
    except SystemExit as exc:
        results.append(f"argparse refused the arguments (exit {exc.code})")
    except BaseException as exc:
        results.append(f"{type(exc).__name__}: {exc}")
print(json.dumps(results))
"""


def parse_command(words: list[str], scripts: list[tuple[str, list[str]]]) -> None:
    """Parse one command line in-process, or queue a script for the parse driver; unknown commands fail."""
    from helpers import compose_recipe

    if any(w.endswith("fairseq-hydra-train") or w == "$(which" for w in words):
        start = words.index("--config-dir")
        overrides = [_placeholder(w) for w in words[start + 4:] if "=" in w]
        compose_recipe(REPO / words[start + 1], words[words.index("--config-name") + 1], overrides)
    elif words[0] in CLI_PARSERS:
        importlib.import_module(CLI_PARSERS[words[0]]).build_parser().parse_args([_placeholder(w) for w in words[1:]])
    elif words[0] in ("python", "python3") and words[1] == "-m" and words[2] != "venv":
        scripts.append((words[2], [_placeholder(w) for w in words[3:]]))
    elif words[0] in ("python", "python3"):
        assert (REPO / words[1]).is_file(), f"{words[1]} does not exist"
        scripts.append((words[1], [_placeholder(w) for w in words[2:]]))
    elif words[0] == "make":
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
        assert set(words[1:]) <= targets, f"make {words[1:]}: the Makefile has {sorted(targets)}"
    elif words[0] == "pip":
        for i, word in enumerate(words[:-1]):
            if word == "-r":
                assert (REPO / words[i + 1]).is_file(), f"pip -r {words[i + 1]}: no such file"
    else:
        assert words[0] in EXTERNAL, f"no rule parses {words[0]!r}: add one to test_doc_snippets.parse_command"


def test_every_snippet_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python snippets compile; shell snippets pass ``bash -n`` and each of their commands parses."""
    pytest.importorskip("fairseq")
    for name, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    scripts: list[tuple[str, list[str]]] = []
    origin: list[str] = []
    for snippet in snippets():
        if snippet.language == "python":
            compile(snippet.text, str(snippet), "exec")
            continue
        proc = subprocess.run(["bash", "-n"], input=snippet.text, capture_output=True, text=True)
        assert proc.returncode == 0, f"{snippet}: {proc.stderr}"
        for words in command_lines(snippet.text):
            before = len(scripts)
            try:
                parse_command(words, scripts)
            except (AssertionError, Exception, SystemExit) as exc:
                raise AssertionError(f"{snippet}: {' '.join(words)}: {exc}") from exc
            origin += [f"{snippet}: {' '.join(words)}"] * (len(scripts) - before)
    proc = subprocess.run([sys.executable, "-c", PARSE_DRIVER, json.dumps(scripts)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = [f"{where}: {result}" for where, result in zip(origin, results) if result != "ok"]
    assert not failed, "\n".join(failed) + "\n" + proc.stderr[-3000:]
    assert len(results) >= 20, results


# ------------------------------------------------------------------------------------------------
# running


def _wav(path: Path, seconds: float = 1.0, sr: int = 16000, seed: int = 0, fmt: Optional[str] = None) -> None:
    from test_api import tone

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(seconds, sr=sr, seed=seed), sr, format=fmt)


def _manifest_with_labels(folder: Path, audio: Path, names: list[str], labels: list[str]) -> None:
    """``train.tsv`` + ``train.lbl`` over existing files of ``audio``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"{name}\t{sf.info(str(audio / name)).frames}" for name in names]
    (folder / "train.tsv").write_text("\n".join([str(audio), *rows]) + "\n")
    (folder / "train.lbl").write_text("".join(f"{Path(n).with_suffix('')}\t{lab}\n" for n, lab in zip(names, labels)))


def _run_log(folder: Path, fine_tuning: bool) -> None:
    """A run folder as fairseq-hydra-train leaves it for eat-plot: its log lines (json format)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for update in range(1, 7):
        stats = {"epoch": 1 + update // 3, "loss": f"{3.0 - 0.2 * update:.3f}", "num_updates": str(update),
                 "lr": f"{5e-5 * update:.6g}"}
        if not fine_tuning:
            stats.update({"frame_loss": f"{2.0 - 0.1 * update:.3f}", "utterance_loss": "1.0"})
        lines.append(f"[2026-12-04 10:00:0{update},000][train_inner][INFO] - {json.dumps(stats)}")
    if fine_tuning:
        lines.append('[2026-12-04 10:00:09,000][valid][INFO] - {"epoch": 2, "valid_loss": "1.5", '
                     '"valid_accuracy": "0.5", "valid_mAP": "0.6", "valid_num_updates": "6"}')
    (folder / "hydra_train.log").write_text("\n".join(lines) + "\n")


def write_deep_pretrained(path: Path) -> None:
    """A pre-training checkpoint of D 64 with EAT-base's 12 blocks, since the docs read block 8."""
    import torch

    from eat_fairseq.checkpoints.convert import build_checkpoint
    from eat_fairseq.model.encoder import EncoderConfig
    from eat_fairseq.model.pretraining import EATPretrainingModel, PretrainConfig

    torch.manual_seed(0)
    cfg = PretrainConfig.tiny(encoder=EncoderConfig.tiny(depth=12))
    model = EATPretrainingModel(cfg)
    torch.save(build_checkpoint("pretrained", model.state_dict(), cfg, task_overrides={"target_length": 128}), path)


def _base(root: Path) -> None:
    """What several pages name: the two checkpoints and a few sounds."""
    from test_api import write_classifier

    write_deep_pretrained(root / "eat_base_pt.pt")
    write_classifier(root / "eat_base_as2m.pt", multi_label=True)
    for name, seconds in (("clip.wav", 1.5), ("extra.wav", 1.0), ("clip1.wav", 1.2), ("clip2.wav", 0.8)):
        _wav(root / name, seconds, seed=len(name))
    _wav(root / "long.flac", 3.0, sr=22050, fmt="FLAC")


def _setup_checkpoints(root: Path) -> None:
    from test_convert import _hf_state, _random_fill, released_finetuned_state, released_pretrained_state, write_released
    from safetensors.torch import save_file

    write_released(root / "EAT-base_epoch10_pt.pt", "pretrained", released_pretrained_state(64, 2, 2, 3, _random_fill(1)),
                   heads=4)
    labels = {f"/m/c{i}": str(i) for i in range(3)}
    write_released(root / "EAT-base_epoch10_ft_AS2M.pt", "finetuned", released_finetuned_state(64, 2, 3, _random_fill(2)),
                   labels=labels, heads=4)
    save_file(_hf_state(64, 2, 3, _random_fill(3)), str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"num_heads": 4, "id2label": {str(i): f"c{i}" for i in range(3)}}))
    shutil.copy(root / "eat_base_pt.pt", root / "ours.pt")
    shutil.copy(root / "eat_base_pt.pt", root / "checkpoint_last.pt")
    for written_by_the_page in ("eat_base_pt.pt", "eat_base_as2m.pt"):
        (root / written_by_the_page).unlink()


def _fake_esc50(base: Path) -> None:
    rows = []
    for fold in (1, 2):
        for target, category in enumerate(("dog", "rain")):
            for take in "AB":
                name = f"{fold}-{100 + target}-{take}-{target}.wav"
                rows.append(f"{name},{fold},{target},{category},False,{100 + target},{take}")
                _wav(base / "audio" / name, 0.5, sr=44100, seed=fold * 10 + target + ord(take))
    (base / "meta").mkdir(parents=True, exist_ok=True)
    (base / "meta" / "esc50.csv").write_text("filename,fold,target,category,esc10,src_file,take\n" + "\n".join(rows) + "\n")


def _fake_fsdd(recordings: Path) -> None:
    for digit in range(3):
        for speaker in ("jackson", "theo", "lucas"):
            for take in (1, 7, 20):
                _wav(recordings / f"{digit}_{speaker}_{take}.wav", 0.4, sr=8000, seed=digit * 100 + take + len(speaker))


def _setup_data(root: Path) -> None:
    data = root / "data"
    for i in range(6):
        _wav(data / "my_audio" / f"sub{i % 2}" / f"a{i}.wav", 0.6 + 0.1 * i, seed=i)
    # AudioSet: segment lists, the class index and clips named as on disk
    classes = [("/m/speech", "Speech"), ("/m/music", "Music"), ("/m/dog", "Dog")]
    (root / "class_labels_indices.csv").write_text(
        "index,mid,display_name\n" + "".join(f'{i},{mid},"{name}"\n' for i, (mid, name) in enumerate(classes)))
    header = "# YTID, start_seconds, end_seconds, positive_labels\n"
    (root / "balanced_train_segments.csv").write_text(
        header + '--aaaaaaaaa, 30.000, 40.000, "/m/speech,/m/music"\nbbbbbbbbbbb, 0.000, 10.000, "/m/dog"\n')
    (root / "eval_segments.csv").write_text(header + 'ccccccccccc, 5.000, 15.000, "/m/music"\n')
    _wav(data / "audioset" / "audio" / "--aaaaaaaaa_30.000.wav", 0.5, seed=1)
    _wav(data / "audioset" / "audio" / "Ybbbbbbbbbbb.flac", 0.5, seed=2, fmt="FLAC")
    _wav(data / "audioset" / "audio" / "ccccccccccc.wav", 0.5, seed=3)
    _fake_esc50(data / "ESC-50-master")
    spc = data / "speech_commands_v0.02"
    for word in ("yes", "no"):
        for speaker in ("aa11_nohash_0", "bb22_nohash_0", "cc33_nohash_0"):
            _wav(spc / word / f"{speaker}.wav", 0.3, seed=len(word) + ord(speaker[0]))
    (spc / "validation_list.txt").write_text("yes/bb22_nohash_0.wav\n")
    (spc / "testing_list.txt").write_text("no/cc33_nohash_0.wav\n")
    for cls in ("cat", "dog"):
        for i in range(6):
            _wav(data / "my_classes" / cls / f"{cls}{i}.wav", 0.4, seed=i + len(cls))
    _fake_fsdd(data / "free-spoken-digit-dataset" / "recordings")
    names = [f"sub{i % 2}/a{i}.wav" for i in range(6)]
    _manifest_with_labels(root / "manifests" / "as2m", data / "my_audio", names, ["/m/speech", "/m/music"] * 3)
    _manifest_with_labels(root / "data" / "as2m", data / "my_audio", names, ["/m/speech,/m/dog", "/m/music"] * 3)


def _setup_inference(root: Path) -> None:
    from test_api import LABELS

    for i in range(3):
        _wav(root / "data" / "audio" / f"x{i}.wav", 1.0 + 0.2 * i, seed=10 + i)
        _wav(root / "clips" / f"c{i}.wav", 0.9, seed=20 + i)
    (root / "manifests" / "train.tsv").write_text(
        f"{root / 'data' / 'audio'}\n" + "".join(f"x{i}.wav\t{16000 + 3200 * i}\n" for i in range(3)))
    (root / "class_labels_indices.csv").write_text(
        "index,mid,display_name\n" + "".join(f'{i},{label},"A {label}"\n' for i, label in enumerate(LABELS)))


def _setup_pretraining(root: Path) -> None:
    from eat_fairseq.prep import esc50

    _fake_fsdd(root / "data" / "free-spoken-digit-dataset" / "recordings")
    (root / "checkpoints" / "eat_small").mkdir(parents=True)
    shutil.copy(root / "eat_base_pt.pt", root / "checkpoints" / "eat_small" / "checkpoint_last.pt")
    _fake_esc50(root / "esc50_source")
    assert esc50.main([str(root / "esc50_source"), "--dest", str(root / "data" / "esc50"), "--workers", "1", "--quiet"]) == 0
    _run_log(root / "checkpoints" / "eat_tiny", fine_tuning=False)
    _run_log(root / "checkpoints" / "finetune_tiny", fine_tuning=True)


PAGE_SETUP: dict[str, Callable[[Path], None]] = {
    "README.md": lambda root: None,
    "docs/checkpoints.md": _setup_checkpoints,
    "docs/data.md": _setup_data,
    "docs/inference.md": _setup_inference,
    "docs/pretraining.md": _setup_pretraining,
}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files every page's snippets name (checkpoints, sounds) and the thin manifest scripts."""
    root = tmp_path_factory.mktemp("stand_ins")
    _base(root)
    (root / "manifests").mkdir()
    for script in (REPO / "manifests").glob("*.py"):
        shutil.copy(script, root / "manifests" / script.name)
    return root


def _in_scratch(text: str, scratch: Path) -> str:
    """Absolute example folders moved into the scratch folder."""
    return re.sub(r"(?<![\w.$/-])/(data|ckpt)/", lambda m: f"{scratch}/{m.group(1)}/", text)


def run_snippet(snippet: Snippet, scratch: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
    text = _in_scratch(snippet.text, scratch)
    if snippet.language == "python":
        prelude = next((code for needle, code in PRELUDES.items() if needle in snippet.text), "")
        script = scratch / f"snippet_{Path(snippet.page).stem}_{snippet.line}.py"
        script.write_text(prelude + text)
        cmd = [sys.executable, str(script)]
    else:
        cmd = ["bash", "-c", "set -euo pipefail\n" + text]
    return subprocess.run(cmd, cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)


@pytest.mark.parametrize("page", sorted(PAGE_SETUP))
def test_snippets_run_as_written(page: str, stand_ins: Path, tmp_path: Path) -> None:
    """The page's runnable snippets, in document order, in one scratch folder (a later snippet may use what an
    earlier one wrote, as a reader going down the page would)."""
    todo = [s for s in covered(RUN) if s.page == page]
    assert todo, f"{page} has no runnable snippet: drop it from PAGE_SETUP"
    if any("onnx" in s.text for s in todo):
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    if any("fairseq" in s.text for s in todo):
        pytest.importorskip("fairseq")
    scratch = tmp_path / "scratch"
    shutil.copytree(stand_ins, scratch)
    PAGE_SETUP[page](scratch)
    for snippet in todo:
        proc = run_snippet(snippet, scratch)
        assert proc.returncode == 0, f"{snippet} failed ({proc.returncode}):\n{snippet.text}\n--- output ---\n{proc.stdout[-5000:]}"


def test_every_page_with_runnable_snippets_has_a_setup() -> None:
    assert {s.page for s in covered(RUN)} == set(PAGE_SETUP)


# ------------------------------------------------------------------------------------------------
# the layout lists and the Python API's keywords in the prose


def layout_lines() -> list[tuple[str, str, str]]:
    """``(page, folder, description)`` of every line of the layout lists (README's and DESIGN.md's plain
    fenced blocks whose lines start with a repository folder)."""
    found = []
    for page in ("README.md", "docs/DESIGN.md"):
        for _, info, body in fenced_blocks((REPO / page).read_text(encoding="utf-8")):
            folder = ""
            for line in body.splitlines():
                match = re.match(r"^(\S+/)\s+(.*)$", line)
                if info == "" and match:
                    folder = match.group(1)
                    found.append((page, folder, match.group(2)))
                elif info == "" and folder and line.startswith(" "):
                    page_, folder_, text = found[-1]
                    found[-1] = (page_, folder_, f"{text} {line.strip()}")
    return found


def test_layout_lists_name_every_file_of_the_folders_they_enumerate() -> None:
    """A layout line that names files of its folder (recipes, modules) names all of them, unless it says
    ``...``: the README's list of recipes once left out eat_small.yaml."""
    lines = layout_lines()
    assert any(folder == "examples/" for _, folder, _ in lines) and len(lines) >= 15, lines
    for page, folder, text in lines:
        path = REPO / folder
        assert path.is_dir(), f"{page}: the layout names {folder}, which does not exist"
        if not folder.startswith(("eat_fairseq/", "examples/")):
            continue
        files = {p.name: p.stem for p in path.iterdir() if p.suffix in (".py", ".yaml") and p.name != "__init__.py"}
        words = set(re.findall(r"[\w.]+", text))
        named = {name for name, stem in files.items() if name in words or stem in words}
        if len(named) >= 2 and "..." not in text:
            missing = sorted(set(files) - named)
            assert not missing, f"{page}: the layout line of {folder} names {sorted(named)} but not {missing}"


API_PAGES = ("README.md", "docs/inference.md")  # the pages that document the Python API


def api_functions() -> dict[str, Callable]:
    from eat_fairseq.inference import hear
    from eat_fairseq.inference.api import EATModelHandle, load_model

    return {"load_model": load_model, "extract": EATModelHandle.extract, "predict": EATModelHandle.predict,
            "predict_scores": EATModelHandle.predict_scores, "hear.load_model": hear.load_model,
            "get_scene_embeddings": hear.get_scene_embeddings, "get_timestamp_embeddings": hear.get_timestamp_embeddings}


def _called_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        owner = func.value.id if isinstance(func.value, ast.Name) else ""
        return f"{owner}.{func.attr}" if owner == "hear" else func.attr
    return func.id if isinstance(func, ast.Name) else ""


def test_api_keywords_in_the_prose_belong_to_the_call_that_takes_them() -> None:
    """Inline code that calls the Python API passes only keywords the called function takes, and the prose of the
    API's pages never names a keyword alone (a reader put ``use_teacher=True``, a ``load_model`` argument, into
    ``extract``): it writes the call, e.g. ``load_model(path, use_teacher=True)``."""
    functions = api_functions()
    keywords = {name for f in functions.values() for name in inspect.signature(f).parameters} - {"self", "audio"}
    checked = 0
    for page in PAGES:
        text = (REPO / page).read_text(encoding="utf-8")
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        for span in re.findall(r"`([^`\n]+)`", prose):
            try:
                tree = ast.parse(span.strip(), mode="eval")
            except SyntaxError:
                continue
            node = tree.body
            if isinstance(node, ast.Call) and _called_name(node) in functions:
                accepted = inspect.signature(functions[_called_name(node)]).parameters
                for kw in node.keywords:
                    assert kw.arg in accepted, f"{page}: `{span}`: {_called_name(node)} takes no {kw.arg}"
                checked += 1
        if page in API_PAGES:
            for line in prose.splitlines():
                if line.startswith("|"):
                    continue  # a table row documents the function named in its first cell
                for span in re.findall(r"`([a-z_]+)=[^`]*`", line):
                    assert span not in keywords, (f"{page}: `{span}=...` alone in the prose; write the call that "
                                                  f"takes it, e.g. `load_model(path, {span}=...)`:\n{line}")
    assert checked >= 3
