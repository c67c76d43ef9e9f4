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
from onnxqf.graph.structure import ONLINE_ROTATION
from onnxqf.lowering.cpu_kernels import (
    DENSE,
    DEQUANTIZE_OP,
    DOMAIN,
    IDENTITY,
    LINEAR_OP,
    OP,
    WALSH,
    WALSH_NEG,
    cpu_rotation,
)
from onnxqf.maths.hadamard import sylvester
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


def _quantize_rows_model(rotation=None, asymmetric=False):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)
    q = onnx.helper.make_tensor_value_info("q", onnx.TensorProto.UINT8, None)
    a = onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, None)
    z = onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)
    inputs, attrs, inits = ["x"], {"asymmetric": 1} if asymmetric else {}, []
    if rotation is not None:
        attrs.update(rotation_sizes=list(rotation.sizes), rotation_kinds=list(rotation.kinds))
        if rotation.dense:
            flat = np.concatenate([m.reshape(-1) for m in rotation.dense]).astype(np.float32)
            inits.append(onnx.numpy_helper.from_array(flat, "R"))
            inputs.append("R")
    outs = [q, a, z] if asymmetric else [q, a]
    node = onnx.helper.make_node(OP, inputs, [o.name for o in outs], domain=DOMAIN, **attrs)
    graph = onnx.helper.make_graph([node], "quantize_rows", [x], outs, initializer=inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                        onnx.helper.make_opsetid(DOMAIN, 1)], ir_version=10)


def _reference(x: np.ndarray):
    """The op's rule in numpy (float32 steps): amax floored at 1e-6, codes round-half-even(x / (amax / 127)) + 128."""
    amax = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-6)).astype(np.float32)
    step = (amax / np.float32(127)).astype(np.float32)
    codes = np.clip(np.rint((x / step).astype(np.float32)) + 128, 0, 255).astype(np.uint8)
    return codes, amax


def _asymmetric_reference(x: np.ndarray):
    """uint8-token-asym's rule (onnxqf.lowering.w8a8.asymmetric_codes) in numpy, float32 steps: the range holds 0,
    scale (hi - lo) / 255 floored at 1e-6, zero point round(-lo / scale), codes clip(round(x / scale) + zp, 0, 255)."""
    f32 = np.float32
    hi = np.maximum(x.max(axis=-1, keepdims=True), f32(0))
    lo = np.minimum(x.min(axis=-1, keepdims=True), f32(0))
    scale = np.maximum(((hi - lo) / f32(255)).astype(f32), f32(1e-6))
    zp = np.rint((-lo / scale).astype(f32))
    codes = np.clip(np.rint((x / scale).astype(f32)) + zp, 0, 255).astype(np.uint8)
    return codes, scale, zp


def _rows_with_edges(shape, seed):
    """Rows of ``shape`` with an outlier channel, an all-zero token and a tiny one (when there are 3 rows or more),
    and a last token of exact .5 ties (amax 127)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[:, 0] *= 50.0
    if flat.shape[0] > 2:
        flat[1] = 0.0
        flat[2] *= 1e-9
    # ties: a token whose values are exact half steps (amax 127 -> step 1)
    flat[-1, :] = np.float32(0.5) * (np.arange(shape[-1]) % 9 - 4)
    flat[-1, -1] = 127.0
    return x


SHAPES = [(1, 64), (5, 1000), (2, 3, 2048), (1500, 96), (4, 7)]


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_rows_against_numpy(cpu_lib, shape):
    """Every shape (one decode token, odd K, rank 3, enough rows to be spread over threads, K under a vector) with an
    outlier channel, an all-zero token (codes 128, the floor) and a tiny one, and values on exact .5 ties."""
    x = _rows_with_edges(shape, sum(shape))
    flat = x.reshape(-1, shape[-1])
    q, a = _session(_quantize_rows_model(), cpu_lib).run(None, {"x": x})
    want_q, want_a = _reference(x)
    assert q.dtype == np.uint8 and q.shape == x.shape and a.shape == (*x.shape[:-1], 1)
    np.testing.assert_array_equal(a, want_a)
    np.testing.assert_array_equal(q, want_q)
    if flat.shape[0] > 2:
        assert (q.reshape(-1, shape[-1])[1] == 128).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_asymmetric_quantize_rows_against_numpy(cpu_lib, shape):
    """asymmetric = 1: the codes, scales and zero points of uint8-token-asym's rule, every bit, on the same rows
    (an all-zero token: scale at the floor, zero point 0, codes 0); a row of one sign keeps 0 in its range."""
    x = _rows_with_edges(shape, sum(shape) + 1)
    flat = x.reshape(-1, shape[-1])
    if flat.shape[0] > 3:
        flat[3] = np.abs(flat[3]) + 1.0  # all positive: lo = 0, zero point 0
    q, s, z = _session(_quantize_rows_model(asymmetric=True), cpu_lib).run(None, {"x": x})
    want_q, want_s, want_z = _asymmetric_reference(x)
    assert q.dtype == np.uint8 and q.shape == x.shape and s.shape == z.shape == (*x.shape[:-1], 1)
    np.testing.assert_array_equal(s, want_s)
    np.testing.assert_array_equal(z, want_z)
    np.testing.assert_array_equal(q, want_q)
    if flat.shape[0] > 3:
        assert (q.reshape(-1, shape[-1])[1] == 0).all() and z.reshape(-1)[3] == 0
    # the codes' affine reading is within half a step of every value
    back = (q.astype(np.float64) - z) * s
    assert (np.abs(back - x) <= s * (0.5 + 1e-3) + 1e-12).all()


def _dequantize_rows_model():
    ins = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in "yszc"]
    o = onnx.helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, None)
    node = onnx.helper.make_node(DEQUANTIZE_OP, ["y", "s", "z", "c"], ["o"], domain=DOMAIN)
    graph = onnx.helper.make_graph([node], "dequantize_rows", ins, [o])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                        onnx.helper.make_opsetid(DOMAIN, 1)], ir_version=10)


@pytest.mark.parametrize("shape", [(1, 48), (3, 5, 1001), (700, 64)])
def test_dequantize_rows_against_numpy(cpu_lib, shape):
    """O = (Y - Z * C) * S per row, to float32 rounding; the wrong number of scales or column sums is refused."""
    rng = np.random.default_rng(shape[-1])
    y = (rng.standard_normal(shape) * 1000).astype(np.float32)
    s = rng.uniform(1e-3, 1e-1, (*shape[:-1], 1)).astype(np.float32)
    z = rng.integers(0, 256, (*shape[:-1], 1)).astype(np.float32)
    c = rng.standard_normal(shape[-1]).astype(np.float32)
    sess = _session(_dequantize_rows_model(), cpu_lib)
    (o,) = sess.run(None, {"y": y, "s": s, "z": z, "c": c})
    want = (y.astype(np.float64) - z.astype(np.float64) * c) * s
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(Exception, match="one value per column"):
        sess.run(None, {"y": y, "s": s, "z": z, "c": c[:-1]})
    with pytest.raises(Exception, match="one value per row"):
        sess.run(None, {"y": y, "s": s[..., :0], "z": z, "c": c})


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["vnni", "avx2", "base"])
def test_every_instruction_set_path_against_numpy(cpu_lib, isa):
    """The library picks its row, dense-factor and butterfly loops and its GEMM for the CPU when it loads (AMX,
    AVX-512 VNNI, AVX-512, AVX2, the compiler's loops); ONNXQF_CPU_ISA caps that choice, so each path the CPU has runs
    here, in a fresh process, through the same checks."""
    import os
    import platform
    import subprocess
    import sys

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the instruction-set paths are x86-64's")
    env = dict(os.environ, ONNXQF_CPU_ISA=isa, ONNXQF_CPU_KERNELS=str(cpu_lib))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "(quantize_rows_against_numpy or w8a8_linear_equals) and not every_instruction_set"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1]


def _orthogonal(n, rng):
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q


def test_cpu_rotation_forms():
    """Each Kronecker factor becomes a kind: the identity, a dense matrix, or ±H_n/sqrt(n) run as a transform; what
    the op form applies is the Kronecker product itself."""
    rng = np.random.default_rng(3)
    groups = [(3, _orthogonal(3, rng)), (8, sylvester(8) / np.sqrt(8)), (2, None), (4, -sylvester(4) / 2),
              (5, _orthogonal(5, rng))]
    rot = cpu_rotation(groups, 3 * 8 * 2 * 4 * 5)
    assert rot.sizes == (3, 8, 2, 4, 5) and rot.kinds == (DENSE, WALSH, IDENTITY, WALSH_NEG, DENSE)
    assert len(rot.dense) == 2
    kron = np.eye(1)
    for n, m in groups:
        kron = np.kron(kron, np.eye(n) if m is None else m)
    x = rng.standard_normal((4, kron.shape[0]))
    np.testing.assert_allclose(rot.apply(x), x @ kron, atol=1e-12)
    assert cpu_rotation(groups, 100) is None  # the sizes do not multiply to K
    assert cpu_rotation([(4, None), (8, None)], 32) is None  # nothing rotates


@pytest.mark.parametrize("groups", [
    [(64, "walsh")],                                  # one Walsh factor (the hybrid's q/gate inputs)
    [(4, "walsh"), (16, None)],                       # head mixing: Walsh over heads, identity inside
    [(12, "dense"), (8, "walsh")],                    # a dense factor and a Walsh one (down_proj, K = 96)
    [(11, "dense"), (16, "-walsh"), (8, "walsh")],    # three factors, a negative Walsh one
    [(44, "dense"), (16, "walsh"), (8, "walsh")],     # d_ff 5632's plan: full register tiles and a ragged last one
    [(10, "dense"), (3, "dense"), (8, "walsh")],      # an inner axis of 24 (one tile of 16 and 8 over) and n < 8
    [(7, "dense"), (20, "dense")],                    # a last dense factor: tiles of 4 rows, 3 rows and 4 outputs over
])
@pytest.mark.parametrize("asymmetric", [False, True], ids=["symmetric", "asymmetric"])
def test_rotated_quantize_rows_against_numpy(cpu_lib, groups, asymmetric):
    """With a rotation the op quantizes x @ kron(F...) (float32 sums): every dequantized value within half a step
    of the float64 rotation, the scale within float32 rounding of its max (its range for asymmetric codes)."""
    rng = np.random.default_rng(len(groups))
    mats = {"walsh": lambda n: sylvester(n) / np.sqrt(n), "-walsh": lambda n: -sylvester(n) / np.sqrt(n),
            "dense": lambda n: _orthogonal(n, rng), None: lambda n: None}
    real = [(n, mats[kind](n)) for n, kind in groups]
    K = int(np.prod([n for n, _ in groups]))
    rot = cpu_rotation(real, K)
    x = rng.standard_normal((33, K)).astype(np.float32)
    x[:, 1] *= 40.0
    x[5] = 0.0
    z = rot.apply(x)
    if asymmetric:
        q, a, zp = _session(_quantize_rows_model(rot, asymmetric=True), cpu_lib).run(None, {"x": x})
        rng_ = np.maximum(z.max(-1, keepdims=True), 0) - np.minimum(z.min(-1, keepdims=True), 0)
        np.testing.assert_allclose(a, np.maximum(rng_ / 255, 1e-6), rtol=1e-5)
        step = a.astype(np.float64)
        assert (np.abs((q.astype(np.float64) - zp) * step - z) <= step * (0.5 + 1e-3)).all()
        assert (q[5] == 0).all()
        return
    q, a = _session(_quantize_rows_model(rot), cpu_lib).run(None, {"x": x})
    np.testing.assert_allclose(a, np.maximum(np.abs(z).max(-1, keepdims=True), 1e-6), rtol=1e-5)
    step = a.astype(np.float64) / 127
    assert (np.abs((q.astype(np.float64) - 128) * step - z) <= step * (0.5 + 1e-3)).all()
    assert (q[5] == 128).all()


def test_bad_rotation_attributes_are_refused(cpu_lib):
    rot = cpu_rotation([(12, sylvester(16)[:12, :12] / 4)], 12)  # dense: a non-power-of-two size is fine
    model = _quantize_rows_model(rot)
    kinds = next(a for a in model.graph.node[0].attribute if a.name == "rotation_kinds")
    kinds.ints[:] = [WALSH]  # ... but not as a Walsh factor
    with pytest.raises(Exception, match="power-of-two"):
        _session(model, cpu_lib).run(None, {"x": np.ones((1, 12), np.float32)})


def test_lowering_equals_uint8_token_ql_to_the_bit(cpu_lib):
    """Symmetric codes (asymmetric=false): the same codes, the same MatMulIntegerToFloat and Mul: the outputs of
    uint8-token-ql, every bit."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 64)).astype(np.float32)
    x[:, 5] *= 20.0
    x[7] = 0.0
    ref = _session(linear_model(64, 48, parse_lowering("uint8-token-ql"), copies=2, seed=1)).run(None, {"x": x})
    model = linear_model(64, 48, parse_lowering("onnxqf-cpu:asymmetric=false"), copies=2, seed=1)
    assert sum(n.op_type == OP and n.domain == DOMAIN for n in model.graph) == 2  # one per copy, nothing else
    assert not any(n.op_type in ("Abs", "ReduceMax", "QuantizeLinear") for n in model.graph)
    got = _session(model, cpu_lib).run(None, {"x": x})
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("uint8_weights", [False, True])
def test_asymmetric_lowering_equals_uint8_token_asym(cpu_lib, uint8_weights):
    """`--lowering onnxqf-cpu` (asymmetric by default): two nodes of the library per group (QuantizeRows,
    DequantizeRows) around MatMulIntegerToFloat, the outputs of uint8-token-asym's graph (the same codes) to
    float32 rounding; with uint8 weights too."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 64)).astype(np.float32)
    x[:, 5] *= 20.0
    x[7] = 0.0
    x[3] = np.abs(x[3])
    extra = ":uint8_weights=true" if uint8_weights else ""
    ref = _session(linear_model(64, 48, parse_lowering("uint8-token-asym" + extra), copies=2, seed=1)).run(
        None, {"x": x})
    low = parse_lowering("onnxqf-cpu" + extra)
    assert low.asymmetric and low.describe() == "onnxqf-cpu"
    model = linear_model(64, 48, low, copies=2, seed=1)
    ops = [(n.domain, n.op_type) for n in model.graph]
    assert ops.count((DOMAIN, OP)) == ops.count((DOMAIN, DEQUANTIZE_OP)) == 2
    assert not any(op in ("ReduceMax", "ReduceMin", "Round", "Clip", "Mul", "Sub") for _, op in ops)
    got = _session(model, cpu_lib).run(None, {"x": x})
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max())
    sym = _session(linear_model(64, 48, parse_lowering("onnxqf-cpu:asymmetric=false"), copies=2, seed=1),
                   cpu_lib).run(None, {"x": x})
    assert not np.allclose(sym[0], got[0], rtol=1e-4, atol=1e-5 * np.abs(got[0]).max())  # other codes, not those


def test_act_quant_picks_the_lowering_field():
    """`--lowering onnxqf-cpu` makes asymmetric codes unless `--act-quant token`; `--act-quant asym` with a lowering
    that makes only symmetric codes is refused in one line; without --lowering the target's default stays
    symmetric (uint8-token-ql, no library needed)."""
    from onnxqf.options import quant_config

    target = get_target("cpu")
    for acts in (None, "asym"):
        low = target.lowering(quant_config("int8", activations=acts, lowering="onnxqf-cpu"))
        assert low.asymmetric and low.describe() == "onnxqf-cpu"
    low = target.lowering(quant_config("int8", activations="token", lowering="onnxqf-cpu"))
    assert not low.asymmetric and low.describe() == "onnxqf-cpu:asymmetric=false"
    assert target.lowering(quant_config("int8")).name == "uint8-token-ql"
    assert target.lowering(quant_config("int8", activations="asym")).name == "uint8-token-asym"
    with pytest.raises(OnnxqfError, match="makes token activations, not --act-quant asym"):
        target.lowering(quant_config("int8", activations="asym", lowering="uint8-token-ql"))


def test_hybrid_rotations_move_into_the_op(cpu_lib, tiny_models, tmp_path):
    """`rewrite --hybrid --lowering onnxqf-cpu`: every online rotation block is gone, each one's factors now
    attributes of the QuantizeRows that quantizes it (`onnxqf-cpu:fuse_rotations=false` keeps the blocks); the
    logits equal uint8-token-ql's hybrid graph's up to float rounding (the same rotation in float32 sums of another
    order, which can move a code at a tie by one step)."""
    from onnxqf.cli import main
    from onnxqf.runtime.session import logits, make_session

    src = tiny_models["llama-gqa"]
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(1).integers(1, 512, 256))
    out = {}
    for i, low in enumerate(("onnxqf-cpu", "uint8-token-ql", "onnxqf-cpu:fuse_rotations=false")):
        out[low] = tmp_path / f"{i}.onnx"
        assert main(["rewrite", str(src), "--hybrid", "--lowering", low, "--act-quant", "token", "--calib", str(ids),
                     "--calib-windows", "2", "--calib-seq", "64", "--weight-rounding", "rtn", "-o", str(out[low]),
                     "-q"]) == 0
    fused = onnx.load(str(out["onnxqf-cpu"]), load_external_data=False)
    std = onnx.load(str(out["uint8-token-ql"]), load_external_data=False)
    unfused = onnx.load(str(out["onnxqf-cpu:fuse_rotations=false"]), load_external_data=False)
    # a field of the lowering's config on the command line: the rotations stay nodes, the quantization is the op's
    assert sum(n.op_type == "MatMul" for n in unfused.graph.node) == sum(n.op_type == "MatMul" for n in std.graph.node)
    assert sum(n.op_type == OP and not n.attribute for n in unfused.graph.node) == 2 * 4
    assert main(["rewrite", str(src), "--lowering", "onnxqf-cpu:bogus=1", "-o", str(tmp_path / "x.onnx"), "-q"]) == 2
    assert not (tmp_path / "x.onnx").exists()
    nodes = [n for n in fused.graph.node if n.op_type == OP]
    rotated = [n for n in nodes if any(a.name == "rotation_sizes" for a in n.attribute)]
    assert len(nodes) == 2 * 4 and len(rotated) == 2 * 4  # the four hybrid sites of both layers
    matmuls = sum(n.op_type == "MatMul" for n in std.graph.node) - sum(n.op_type == "MatMul" for n in fused.graph.node)
    assert matmuls > 0 and not any(p.key == ONLINE_ROTATION for n in fused.graph.node for p in n.metadata_props)
    ids_ = np.random.default_rng(0).integers(1, 512, (2, 24))
    a = logits(make_session(out["onnxqf-cpu"]), ids_)
    b = logits(make_session(out["uint8-token-ql"]), ids_)
    diff, top = np.abs(a - b), np.abs(b).max()
    # most logits equal to float32 rounding; a code one step off at a tie moves a few by a little
    assert np.median(diff) <= 1e-5 * top and diff.max() <= 1e-2 * top


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


def test_a_library_older_than_the_graphs_is_refused(cpu_lib, monkeypatch):
    """The built library reports its version (onnxqf_cpu_version); one older than the ops this onnxqf writes (a
    build left from before DequantizeRows) is refused in one line that says how to rebuild it."""
    assert kernels.cpu_library_version(cpu_lib) == kernels.CPU_VERSION
    monkeypatch.setattr(kernels, "cpu_library_version", lambda path: kernels.CPU_VERSION - 1)
    with pytest.raises(OnnxqfError, match="rebuild it") as err:
        get_target("cpu").custom_op_libraries({kernels.CPU_DOMAIN})
    assert "\n" not in str(err.value)


def test_register_loads_no_cuda_runtime_for_the_cpu_library(cpu_lib, monkeypatch, tmp_path):
    """The CPU op library, under its own name or renamed and named by $ONNXQF_CPU_KERNELS, registers without the
    CUDA runtime (a CPU-only machine has none); any other library asks for it first."""
    import shutil

    calls = []
    monkeypatch.setattr(kernels, "preload_cuda_runtime", lambda: calls.append(1))
    kernels.register(ort.SessionOptions(), cpu_lib)
    renamed = tmp_path / "mycpuops.so"
    shutil.copy(cpu_lib, renamed)
    monkeypatch.setenv(kernels.CPU_ENV, str(renamed))
    kernels.register(ort.SessionOptions(), renamed)
    assert calls == []
    with pytest.raises(Exception):  # not a library at all: after the CUDA runtime was asked for
        kernels.register(ort.SessionOptions(), tmp_path / "libonnxqf_kernels.so")
    assert calls == [1]


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
        assert main(["rewrite", str(src), "--lowering", low, "--act-quant", "token", "--weight-rounding", "rtn", "-o",
                     str(outs[low]), "-q"]) == 0
    model = onnx.load(str(outs["onnxqf-cpu"]), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count(OP) == 2 * 4 and "ReduceMax" not in ops  # q/k/v, o, gate/up, down per layer
    assert {p.key: p.value for p in model.metadata_props}["onnxqf.target"] == "cpu"
    capsys.readouterr()
    assert main(["check", str(outs["onnxqf-cpu"]), "--ep", "cpu"]) == 0
    capsys.readouterr()
    assert main(["check", str(outs["onnxqf-cpu"]), "--ep", "cuda"]) != 0  # refused, or (no CUDA here) flagged
    out, err = capsys.readouterr()
    assert "lowered for --ep cpu (onnxqf-cpu:asymmetric=false)" in out or \
        ("--ep cpu only" in err and err.strip().count("\n") == 0)
    wins = np.random.default_rng(0).integers(1, 512, (2, 32))
    a = compare(src, outs["onnxqf-cpu"], wins, progress=False)
    b = compare(src, outs["uint8-token-ql"], wins, progress=False)
    assert a["kl"] == b["kl"] and a["top1"] == b["top1"]
    # the lowering's default, asymmetric codes: uint8-token-asym's graph's accuracy (the same codes)
    for low, extra in (("asym-op", ["--lowering", "onnxqf-cpu"]), ("asym-nodes", ["--act-quant", "asym"])):
        outs[low] = tmp_path / f"{low}.onnx"
        assert main(["rewrite", str(src), *extra, "--weight-rounding", "rtn", "-o", str(outs[low]), "-q"]) == 0
    ops = [n.op_type for n in onnx.load(str(outs["asym-op"]), load_external_data=False).graph.node]
    assert ops.count(OP) == ops.count(DEQUANTIZE_OP) == 2 * 4 and "ReduceMin" not in ops
    c = compare(src, outs["asym-op"], wins, progress=False)
    d = compare(src, outs["asym-nodes"], wins, progress=False)
    assert abs(c["kl"] - d["kl"]) <= 1e-3 * d["kl"] and c["kl"] != a["kl"]


# -- W8A8Linear: the quantization, onnxqf's int8 GEMM and the dequantization in one node --------------------------


def test_vnni_order_puts_four_ks_of_sixteen_columns_in_each_line():
    """vnni_order's element [j, p, 4 i + t] is q[4 p + t, 16 j + i]; shapes that do not tile are refused."""
    from onnxqf.lowering.cpu_kernels import vnni_order

    q = np.random.default_rng(0).integers(-127, 128, (8, 32)).astype(np.int8)
    b = vnni_order(q)
    assert b.shape == (2, 2, 64) and b.dtype == np.int8
    for j, p, i, t in [(0, 0, 0, 0), (1, 1, 15, 3), (0, 1, 5, 2), (1, 0, 9, 1)]:
        assert b[j, p, 4 * i + t] == q[4 * p + t, 16 * j + i]
    assert sorted(b.reshape(-1).tolist()) == sorted(q.reshape(-1).tolist())
    with pytest.raises(ValueError, match="N % 16"):
        vnni_order(q[:, :24])


# (K, N, rows): one 16-column block and five (an odd count: AMX's one-block step), K past one AMX tile and not a
# multiple of 64 (the VNNI path at every M), rows from decode to two AMX row tiles with a tail and two row chunks
LINEAR_CASES = [(64, 16, 1), (128, 80, 3), (192, 48, 17), (100, 32, 9), (256, 96, 40), (128, 48, 70)]


@pytest.mark.parametrize("asymmetric", [True, False])
@pytest.mark.parametrize("K,N,rows", LINEAR_CASES)
def test_w8a8_linear_equals_the_three_node_graph(cpu_lib, K, N, rows, asymmetric):
    """`onnxqf-cpu:gemm=onnxqf`: one W8A8Linear per group and nothing else; its outputs are those of the
    QuantizeRows -> MatMulIntegerToFloat -> DequantizeRows graph of the same lowering (the same codes and integer
    sums; the epilogue's float steps in another order) to float32 rounding."""
    rng = np.random.default_rng(K + N + rows)
    x = rng.standard_normal((rows, K)).astype(np.float32)
    x[:, 3] *= 30.0
    if rows > 2:
        x[1] = 0.0
        x[2] = np.abs(x[2])
    extra = "" if asymmetric else ":asymmetric=false"
    ref = _session(linear_model(K, N, parse_lowering("onnxqf-cpu" + extra), copies=2, seed=3), cpu_lib).run(
        None, {"x": x})
    low = parse_lowering("onnxqf-cpu:gemm=onnxqf" + extra)
    assert low.describe() == "onnxqf-cpu" + extra + ":gemm=onnxqf"
    model = linear_model(K, N, low, copies=2, seed=3)
    ops = [(n.domain, n.op_type) for n in model.graph]
    assert ops.count((DOMAIN, LINEAR_OP)) == 2 and len(ops) == 2
    got = _session(model, cpu_lib).run(None, {"x": x})
    for g, r in zip(got, ref):
        assert g.shape == r.shape == (rows, N)
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-5 * np.abs(r).max())


def test_w8a8_linear_bad_weights_are_refused(cpu_lib):
    """Weights that are not [N / 16, K / 4, 64], or scales of another length, fail the run in one message."""
    K, N = 64, 32
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    w = onnx.helper.make_tensor_value_info("w", onnx.TensorProto.INT8, None)
    s = onnx.helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, None)
    c = onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None)
    node = onnx.helper.make_node(LINEAR_OP, ["x", "w", "s", "c"], ["y"], domain=DOMAIN)
    graph = onnx.helper.make_graph([node], "linear", [x, w, s, c], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                         onnx.helper.make_opsetid(DOMAIN, 1)], ir_version=10)
    sess = _session(model, cpu_lib)
    feeds = {"x": np.ones((2, K), np.float32), "w": np.zeros((N // 16, K // 4, 64), np.int8),
             "s": np.ones(N, np.float32), "c": np.zeros(N, np.float32)}
    assert sess.run(None, feeds)[0].shape == (2, N)
    with pytest.raises(Exception, match=r"W must be int8 \[N / 16, K / 4, 64\]"):
        sess.run(None, {**feeds, "w": np.zeros((N // 16, K // 8, 64), np.int8)})
    with pytest.raises(Exception, match="one value per column"):
        sess.run(None, {**feeds, "s": np.ones(N - 1, np.float32)})


def test_hybrid_rotations_move_into_the_linear_op(cpu_lib, tiny_models, tmp_path):
    """`rewrite --hybrid --lowering onnxqf-cpu:gemm=onnxqf`: one W8A8Linear per linear group (lm_head too), the
    online rotations inside the ops that read them, no MatMulIntegerToFloat left; the logits those of the
    three-node lowering (gemm=mlas) to float32 rounding."""
    from onnxqf.cli import main
    from onnxqf.runtime.session import logits, make_session

    src = tiny_models["llama-gqa"]
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(1).integers(1, 512, 256))
    out = {}
    for low in ("onnxqf-cpu", "onnxqf-cpu:gemm=onnxqf"):
        out[low] = tmp_path / f"{low.replace(':', '_').replace('=', '_')}.onnx"
        assert main(["rewrite", str(src), "--hybrid", "--lowering", low, "--calib", str(ids), "--calib-windows", "2",
                     "--calib-seq", "64", "--weight-rounding", "rtn", "--quantize-lm-head", "-o", str(out[low]),
                     "-q"]) == 0
    fused = onnx.load(str(out["onnxqf-cpu:gemm=onnxqf"]), load_external_data=False)
    ops = [n.op_type for n in fused.graph.node]
    linears = [n for n in fused.graph.node if n.op_type == LINEAR_OP]
    assert "MatMulIntegerToFloat" not in ops and OP not in ops and DEQUANTIZE_OP not in ops
    assert len(linears) == 2 * 4 + 1  # q/k/v, o, gate/up, down of both layers; lm_head
    assert sum(any(a.name == "rotation_sizes" for a in n.attribute) for n in linears) == 2 * 4 + 1  # + lm_head
    ids_ = np.random.default_rng(0).integers(1, 512, (2, 24))
    a = logits(make_session(out["onnxqf-cpu:gemm=onnxqf"]), ids_)
    b = logits(make_session(out["onnxqf-cpu"]), ids_)
    diff, top = np.abs(a - b), np.abs(b).max()
    assert np.median(diff) <= 1e-5 * top and diff.max() <= 1e-3 * top


def test_a_cpu_without_vnni_is_warned_about_the_linear_op(cpu_lib, tmp_path, monkeypatch, caplog):
    """A session on a graph with W8A8Linear nodes warns once where the CPU has no AVX-512 VNNI (the library's GEMM
    takes its AVX2 path or the compiler's loop), and says nothing where it has VNNI or AMX or the graph has no such
    node."""
    import logging

    from onnxqf.runtime.session import make_session

    paths = {}
    for spec in ("onnxqf-cpu:gemm=onnxqf", "onnxqf-cpu"):
        paths[spec] = tmp_path / f"{len(paths)}.onnx"
        ir.save(linear_model(64, 32, parse_lowering(spec), copies=1, seed=0), paths[spec])
    for isa, spec, warned in [("base", "onnxqf-cpu:gemm=onnxqf", True), ("avx2", "onnxqf-cpu:gemm=onnxqf", True),
                              ("vnni", "onnxqf-cpu:gemm=onnxqf", False), ("amx", "onnxqf-cpu:gemm=onnxqf", False),
                              ("base", "onnxqf-cpu", False)]:
        monkeypatch.setattr(kernels, "cpu_gemm_isa", lambda path=None, isa=isa: isa)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="onnxqf"):
            make_session(paths[spec], ep="cpu")
        assert any("no AVX-512 VNNI" in r.message for r in caplog.records) == warned, (isa, spec)


def test_groups_the_linear_op_cannot_tile_keep_the_three_nodes(cpu_lib):
    """`gemm=onnxqf` on a group whose width is not a multiple of 16 (or K of 4): the three-node lowering for it,
    the same outputs as `onnxqf-cpu`'s."""
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    model = linear_model(64, 40, parse_lowering("onnxqf-cpu:gemm=onnxqf"), copies=1, seed=2)
    ops = [n.op_type for n in model.graph]
    assert LINEAR_OP not in ops and OP in ops and DEQUANTIZE_OP in ops and "MatMulIntegerToFloat" in ops
    ref = _session(linear_model(64, 40, parse_lowering("onnxqf-cpu"), copies=1, seed=2), cpu_lib).run(None, {"x": x})
    np.testing.assert_array_equal(_session(model, cpu_lib).run(None, {"x": x})[0], ref[0])
    with pytest.raises(OnnxqfError, match="gemm must be one of mlas, onnxqf"):
        parse_lowering("onnxqf-cpu:gemm=cublas")
