"""What `pip install .` ships: every recipe, found by eat-recipes without the source tree; no dead data."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--wheel-dir", str(out), str(REPO)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr[-500:]}")
    return next(out.glob("*.whl"))


def test_wheel_carries_every_recipe_and_nothing_dead(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = sorted(p.relative_to(REPO / "examples").as_posix() for p in (REPO / "examples").glob("*/*.yaml"))
    assert len(recipes) >= 13
    assert {f"eat_fairseq/recipes/{r}" for r in recipes} <= names
    assert not any("/config/" in n for n in names)


def test_installed_copy_finds_its_recipes(wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    script = ("import eat_fairseq, sys; from eat_fairseq.cli.recipes import main; "
              "print(eat_fairseq.__file__); sys.exit(main(['pretraining']))")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0].startswith(str(tmp_path / "site"))
    assert out[1] == str(tmp_path / "site" / "eat_fairseq" / "recipes" / "pretraining")
    assert (Path(out[1]) / "eat_base.yaml").read_bytes() == (REPO / "examples" / "pretraining" / "eat_base.yaml").read_bytes()


def test_source_tree_recipes_and_errors(capsys: pytest.CaptureFixture) -> None:
    from eat_fairseq.cli.recipes import main, recipes_dir

    assert recipes_dir("finetuning") == REPO / "examples" / "finetuning"
    assert main(["nope"]) == 2
    assert "families: finetuning, fsdd, pretraining" in capsys.readouterr().err
    assert main(["--list"]) == 0
    assert "pretraining/eat_tiny" in capsys.readouterr().out.split()
