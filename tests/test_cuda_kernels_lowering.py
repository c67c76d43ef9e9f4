"""CPU-side checks of the onnxqf-cuda lowering's graph (no GPU, no library needed)::

    python -m pytest -q tests/test_cuda_kernels_lowering.py
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxqf.lowering.cuda_kernels import DOMAIN, OP, OnnxqfCudaW8A8, emit_w8a8_kernel
from onnxqf.maths.hadamard import walsh_matrix
from onnxqf.maths.qmath import asymmetric_codes_f16, asymmetric_dequant_f32


def test_emit_node_and_initializers():
    K, N = 64, 48
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT16), shape=ir.Shape(["B", K]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18, DOMAIN: 1}, name="g")
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, size=(K, N), dtype=np.int8)
    scale = rng.uniform(0.001, 0.01, N)
    y = emit_w8a8_kernel(graph, x, q, scale, "lin")
    node = y.producer()
    graph.append(node)
    y.name = "y"
    y.shape = ir.Shape(["B", N])
    graph.outputs.append(y)
    assert (node.domain, node.op_type) == (DOMAIN, OP)
    wq, ws = node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy()
    assert wq.shape == (N, K) and wq.dtype == np.int8 and np.array_equal(wq, q.T)
    assert ws.dtype == np.float32 and np.array_equal(ws, (scale / 127.0).astype(np.float32))
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=9))
    onnx.checker.check_model(proto)


def test_placement_rule():
    low = OnnxqfCudaW8A8()
    node = ir.Node(DOMAIN, OP, inputs=[], name="n")
    assert low.node_issue(node, "cuda") is None
    assert "cpu" in low.node_issue(node, "cpu")
    assert low.domains == {DOMAIN: 1} and low.providers == ("cuda",)


def test_rewrite_emits_the_kernel_and_check_needs_cuda(tiny_fp16, tmp_path, capsys):
    """`rewrite --lowering onnxqf-cuda` on a float16 model: one W8A8Linear per linear group, recorded as lowered for
    cuda; `check --ep cpu` refuses it (the kernels run on CUDA only) in one line."""
    from onnxqf.cli import main

    out = tmp_path / "k.onnx"
    assert main(["rewrite", str(tiny_fp16), "--lowering", "onnxqf-cuda", "--weight-rounding", "rtn", "-o", str(out),
                 "-q"]) == 0
    model = onnx.load(str(out), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count(OP) == 2 * 4 and "MatMulInteger" not in ops  # q/k/v, o, gate/up, down per layer
    assert "Split" not in ops  # a group's op writes one output per linear
    outs = sorted(len(n.output) for n in model.graph.node if n.op_type == OP)
    assert outs == [1] * 4 + [2] * 2 + [3] * 2, outs  # o, down; gate/up; q/k/v
    for n in model.graph.node:
        sizes = [list(a.ints) for a in n.attribute if a.name == "output_sizes"]
        assert (len(n.output) > 1) == bool(sizes) and (not sizes or len(sizes[0]) == len(n.output))
    assert {p.key: p.value for p in model.metadata_props}["onnxqf.target"] == "cuda"
    # down_proj reads SwiGLU's two inputs, the product made inside the op: no Sigmoid is left
    glu = {n.name.split("/")[0]: list(n.input) for n in model.graph.node
           if n.op_type == OP and any(a.name == "input_glu" and a.i == 1 for a in n.attribute)}
    assert sorted(glu) == ["layers.0.down_proj", "layers.1.down_proj"] and "Sigmoid" not in ops
    gate_up = {n.name.split("/")[0]: list(n.output) for n in model.graph.node if n.op_type == OP}
    assert all(glu[f"layers.{i}.down_proj"][0] == gate_up[f"layers.{i}.gate_proj+up_proj"][0] and
               glu[f"layers.{i}.down_proj"][6] == gate_up[f"layers.{i}.gate_proj+up_proj"][1] for i in (0, 1))
    capsys.readouterr()
    assert main(["check", str(out), "--ep", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--ep cuda only" in err


def _glu_graph(order: int, extra_reader: bool = False, u_shape=("B", 8)):
    """y = Mul(Mul(g, Sigmoid(g)), u) (operand orders by ``order``'s bits) as an ir graph; returns (graph, x)."""
    f16 = ir.TensorType(ir.DataType.FLOAT16)
    g = ir.Value(name="g", type=f16, shape=ir.Shape(["B", 8]))
    u = ir.Value(name="u", type=f16, shape=ir.Shape(list(u_shape)))
    sig = ir.Node("", "Sigmoid", [g], name="sig")
    s = sig.outputs[0]
    inner = ir.Node("", "Mul", [g, s] if order & 1 else [s, g], name="inner")
    t = inner.outputs[0]
    outer = ir.Node("", "Mul", [t, u] if order & 2 else [u, t], name="outer")
    nodes = [sig, inner, outer]
    outs = [outer.outputs[0]]
    if extra_reader:
        other = ir.Node("", "Neg", [t], name="other")
        nodes.append(other)
        outs.append(other.outputs[0])
    graph = ir.Graph([g, u], outs, nodes=nodes, opset_imports={"": 18}, name="glu")
    return graph, outer.outputs[0]


def test_swiglu_of_finds_the_product_in_any_operand_order():
    from onnxqf.lowering.cuda_kernels import swiglu_of

    for order in range(4):
        graph, x = _glu_graph(order)
        found = swiglu_of(x)
        assert found is not None and (found.g.name, found.u.name) == ("g", "u"), order
        assert [n.name for n in found.nodes] == ["outer", "inner", "sig"]
    graph, x = _glu_graph(3, extra_reader=True)
    assert swiglu_of(x) is None  # silu(g) read elsewhere: the nodes must stay
    graph, x = _glu_graph(3, u_shape=("B", 1))
    assert swiglu_of(x) is None  # u broadcast: not the op's elementwise product
    graph, x = _glu_graph(3)
    assert swiglu_of(graph.node("sig").outputs[0]) is None and swiglu_of(graph.inputs[0]) is None


def _kron(groups, K):
    m = np.ones((1, 1))
    for size, f in groups:
        m = np.kron(m, np.eye(size) if f is None else f)
    assert m.shape == (K, K)
    return m


def test_kernel_rotation_layout_computes_the_kronecker_rotation():
    """The op's form of an online rotation (A^T padded, B, the inner size) rotates as ``x @ kron(A, B)``, for every
    shape of group list the online rotations write; shapes the op cannot run are left to the graph (None)."""
    from onnxqf.lowering.cuda_kernels import kernel_rotation
    from onnxqf.maths.hadamard import random_orthogonal

    rng = np.random.default_rng(0)
    cases = {
        "two dense (as d_ff 11008 = 172 x 64)": [(12, random_orthogonal(12, 1)), (32, random_orthogonal(32, 2))],
        "dense then identity (o_proj's head mixing)": [(4, random_orthogonal(4, 3)), (16, None)],
        "identity then dense": [(3, None), (48, random_orthogonal(48, 4))],
        "one dense group": [(96, random_orthogonal(96, 5))],
        "an inner size of 8 (as 2048 = 256 x 8)": [(20, random_orthogonal(20, 8)), (8, random_orthogonal(8, 9))],
    }
    for what, groups in cases.items():
        K = int(np.prod([s for s, _ in groups]))
        rot = kernel_rotation(groups, K)
        assert rot is not None, what
        x = rng.standard_normal((5, K))
        np.testing.assert_allclose(rot.apply(x), x @ _kron(groups, K), atol=1e-12, err_msg=what)
        if rot.at is not None:
            assert rot.at.shape[0] % 16 == 0 and not rot.at[K // rot.block:].any()
    dense = random_orthogonal(16, 6)
    assert kernel_rotation([(16, dense), (4, random_orthogonal(4, 7))], 64) is None  # inner size not a multiple of 8
    assert kernel_rotation([(2, dense[:2, :2]), (16, dense), (16, dense)], 512) is None  # three groups
    assert kernel_rotation([(4096, None), (16, dense)], 4096 * 16) is None  # a row larger than the op's shared memory


def test_kernel_rotation_runs_walsh_hadamard_factors_as_transforms():
    """A factor that is Sylvester's normalised Hadamard matrix goes to the op as a Walsh flag, not a matrix (the op
    runs it as a fast transform); a factor found with the opposite sign trades it with the other factor; dense
    factors stay matrices. The op's form rotates as ``x @ kron(A, B)`` in every case."""
    from onnxqf.lowering.cuda_kernels import kernel_rotation
    from onnxqf.maths.hadamard import random_orthogonal, walsh_sign

    h32, h4, h16 = walsh_matrix(32), walsh_matrix(4), walsh_matrix(16)
    assert walsh_sign(h32) == 1 and walsh_sign(-h4) == -1 and walsh_sign(random_orthogonal(8, 0)) == 0
    assert walsh_sign(None) == 0 and walsh_sign(np.eye(3)) == 0
    assert walsh_sign(h32.astype(np.float16).astype(np.float64)) == 1  # a float16 model's factor, read back
    rng = np.random.default_rng(3)
    cases = {  # groups -> (walsh flags, A^T given, B given)
        "head mixing: 32 heads x 128": ([(32, h32), (128, None)], (2, False, False)),
        "d_ff: a dense Hadamard over a Walsh 32": ([(12, random_orthogonal(12, 1)), (32, h32)], (1, True, False)),
        "-H x H: the sign moves to B": ([(4, -h4), (16, h16)], (2, False, True)),
        "-H x -H": ([(4, -h4), (16, -h16)], (3, False, False)),
        "dense x dense": ([(4, random_orthogonal(4, 5)), (16, random_orthogonal(16, 6))], (0, True, True)),
    }
    for what, (groups, (walsh, has_at, has_b)) in cases.items():
        K = int(np.prod([s for s, _ in groups]))
        rot = kernel_rotation(groups, K)
        assert (rot.walsh, rot.at is not None, rot.b is not None) == (walsh, has_at, has_b), what
        x = rng.standard_normal((3, K))
        np.testing.assert_allclose(rot.apply(x), x @ _kron(groups, K), atol=1e-12, err_msg=what)


def test_kernel_rotation_balances_a_kronecker_factor():
    """An outer factor that is itself a Kronecker product (a Sylvester Hadamard: kron(H256, H16) = kron(H64, H64)) is
    split so the op's two factors are balanced: the same rotation for half the work; a factor that does not split
    (a random orthogonal one) stays as it is."""
    from onnxqf.lowering.cuda_kernels import kernel_rotation, kron_split
    from onnxqf.maths.hadamard import random_orthogonal

    h2 = np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2)
    h16 = np.ones((1, 1))
    for _ in range(4):
        h16 = np.kron(h16, h2)
    h256 = np.kron(h16, h16)
    groups = [(256, h256), (16, h16)]
    rot = kernel_rotation(groups, 4096)
    assert rot.block == 64 and rot.walsh == 3 and rot.at is None and rot.b is None  # both factors H64 / 8
    x = np.random.default_rng(1).standard_normal((3, 4096))
    np.testing.assert_allclose(rot.apply(x), x @ _kron(groups, 4096), atol=1e-12)
    q4 = random_orthogonal(4, 2)
    groups = [(256, np.kron(q4, np.kron(h16, np.kron(h2, h2)))), (16, h16)]
    rot = kernel_rotation(groups, 4096)  # a dense 4 inside the outer factor: 64 (dense) x 64 (Walsh)
    assert rot.block == 64 and rot.walsh == 1 and rot.at.shape == (64, 64) and rot.b is None
    np.testing.assert_allclose(rot.apply(x), x @ _kron(groups, 4096), atol=1e-12)
    q = random_orthogonal(64, 3)
    assert kron_split(q, 8) is None and kron_split(np.kron(q[:8, :8], h16), 16) is not None
    assert kernel_rotation([(64, q), (16, None)], 1024).block == 16  # nothing to split: as given


def test_kernel_rotation_of_d_ff_11008_is_williamson_172_over_walsh_64():
    """Llama-2-7B's d_ff: the rotation onnxqf builds (hadamard_factors: 172 x 16 x 4, online groups 172 and 64)
    reaches the op as Williamson's 172 (dense, A^T padded to 176: the size the one-kernel path holds in shared
    memory) over a Walsh flag of 64, and rotates as the Kronecker product does; Paley's 344 x 32 (the rotation
    before 172 existed) stays 344 x 32, since it does not split."""
    from onnxqf.lowering.cuda_kernels import kernel_rotation
    from onnxqf.maths.hadamard import hadamard_factors, online_groups

    groups = online_groups(hadamard_factors(11008))
    assert [s for s, _ in groups] == [172, 64]
    rot = kernel_rotation(groups, 11008)
    assert rot.block == 64 and rot.walsh == 1 and rot.at.shape == (176, 176) and rot.b is None
    assert not rot.at[172:].any() and not rot.at[:, 172:].any()
    x = np.random.default_rng(2).standard_normal((2, 11008))
    want = x.reshape(2, 172, 64)
    want = np.einsum("ij,rjb->rib", groups[0][1].T, want @ groups[1][1])  # x @ kron(A, B) as A^T X B
    np.testing.assert_allclose(rot.apply(x), want.reshape(2, 11008), atol=1e-10)
    paley = kernel_rotation(online_groups(hadamard_factors(11008, block=344)), 11008)
    assert paley.block == 32 and paley.at.shape == (352, 352)


def _op_reference(node, x):
    """numpy: what onnxqf.W8A8Linear computes (kernels.h; the rotation in fp32 with fp16 results, as the op)."""
    vals = [None if v is None else v.const_value.numpy() for v in node.inputs[1:]]
    w, ws = vals[0], vals[1]
    ra = vals[3] if len(vals) > 3 else None
    rb = vals[4] if len(vals) > 4 else None
    block = node.attributes["rotation_block"].value if "rotation_block" in node.attributes else 0
    walsh = node.attributes["rotation_walsh"].value if "rotation_walsh" in node.attributes else 0
    K = x.shape[-1]
    x = x.astype(np.float16)
    if block:
        a = K // block
        X = x.reshape(-1, a, block).astype(np.float32)
        if rb is not None:
            X = X @ rb[:block, :block].astype(np.float32)
        elif walsh & 1:
            X = X @ walsh_matrix(block).astype(np.float32)
        if ra is not None:  # a dense factor reads the fp16-rounded row
            X = np.einsum("pi,rib->rpb", ra[:a, :a].astype(np.float32), X.astype(np.float16).astype(np.float32))
        elif walsh & 2:
            X = np.einsum("pi,rib->rpb", walsh_matrix(a).astype(np.float32), X)
        x = X.astype(np.float16).reshape(-1, K)
    if "asymmetric" in node.attributes:  # int8-token-asym's codes and rescale (onnxqf.maths.qmath)
        codes, s, zp = asymmetric_codes_f16(x)
        acc = codes.astype(np.float64) @ w.T.astype(np.float64)
        return asymmetric_dequant_f32(acc, s, zp, vals[8], ws).astype(np.float16)
    amax = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float16(2.0 ** -9)).astype(np.float16)
    inv = (np.float16(127.0) / amax).astype(np.float16)
    codes = np.clip(np.rint((x * inv).astype(np.float16).astype(np.float32)), -127, 127)
    acc = codes.astype(np.float64) @ w.T.astype(np.float64)
    return ((acc.astype(np.float32) * amax.astype(np.float32)) * ws[None, :]).astype(np.float16)


def test_online_rotation_moves_into_the_op():
    """A linear behind an online rotation: the onnxqf-cuda lowering takes the rotation into its op (no MatMul,
    Transpose or Reshape left) and computes what the standard int8-token graph with the rotation nodes computes, to
    the fp16 rounding of the rotated values; ``fuse_rotations=False`` keeps the nodes."""
    import onnxruntime as ort

    from onnxqf.runtime.linears import linear_model, parse_lowering

    rng = np.random.default_rng(1)
    # one group (96 = 12 * 8); 36 x 16 (SmolLM2's hidden); 256 x 8 (hidden 2048); 256 x 16 (Llama-2-7B's hidden)
    for K in (96, 576, 2048, 4096):
        x = rng.standard_normal((6, K)).astype(np.float16)
        x[:, 3] *= 30  # an outlier channel: what the rotation spreads
        fused = linear_model(K, 32, parse_lowering("onnxqf-cuda"), copies=2, dtype="float16", rotate=True)
        ops = [n.op_type for n in fused.graph]
        assert ops.count(OP) == 2 and not {"MatMul", "Transpose", "Reshape", "Shape"} & set(ops), ops
        kept = linear_model(K, 32, parse_lowering("onnxqf-cuda:fuse_rotations=false"), copies=2, dtype="float16",
                            rotate=True)
        assert "MatMul" in [n.op_type for n in kept.graph]
        standard = linear_model(K, 32, parse_lowering("int8-token"), copies=2, dtype="float16", rotate=True)
        proto = ir.serde.serialize_model(standard).SerializeToString()
        want = ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, {"x": x})
        floats = ir.serde.serialize_model(linear_model(K, 32, None, copies=2, dtype="float16", rotate=True))
        exact = ort.InferenceSession(floats.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        for node, y, f in zip([n for n in fused.graph if n.op_type == OP], want, exact):
            got = _op_reference(node, x).astype(np.float32)
            y, f = y.astype(np.float32), f.astype(np.float32)
            top = np.abs(f).max()
            assert np.abs(got - y).max() <= 0.02 * top, K  # a code may move by one where a rotated value rounds
            assert np.abs(got - f).max() <= 0.05 * top, K  # and both are W8A8 of the rotated float product


def _asym_rows(M, K, seed):
    """float16 rows with an outlier channel, an all-zero token, an all-positive one, a tiny one and an all-negative
    one (the asymmetric codes' edges: the range always holds 0, the step's floor)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, 3] *= 30
    x[1] = 0.0
    x[2] = np.abs(x[2]) + 0.5
    x[3] *= 1e-6
    x[4] = -np.abs(x[4]) - 0.25
    return x.astype(np.float16)


def _fp16_nodes(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    """The model's outputs with every node run in its own dtype, each float16 result rounded as one IEEE operation:
    ONNX's reference evaluator (numpy), as ONNX Runtime's CUDA provider runs float16 nodes. (Its CPU provider is no
    reference here: it runs float16 chains in float32 between inserted Casts, and its float16 Div is not correctly
    rounded on every CPU.)"""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(ir.serde.serialize_model(model)).run(None, {"x": x})


def test_asymmetric_codes_model_the_standard_graph():
    """qmath.asymmetric_codes_f16 / asymmetric_dequant_f32 (what the op's asymmetric codes compute, kernels.h) equal
    int8-token-asym's float16 nodes, every bit (_fp16_nodes): the codes' product and rescale of a linear."""
    from onnxqf.runtime.linears import linear_model, parse_lowering

    for K, N in ((64, 48), (576, 40), (2048, 16)):
        x = _asym_rows(7, K, K)
        standard = linear_model(K, N, parse_lowering("int8-token-asym"), copies=1, dtype="float16")
        inits = {v.name: v.const_value.numpy() for v in standard.graph.initializers.values()
                 if v.const_value is not None}
        q = next(v for n, v in inits.items() if n.startswith("linear0.weight_int8"))
        want = _fp16_nodes(standard, x)[0]
        codes, s, zp = asymmetric_codes_f16(x)
        assert codes.dtype == np.int8 and (zp[1] == 0) and s[1] == np.float16(1e-4) and s[3] == np.float16(1e-4)
        assert zp[2] == 0 and codes[2].max() == 127  # all positive: the range is [0, max], max the top code
        assert zp[4] == 255 and codes[4].min() == -128  # all negative: [min, 0], 0 the top code
        acc = codes.astype(np.float64) @ q.astype(np.float64)
        scale = next(v for n, v in inits.items() if n.startswith("linear0.weight_scale"))
        got = asymmetric_dequant_f32(acc, s, zp, q.astype(np.int64).sum(axis=0), scale).astype(np.float16)
        np.testing.assert_array_equal(got, want)


def _nvcc() -> str | None:
    """nvcc as kernels/build.sh finds it ($CUDACXX, PATH, /usr/local/cuda/bin), or None."""
    import shutil

    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def test_asymmetric_row_arithmetic_on_the_host(tmp_path):
    """The kernels' own source of the asymmetric codes (quant_row.cuh: chunk_range, asym_row_scale, code_of),
    compiled for the host by nvcc (kernels/tests/asym_row_host.cu; CI has nvcc), gives qmath.asymmetric_codes_f16's
    codes, steps and zero points to the bit on rows with every edge: all zero, one sign, tiny, exact .5 quotients.
    (The device's __hdiv is ONNX Runtime's CUDA Div itself; the GPU tests hold the kernels against that graph.)"""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc here (CI has one)")
    src = Path(__file__).resolve().parents[1] / "kernels"
    exe = tmp_path / "asym_row_host"
    subprocess.run([nvcc, "-std=c++17", "-O2", f"-I{src / 'src'}", "-o", str(exe),
                    str(src / "tests" / "asym_row_host.cu")], check=True, capture_output=True, timeout=600)
    M, K = 64, 512
    x = _asym_rows(M, K, 11)
    x[5] = np.float16(0.5) * (np.arange(K) % 9 - 4)  # quotients on .5 ties
    x[6] = np.float16(-3.0)  # one value: lo = -3, hi = 0
    x[7, :] = 0
    x[7, 9] = np.float16(65504.0)  # the largest fp16
    x.tofile(tmp_path / "x.bin")
    subprocess.run([str(exe), str(tmp_path / "x.bin"), str(tmp_path / "y.bin"), str(M), str(K)], check=True,
                   timeout=60)
    raw = np.fromfile(tmp_path / "y.bin", np.uint8).reshape(M, 8 + K)
    s_got = raw[:, :4].copy().view(np.float32)
    z_got = raw[:, 4:8].copy().view(np.float32)
    codes_got = raw[:, 8:].view(np.int8)
    codes, s, zp = asymmetric_codes_f16(x)
    np.testing.assert_array_equal(s_got, s.astype(np.float32))
    np.testing.assert_array_equal(z_got, zp.astype(np.float32) - 128)
    np.testing.assert_array_equal(codes_got, codes)


def test_asymmetric_op_computes_int8_token_asym():
    """`onnxqf-cuda:asymmetric=true`: one op per group with attribute asymmetric, the weights' steps (not / 127) and
    their per-channel sums as input 9, no standard quantization node; its definition (kernels.h) gives
    int8-token-asym's outputs to the bit (_fp16_nodes); behind an online rotation, the rotation goes into the op too
    and the outputs are that graph's with the rotation nodes, to the fp16 rounding of the rotated values."""
    from onnxqf.runtime.linears import linear_model, parse_lowering

    K, N = 96, 32
    x = _asym_rows(6, K, 5)
    fused = linear_model(K, N, parse_lowering("onnxqf-cuda:asymmetric=true"), copies=2, dtype="float16")
    nodes = [n for n in fused.graph if n.op_type == OP]
    assert len(nodes) == 2 and not {"MatMulInteger", "ReduceMin", "Round"} & {n.op_type for n in fused.graph}
    want = _fp16_nodes(linear_model(K, N, parse_lowering("int8-token-asym"), copies=2, dtype="float16"), x)
    for node, y in zip(nodes, want):
        assert node.attributes["asymmetric"].value == 1 and len(node.inputs) == 10
        w, colsum = node.inputs[1].const_value.numpy(), node.inputs[9].const_value.numpy()
        assert colsum.dtype == np.float32 and np.array_equal(colsum, w.astype(np.int64).sum(axis=1))
        np.testing.assert_array_equal(_op_reference(node, x), y)
    assert OnnxqfCudaW8A8(asymmetric=True).describe() == "onnxqf-cuda:asymmetric=true"
    for K in (96, 576):  # one dense group; 36 (dense) x 16 (Walsh)
        x = _asym_rows(6, K, K)
        fused = linear_model(K, N, parse_lowering("onnxqf-cuda:asymmetric=true"), copies=1, dtype="float16",
                             rotate=True)
        node, = [n for n in fused.graph if n.op_type == OP]
        assert "rotation_block" in node.attributes and "MatMul" not in [n.op_type for n in fused.graph]
        standard = linear_model(K, N, parse_lowering("int8-token-asym"), copies=1, dtype="float16", rotate=True)
        y = _fp16_nodes(standard, x)[0].astype(np.float32)
        got = _op_reference(node, x).astype(np.float32)
        assert np.abs(got - y).max() <= 0.02 * np.abs(y).max(), K  # a code may move where a rotated value rounds


def test_hybrid_rewrite_moves_every_online_rotation_into_the_ops(tiny_fp16, ids_file, tmp_path):
    """`rewrite --hybrid --lowering onnxqf-cuda`: every online rotation the hybrid writes (norm outputs, o_proj's head
    mixing, down_proj) is taken into the W8A8Linear reading it: no rotation node is left, and each op says its
    rotation's inner size."""
    from onnxqf.cli import main
    from onnxqf.graph.structure import ONLINE_ROTATION

    out = tmp_path / "h.onnx"
    assert main(["rewrite", str(tiny_fp16), "--hybrid", "--lowering", "onnxqf-cuda", "--weight-rounding", "rtn",
                 "--calib", str(ids_file), "-o", str(out), "-q"]) == 0
    model = onnx.load(str(out), load_external_data=False)
    assert not [n.name for n in model.graph.node if any(p.key == ONLINE_ROTATION for p in n.metadata_props)]
    ops = [n for n in model.graph.node if n.op_type == OP]
    blocks = {n.name.split("/")[0]: {a.name: a.i for a in n.attribute}.get("rotation_block") for n in ops}
    assert len(ops) == 8 and all(blocks.values()), blocks
    assert blocks["layers.0.down_proj"] == 96 and blocks["layers.0.o_proj"] == 16  # d_ff 96: one group; 4 heads of 16
    glu = [n.name for n in ops if any(a.name == "input_glu" for a in n.attribute)]
    assert sorted(glu) == ["layers.0.down_proj/w8a8_linear", "layers.1.down_proj/w8a8_linear"]  # rotation + SwiGLU


def test_act_quant_picks_the_cuda_lowering_field():
    """`--lowering onnxqf-cuda` makes symmetric codes unless `--act-quant asym`; a lowering spec and --act-quant that
    disagree are refused in one line; without --lowering, `--act-quant asym` on CUDA stays the standard-op
    int8-token-asym."""
    from onnxqf.errors import OnnxqfError
    from onnxqf.options import quant_config
    from onnxqf.runtime.target import get_target

    target = get_target("cuda")
    for acts in (None, "token"):
        low = target.lowering(quant_config("int8", activations=acts, lowering="onnxqf-cuda"))
        assert not low.asymmetric and low.describe() == "onnxqf-cuda"
    low = target.lowering(quant_config("int8", activations="asym", lowering="onnxqf-cuda"))
    assert low.asymmetric and low.describe() == "onnxqf-cuda:asymmetric=true"
    assert target.lowering(quant_config("int8", activations="asym")).name == "int8-token-asym"
    with pytest.raises(OnnxqfError, match="disagree on the asymmetric codes"):
        target.lowering(quant_config("int8", activations="token", lowering="onnxqf-cuda:asymmetric=true"))
    with pytest.raises(OnnxqfError, match="disagree on the asymmetric codes"):
        target.lowering(quant_config("int8", activations="asym", lowering="onnxqf-cuda:asymmetric=false"))


def test_hybrid_rewrite_with_asymmetric_codes(tiny_fp16, ids_file, tmp_path):
    """`rewrite --hybrid --lowering onnxqf-cuda --act-quant asym`: every op has the asymmetric codes (attribute,
    Wsum), and every online rotation and SwiGLU product goes into the ops as with the symmetric codes."""
    from onnxqf.cli import main
    from onnxqf.graph.structure import ONLINE_ROTATION

    out = tmp_path / "ha.onnx"
    assert main(["rewrite", str(tiny_fp16), "--hybrid", "--lowering", "onnxqf-cuda", "--act-quant", "asym",
                 "--weight-rounding", "rtn", "--calib", str(ids_file), "-o", str(out), "-q"]) == 0
    model = onnx.load(str(out), load_external_data=False)
    ops = [n for n in model.graph.node if n.op_type == OP]
    attrs = [{a.name: a.i for a in n.attribute} for n in ops]
    assert len(ops) == 8 and all(a.get("asymmetric") == 1 and a.get("rotation_block") for a in attrs), attrs
    assert all(len(n.input) == 10 and n.input[9] for n in ops)
    assert not [n.name for n in model.graph.node if any(p.key == ONLINE_ROTATION for p in n.metadata_props)]
    assert sum(1 for a in attrs if a.get("input_glu") == 1) == 2
    assert any(p.value.startswith("onnxqf-cuda:asymmetric=true") for p in model.metadata_props), model.metadata_props


def _sln_graph(K=64, read_mean=False, extra_reader=False, bias=False):
    """a, skip -> SkipSimplifiedLayerNormalization -> (xn -> two MatMuls, sum -> Identity), float16, as ir."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f16 = TensorProto.FLOAT16
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, K).astype(np.float16), "gamma"),
             numpy_helper.from_array(rng.standard_normal((K, 32)).astype(np.float16), "w1"),
             numpy_helper.from_array(rng.standard_normal((K, 16)).astype(np.float16), "w2"),
             numpy_helper.from_array(np.zeros(K, np.float16), "beta")]
    sln_in = ["a", "skip", "gamma"] + (["beta"] if bias else [])
    nodes = [helper.make_node("SkipSimplifiedLayerNormalization", sln_in, ["xn", "mean" if read_mean else "", "",
                                                                          "s"], domain="com.microsoft", epsilon=1e-6),
             helper.make_node("MatMul", ["xn", "w1"], ["y1"]), helper.make_node("MatMul", ["xn", "w2"], ["y2"]),
             helper.make_node("Identity", ["s"], ["s_out"])]
    outs = [helper.make_tensor_value_info(n, f16, None) for n in ("y1", "y2", "s_out")]
    if read_mean:
        outs.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, None))
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["xn"], ["r"]))
        outs.append(helper.make_tensor_value_info("r", f16, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, f16, [2, K]) for n in ("a", "skip")], outs,
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    graph = ir.serde.deserialize_model(m).graph
    sln = next(n for n in graph if n.op_type == "SkipSimplifiedLayerNormalization")
    readers = {id(n) for n in graph if n.op_type == "MatMul"}
    return graph, sln, readers


def test_skip_norm_of_rules():
    """skip_norm_of: the node whose output 0 only the group reads, no bias, mean / inverse deviation unread; the sum
    output kept when read; its epsilon (ONNX Runtime's default when absent)."""
    from onnxqf.lowering.cuda_kernels import skip_norm_of

    graph, sln, readers = _sln_graph()
    norm = skip_norm_of(sln.outputs[0], readers)
    assert norm is not None and norm.node is sln and norm.sum is sln.outputs[3]
    assert (norm.x.name, norm.skip.name, norm.gamma.name) == ("a", "skip", "gamma")
    assert abs(norm.epsilon - 1e-6) < 1e-12
    assert skip_norm_of(sln.outputs[0], set(list(readers)[:1])) is None  # another linear reads it too
    for kwargs in ({"read_mean": True}, {"extra_reader": True}, {"bias": True}, {"K": 40}):
        graph, sln, readers = _sln_graph(**kwargs)
        assert skip_norm_of(sln.outputs[0], readers) is None, kwargs


def test_genai_rewrite_moves_the_norms_into_the_ops(tmp_path):
    """`rewrite --lowering onnxqf-cuda` on the model builder's float16 CUDA folder: every
    SkipSimplifiedLayerNormalization in front of q/k/v, gate/up and lm_head goes into its op (skip_norm, the sum its
    last output where the residual stream goes on); ``fuse_norm=false`` keeps them. (The numbers:
    kernels/tests/test_kernels_gpu.py on a GPU.)"""
    import pytest

    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("transformers")
    from onnxqf.cli import main
    from onnxqf.models.genai_export import export_genai
    from onnxqf.runtime import kernels

    from tiny import save_byte_tokenizer, tiny_model

    try:
        kernels.library_path()
    except Exception as exc:  # CI builds the library before the tests (.ci/run); a checkout without it cannot copy it
        pytest.skip(f"the kernels library is not built here: {exc}")
    model = tiny_model("llama-gqa")
    model.save_pretrained(str(tmp_path / "hf"))
    save_byte_tokenizer(tmp_path / "hf")
    export_genai(str(tmp_path / "hf"), tmp_path / "gen" / "model.onnx", dtype="float16", ep="cuda")
    before = onnx.load(str(tmp_path / "gen" / "model.onnx"), load_external_data=False)
    slns = sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in before.graph.node)
    assert slns == 2 * 2  # after attention and after the MLP, per layer (the last one is the final norm)
    counts = {}
    for name, lowering in (("k", "onnxqf-cuda"), ("kept", "onnxqf-cuda:fuse_norm=false")):
        assert main(["rewrite", str(tmp_path / "gen"), "--lowering", lowering, "--quantize-lm-head",
                     "--weight-rounding", "rtn", "--ep", "cuda", "-o", str(tmp_path / name), "-q"]) == 0
        graph = onnx.load(str(tmp_path / name / "model.onnx"), load_external_data=False).graph
        counts[name] = sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in graph.node)
        normed = [n for n in graph.node if n.op_type == OP and any(a.name == "skip_norm" for a in n.attribute)]
        if name == "kept":
            assert not normed
            continue
        assert len(normed) == slns  # gate/up after attention's, q/k/v of the next layer and lm_head after the MLP's
        modes = []
        for n in normed:
            modes.append(next(a.i for a in n.attribute if a.name == "skip_norm"))
            assert len(n.input) == 9 and n.input[7] and n.input[8], n.input
            if modes[-1] == 2:  # its sum goes on down the residual stream: the next op's skip
                assert [m for m in graph.node if n.output[-1] in m.input], n.name
        assert sorted(modes) == [1] + [2] * (slns - 1)  # lm_head's (the final norm's sum is read by nothing)
    assert counts == {"k": 0, "kept": slns}


def test_an_older_cuda_library_is_refused_in_one_line(monkeypatch, tmp_path):
    """A CUDA library built before this onnxqf (its ops lack skip_norm) is refused when a session would register it,
    with the command that rebuilds it, instead of ONNX Runtime's invalid-graph error."""
    import pytest

    from onnxqf.errors import OnnxqfError
    from onnxqf.runtime import kernels

    lib = tmp_path / kernels.LIBRARY
    lib.write_bytes(b"")
    monkeypatch.setattr(kernels, "library_version", lambda path=None: kernels.KERNELS_VERSION - 1)

    class Options:
        def register_custom_ops_library(self, path):
            raise AssertionError("registered an old library")

    with pytest.raises(OnnxqfError, match="rebuild it"):
        kernels.register(Options(), lib)


def test_gemm_tile_rule_picks_the_measured_winners(monkeypatch):
    """The library's default GEMM tile (kernels.h: w8a8_gemm_sm90_tile) read through the built library on the CPU,
    against the H100 runs it was fitted to (docs/benchmarks.md g16, 132 multiprocessors): the 64-row tile to 128
    rows and at 192, the 256-row tile in clusters along N (6) where its waves cost least (528, 1024, 2048 rows; 1536
    at N = 11008), else 128-row tiles: clusters of 2 (0) for an even count of 128-row tiles, stream-K (3) for odd;
    and tile 9 (tokens on the tile's second side) where its grid is one wave and costs least: 264 rows at N = 4096
    (g18: 0.91x / 1.08x FP16 against tile 3's 0.78x / 0.85x), not at N = 11008 (three waves)."""
    from onnxqf.runtime import kernels

    root = Path(__file__).resolve().parents[1]
    lib = root / "kernels" / "build" / kernels.LIBRARY
    if not lib.is_file():
        pytest.skip("onnxqf's CUDA library is not built: bash kernels/build.sh")
    monkeypatch.syspath_prepend(str(root / "kernels" / "build" / "deps"))  # the build's nvidia-cuda-runtime wheel
    want = {  # (M, N): tile
        (1, 4096): 1, (128, 32000): 1, (192, 4096): 1, (192, 11008): 1,
        (264, 4096): 9, (264, 11008): 3, (396, 4096): 0, (396, 11008): 0, (256, 4096): 1, (290, 4096): 3,
        (528, 4096): 6, (528, 11008): 6, (1024, 4096): 6, (1024, 11008): 6,
        (1536, 4096): 0, (1536, 11008): 6, (2048, 4096): 6, (2048, 11008): 6,
    }
    got = {mn: kernels.gemm_tile(*mn, sm_count=132, path=lib) for mn in want}
    assert got == want
    # fewer multiprocessors: more waves of the 256-row tiles, where the 128-row tiles fit the grid better
    assert kernels.gemm_tile(1536, 4096, sm_count=96, path=lib) == 6 and kernels.gemm_tile(2048, 4096, 114, lib) == 0
    # rule 1 (ONNXQF_GEMM_RULE=1, not yet timed): the tiles with the tokens on their second side where their grid
    # costs least: 264 rows make 2 x 64 CTAs of 144 tokens x 64 channels (one wave, as cuBLAS's FP16 64 x 136), 528
    # rows 4 x 32 of 144 x 128; stream-K tiles 11 / 12 to 128 rows; where they cost more, rule 0's pick
    want1 = {(16, 4096): 11, (32, 4096): 11, (33, 4096): 12, (128, 11008): 12, (192, 4096): 1, (264, 4096): 9,
             (264, 11008): 3, (396, 4096): 0, (528, 4096): 10, (1024, 4096): 6, (1536, 4096): 0, (2048, 4096): 6,
             (2048, 11008): 6}
    assert {mn: kernels.gemm_tile(*mn, sm_count=132, path=lib, rule=1) for mn in want1} == want1
    with pytest.raises(kernels.OnnxqfError, match="no GEMM tile rule 2"):
        kernels.gemm_tile(264, 4096, sm_count=132, path=lib, rule=2)


def _build_script(args, env_extra, tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ONNXQF_KERNELS_BUILD": str(tmp_path / "build"), **env_extra}
    return subprocess.run(["bash", str(root / "kernels" / "build.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args,deps,match", [
    ([], "junk", "is not a whole pack written by `bash kernels/build.sh --pack-deps FILE`"),
    ([], "missing", "missing: no such file"),
    ([], "partial", "is not a whole pack .*no deps/cutlass_library/source/include/cutlass/cutlass.h in it"),
    (["--pack-deps", "folder/"], None, "a file to write, not a folder"),
    (["--pack-deps", "deps.tar.xz", "more"], None, "unexpected argument after --pack-deps"),
    (["--pack-deps", "nofolder/deps.tar.xz"], None, "--pack-deps .*: no folder"),
    (["--pack-deps"], None, "--pack-deps needs a file"),
    (["--fast"], None, "unknown argument --fast"),
])
def test_build_script_refuses_bad_input_in_one_line(tmp_path, args, deps, match):
    """kernels/build.sh: a dependency pack that is not one, or bad arguments: one line, exit 2, no build folder."""
    env = {}
    if deps:
        path = tmp_path / deps
        if deps == "junk":
            path.write_bytes(b"not an xz archive")
        elif deps == "partial":  # an xz tar of the right form, CUTLASS's headers missing
            (tmp_path / "src" / "deps" / "nvidia").mkdir(parents=True)
            with tarfile.open(path, "w:xz") as tar:
                tar.add(tmp_path / "src" / "deps", arcname="deps")
        env["ONNXQF_KERNELS_DEPS"] = str(path)
    (tmp_path / "folder").mkdir()
    args = [str(tmp_path / a) if a.endswith((".tar.xz", "/")) else a for a in args]
    done = _build_script(args, env, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and re.search(match, done.stderr), done.stderr
    assert not (tmp_path / "build").exists()


def test_build_dependency_pack_holds_what_an_offline_build_reads(tmp_path):
    """`--pack-deps FILE` writes CUTLASS's headers, libcudart and ONNX Runtime's headers under the names build.sh
    looks for (an offline GPU machine unpacks it with ONNXQF_KERNELS_DEPS=FILE and builds with no download)."""
    root = Path(__file__).resolve().parents[1]
    build = root / "kernels" / "build"
    inputs = ["deps/cutlass_library/source/include/cutlass/cutlass.h",
              "deps/cutlass_library/source/tools/util/include/cutlass/util/packed_stride.hpp",
              "deps/nvidia/cu13/lib/libcudart.so.13",
              "ortheaders/include/onnxruntime/onnxruntime_cxx_api.h"]
    if not all((build / f).is_file() for f in inputs):  # (else build.sh would fetch them into the checkout)
        pytest.skip("the CUDA library's build inputs are not fetched: bash kernels/build.sh")
    # the pack is made from the checkout's build folder (its inputs fetched), not the empty tmp one
    done = _build_script(["--pack-deps", str(tmp_path / "deps.tar.xz")], {"ONNXQF_KERNELS_BUILD": str(build)},
                         tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    with tarfile.open(tmp_path / "deps.tar.xz") as tar:
        names = set(tar.getnames())
    for want in [*inputs, "deps/cutlass_library/source/include/cute/tensor.hpp"]:
        assert want in names, want
    assert not list(tmp_path.glob("deps.tar.xz.tmp*"))

    # an offline machine: the pack unpacked into an empty build folder, no pip (PYTHON=false), cmake and nvcc
    # stand-ins that make the library file: build.sh reaches the compile with every input from the pack
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "cmake").write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do\n  case $1 in -B) mkdir -p "$2" ;; '
                                '--build) touch "$2/libonnxqf_kernels.so" ;; esac\n  shift\ndone\n')
    (fake / "ninja").write_text("#!/bin/sh\nexit 0\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    done = _build_script([], {"ONNXQF_KERNELS_DEPS": str(tmp_path / "deps.tar.xz"), "PYTHON": "false",
                              "CUDACXX": "/bin/true", "PATH": f"{fake}:{os.environ['PATH']}"}, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wheels" not in done.stdout and "from PyPI" not in done.stdout and "API headers ->" not in done.stdout
    assert (tmp_path / "build" / "libonnxqf_kernels.so").is_file()
    assert (tmp_path / "build" / "deps/cutlass_library/source/include/cute/tensor.hpp").is_file()
