"""W8A8 subgraphs: node types, closeness to float, static CUDA placement rules, float16."""

import collections

import numpy as np
import onnx
import pytest

from onnxqf.graph.modelfile import load_model, save_model
from onnxqf.pipeline import rewrite
from onnxqf.runtime.target import TARGETS

from helpers import kl_per_token, options, run_logits


def ops(model):
    return collections.Counter(n.op_type for n in model.graph)


def quantized(path, tmp_path, **kw):
    model = load_model(path)
    kw.setdefault("weight_rounding", "rtn")
    rewrite(model, options(progress=False, **kw))
    out = save_model(model, tmp_path / "q.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    return model, out


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias", "llama-odd"])
def test_token_graph_nodes_and_accuracy(tiny_models, text_ids, tmp_path, name):
    model, out = quantized(tiny_models[name], tmp_path, act_quant="token", target="cuda")
    c = ops(model)
    layers = 2
    # q/k/v share one quantized input and one MatMulInteger, gate/up another; lm_head stays float
    assert c["MatMulInteger"] == 4 * layers and c["Split"] >= 2 * layers
    assert c["ReduceMax"] == 4 * layers
    assert "DynamicQuantizeLinear" not in c
    assert TARGETS["cuda"].node_issues(model) == []
    for node in model.graph:
        if node.op_type == "MatMulInteger":
            assert [v.dtype.name for v in node.inputs] == ["INT8", "INT8"]
    ids = text_ids[:256].reshape(2, 128)
    ref, new = run_logits(tiny_models[name], ids), run_logits(out, ids)
    assert kl_per_token(ref, new) < 1e-3
    assert np.abs(new - ref).max() < 0.1 * np.abs(ref).max()


def test_tensor_graph_is_the_onnx_standard_one(tiny_models, text_ids, tmp_path):
    model, out = quantized(tiny_models["llama-gqa"], tmp_path, act_quant="tensor")
    c = ops(model)
    assert c["DynamicQuantizeLinear"] == 8 and c["MatMulInteger"] == 8
    issues = TARGETS["cuda"].node_issues(model)
    assert any("DynamicQuantizeLinear" in i for i in issues)
    assert any("UINT8" in i for i in issues)
    ids = text_ids[:256].reshape(2, 128)
    assert kl_per_token(run_logits(tiny_models["llama-gqa"], ids), run_logits(out, ids)) < 1e-2


@pytest.mark.parametrize("target, gemm", [("cuda", "MatMulInteger"), ("cpu", "MatMulIntegerToFloat")])
def test_lm_head_opt_in_and_keep_float(tiny_models, tmp_path, target, gemm):
    model, _ = quantized(tiny_models["llama-gqa"], tmp_path, quantize_lm_head=True, target=target)
    assert ops(model)[gemm] == 9
    model, _ = quantized(tiny_models["llama-gqa"], tmp_path, keep_float=("down_proj",), target=target)
    assert ops(model)[gemm] == 6
    model, _ = quantized(tiny_models["llama-gqa"], tmp_path, keep_float=("up_proj",), target=target)  # gate alone
    assert ops(model)[gemm] == 8


def test_rotation_lowers_quantization_error(tiny_models, text_ids, tmp_path):
    ids = text_ids[:512].reshape(4, 128)
    ref = run_logits(tiny_models["llama-gqa"], ids)
    _, plain = quantized(tiny_models["llama-gqa"], tmp_path / "a", act_quant="tensor")
    _, rotated = quantized(tiny_models["llama-gqa"], tmp_path / "b", act_quant="tensor", transform="rotate")
    assert kl_per_token(ref, run_logits(rotated, ids)) < kl_per_token(ref, run_logits(plain, ids))


@pytest.mark.parametrize("preset", [dict(transform="smooth"), dict(transform="hybrid"),
                                    dict(transform="hybrid-folded")])
def test_smooth_and_hybrid_with_calibration(tiny_models, ids_file, text_ids, tmp_path, preset):
    model = load_model(tiny_models["qwen2-bias"])
    report = rewrite(model, options(progress=False, calib=str(ids_file), calib_windows=4, calib_seq=128, **preset))
    out = save_model(model, tmp_path / "q.onnx")
    assert report.calibration["windows"] == 4
    assert report.alphas  # an alpha (or None = no smoothing) per smoothed site
    assert list(report.rounding.values()) == ["gptq"] * 14
    ids = text_ids[1024:1280].reshape(2, 128)
    assert kl_per_token(run_logits(tiny_models["qwen2-bias"], ids), run_logits(out, ids)) < 1e-3


def test_smoothing_alone_is_function_preserving(tiny_models, ids_file, text_ids, tmp_path):
    model = load_model(tiny_models["llama-gqa"])
    rewrite(model, options(transform="smooth", quant="none", alpha=0.5, progress=False, calib=str(ids_file),
                           calib_windows=2, calib_seq=128))
    out = save_model(model, tmp_path / "s.onnx")
    ids = text_ids[:256].reshape(2, 128)
    ref, new = run_logits(tiny_models["llama-gqa"], ids), run_logits(out, ids)
    assert np.abs(new - ref).max() <= 1e-3 * np.abs(ref).max()


def test_hybrid_float_is_function_preserving(tiny_models, ids_file, text_ids, tmp_path):
    model = load_model(tiny_models["llama-odd"])
    rewrite(model, options(transform="hybrid", quant="none", progress=False, calib=str(ids_file), calib_windows=2,
                           calib_seq=128))
    out = save_model(model, tmp_path / "h.onnx")
    ids = text_ids[:256].reshape(2, 128)
    ref, new = run_logits(tiny_models["llama-odd"], ids), run_logits(out, ids)
    assert np.abs(new - ref).max() <= 1e-3 * np.abs(ref).max()
    assert kl_per_token(ref, new) <= 1e-6


def test_float16_quantized(tiny_fp16, text_ids, tmp_path):
    model, out = quantized(tiny_fp16, tmp_path, transform="rotate")  # float16: lowered for CUDA by default
    assert TARGETS["cuda"].node_issues(model) == []
    ids = text_ids[:128].reshape(1, 128)
    ref = run_logits(tiny_fp16, ids).astype(np.float32)
    new = run_logits(out, ids).astype(np.float32)
    assert np.isfinite(new).all()
    assert kl_per_token(ref, new) < 1e-3


def test_gptq_lowers_kl_against_rtn(tiny_models, ids_file, text_ids, tmp_path):
    ids = text_ids[4096:4096 + 512].reshape(4, 128)  # not in the calibration windows
    ref = run_logits(tiny_models["llama-gqa"], ids)
    kls = {}
    for rounding in ("rtn", "gptq"):
        model = load_model(tiny_models["llama-gqa"])
        rewrite(model, options(transform="rotate", weight_rounding=rounding, progress=False, calib=str(ids_file),
                                      calib_windows=16, calib_seq=128))
        kls[rounding] = kl_per_token(ref, run_logits(save_model(model, tmp_path / f"{rounding}.onnx"), ids))
    assert kls["gptq"] < kls["rtn"]


def test_w8a8_lm_head_as_matmulnbits(tiny_models, text_ids, tmp_path):
    """--quantize-lm-head --lm-head-bits 8 with W8A8: the decoder linears stay W8A8, lm_head becomes MatMulNBits."""
    from onnxqf.cli import main

    out = tmp_path / "h.onnx"
    assert main(["rewrite", str(tiny_models["llama-gqa"]), "--quantize-lm-head", "--lm-head-bits", "8", "--ep", "cpu",
                 "--weight-rounding", "rtn", "-o", str(out), "-q"]) == 0
    c = collections.Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)
    assert c["MatMulNBits"] == 1 and c["MatMulIntegerToFloat"] == 8
    ids = text_ids[:256].reshape(2, 128)
    assert kl_per_token(run_logits(tiny_models["llama-gqa"], ids), run_logits(out, ids)) < 1e-2
