"""Weight-only low-bit linears as ``com.microsoft.MatMulNBits`` (ONNX Runtime).

Every selected ``y = x @ B`` (B an initializer ``[K, N]``) becomes::

    y = MatMulNBits(x, B_packed, scales[, zero_points]; K, N, bits, block_size[, accuracy_level])

with B quantized in blocks of ``block_size`` consecutive input rows per output column (layout in
:mod:`onnxqf.maths.nbits`: ``B_packed`` uint8 ``[N, ceil(K/block_size), block_size*bits/8]``, low bits
first; ``scales`` ``[N, n_blocks]`` in the activation's float type; symmetric by default, i.e. no
zero-point input and codes centred on ``2^(bits-1)``). Activations stay float; a bias Add after the
MatMul is kept as it is.

Rules:

- bits 4 or 8; block_size 16, 32, 64, 128 or 256; K need not be a multiple of the block size.
- Rounding: GPTQ with per-(column, block) scales given the site's ``X^T X``, else round to nearest,
  which is byte-identical to onnxruntime's own ``MatMulNBitsQuantizer`` (RTN, same settings).
- lm_head (when quantized at all) gets ``lm_head_bits``, rounded to nearest, same block size.
- ``accuracy_level`` 4 lets the CPU kernel quantize the activations to int8 per block and use its integer
  kernels (the model builder's CPU default); 0 keeps float compute. The CUDA kernels ignore it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from onnxqf.errors import OnnxqfError
from onnxqf.graph import edit
from onnxqf.lowering.base import LinearGroup, Lowering, register, replace_outputs
from onnxqf.maths import nbits
from onnxqf.maths.gptq import prepare

__all__ = ["MatMulNBits", "MS_DOMAIN", "SCALE_DTYPES"]

MS_DOMAIN = "com.microsoft"
SCALE_DTYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


@register
@dataclasses.dataclass
class MatMulNBits(Lowering):
    name = "matmulnbits"
    format = "nbits"
    providers = ("cpu", "cuda")
    summary = "com.microsoft.MatMulNBits: block-wise 4- or 8-bit weights, float activations"
    domains = {MS_DOMAIN: 1}

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    clip_search: bool = False
    act_order: bool = False
    damp: float = 0.01
    accuracy_level: int = 0
    lm_head_bits: int = 8

    def __post_init__(self):
        try:
            nbits.check(self.bits, self.block_size)
            nbits.check(self.lm_head_bits, self.block_size)
        except ValueError as exc:
            raise OnnxqfError(str(exc)) from None
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise OnnxqfError(f"accuracy_level must be 0..4, not {self.accuracy_level}")

    def prepare(self, H):
        return prepare(H, self.damp, self.act_order)

    def round(self, weight: np.ndarray, prepared, group: LinearGroup) -> nbits.BlockQuant:
        bits = self.lm_head_bits if group.is_head else self.bits
        scale_dtype = SCALE_DTYPES[group.dtype]
        if prepared is not None and not group.is_head:
            return nbits.gptq_blockwise(weight, prepared, bits, self.block_size, symmetric=self.symmetric,
                                        clip_search=self.clip_search, act_order=self.act_order, damp=self.damp,
                                        scale_dtype=scale_dtype)
        return nbits.quantize_blockwise(weight, bits, self.block_size, symmetric=self.symmetric,
                                        clip_search=self.clip_search, scale_dtype=scale_dtype)

    def concat(self, parts):
        return nbits.concat_columns(parts)

    def dequantize(self, rounded: nbits.BlockQuant) -> np.ndarray:
        return rounded.dequantize()

    def emit(self, graph: ir.Graph, group: LinearGroup, weights) -> None:
        for lin, q in zip(group.linears, weights):  # one node per linear: MatMulNBits has no shared-input form
            K, N = q.shape
            packed, scales, zp = q.pack()
            base = lin.name or lin.node.name
            inputs = [lin.input, edit.add_initializer(graph, f"{base}.weight_q{q.bits}", packed),
                      edit.add_initializer(graph, f"{base}.weight_scales", scales)]
            if zp is not None:
                inputs.append(edit.add_initializer(graph, f"{base}.weight_zero_points", zp))
            attrs = {"K": K, "N": N, "bits": q.bits, "block_size": q.block_size}
            if self.accuracy_level:
                attrs["accuracy_level"] = self.accuracy_level
            tape = ir_tape.Tape(graph)
            y = tape.op("MatMulNBits", inputs, attrs, domain=MS_DOMAIN, name=f"{base}/matmul_nbits")
            graph.insert_before(lin.node, tape.nodes)
            replace_outputs(graph, [lin], [y])

    def describe(self) -> str:
        return (f"{self.name} int{self.bits} block {self.block_size}{'' if self.symmetric else ' asymmetric'}"
                f"{f' accuracy_level {self.accuracy_level}' if self.accuracy_level else ''}")
