"""ONNX export and the onnxruntime backend: eat-export -> load_model / eat-extract / eat-tag / HEAR give
the .pt's outputs; metadata round trip; int8 and its measured cost; a clear error without onnxruntime."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import eat_fairseq.inference.hear as hear
from eat_fairseq.checkpoints.convert import convert_to_released
from eat_fairseq.checkpoints.load import CheckpointError
from eat_fairseq.cli.export import main as export_main
from eat_fairseq.cli.extract import main as extract_main
from eat_fairseq.cli.tag import main as tag_main
from eat_fairseq.inference.api import GRANULARITIES, EATModelHandle, ModelLoadError, load_model
from eat_fairseq.inference.onnx_backend import OnnxMetadata, OnnxModelHandle, OnnxUnavailableError
from eat_fairseq.inference.onnx_export import ExportReport, export_onnx

from test_api import LABELS, WINDOW, tone, write_classifier, write_pretrained

RTOL = 1e-4  # the promise: fp32 .onnx outputs within 1e-4 (relative to the output scale) of the .pt's


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = float(np.abs(want).max()) or 1.0
    assert float(np.abs(got - want).max()) <= RTOL * scale


def clips() -> list[np.ndarray]:
    """A short clip, one of exactly one window and one of three windows (the last padded)."""
    return [tone(0.7, seed=3), tone(WINDOW * 0.01 + 0.015, seed=4), tone(3.1, seed=5)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx")
    out = {"pre.pt": write_pretrained(d / "pre.pt"), "single.pt": write_classifier(d / "single.pt", multi_label=False)}
    out["reports"] = {}  # type: ignore[assignment]
    for name, src, kwargs in (
        ("pre.onnx", "pre.pt", {}),
        ("pre_int8.onnx", "pre.pt", {"int8": True}),
        ("pre_layer0.onnx", "pre.pt", {"layer": 0}),
        ("single.onnx", "single.pt", {}),
    ):
        out["reports"][name] = export_onnx(load_model(out[src]), d / name, **kwargs)  # type: ignore[index]
        out[name] = d / name
    return out


def test_export_writes_one_file_and_reports(files: dict) -> None:
    report: ExportReport = files["reports"]["pre.onnx"]
    assert report.path == str(files["pre.onnx"]) and report.size_bytes == files["pre.onnx"].stat().st_size
    assert not report.int8 and report.layer == 1 and report.depth == 2 and report.check_windows >= 4
    assert report.fp32_relative < 1e-5
    assert sorted(p.name for p in files["pre.onnx"].parent.iterdir() if p.name.startswith(".")) == []  # no temp left
    assert "fp32 graph against PyTorch" in "\n".join(report.lines())


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_same_embeddings_as_the_checkpoint(files: dict, granularity: str) -> None:
    pt, ox = load_model(files["pre.pt"]), load_model(files["pre.onnx"])
    assert isinstance(ox, OnnxModelHandle) and not ox.int8
    for want, got in zip(pt.extract(clips(), granularity=granularity), ox.extract(clips(), granularity=granularity)):
        if granularity == "all":
            assert set(got) == set(want)
            for key in want:
                assert_close(got[key], want[key])
        else:
            assert_close(got, want)


def test_dynamic_batch_and_length(files: dict) -> None:
    """The graph takes any batch and any whole number of patches, not only the export's shape."""
    pt, ox = load_model(files["pre.pt"]), load_model(files["pre.onnx"])
    for batch, frames in ((1, 16), (3, WINDOW), (2, 4 * WINDOW)):
        fbank = torch.randn(batch, frames, 128)
        with torch.no_grad():
            assert_close(ox.encoder.extract_features(fbank).numpy(), pt.encoder.extract_features(fbank).numpy())
    with pytest.raises(ValueError, match="multiple of 16"):
        ox.encoder.extract_features(torch.randn(1, 20, 128))


def test_exported_layer(files: dict) -> None:
    pt, ox = load_model(files["pre.pt"]), load_model(files["pre_layer0.onnx"])
    assert ox.exported_layer == 0 and ox.num_layers == 2
    x = clips()[2]
    assert_close(ox.extract(x, granularity="frame"), pt.extract(x, granularity="frame", layer=0))
    assert_close(ox.extract(x, layer=-2), pt.extract(x, layer=0))
    with pytest.raises(ValueError, match="holds block 0 only.*--layer 1"):
        ox.extract(x, layer=1)
    with pytest.raises(ValueError, match="holds block 0 only"):
        ox.check_layer(-1)
    hidden = ox.encoder.hidden_states(torch.zeros(1, WINDOW, 128), num_blocks=1)
    assert len(hidden) == 1 and hidden[0].shape == (1, 1 + WINDOW // 16 * 8, 64)
    with pytest.raises(ValueError, match="holds block 1 only"):
        load_model(files["pre.onnx"]).encoder.hidden_states(torch.zeros(1, WINDOW, 128), num_blocks=1)
    placeholder = load_model(files["pre.onnx"]).encoder.hidden_states(torch.zeros(1, WINDOW, 128))[0]
    with pytest.raises(ValueError, match="block 0 is not in this .onnx file"):
        placeholder.float()


def test_fine_tuned_tags_equal(files: dict) -> None:
    pt, ox = load_model(files["single.pt"]), load_model(files["single.onnx"])
    assert ox.kind == "classifier" and ox.labels == LABELS and ox.multi_label is False
    for aggregate in ("mean", "max"):
        for want, got in zip(
            pt.predict_scores(clips(), aggregate=aggregate), ox.predict_scores(clips(), aggregate=aggregate)
        ):
            assert_close(got, want)
    assert [label for label, _ in ox.predict(clips()[2], top_k=None)] == [
        label for label, _ in pt.predict(clips()[2], top_k=None)
    ]
    assert_close(ox.extract(clips()[0]), pt.extract(clips()[0]))  # a fine-tuned file embeds too


def test_released_and_multi_label_checkpoints_export(files: dict, tmp_path: Path) -> None:
    """Export starts from whatever load_model reads: here the authors' layout of a multi-label model."""
    multi = write_classifier(tmp_path / "multi.pt", multi_label=True)
    released, _ = convert_to_released(torch.load(multi, weights_only=True))
    torch.save(released, tmp_path / "released.pt")
    export_onnx(load_model(tmp_path / "released.pt"), tmp_path / "released.onnx")
    pt, ox = load_model(multi), load_model(tmp_path / "released.onnx")
    assert ox.multi_label is True and ox.labels == LABELS
    assert_close(ox.predict_scores(clips()[1]), pt.predict_scores(clips()[1]))


def test_metadata_round_trip(files: dict, tmp_path: Path) -> None:
    pt, ox = load_model(files["single.pt"]), load_model(files["single.onnx"])
    assert ox.feature_cfg == pt.feature_cfg and ox.feature_cfg.target_length == WINDOW
    assert ox.encoder.cfg == pt.encoder.cfg
    meta = ox.metadata
    assert meta.source == "single.pt" and meta.pooling == "cls" and not meta.int8 and meta.layer == 1
    assert OnnxMetadata.from_props(meta.to_props(), "x") == meta
    assert all(key.startswith("eat.") for key in meta.to_props())
    # a different window and normalisation travel too
    esc = write_classifier(
        tmp_path / "esc.pt", task_extra={"target_length": 64, "norm_mean": -6.627, "norm_std": 5.359}
    )
    export_onnx(load_model(esc), tmp_path / "esc.onnx")
    again = load_model(tmp_path / "esc.onnx")
    assert (again.window_frames, again.feature_cfg.norm_mean, again.feature_cfg.norm_std) == (64, -6.627, 5.359)
    with pytest.raises(ModelLoadError, match="newer eat-export"):
        OnnxMetadata.from_props({**meta.to_props(), "eat.format": "99"}, "x.onnx")
    with pytest.raises(ModelLoadError, match="without EAT metadata"):
        OnnxMetadata.from_props({}, "x.onnx")


def test_foreign_and_broken_files(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "foreign.onnx")
    with pytest.raises(CheckpointError, match="foreign.onnx: an ONNX file without EAT metadata"):
        load_model(tmp_path / "foreign.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(CheckpointError, match="junk.onnx: onnxruntime cannot load it"):
        load_model(tmp_path / "junk.onnx")
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "missing.onnx")


def test_attention_is_fused_unless_portable(files: dict, tmp_path: Path) -> None:
    """Default: one onnxruntime MultiHeadAttention node per block, no Softmax; --portable: standard ops
    only. Both give the .pt's outputs; the export leaves the model's own forward as it was."""
    import onnx

    handle = load_model(files["pre.pt"])
    portable = export_onnx(handle, tmp_path / "portable.onnx", portable=True)
    fused_ops = [n.op_type for n in onnx.load(str(files["pre.onnx"])).graph.node]
    plain = onnx.load(str(tmp_path / "portable.onnx")).graph.node
    assert fused_ops.count("MultiHeadAttention") == handle.num_layers and "Softmax" not in fused_ops
    assert [n.op_type for n in plain].count("Softmax") == handle.num_layers
    assert all(n.domain in ("", "ai.onnx") for n in plain)
    assert portable.portable and "standard ONNX ops" in "\n".join(portable.lines())
    assert not files["reports"]["pre.onnx"].portable
    assert load_model(tmp_path / "portable.onnx").metadata.portable is True
    assert load_model(files["pre.onnx"]).metadata.portable is False
    older = {k: v for k, v in load_model(files["pre.onnx"]).metadata.to_props().items() if k != "eat.portable"}
    assert OnnxMetadata.from_props(older, "old.onnx").portable is None  # written before it was recorded
    x = clips()
    want = load_model(files["pre.pt"]).extract(x, granularity="frame")
    for path in (files["pre.onnx"], tmp_path / "portable.onnx"):
        for got, ref in zip(load_model(path).extract(x, granularity="frame"), want):
            assert_close(got, ref)
    assert all("forward" not in vars(m) for m in handle.encoder.modules())


def test_cls_token_apart_computes_the_same(files: dict) -> None:
    """The int8 export's block forward (CLS row projected apart, keys and values joined) is the
    encoder's computation, plain and fused; the model is as before afterwards."""
    from eat_fairseq.inference.onnx_export import ExportGraph, _export_forwards

    handle = load_model(files["pre.pt"])
    graph = ExportGraph(handle, handle.num_layers - 1).eval()
    fbank = torch.randn(2, 2 * WINDOW, 128)
    with torch.no_grad():
        want = graph(fbank)
        for fused in (False, True):
            with _export_forwards(graph, fused=fused, cls_apart=range(handle.num_layers)):
                got = graph(fbank)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(graph(fbank), want, rtol=0, atol=0)
    assert all("forward" not in vars(m) and not hasattr(m, "cls_path") for m in handle.encoder.modules())


def residual_nodes(model: "onnx.ModelProto") -> int:  # noqa: F821
    return sum(n.op_type == "Sub" and n.name.endswith("_residual") for n in model.graph.node)


def test_int8_cls_products_keep_their_activations_precise(files: dict, tmp_path: Path) -> None:
    """Default int8: the CLS row's four products per block are residual int8 products (two
    MatMulIntegers each) of the patch rows' int8 weights (no second copy of the weights, no float
    product); --int8-cls quantises them once, like the patch rows."""
    import onnx

    depth = files["reports"]["pre.onnx"].depth
    default = onnx.load(str(files["pre_int8.onnx"]))
    report = export_onnx(load_model(files["pre.pt"]), tmp_path / "all.onnx", int8=True, int8_cls=True)
    everything = onnx.load(str(tmp_path / "all.onnx"))
    ops = [n.op_type for n in default.graph.node]
    plain = [n.op_type for n in everything.graph.node]
    assert plain.count("MatMulInteger") == 4 * depth and residual_nodes(everything) == 0
    assert ops.count("MatMulInteger") == 12 * depth and residual_nodes(default) == 4 * depth
    assert "MatMul" not in ops and "DequantizeLinear" not in plain
    assert not any("cls_path" in i.name for i in default.graph.initializer)  # the float copies are gone

    def weight_bytes(model: "onnx.ModelProto") -> int:
        return sum(i.ByteSize() for i in model.graph.initializer)

    assert weight_bytes(default) < 1.01 * weight_bytes(everything)
    assert report.int8_check["int8_cls"] and not files["reports"]["pre_int8.onnx"].int8_check["int8_cls"]
    assert files["reports"]["pre_int8.onnx"].fp32_relative < 1e-5  # its float graph (CLS apart, fused) = eager
    kept = export_onnx(load_model(files["pre.pt"]), tmp_path / "k1.onnx", int8=True, fp32_blocks=1)
    assert residual_nodes(onnx.load(kept.path)) == 4 * (depth - 1)
    with pytest.raises(ValueError, match="int8_cls goes with int8"):
        export_onnx(load_model(files["pre.pt"]), tmp_path / "x.onnx", int8_cls=True)
    assert "CLS token's activations" in "\n".join(files["reports"]["pre_int8.onnx"].lines())
    fp = load_model(files["pre.onnx"]).extract(clips())
    for path in (files["pre_int8.onnx"], tmp_path / "all.onnx"):
        for a, b in zip(load_model(path).extract(clips()), fp):
            assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


@pytest.mark.parametrize("weights", ["s8", "s7", "u8"])
def test_residual_int8_product_is_float_activations_on_int8_weights(tmp_path: Path, weights: str) -> None:
    """The residual product equals float activations times the dequantised int8 weights to ~16-bit
    precision of the activations, far closer than one int8 rounding of them (what --int8-cls does),
    for every form of --int8-weights (s8 only where its products cannot saturate)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from eat_fairseq.inference.onnx_export import _residual_int8_matmul
    from eat_fairseq.inference.onnx_format import int8_saturates

    if weights == "s8" and int8_saturates():
        pytest.skip("signed 8-bit products saturate on this CPU (x86 without VNNI)")

    rng = np.random.default_rng(0)
    n_in, n_out = 64, 48
    # a large common vector with small variation across rows, like a trained model's CLS token
    x = (rng.normal(size=(1, n_in)) + 0.01 * rng.normal(size=(5, n_in))).astype(np.float32)
    w = rng.normal(size=(n_in, n_out)).astype(np.float32)
    top = 64 if weights == "s7" else 127  # onnxruntime's reduced range is [-64, 64]
    scale = (np.abs(w).max(axis=0) / top).astype(np.float32)
    wq = np.clip(np.round(w / scale), -top, top).astype(np.int8)
    want = x @ (wq.astype(np.float32) * scale)
    zero = np.zeros(n_out, np.int8)
    if weights == "u8":  # the same values stored unsigned, zero point 128
        wq, zero = (wq.astype(np.int16) + 128).astype(np.uint8), np.full(n_out, 128, np.uint8)
    product = helper.make_node("MatMul", ["x", "w"], ["y"], name="p")
    nodes = _residual_int8_matmul(onnx, product, "wq", "ws", "wz")
    once = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
            helper.make_node("MatMulInteger", ["q", "wq", "z", "wz"], ["acc"]),
            helper.make_node("Cast", ["acc"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["s", "ws"], ["ss"]), helper.make_node("Mul", ["f", "ss"], ["y1"])]
    graph = helper.make_graph(
        nodes + once, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n_in])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None, n_out]) for o in ("y", "y1")],
        [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(scale, "ws"),
         numpy_helper.from_array(zero, "wz")],
    )
    path = str(tmp_path / "residual.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    got, single = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    # judged on what varies between rows (the small part a probe reads)
    spread = (want - want.mean(0)).std()
    residual_error = np.abs(got - want).max() / spread
    single_error = np.abs(single - want).max() / spread
    assert residual_error < 0.02 and single_error > 50 * residual_error, (residual_error, single_error)


def test_int8_blocks_with_identical_weights(tmp_path: Path) -> None:
    """Two blocks with the same weights (the exporter then shares them through Identity nodes) are
    quantised and rewired like the others: no float copy is left."""
    import onnx

    handle = load_model(write_pretrained(tmp_path / "twin.pt"))
    blocks = handle.encoder.blocks
    blocks[1].load_state_dict(blocks[0].state_dict())
    report = export_onnx(handle, tmp_path / "twin.onnx", int8=True)
    model = onnx.load(report.path)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulInteger") == 12 * len(blocks) and residual_nodes(model) == 4 * len(blocks)
    assert "MatMul" not in ops and not any("cls_path" in i.name for i in model.graph.initializer)
    assert report.fp32_relative < 1e-5 and report.int8_check["utterance_cosine_min"] > 0.99


def test_int8_export_with_a_float_intermediate_over_the_proto_cap(tmp_path: Path, monkeypatch) -> None:
    """EAT-large's float intermediate (weights + the CLS row's copies) passes protobuf's cap and is
    saved with its weights beside it; the int8 file is delivered whole. Scaled down: the cap set
    between the int8 file's weights and the intermediate's, with shared weights (Identity nodes) to
    rewire as random EAT-large has (LayerNorms of ones)."""
    import eat_fairseq.inference.onnx_export as onnx_export

    handle = load_model(write_pretrained(tmp_path / "twin.pt"))
    blocks = handle.encoder.blocks
    blocks[1].load_state_dict(blocks[0].state_dict())
    fp32 = export_onnx(handle, tmp_path / "fp32.onnx")
    monkeypatch.setattr(onnx_export, "PROTO_LIMIT", fp32.size_bytes)  # over its weights, under theirs + copies
    saved = []
    real_save = onnx_export._save
    monkeypatch.setattr(onnx_export, "_save", lambda onnx, model, path: (
        real_save(onnx, model, path), saved.append(os.path.exists(path + ".data"))))
    report = export_onnx(handle, tmp_path / "int8.onnx", int8=True)
    assert any(saved) and not os.path.exists(report.path + ".data")
    assert report.int8_check["utterance_cosine_min"] > 0.99


def test_int8_export_and_its_cost(files: dict) -> None:
    report: ExportReport = files["reports"]["pre_int8.onnx"]
    cost = report.int8_check
    assert report.int8 and report.size_bytes < files["reports"]["pre.onnx"].size_bytes
    for key in ("utterance_cosine_min", "utterance_cosine_mean", "frame_cosine_min", "frame_cosine_mean"):
        assert 0.99 < cost[key] <= 1.0 + 1e-9, (key, cost)
    assert "int8 against fp32" in "\n".join(report.lines())
    q = load_model(files["pre_int8.onnx"])
    assert q.int8 and q.metadata.int8_check == pytest.approx(cost)
    fp = load_model(files["pre.onnx"])
    for a, b in zip(q.extract(clips()), fp.extract(clips())):
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


def test_int8_keeps_the_last_blocks_fp32_when_asked(files: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """--fp32-blocks N: the weight products of the last N exported blocks stay float MatMuls, the
    others are quantised; the report and the metadata say so; without --int8 it is refused."""
    import onnx

    report = export_onnx(load_model(files["pre.pt"]), tmp_path / "k1.onnx", int8=True, fp32_blocks=1)
    nodes = onnx.load(str(tmp_path / "k1.onnx")).graph.node
    depth = report.depth
    last = [n.op_type for n in nodes if f"blocks.{depth - 1}/" in n.name and "/qkv/" in n.name]
    first = [n.op_type for n in nodes if "blocks.0/" in n.name and "/qkv/" in n.name]
    assert "MatMul" in last and "MatMul" not in first, (last, first)
    assert report.int8_check["fp32_blocks"] == 1 and "kept in fp32" in "\n".join(report.lines())
    assert load_model(tmp_path / "k1.onnx").metadata.int8_check["fp32_blocks"] == 1
    with pytest.raises(ValueError, match="fp32_blocks"):
        export_onnx(load_model(files["pre.pt"]), tmp_path / "k9.onnx", int8=True, fp32_blocks=depth + 1)
    assert export_main([str(files["pre.pt"]), str(tmp_path / "k2.onnx"), "--fp32-blocks", "1"]) == 2
    assert "--int8" in capsys.readouterr().err
    assert export_main([str(files["pre.pt"]), str(tmp_path / "k3.onnx"), "--int8-cls"]) == 2
    assert "--int8-cls goes with --int8" in capsys.readouterr().err


def _saturation_graph(weight_dtype: type, weight: int, zero_point: int) -> tuple[int, int]:
    """One MatMulInteger of uint8 255s by constant weights (K = 64): (onnxruntime's sum, the exact sum)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 64
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["y"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, 8])],
        [numpy_helper.from_array(np.full((k, 8), weight, weight_dtype), "b"),
         numpy_helper.from_array(np.array(0, np.uint8), "az"),
         numpy_helper.from_array(np.array(zero_point, weight_dtype), "bz")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"a": np.full((4, k), 255, np.uint8)})[0]
    return int(got[0, 0]), 255 * (weight - zero_point) * k


def test_signed_int8_products_saturate_exactly_where_detected() -> None:
    """The reason for --int8-weights: uint8 x int8 sums are clipped to 16 bits in pairs on x86 without
    VNNI (64 x 255 x 127 comes out as 32 x 32,767), uint8 x uint8 ones never are; int8_saturates()
    says which CPU this is, so on every machine one of the two branches checks it."""
    from eat_fairseq.inference.onnx_format import int8_saturates

    signed, exact = _saturation_graph(np.int8, 127, 0)
    unsigned, exact_u = _saturation_graph(np.uint8, 255, 128)
    assert unsigned == exact_u
    if int8_saturates():
        assert signed == 32 * 32767 != exact
    else:
        assert signed == exact


def test_cpuinfo_flags_and_the_default_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import eat_fairseq.inference.onnx_format as fmt

    assert fmt.cpuinfo_saturates("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_vnni\n") is False
    assert fmt.cpuinfo_saturates("flags\t\t: fpu avx avx2 avx_vnni\nflags : x\n") is False
    assert fmt.cpuinfo_saturates("flags : fpu sse2 avx avx2 fma\n") is True
    assert fmt.cpuinfo_saturates("flags : fpu sse2 sse4_2\n") is False  # SSE kernel: 32-bit sums
    assert fmt.cpuinfo_saturates("Features : fp asimd\n") is None
    monkeypatch.setattr(fmt.platform, "machine", lambda: "aarch64")
    fmt.int8_saturates.cache_clear()
    try:
        assert fmt.int8_saturates() is False and fmt.default_int8_weights() == "s8"
    finally:
        fmt.int8_saturates.cache_clear()
    monkeypatch.setattr(fmt, "int8_saturates", lambda: True)
    assert fmt.default_int8_weights() == "u8"


def test_windows_per_run_follows_threads_and_heads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """int8: one window per onnxruntime run up to ``num_heads`` threads, then enough (window, head)
    pairs; fp32 twice that; threads 0 (onnxruntime's default) count as physical cores."""
    import types

    import eat_fairseq.inference.onnx_format as fmt

    def session(threads: int) -> object:
        options = types.SimpleNamespace(intra_op_num_threads=threads)
        return types.SimpleNamespace(get_session_options=lambda: options)

    assert [fmt.windows_per_run(session(t), 12, True) for t in (1, 2, 12, 13, 24, 25)] == [1, 1, 1, 2, 2, 3]
    assert [fmt.windows_per_run(session(t), 12, False) for t in (1, 12, 13)] == [2, 2, 4]
    monkeypatch.setattr(fmt, "physical_cores", lambda: 40)
    assert fmt.windows_per_run(session(0), 16, True) == 3
    with pytest.raises(ValueError, match="no windows"):
        fmt.run_windows(session(1), ["features"], np.zeros((0, 16, 128), np.float32), 1)


def test_physical_cores_count_hyperthreads_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two logical CPUs that share a core count once (onnxruntime's default is one thread per core)."""
    import builtins
    import io

    import eat_fairseq.inference.onnx_format as fmt

    siblings = {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}
    real_open = builtins.open

    def fake_open(path: object, *args: object, **kwargs: object) -> object:
        name = str(path)
        if name.startswith("/sys/devices/system/cpu/cpu") and name.endswith("thread_siblings_list"):
            return io.StringIO(siblings[int(name.split("/cpu/cpu")[1].split("/")[0])] + "\n")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fmt.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(builtins, "open", fake_open)
    assert fmt.physical_cores() == 2
    monkeypatch.setattr(fmt.os, "sched_getaffinity", lambda pid: {0, 2}, raising=False)
    assert fmt.physical_cores() == 1


@pytest.mark.parametrize("api", ["handle", "runner"])
def test_int8_embedding_does_not_depend_on_the_batch(files: dict, api: str) -> None:
    """int8 activations are quantised with one scale per onnxruntime run; runs of one window (on few
    threads) make a clip's int8 embedding the same alone and beside louder clips. With all windows in
    one run, as before, it was not (the control below)."""
    from eat_fairseq.inference.onnx_runner import load_runner

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the sessions take torch's count; two threads, four heads: one window per run
    try:
        model = load_model(files["pre_int8.onnx"], batch_size=8) if api == "handle" else load_runner(files["pre_int8.onnx"])
    finally:
        torch.set_num_threads(threads)
    runs = model.encoder if api == "handle" else model
    assert runs.windows_per_run == 1
    clip, loud = tone(2.1, seed=3), [10 * tone(1.0, seed=s) for s in (7, 8)]
    alone = np.asarray(model.extract(clip, granularity="frame"))
    together = np.asarray(model.extract([clip, *loud], granularity="frame")[0])
    np.testing.assert_array_equal(together, alone)
    runs.windows_per_run = 8
    assert np.abs(np.asarray(model.extract([clip, *loud], granularity="frame")[0]) - alone).max() > 1e-4


def test_sessions_leave_out_the_skip_layer_norm_fusion(files: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """make_session's graphs keep Add + LayerNormalization (faster than onnxruntime's fused
    SkipLayerNormalization for int8 files); the fusion would apply to these files otherwise."""
    import onnx
    import onnxruntime as ort

    import eat_fairseq.inference.onnx_format as fmt
    from eat_fairseq.inference.onnx_format import make_session

    real = ort.InferenceSession
    saved = tmp_path / "optimised.onnx"

    def saving(path: str, options: "ort.SessionOptions", **kwargs: object) -> object:
        options.optimized_model_filepath = str(saved)
        return real(path, options, **kwargs)

    def ops() -> set[str]:
        return {n.op_type for n in onnx.load(str(saved)).graph.node}

    monkeypatch.setattr(ort, "InferenceSession", saving)
    make_session(str(files["pre_int8.onnx"]), threads=1)
    assert "SkipLayerNormalization" not in ops() and "LayerNormalization" in ops()
    monkeypatch.setattr(fmt, "LEFT_OUT_FUSIONS", ())  # make_session's other options allow the fusion
    make_session(str(files["pre_int8.onnx"]), threads=1)
    assert "SkipLayerNormalization" in ops()


def test_plain_warnings_rewrite_only_our_own(capsys: pytest.CaptureFixture[str]) -> None:
    import warnings

    from eat_fairseq.cli.common import plain_warnings

    @plain_warnings("prog")
    def main() -> int:
        warnings.warn_explicit("ours", UserWarning, os.path.join("site", "eat_fairseq", "m.py"), 1)
        warnings.warn_explicit("theirs", UserWarning, os.path.join("site", "numpy", "m.py"), 1)
        return 3

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main() == 3
    assert capsys.readouterr().err == "prog: warning: ours\n"
    assert [str(w.message) for w in seen] == ["theirs"]


@pytest.mark.filterwarnings("ignore:.*can saturate on this CPU")
@pytest.mark.parametrize("weights", ["s8", "s7", "u8"])
def test_int8_weights_forms(files: dict, tmp_path: Path, weights: str) -> None:
    """--int8-weights: s8 uses the full signed range, s7 half of it (no pair of products can pass
    16 bits), u8 unsigned weights with their own zero points; the choice is stored and reported,
    and every form stays near fp32."""
    import onnx
    from onnx import numpy_helper

    report = export_onnx(load_model(files["pre.pt"]), tmp_path / f"{weights}.onnx", int8=True, int8_weights=weights)
    model = onnx.load(report.path)
    stored = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_quantized")]
    assert stored and {w.dtype for w in stored} == {np.dtype(np.uint8 if weights == "u8" else np.int8)}
    peak = max(int(np.abs(w.astype(np.int32)).max()) for w in stored)
    if weights == "s8":
        assert peak == 127
    elif weights == "s7":
        assert peak <= 64
    else:
        assert max(int(w.max()) for w in stored) == 255 and min(int(w.min()) for w in stored) == 0
    assert report.int8_check["weights"] == weights and f"int8 weights: {weights}" in "\n".join(report.lines())
    loaded = load_model(report.path)
    assert loaded.metadata.int8_check["weights"] == weights
    for a, b in zip(loaded.extract(clips()), load_model(files["pre.onnx"]).extract(clips())):
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


def test_int8_weights_default_and_warning(files: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Without --int8-weights the exporting CPU decides (u8 where s8 saturates); loading an s8 file
    where it saturates warns, a u8 or s7 file does not; bad values and --int8-weights without --int8
    are refused."""
    import warnings

    import eat_fairseq.inference.onnx_export as onnx_export
    import eat_fairseq.inference.onnx_format as fmt

    monkeypatch.setattr(fmt, "int8_saturates", lambda: True)
    monkeypatch.setattr(onnx_export, "int8_saturates", lambda: True)
    report = export_onnx(load_model(files["pre.pt"]), tmp_path / "auto.onnx", int8=True)
    assert report.int8_check["weights"] == "u8" and report.int8_check["saturating_cpu"] is True
    s8 = export_onnx(load_model(files["pre.pt"]), tmp_path / "s8.onnx", int8=True, int8_weights="s8").path
    with pytest.warns(UserWarning, match="saturate on this CPU"):
        load_model(s8)
    all_fp32 = export_onnx(load_model(files["pre.pt"]), tmp_path / "k.onnx", int8=True, int8_weights="s8",
                           fp32_blocks=files["reports"]["pre.onnx"].depth).path  # no int8 product left
    for path in (report.path, files["pre.onnx"], all_fp32):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_model(path)
    monkeypatch.setattr(fmt, "int8_saturates", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(s8)
    monkeypatch.setattr(fmt, "int8_saturates", lambda: True)
    wav = tmp_path / "tone.wav"
    sf.write(wav, tone(1.0, seed=1), 16000)
    assert extract_main(["--checkpoint", s8, str(wav), "--out", str(tmp_path / "emb"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "eat-extract: warning: " in err and "saturate on this CPU" in err and "UserWarning" not in err
    with pytest.raises(ValueError, match="int8_weights must be one of"):
        export_onnx(load_model(files["pre.pt"]), tmp_path / "x.onnx", int8=True, int8_weights="s4")
    with pytest.raises(ValueError, match="int8_weights goes with int8"):
        export_onnx(load_model(files["pre.pt"]), tmp_path / "x.onnx", int8_weights="u8")
    assert export_main([str(files["pre.pt"]), str(tmp_path / "y.onnx"), "--int8-weights", "s7"]) == 2
    assert "--int8-weights goes with --int8" in capsys.readouterr().err


def test_hear_accepts_onnx(files: dict) -> None:
    audio = torch.from_numpy(np.stack([tone(2.0, seed=i) for i in range(3)]))
    pt, ox = hear.load_model(str(files["pre.pt"]), device="cpu"), hear.load_model(str(files["pre.onnx"]))
    assert ox.scene_embedding_size == pt.scene_embedding_size == 64
    assert_close(hear.get_scene_embeddings(audio, ox).numpy(), hear.get_scene_embeddings(audio, pt).numpy())
    (emb_o, ts_o), (emb_p, ts_p) = hear.get_timestamp_embeddings(audio, ox), hear.get_timestamp_embeddings(audio, pt)
    assert_close(emb_o.numpy(), emb_p.numpy())
    assert torch.equal(ts_o, ts_p)
    with pytest.raises(ValueError, match="holds block 1 only"):
        hear.load_model(str(files["pre.onnx"]), layer=0)


# ------------------------------------------------------------------------------------------------
# console scripts


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("audio")
    for i, seconds in enumerate((0.7, 2.9)):
        sf.write(folder / f"c{i}.wav", tone(seconds, seed=20 + i), 16000)
    return folder


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_eat_extract_accepts_onnx(files: dict, audio: Path, tmp_path: Path, granularity: str) -> None:
    for name in ("pre.pt", "pre.onnx"):
        argv = [
            "--checkpoint",
            str(files[name]),
            str(audio),
            "--out",
            str(tmp_path / name),
            "--granularity",
            granularity,
        ]
        assert extract_main([*argv, "--no-progress"]) == 0
    suffix = ".npz" if granularity == "all" else ".npy"
    for clip in ("c0", "c1"):
        want, got = tmp_path / "pre.pt" / (clip + suffix), tmp_path / "pre.onnx" / (clip + suffix)
        if granularity == "all":
            with np.load(want) as w, np.load(got) as g:
                for key in w.files:
                    assert_close(g[key], w[key])
        else:
            assert_close(np.load(got), np.load(want))


def test_eat_extract_layer_of_onnx_is_a_usage_error(
    files: dict, audio: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--checkpoint", str(files["pre.onnx"]), str(audio), "--out", str(tmp_path / "x"), "--layer", "0"]
    assert extract_main(argv) == 2
    assert "holds block 1 only" in capsys.readouterr().err
    assert extract_main([*argv[:-2], "--layer", "1"]) == 0


def test_eat_tag_accepts_onnx(files: dict, audio: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = {}
    for name in ("single.pt", "single.onnx"):
        assert tag_main(["--checkpoint", str(files[name]), "--json", "--top-k", "5", str(audio)]) == 0
        results[name] = json.loads(capsys.readouterr().out)["results"]
    assert results["single.pt"].keys() == results["single.onnx"].keys()
    for path, want in results["single.pt"].items():
        got = results["single.onnx"][path]
        assert [e["label"] for e in got] == [e["label"] for e in want]
        assert np.allclose([e["score"] for e in got], [e["score"] for e in want], rtol=0, atol=RTOL)


def test_eat_export_cli(files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    assert export_main([str(files["single.pt"]), str(out), "--int8"]) == 0
    printed = capsys.readouterr().out
    assert "int8 against fp32" in printed and "top-1 class agrees" in printed
    assert load_model(out).labels == LABELS
    assert export_main([str(files["single.pt"]), str(out)]) == 2  # exists
    assert "--force" in capsys.readouterr().err
    assert export_main([str(files["single.pt"]), str(out), "--force", "--layer", "5"]) == 2
    assert "--layer" in capsys.readouterr().err
    assert export_main([str(files["pre.onnx"]), str(tmp_path / "again.onnx")]) == 2
    with pytest.raises(SystemExit):
        export_main([str(files["single.pt"]), str(tmp_path / "m.bin")])


# ------------------------------------------------------------------------------------------------
# without onnxruntime


@pytest.fixture
def no_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if onnxruntime (and onnx) were not installed: importing them raises ImportError."""
    for name in [m for m in sys.modules if m.split(".")[0] in ("onnxruntime", "onnx")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "onnx", None)


def test_missing_onnxruntime_is_one_clear_line(
    files: dict, audio: Path, tmp_path: Path, no_onnxruntime: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(
        OnnxUnavailableError, match=r"needs onnxruntime, which is not installed: pip install 'eat_fairseq\[onnx\]'"
    ):
        load_model(files["pre.onnx"])
    assert extract_main(["--checkpoint", str(files["pre.onnx"]), str(audio), "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'eat_fairseq[onnx]'" in err[0] and "Traceback" not in err[0]
    assert export_main([str(files["pre.pt"]), str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the onnx package" in err[0]
    assert isinstance(load_model(files["pre.pt"]), EATModelHandle)  # checkpoints need neither
