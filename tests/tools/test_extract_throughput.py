"""benchmarks/extract_throughput.py's header names the CPU's int8 instructions (what decides int8 speed)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "extract_throughput.py"


def _load():
    pytest.importorskip("onnxruntime")
    spec = importlib.util.spec_from_file_location("extract_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "flags, label",
    [
        ("fpu sse2 avx2 avx512f avx512_vnni", "AVX512-VNNI"),
        ("fpu avx2 avx_vnni amx_int8 amx_tile", "AVX-VNNI, AMX-INT8"),
        ("fpu sse2 avx2", "no VNNI flag"),
        (None, "no VNNI flag"),
    ],
)
def test_header_names_the_int8_instructions(tmp_path: Path, flags: str | None, label: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert _load().int8_features(str(cpuinfo)) == label
