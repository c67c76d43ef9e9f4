"""CPU-side checks of the onnxqf-cuda lowering's graph (no GPU, no library needed)::

    python -m pytest -q tests/test_cuda_kernels_lowering.py
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxqf.lowering.cuda_kernels import DOMAIN, OP, OnnxqfCudaW8A8, emit_w8a8_kernel


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
    assert {p.key: p.value for p in model.metadata_props}["onnxqf.target"] == "cuda"
    capsys.readouterr()
    assert main(["check", str(out), "--ep", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--ep cuda only" in err
