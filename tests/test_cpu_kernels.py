"""onnxqf's CPU op library (kernels/cpu/, domain onnxqf.cpu) and the ``onnxqf-cpu`` lowering that emits it.

The library is built by ``bash kernels/build_cpu.sh`` (CI's .ci/run builds it before the tests); the tests that run
it skip with that command as the reason where it is not built. The target rules need no library."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxqf.errors import OnnxqfError
from onnxqf.lowering.cpu_kernels import DOMAIN, OP
from onnxqf.runtime import kernels
from onnxqf.runtime.linears import linear_model, parse_lowering
from onnxqf.runtime.target import get_target


@pytest.fixture(scope="module")
def cpu_lib():
    if not kernels.cpu_available():
        pytest.skip("onnxqf's CPU op library is not built: bash kernels/build_cpu.sh")
    return kernels.cpu_library_path()


def _session(model_or_proto, lib=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if lib is not None:
        kernels.register(so, lib)
    proto = model_or_proto if isinstance(model_or_proto, onnx.ModelProto) else ir.serde.serialize_model(model_or_proto)
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _quantize_rows_model():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)
    q = onnx.helper.make_tensor_value_info("q", onnx.TensorProto.UINT8, None)
    a = onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, None)
    node = onnx.helper.make_node(OP, ["x"], ["q", "a"], domain=DOMAIN)
    graph = onnx.helper.make_graph([node], "quantize_rows", [x], [q, a])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                        onnx.helper.make_opsetid(DOMAIN, 1)], ir_version=10)


def _reference(x: np.ndarray):
    """The op's rule in numpy (float32 steps): amax floored at 1e-6, codes round-half-even(x / (amax / 127)) + 128."""
    amax = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-6)).astype(np.float32)
    step = (amax / np.float32(127)).astype(np.float32)
    codes = np.clip(np.rint((x / step).astype(np.float32)) + 128, 0, 255).astype(np.uint8)
    return codes, amax


@pytest.mark.parametrize("shape", [(1, 64), (5, 1000), (2, 3, 2048), (1500, 96), (4, 7)])
def test_quantize_rows_against_numpy(cpu_lib, shape):
    """Every shape (one decode token, odd K, rank 3, enough rows to be spread over threads, K under a vector) with an
    outlier channel, an all-zero token (codes 128, the floor) and a tiny one, and values on exact .5 ties."""
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[:, 0] *= 50.0
    if flat.shape[0] > 2:
        flat[1] = 0.0
        flat[2] *= 1e-9
    # ties: a token whose values are exact half steps (amax 127 -> step 1)
    flat[-1, :] = np.float32(0.5) * (np.arange(shape[-1]) % 9 - 4)
    flat[-1, -1] = 127.0
    q, a = _session(_quantize_rows_model(), cpu_lib).run(None, {"x": x})
    want_q, want_a = _reference(x)
    assert q.dtype == np.uint8 and q.shape == x.shape and a.shape == (*x.shape[:-1], 1)
    np.testing.assert_array_equal(a, want_a)
    np.testing.assert_array_equal(q, want_q)
    if flat.shape[0] > 2:
        assert (q.reshape(-1, shape[-1])[1] == 128).all()


def test_lowering_equals_uint8_token_ql_to_the_bit(cpu_lib):
    """The same codes, the same MatMulIntegerToFloat and Mul: the outputs of uint8-token-ql, every bit."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 64)).astype(np.float32)
    x[:, 5] *= 20.0
    x[7] = 0.0
    ref = _session(linear_model(64, 48, parse_lowering("uint8-token-ql"), copies=2, seed=1)).run(None, {"x": x})
    model = linear_model(64, 48, parse_lowering("onnxqf-cpu"), copies=2, seed=1)
    assert sum(n.op_type == OP and n.domain == DOMAIN for n in model.graph) == 2  # one per copy, nothing else
    assert not any(n.op_type in ("Abs", "ReduceMax", "QuantizeLinear") for n in model.graph)
    got = _session(model, cpu_lib).run(None, {"x": x})
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


def test_float16_models_are_refused():
    with pytest.raises(OnnxqfError, match="float32"):
        linear_model(64, 48, parse_lowering("onnxqf-cpu"), copies=1, dtype="float16")


def test_targets_and_a_missing_library(monkeypatch, tmp_path):
    """The CPU library runs on --ep cpu only, the CUDA kernels on --ep cuda only, each refused in one line; a library
    named by its variable but absent is refused in one line naming the variable."""
    with pytest.raises(OnnxqfError, match="--ep cpu only"):
        get_target("cuda").custom_op_libraries({kernels.CPU_DOMAIN})
    with pytest.raises(OnnxqfError, match="--ep cuda only"):
        get_target("cpu").custom_op_libraries({kernels.DOMAIN})
    assert get_target("cpu").custom_op_libraries({"", "com.microsoft"}) == []
    monkeypatch.setenv(kernels.CPU_ENV, str(tmp_path / "none.so"))
    with pytest.raises(OnnxqfError) as err:
        get_target("cpu").custom_op_libraries({kernels.CPU_DOMAIN})
    assert kernels.CPU_ENV in str(err.value) and "\n" not in str(err.value)
    assert not kernels.cpu_available()


def test_rewrite_check_and_eval(cpu_lib, tiny_models, tmp_path, capsys):
    """`rewrite --lowering onnxqf-cpu`: one QuantizeRows per linear group; `check --ep cpu` places every node on the
    CPU (loading the library itself); `check --ep cuda` refuses it; `eval` runs it, as accurate as
    uint8-token-ql's graph (the same outputs)."""
    from onnxqf.analysis.evaluate import compare
    from onnxqf.cli import main

    src = tiny_models["llama-gqa"]
    outs = {}
    for low in ("onnxqf-cpu", "uint8-token-ql"):
        outs[low] = tmp_path / f"{low}.onnx"
        assert main(["rewrite", str(src), "--lowering", low, "--weight-rounding", "rtn", "-o", str(outs[low]),
                     "-q"]) == 0
    model = onnx.load(str(outs["onnxqf-cpu"]), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count(OP) == 2 * 4 and "ReduceMax" not in ops  # q/k/v, o, gate/up, down per layer
    assert {p.key: p.value for p in model.metadata_props}["onnxqf.target"] == "cpu"
    capsys.readouterr()
    assert main(["check", str(outs["onnxqf-cpu"]), "--ep", "cpu"]) == 0
    capsys.readouterr()
    assert main(["check", str(outs["onnxqf-cpu"]), "--ep", "cuda"]) != 0  # refused, or (no CUDA here) flagged
    out, err = capsys.readouterr()
    assert "lowered for --ep cpu (onnxqf-cpu)" in out or ("--ep cpu only" in err and err.strip().count("\n") == 0)
    wins = np.random.default_rng(0).integers(1, 512, (2, 32))
    a = compare(src, outs["onnxqf-cpu"], wins, progress=False)
    b = compare(src, outs["uint8-token-ql"], wins, progress=False)
    assert a["kl"] == b["kl"] and a["top1"] == b["top1"]
