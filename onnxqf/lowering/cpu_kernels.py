"""W8A8 on the CPU with the per-token quantization in one node of onnxqf's CPU op library (``--lowering onnxqf-cpu``).

``uint8-token-ql`` (:mod:`onnxqf.lowering.w8a8`) makes each activation's codes with six standard nodes (Abs,
ReduceMax, Max, Div, a QuantizeLinear for the zero point, a blocked QuantizeLinear), each a pass over the activation
or a node ONNX Runtime schedules at every decode step. This lowering makes the same codes and the same per-token
scale in one node, ``onnxqf.cpu.QuantizeRows`` (``kernels/cpu/quantize_rows.cc``, kernels/README.md), and keeps
the rest of ``uint8-token-ql``: one ``MatMulIntegerToFloat`` (u8 x s8, zero point 128) per linear group, one Mul by
the token's scale, the group's Split::

    xu, amax = onnxqf.cpu.QuantizeRows(x)            xu = saturate(round(x / (amax / 127)) + 128), amax per token
    y        = MatMulIntegerToFloat(xu, Wq, 1, w_scale / 127, 128) * amax

Float32 activations only (the CPU target's models). Sessions that run the graph load the library
(:func:`onnxqf.runtime.kernels.cpu_library_path`; ``onnxqf`` commands do it themselves).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import onnx_ir as ir

from onnxqf.errors import UnsupportedGraphError
from onnxqf.lowering.base import FLOAT32, register
from onnxqf.lowering.w8a8 import Uint8TokenQL

__all__ = ["DOMAIN", "OP", "OnnxqfCpu"]

DOMAIN = "onnxqf.cpu"  # = onnxqf.runtime.kernels.CPU_DOMAIN (not imported: lowering loads no library)
OP = "QuantizeRows"


@register
@dataclasses.dataclass
class OnnxqfCpu(Uint8TokenQL):
    name = "onnxqf-cpu"
    summary = ("uint8-token-ql with each activation's codes and scale made by one onnxqf.cpu.QuantizeRows node "
               "(onnxqf's CPU op library: bash kernels/build_cpu.sh); float32 models")
    domains: ClassVar[dict[str, int]] = {DOMAIN: 1, "com.microsoft": 1}

    def quantize_activation(self, tape, graph, x, dtype, base):
        if dtype != FLOAT32:
            raise UnsupportedGraphError(f"{base}: onnxqf-cpu takes float32 activations, not {dtype.name.lower()} "
                                        "(use --lowering uint8-token-ql)")
        xu, amax = tape.op_multi_out(OP, [x], num_outputs=2, domain=DOMAIN, name=f"{base}/quantize_rows")
        xu.type = ir.TensorType(ir.DataType.UINT8)
        amax.type = ir.TensorType(FLOAT32)
        if x.shape is not None:
            xu.shape = x.shape
            amax.shape = ir.Shape([*x.shape[:-1], 1])
        return xu, amax
