"""W8A8 through onnxqf's own CUDA kernels: one fused node per linear group (``--lowering onnxqf-cuda``).

The group's int8 weights (rounded as every W8A8 lowering rounds them) are concatenated along the output channels and
stored transposed, ``[N, K]`` ("TN", what the int8 tensor cores read), and the whole linear is one node of the
``onnxqf`` domain, from ``kernels/`` (``onnxqf.runtime.kernels``)::

    y = onnxqf.W8A8Linear(x, Wq[N, K] int8, wscale[N] float32)       (Split into the group's outputs if several)

which computes, inside one op, exactly what ``int8-token`` computes with standard ops (kernels/README.md)::

    amax = max(max|x| per token, 1e-4); codes = Round(x * (127 / amax))     (float16, as the graph does)
    y    = Cast<f16>(Cast<f32>(codes @ Wq^T) * amax * wscale),  wscale = w_scale / 127 (float32)

so its outputs are those of ``int8-token`` to the bit. The op has a CUDA kernel only, for sm_90a (H100/H200), and
takes float16 activations: float32 models are refused. Sessions that run the graph must load the library
(:func:`onnxqf.runtime.kernels.register`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from onnxqf.errors import OnnxqfError
from onnxqf.graph import edit
from onnxqf.lowering.base import LinearGroup, register, replace_outputs
from onnxqf.lowering.w8a8 import W8A8Lowering

__all__ = ["DOMAIN", "OP", "OnnxqfCudaW8A8", "emit_w8a8_kernel"]

DOMAIN = "onnxqf"  # = onnxqf.runtime.kernels.DOMAIN (not imported: lowering needs no GPU library)
OP = "W8A8Linear"


def emit_w8a8_kernel(graph: ir.Graph, x: ir.Value, q_int8_KN: np.ndarray, scale: np.ndarray, base_name: str,
                     tape: ir_tape.Tape | None = None) -> ir.Value:
    """The ``onnxqf.W8A8Linear`` node (on ``tape``, a new one if None, not inserted) computing
    ``x @ (q_int8_KN * scale)`` with per-token int8 activations: ``q_int8_KN`` int8 ``[K, N]`` (MatMul's layout),
    ``scale`` the per-output-channel weight scale ``[N]``. Returns the float16 output value."""
    if q_int8_KN.dtype != np.int8 or q_int8_KN.ndim != 2 or scale.shape != (q_int8_KN.shape[1],):
        raise OnnxqfError(f"{base_name}: W8A8Linear needs int8 [K, N] weights and N scales")
    tape = tape if tape is not None else ir_tape.Tape(graph)
    wq = edit.add_initializer(graph, f"{base_name}.weight_int8_nk", np.ascontiguousarray(q_int8_KN.T))
    ws = edit.add_initializer(graph, f"{base_name}.weight_scale",
                              (np.asarray(scale, np.float64) / 127.0).astype(np.float32))
    y = tape.op(OP, [x, wq, ws], domain=DOMAIN, name=f"{base_name}/w8a8_linear")
    y.type = ir.TensorType(ir.DataType.FLOAT16)
    return y


@register
@dataclasses.dataclass
class OnnxqfCudaW8A8(W8A8Lowering):
    name = "onnxqf-cuda"
    providers = ("cuda",)
    summary = ("per-token int8 x int8 in one fused onnxqf.W8A8Linear node per activation (onnxqf's CUDA kernels: "
               "H100/H200, float16 models; sessions load kernels/build/libonnxqf_kernels.so)")
    domains: ClassVar[dict[str, int]] = {DOMAIN: 1}

    def emit(self, graph: ir.Graph, group: LinearGroup, weights) -> None:
        if group.dtype != ir.DataType.FLOAT16:
            raise OnnxqfError(f"--lowering {self.name} takes float16 models (onnxqf's CUDA kernels read float16 "
                              f"activations); this one is {group.dtype.name.lower()}: export with --dtype float16")
        q = np.concatenate([w[0] for w in weights], axis=1)
        scale = np.concatenate([w[1] for w in weights])
        tape = ir_tape.Tape(graph)
        y = emit_w8a8_kernel(graph, group.x, q, scale, group.base, tape)
        if len(group.linears) > 1:
            sizes = edit.add_initializer(graph, f"{group.base}/split_sizes",
                                         np.array([w[0].shape[1] for w in weights], np.int64))
            outs = tape.op_multi_out("Split", [y, sizes], {"axis": -1}, num_outputs=len(weights),
                                     name=f"{group.base}/split")
        else:
            outs = [y]
        graph.insert_before(group.first, tape.nodes)
        replace_outputs(graph, group.linears, outs)

    def node_issue(self, node: ir.Node, provider: str) -> str | None:
        if node.domain != DOMAIN:
            return None
        if provider != "cuda":
            return (f"{node.op_type} '{node.name}': onnxqf's CUDA kernels have no {provider} kernel "
                    "(rewrite with another --lowering for this provider)")
        return None
