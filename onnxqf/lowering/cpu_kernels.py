"""W8A8 on the CPU with the per-token quantization in one node of onnxqf's CPU op library (``--lowering onnxqf-cpu``).

``uint8-token-ql`` (:mod:`onnxqf.lowering.w8a8`) makes each activation's codes with six standard nodes (Abs,
ReduceMax, Max, Div, a QuantizeLinear for the zero point, a blocked QuantizeLinear), each a pass over the activation
or a node ONNX Runtime schedules at every decode step. This lowering makes the same codes and the same per-token
scale in one node, ``onnxqf.cpu.QuantizeRows`` (``kernels/cpu/quantize_rows.cc``, kernels/README.md), and keeps
the rest of ``uint8-token-ql``: one ``MatMulIntegerToFloat`` (u8 x s8, zero point 128) per linear group, one Mul by
the token's scale, the group's Split::

    xu, amax = onnxqf.cpu.QuantizeRows(x)            xu = saturate(round(x / (amax / 127)) + 128), amax per token
    y        = MatMulIntegerToFloat(xu, Wq, 1, w_scale / 127, 128) * amax

With ``asymmetric`` (the default; ``--act-quant token`` for the symmetric codes) the node makes
``uint8-token-asym``'s codes instead (a scale and a zero point per token,
:func:`onnxqf.lowering.w8a8.asymmetric_codes`), the GEMM runs with zero point 0 and the token's zero
point comes off after it, with the token scale, in one ``onnxqf.cpu.DequantizeRows`` node (one pass, as the
symmetric lowering's Mul)::

    xu, s, z = onnxqf.cpu.QuantizeRows(x, asymmetric=1)
    y        = onnxqf.cpu.DequantizeRows(MatMulIntegerToFloat(xu, Wq, 1, w_scale, 0), s, z, colsum(Wq) * w_scale)
             = (y' - z * colsum(Wq) * w_scale) * s

With ``gemm="onnxqf"`` (``--lowering onnxqf-cpu:gemm=onnxqf``) each group is one ``onnxqf.cpu.W8A8Linear`` node
instead: the same codes, onnxqf's own int8 GEMM (kernels/cpu/gemm_u8s8.cc: AMX, AVX-512 VNNI) and the dequantization
in its epilogue, the weights stored in the GEMM's order (:func:`vnni_order`)::

    y = onnxqf.cpu.W8A8Linear(x, vnni_order(Wq), w_scale, colsum(Wq) * w_scale)   = s * (w_scale * (xu @ Wq) - z * c)

It reads the int8 weights at close to the memory's bandwidth at one token, where ONNX Runtime's u8 x s8 GEMM does
not (docs/benchmarks.md §h run 9); on a CPU without AVX-512 VNNI its GEMM takes an AVX2 path (fast at one token,
about fp32's speed for prompts) or the compiler's loop, so ``gemm="mlas"`` stays the default.

When the group's activation is the output of an online rotation (``--hybrid``'s down_proj, o_proj and lm_head
inputs) read by nothing else, the rotation moves into the same node (``fuse_rotations``): it reads the unrotated
activation and rotates each row by the block's Kronecker factors before quantizing it (attributes ``rotation_sizes``
and ``rotation_kinds``, the dense factors in input R; :func:`cpu_rotation`), and the block of batched MatMul nodes
goes. A factor that is Sylvester's Hadamard matrix (±H_n / sqrt(n)) runs as a fast Walsh-Hadamard transform.

Float32 activations only (the CPU target's models). Sessions that run the graph load the library
(:func:`onnxqf.runtime.kernels.cpu_library_path`; ``onnxqf`` commands do it themselves).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from onnxqf.errors import UnsupportedGraphError
from onnxqf.graph import edit
from onnxqf.lowering.base import FLOAT32, LinearGroup, register
from onnxqf.lowering.w8a8 import Uint8TokenQL, finish_group, matmul_integer_to_float
from onnxqf.maths.hadamard import walsh_matrix, walsh_sign

__all__ = ["DOMAIN", "IDENTITY", "DENSE", "OP", "DEQUANTIZE_OP", "LINEAR_OP", "GEMMS", "WALSH", "WALSH_NEG",
           "CpuRotation", "OnnxqfCpu", "cpu_rotation", "quantize_rows_node", "linear_node", "vnni_order",
           "weight_colsum"]

DOMAIN = "onnxqf.cpu"  # = onnxqf.runtime.kernels.CPU_DOMAIN (not imported: lowering loads no library)
OP = "QuantizeRows"
DEQUANTIZE_OP = "DequantizeRows"
LINEAR_OP = "W8A8Linear"
#: OnnxqfCpu.gemm: where the int8 GEMM runs
GEMMS = ("mlas", "onnxqf")
#: rotation_kinds (kernels/cpu/quantize_rows.cc): the identity, a dense matrix, +H_n / sqrt(n), -H_n / sqrt(n)
IDENTITY = 0
DENSE = 1
WALSH = 2
WALSH_NEG = 3


@dataclasses.dataclass(frozen=True)
class CpuRotation:
    """An online rotation ``x @ kron(F_1, .., F_t)`` in the op's form: ``sizes`` (n_t), ``kinds`` (one of
    IDENTITY, DENSE, WALSH, WALSH_NEG per factor) and ``dense``, the DENSE factors' matrices in order (float64)."""

    sizes: tuple[int, ...]
    kinds: tuple[int, ...]
    dense: tuple[np.ndarray, ...]

    def matrices(self) -> list[np.ndarray | None]:
        """Each factor's matrix (None: the identity), float64."""
        out, dense = [], iter(self.dense)
        for n, kind in zip(self.sizes, self.kinds):
            if kind == IDENTITY:
                out.append(None)
            elif kind == DENSE:
                out.append(next(dense))
            else:
                out.append((1.0 if kind == WALSH else -1.0) * walsh_matrix(n))
        return out

    def apply(self, x: np.ndarray) -> np.ndarray:
        """What the op computes before quantizing, in float64: ``x [..., K]`` rotated."""
        t = x.reshape(-1, *self.sizes).astype(np.float64)
        for axis, m in enumerate(self.matrices(), start=1):
            if m is not None:
                t = np.moveaxis(np.tensordot(t, m, axes=([axis], [0])), -1, axis)
        return t.reshape(x.shape)


def cpu_rotation(groups: list[tuple[int, np.ndarray | None]], K: int) -> CpuRotation | None:
    """The op's form of the rotation ``kron(*groups)`` of a K-wide activation (``[(size, matrix or None)]`` as
    :class:`onnxqf.graph.edit.OnlineRotation` reads them), or None when the sizes do not multiply to K or nothing
    rotates. Any number of factors; a factor that is ±H_n / sqrt(n) (:func:`walsh_sign`) runs as a fast transform."""
    if not groups or int(np.prod([n for n, _ in groups])) != K or all(m is None for _, m in groups):
        return None
    kinds, dense = [], []
    for n, m in groups:
        if m is None:
            kinds.append(IDENTITY)
            continue
        sign = walsh_sign(np.asarray(m, np.float64))
        if sign:
            kinds.append(WALSH if sign > 0 else WALSH_NEG)
        else:
            kinds.append(DENSE)
            dense.append(np.asarray(m, np.float64))
    return CpuRotation(tuple(int(n) for n, _ in groups), tuple(kinds), tuple(dense))


def vnni_order(q: np.ndarray) -> np.ndarray:
    """int8 weight codes ``q [K, N]`` (K % 4 == 0, N % 16 == 0) in the order ``onnxqf.cpu.W8A8Linear`` reads them,
    ``[N / 16, K / 4, 64]``: element ``[j, p, 4 i + t] = q[4 p + t, 16 j + i]``, each 64-byte line 16 columns x 4
    consecutive k (the operand of one VPDPBUSD, one row of an AMX tile: kernels/cpu/gemm_u8s8.h)."""
    K, N = q.shape
    if K % 4 or N % 16:
        raise ValueError(f"vnni_order needs K % 4 == 0 and N % 16 == 0, not K = {K}, N = {N}")
    return np.ascontiguousarray(q.reshape(K // 4, 4, N // 16, 16).transpose(2, 0, 3, 1)).reshape(N // 16, K // 4, 64)


def _rotation_attributes(graph: ir.Graph, base: str, rotation: CpuRotation | None, asymmetric: bool):
    """The quantization's attributes (rotation and codes) and its optional input R (None without dense factors),
    as QuantizeRows and W8A8Linear take them."""
    attributes, r = {}, None
    if rotation is not None:
        attributes = {"rotation_sizes": list(rotation.sizes), "rotation_kinds": list(rotation.kinds)}
        if rotation.dense:
            flat = np.concatenate([m.reshape(-1) for m in rotation.dense]).astype(np.float32)
            r = edit.add_initializer(graph, f"{base}.rotation", flat)
    if asymmetric:
        attributes["asymmetric"] = 1
    return attributes, r


def quantize_rows_node(tape, graph: ir.Graph, x: ir.Value, base: str, rotation: CpuRotation | None = None,
                       asymmetric: bool = False, shape: ir.Shape | None = None) -> tuple[ir.Value, ...]:
    """The ``onnxqf.cpu.QuantizeRows`` node on ``tape`` (its dense factors, if any, an initializer of ``graph``):
    ``x``'s uint8 codes and its per-token amax, x rotated first by ``rotation``; ``asymmetric``: the codes, the
    scale and the zero point of each token. ``shape``: the codes' shape where x's is unknown (the rotated value's)."""
    attributes, r = _rotation_attributes(graph, base, rotation, asymmetric)
    inputs = [x] + ([r] if r is not None else [])
    outs = tape.op_multi_out(OP, inputs, attributes or None, num_outputs=3 if asymmetric else 2, domain=DOMAIN,
                             name=f"{base}/quantize_rows")
    outs[0].type = ir.TensorType(ir.DataType.UINT8)
    for v in outs[1:]:
        v.type = ir.TensorType(FLOAT32)
    shape = shape if shape is not None else x.shape
    if shape is not None:
        outs[0].shape = shape
        for v in outs[1:]:
            v.shape = ir.Shape([*shape[:-1], 1])
    return tuple(outs)


def weight_colsum(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 ``colsum(q) * scale`` per output channel: what the asymmetric codes' zero point takes off after the
    GEMM (DequantizeRows' C, W8A8Linear's C)."""
    return (q.astype(np.int64).sum(axis=0) * scale.astype(np.float64)).astype(np.float32)


def _require_float32(dtype: ir.DataType, base: str) -> None:
    if dtype != FLOAT32:
        raise UnsupportedGraphError(f"{base}: onnxqf-cpu takes float32 activations, not {dtype.name.lower()} "
                                    "(use --lowering uint8-token-ql)")


def linear_node(tape, graph: ir.Graph, x: ir.Value, base: str, q: np.ndarray, scale: np.ndarray,
                rotation: CpuRotation | None = None, asymmetric: bool = True) -> ir.Value:
    """The ``onnxqf.cpu.W8A8Linear`` node on ``tape``: ``x [.., K]`` (rotated first by ``rotation``) quantized per
    token and multiplied by the weights ``q [K, N] * scale [N]`` in one node, float32 ``[.., N]`` out; its weights
    (:func:`vnni_order`), scales, scaled column sums and dense factors initializers of ``graph``."""
    attributes, r = _rotation_attributes(graph, base, rotation, asymmetric)
    inputs = [x, edit.add_initializer(graph, f"{base}.weight_vnni", vnni_order(np.asarray(q, np.int8))),
              edit.add_initializer(graph, f"{base}.weight_scale", np.asarray(scale, np.float32)),
              edit.add_initializer(graph, f"{base}.weight_colsum", weight_colsum(q, scale))]
    if r is not None:
        inputs.append(r)
    y = tape.op(LINEAR_OP, inputs, attributes or None, domain=DOMAIN, name=f"{base}/w8a8_linear")
    y.type = ir.TensorType(FLOAT32)
    if x.shape is not None:
        y.shape = ir.Shape([*x.shape[:-1], q.shape[1]])
    return y


@register
@dataclasses.dataclass
class OnnxqfCpu(Uint8TokenQL):
    name = "onnxqf-cpu"
    summary = ("per-token codes and scales made by one onnxqf.cpu.QuantizeRows node (onnxqf's CPU op library: bash "
               "kernels/build_cpu.sh), then MatMulIntegerToFloat; float32 models; asymmetric codes "
               "(uint8-token-asym's, the zero point taken off in one DequantizeRows node) unless --act-quant token "
               "(uint8-token-ql's); onnxqf-cpu:gemm=onnxqf: one onnxqf.cpu.W8A8Linear node per group instead, "
               "onnxqf's own int8 GEMM (fastest on CPUs with AVX-512 VNNI / AMX)")
    domains: ClassVar[dict[str, int]] = {DOMAIN: 1, "com.microsoft": 1}
    activations: ClassVar[tuple[str, ...]] = ("token", "asym")
    #: move online rotations into the quantization node (:func:`cpu_rotation`)
    fuse_rotations: bool = True
    #: asymmetric per-token codes (uint8-token-asym's): the default, as fast as the symmetric ones here and more
    #: accurate (docs/results.md 2b); ``--act-quant token`` sets it off
    asymmetric: bool = True
    #: where the int8 GEMM runs: ``mlas`` (QuantizeRows -> ONNX Runtime's MatMulIntegerToFloat -> DequantizeRows) or
    #: ``onnxqf`` (one onnxqf.cpu.W8A8Linear node: the quantization, onnxqf's own GEMM, AMX / AVX-512 VNNI, and the
    #: dequantization; groups with K % 4 or N % 16 keep mlas)
    gemm: str = "mlas"
    # (the rotation block and its op form while one group is emitted)
    _fused: tuple | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.gemm not in GEMMS:
            raise UnsupportedGraphError(f"onnxqf-cpu: gemm must be one of {', '.join(GEMMS)}, not '{self.gemm}'")

    def emit(self, graph: ir.Graph, group: LinearGroup, weights) -> None:
        block = rotation = None
        if self.fuse_rotations:
            block = edit.online_rotation_of(graph, group.x)
            readers = {id(lin.node) for lin in group.linears}
            if block is not None and block.private() and {id(n) for n in group.x.consumers()} == readers and \
                    not group.x.is_graph_output() and group.x.shape is not None and isinstance(group.x.shape[-1], int):
                rotation = cpu_rotation(block.groups, group.x.shape[-1])
        if self.gemm == "onnxqf" and self._linear_fits(group, weights):
            tape = ir_tape.Tape(graph)
            q, scale = self.concat(weights)
            x = group.x if rotation is None else block.input
            y = linear_node(tape, graph, x, group.base, q, scale, rotation, self.asymmetric)
            finish_group(tape, graph, group, weights, y)
        else:
            self._fused = (block, rotation) if rotation is not None else None
            try:
                super().emit(graph, group, weights)
            finally:
                self._fused = None
        if rotation is not None:
            block.remove(graph)

    @staticmethod
    def _linear_fits(group: LinearGroup, weights) -> bool:
        _require_float32(group.dtype, group.base)
        K = weights[0][0].shape[0]
        return K % 4 == 0 and sum(w[0].shape[1] for w in weights) % 16 == 0

    def quantize_activation(self, tape, graph, x, dtype, base):
        _require_float32(dtype, base)
        if self._fused is None:
            return quantize_rows_node(tape, graph, x, base, asymmetric=self.asymmetric)
        block, rotation = self._fused
        # (the rotated value's shape, known where the block's input's may not be)
        return quantize_rows_node(tape, graph, block.input, base, rotation, asymmetric=self.asymmetric,
                                  shape=x.shape)

    def product(self, tape, graph, base, act, wq, q, scale, wzp=None):
        if not self.asymmetric:
            return super().product(tape, graph, base, act, wq, q, scale, wzp)
        xu, s, z = act
        y = matmul_integer_to_float(tape, graph, base, xu, wq, scale, 0, wzp)
        c = edit.add_initializer(graph, f"{base}.weight_colsum", weight_colsum(q, scale))
        return tape.op(DEQUANTIZE_OP, [y, s, z, c], domain=DOMAIN, name=f"{base}/dequantize_rows")

    def describe(self) -> str:
        fields = ([] if self.asymmetric else ["asymmetric=false"]) + ([] if self.gemm == "mlas" else
                                                                      [f"gemm={self.gemm}"])
        return ":".join([self.name, *fields])
