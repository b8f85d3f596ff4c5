"""`import eat_fairseq` does not import fairseq, yet the eat_* components are registered on every path
that uses fairseq: fairseq imported after us (the README's checkpoint_utils path), fairseq loading this
package as common.user_dir, and a direct `import eat_fairseq.fairseq_ext`. Each path runs in its own
interpreter, because registration is process-wide."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

LIGHT_MODULES = ("fairseq", "fairseq_cli", "hydra", "omegaconf")

CHECK_REGISTERED = """
from fairseq.tasks import TASK_REGISTRY
from fairseq.models import MODEL_REGISTRY
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.optim import OPTIMIZER_REGISTRY
missing = [n for n, reg in (("eat_pretraining", TASK_REGISTRY), ("eat_classification", TASK_REGISTRY),
                            ("eat", MODEL_REGISTRY), ("eat_classifier", MODEL_REGISTRY),
                            ("eat_ufo", CRITERION_REGISTRY), ("eat_classification", CRITERION_REGISTRY),
                            ("eat_adam", OPTIMIZER_REGISTRY)) if n not in reg]
import fairseq
assert type(fairseq.__loader__).__name__ == "SourceFileLoader", fairseq.__loader__
assert fairseq.__spec__.loader is fairseq.__loader__
print("MISSING", missing)
"""


def _python(*parts: str) -> subprocess.CompletedProcess:
    """Run the code pieces (each dedented on its own) in a fresh interpreter."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)
    code = "\n".join(textwrap.dedent(part) for part in parts)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_is_light_and_inference_modules_never_import_fairseq() -> None:
    proc = _python(f"""
        import sys
        import eat_fairseq
        assert "torch" not in sys.modules, "import eat_fairseq should not even import torch"
        print("USER_DIR", eat_fairseq.USER_DIR)
        import eat_fairseq.cli.extract, eat_fairseq.cli.tag, eat_fairseq.cli.evaluate, eat_fairseq.cli.plot
        import eat_fairseq.cli.user_dir, eat_fairseq.inference.hear, eat_fairseq.inference.api
        assert callable(eat_fairseq.load_model)
        print("LEAKED", sorted(m for m in sys.modules if m.split(".")[0] in {LIGHT_MODULES!r}))
        """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LEAKED []" in proc.stdout, proc.stdout
    assert "FutureWarning" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.fairseq
def test_fairseq_imported_after_us_registers_everything() -> None:
    """The README's path: `import eat_fairseq`, then fairseq's checkpoint_utils."""
    pytest.importorskip("fairseq")
    proc = _python("""
        import sys
        import eat_fairseq
        assert "fairseq" not in sys.modules
        from fairseq import checkpoint_utils  # noqa: F401
        """, CHECK_REGISTERED, """
        assert not any(type(f).__name__ == "_FairseqFinder" for f in sys.meta_path), "the hook must remove itself"
        """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MISSING []" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_hook_restores_the_loader_removes_itself_and_turns_failures_into_warnings(tmp_path) -> None:
    """The import hook's mechanics, on a stand-in `fairseq` package (no real fairseq, so it is fast):
    the stand-in loads normally, the hook leaves no trace, and a registration that fails (the real
    fairseq layer cannot import from the stand-in) is a warning, never a failed `import fairseq`.
    The success paths with the real fairseq: the test above (README path) and every fairseq-hydra-train
    test (common.user_dir: fairseq first, then this package)."""
    fake = tmp_path / "fairseq"
    fake.mkdir()
    (fake / "__init__.py").write_text("VALUE = 42\n")
    proc = _python(f"""
        import sys, warnings
        sys.path.insert(0, {str(tmp_path)!r})
        import eat_fairseq
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fairseq
        assert fairseq.VALUE == 42 and fairseq.__file__.startswith({str(tmp_path)!r})
        assert type(fairseq.__loader__).__name__ == "SourceFileLoader", fairseq.__loader__
        assert fairseq.__spec__.loader is fairseq.__loader__
        assert not any(type(f).__name__ == "_FairseqFinder" for f in sys.meta_path)
        print("WARNED", [str(w.message) for w in caught if w.category is RuntimeWarning])
        """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registering the eat_* fairseq components failed" in proc.stdout, proc.stdout
