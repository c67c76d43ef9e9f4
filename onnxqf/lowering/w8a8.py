"""W8A8: int8 weights (symmetric, per output channel) x int8 activations quantized at run time.

Weights are rounded the same way by every W8A8 lowering (GPTQ with the site's X^T X, else to nearest;
``clip_search``: a searched clipping ratio per channel). The lowerings differ in how the activation is
quantized and which integer GEMM the provider runs fast:

``int8-token`` (CUDA; every node has a CUDA kernel)::

    amax = max(ReduceMax(Abs(x), axis=-1), tiny)     per-token absolute maximum   [.., 1]
    xq   = Cast<int8>(Round(x * (127 / amax)))       symmetric int8
    y    = Cast<f32>(MatMulInteger(xq, Wq)) * amax * (w_scale / 127)

``uint8-token`` (CPU): the same codes shifted by 128, with zero point 128. MatMulInteger subtracts the
zero point before it multiplies, so the int32 products are *exactly* those of ``int8-token``; ONNX
Runtime's CPU kernels (MLAS) take their fast u8 x s8 path (VNNI / AMX) instead of the slow s8 x s8 one::

    xu   = Cast<uint8>(Round(x * (127 / amax)) + 128)
    y    = Cast<f32>(MatMulInteger(xu, Wq, 128)) * amax * (w_scale / 127)

``uint8-token-asym`` (CPU): asymmetric per-token codes, a scale and a zero point per token
(``s = (max - min) / 255``, ``z = round(-min / s)``, codes ``clip(round(x / s) + z, 0, 255)``). ONNX Runtime
takes only a scalar zero point, so the token's zero point is applied after the GEMM, as a rank-one
correction with the weights' column sums::

    y = (Cast<f32>(MatMulInteger(xu, Wq)) - z * colsum(Wq)) * s * w_scale

``int8-token-asym`` (CUDA): the same asymmetric codes stored as ``code - 128`` in int8 (CUDA's
MatMulInteger takes int8 x int8 only), the correction then uses ``z - 128``.

``uint8-tensor``: the ONNX-standard ``DynamicQuantizeLinear`` (per-tensor, asymmetric uint8); CPU only.

The uint8-activation lowerings take ``uint8_weights=True``: the int8 weights stored as ``w + 128`` (uint8) with
zero point 128, the same int32 products. ONNX Runtime's u8 x s8 CPU kernel on x86 CPUs with AVX2 but without VNNI
adds pairs of u8 x s8 products in int16 with saturation (up to 2 * 255 * 127) and computes wrong sums; its u8 x u8
kernel widens first. The CPU target sets it where a probe of the local ONNX Runtime shows the saturation
(:func:`onnxqf.runtime.target.u8s8_saturates`).

An activation read by several linears (q/k/v, gate/up) is quantized once, and their int8 weights are
concatenated into one MatMulInteger whose rescaled result is Split back into the linears' outputs (one
GEMM and one rescale per activation). Float16 models compute the rescale in float32 (int32
accumulators overflow float16) and cast back.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from onnxqf.errors import UnsupportedGraphError
from onnxqf.graph import edit
from onnxqf.lowering.base import FLOAT32, LinearGroup, Lowering, insert_after_producer, register, replace_outputs
from onnxqf.maths import qmath
from onnxqf.maths.gptq import gptq_quantize, prepare

__all__ = ["W8A8Lowering", "Int8Token", "Uint8Token", "Uint8TokenQL", "Uint8TokenAsym", "Int8TokenAsym", "Uint8Tensor",
           "token_amax", "per_token_codes", "asymmetric_codes", "refine_asymmetric", "Uint8TokenIter", "Int8TokenIter",
           "matmul_integer_to_float", "finish_group"]


@dataclasses.dataclass
class W8A8Lowering(Lowering):
    """Shared by the W8A8 lowerings: the weight rounding and the GEMM + rescale + Split.

    Subclasses implement :meth:`quantize_activation` (nodes on ``tape``, returning what :meth:`product`
    needs) and :meth:`product` (the float32 result ``[.., N]`` of the concatenated group)."""

    format = "int8"
    #: the ``--act-quant`` kinds it makes (``token``: symmetric per token)
    activations: ClassVar[tuple[str, ...]] = ("token",)
    private_weights = True  # the group's weights are untied (make_private) before they are read
    uint8_activations = False  # the activations are uint8 codes (the CPU lowerings): uint8_weights applies
    clip_search: bool = False
    uint8_weights: bool = False  # weights as uint8 (w + 128, zero point 128); only with uint8 activations

    # -- rounding -----------------------------------------------------------------------------------
    def prepare(self, H):
        return prepare(H)

    def round(self, weight: np.ndarray, prepared, group: LinearGroup):
        q, scale = qmath.quantize_weight_per_channel(weight, bits=8, clip_search=self.clip_search)
        if prepared is not None:
            q, scale = gptq_quantize(weight, prepared, scale=scale)
        return np.asarray(q, np.int8), np.asarray(scale, np.float64)

    def concat(self, parts):
        return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts])

    def dequantize(self, rounded) -> np.ndarray:
        q, scale = rounded
        return q.astype(np.float64) * scale

    # -- nodes --------------------------------------------------------------------------------------
    def emit(self, graph: ir.Graph, group: LinearGroup, weights) -> None:
        q, scale = self.concat(weights)
        dtype, base = group.dtype, group.base
        act_tape = ir_tape.Tape(graph)
        head = group.linears[0]
        act = self.quantize_activation(act_tape, graph, group.x, dtype, f"{head.name or head.node.name}/act_quant")
        insert_after_producer(graph, group.x, act_tape.nodes, group.first)
        tape = ir_tape.Tape(graph)
        if self.uint8_weights and self.uint8_activations:  # the same products through the u8 x u8 kernel
            wq = edit.add_initializer(graph, f"{base}.weight_uint8", (q.astype(np.int16) + 128).astype(np.uint8))
            wzp = edit.add_initializer(graph, f"{base}.weight_zero_point", np.array(128, np.uint8))
        else:
            wq, wzp = edit.add_initializer(graph, f"{base}.weight_int8", q), None
        y = self.product(tape, graph, base, act, wq, q, scale, wzp)
        if dtype != FLOAT32:
            y = tape.op("Cast", [y], {"to": dtype}, name=f"{base}/to_{dtype.name.lower()}")
        finish_group(tape, graph, group, weights, y)

    def quantize_activation(self, tape, graph, x: ir.Value, dtype: ir.DataType, base: str):
        raise NotImplementedError

    def product(self, tape, graph, base: str, act, wq: ir.Value, q: np.ndarray, scale: np.ndarray,
                wzp: ir.Value | None = None) -> ir.Value:
        """The float32 product of the group; ``wzp``: the weights' zero point (uint8 weights) or None."""
        raise NotImplementedError

    def node_issue(self, node: ir.Node, provider: str) -> str | None:
        if node.op_type != "MatMulInteger":
            return None
        a = _dtype(node.inputs[0])
        if provider == "cuda":
            if a is not None and a != ir.DataType.INT8:
                return f"MatMulInteger '{node.name}': CUDA takes int8 x int8 only, has {a.name} activations"
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                return f"MatMulInteger '{node.name}': zero points (CUDA's MatMulInteger takes symmetric int8)"
        if provider == "cpu" and a == ir.DataType.INT8:
            return (f"MatMulInteger '{node.name}': int8 activations take ONNX Runtime's slow CPU path "
                    "(30-40x slower than uint8; rewrite with --ep cpu)")
        return None


def finish_group(tape, graph: ir.Graph, group: LinearGroup, weights, y: ir.Value) -> None:
    """The group's float product ``y [.., N]`` split into its linears' outputs (one Split for several), ``tape``'s
    nodes put in before the group's first MatMul, and the MatMuls replaced."""
    if len(group.linears) > 1:
        sizes = edit.add_initializer(graph, f"{group.base}/split_sizes",
                                     np.array([w[0].shape[1] for w in weights], np.int64))
        outs = tape.op_multi_out("Split", [y, sizes], {"axis": -1}, num_outputs=len(weights),
                                 name=f"{group.base}/split")
    else:
        outs = [y]
    graph.insert_before(group.first, tape.nodes)
    replace_outputs(graph, group.linears, outs)


def _rescale(tape, graph, base: str, acc: ir.Value, token_scale: ir.Value, channel_scale: np.ndarray) -> ir.Value:
    """float32 ``acc * token_scale * channel_scale``."""
    accf = tape.op("Cast", [acc], {"to": FLOAT32}, name=f"{base}/acc_f32")
    wscale = edit.add_initializer(graph, f"{base}.weight_scale", channel_scale.astype(np.float32))
    y = tape.op("Mul", [accf, token_scale], name=f"{base}/token_scale")
    return tape.op("Mul", [y, wscale], name=f"{base}/channel_scale")


def _as_f32(tape, value: ir.Value, dtype: ir.DataType, name: str) -> ir.Value:
    return value if dtype == FLOAT32 else tape.op("Cast", [value], {"to": FLOAT32}, name=name)


#: the floor of a token's max|x| in float16 graphs: 2^-9, the smallest power of two whose 127 / amax (65024) is a
#: finite float16 (under a smaller floor a token with max|x| < 127/65504 gets +-inf codes and NaN for its zeros)
FP16_AMAX_FLOOR = 2.0 ** -9


def token_amax(tape: ir_tape.Tape, graph: ir.Graph, x: ir.Value, dtype: ir.DataType,
               base: str) -> tuple[ir.Value, ir.Value]:
    """Nodes of max|x| per token (keepdims, at least a tiny floor) and the constant 127, in ``dtype``."""
    absx = tape.op("Abs", [x], name=f"{base}/abs")
    axes = edit.add_initializer(graph, f"{base}/axes", np.array([-1], np.int64))
    amax = tape.op("ReduceMax", [absx, axes], {"keepdims": 1}, name=f"{base}/amax")
    tiny = edit.add_initializer(graph, f"{base}/tiny", np.array(1e-6 if dtype == FLOAT32 else FP16_AMAX_FLOOR,
                                                                  dtype.numpy()))
    amax = tape.op("Max", [amax, tiny], name=f"{base}/amax_safe")
    return amax, edit.add_initializer(graph, f"{base}/qmax", np.array(127.0, dtype.numpy()))


def per_token_codes(tape: ir_tape.Tape, graph: ir.Graph, x: ir.Value, dtype: ir.DataType,
                    base: str) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Nodes (on ``tape``) of per-token symmetric int8 codes of ``x``: (round(x * 127 / max|x|) in ``dtype``,
    max|x| per token (keepdims, at least a tiny floor), the constant 127). scripts/hybrid_budget.py multiplies
    them back to simulate the W8A8 graph in float."""
    amax, qmax = token_amax(tape, graph, x, dtype, base)
    inv = tape.op("Div", [qmax, amax], name=f"{base}/inv_scale")
    scaled = tape.op("Mul", [x, inv], name=f"{base}/scale")
    return tape.op("Round", [scaled], name=f"{base}/round"), amax, qmax


def asymmetric_codes(tape: ir_tape.Tape, graph: ir.Graph, x: ir.Value, dtype: ir.DataType,
                     base: str) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Nodes of per-token asymmetric uint8-range codes of ``x``: (codes in [0, 255] as ``dtype`` values, scale
    ``(max - min) / 255`` and zero point ``round(-min / scale)``, both per token, keepdims). The range always
    holds 0, so that zero maps to an exact code."""
    axes = edit.add_initializer(graph, f"{base}/axes", np.array([-1], np.int64))
    zero = edit.add_initializer(graph, f"{base}/zero", np.array(0.0, dtype.numpy()))
    hi = tape.op("Max", [tape.op("ReduceMax", [x, axes], {"keepdims": 1}, name=f"{base}/max"), zero], name=f"{base}/hi")
    lo = tape.op("Min", [tape.op("ReduceMin", [x, axes], {"keepdims": 1}, name=f"{base}/min"), zero], name=f"{base}/lo")
    levels = edit.add_initializer(graph, f"{base}/levels", np.array(255.0, dtype.numpy()))
    tiny = edit.add_initializer(graph, f"{base}/tiny", np.array(1e-6 if dtype == FLOAT32 else 1e-4, dtype.numpy()))
    step = tape.op("Div", [tape.op("Sub", [hi, lo], name=f"{base}/range"), levels], name=f"{base}/step")
    scale = tape.op("Max", [step, tiny], name=f"{base}/scale")
    zp = tape.op("Round", [tape.op("Div", [tape.op("Neg", [lo], name=f"{base}/neg_lo"), scale], name=f"{base}/zp_f")],
                 name=f"{base}/zp")
    return _affine_codes(tape, x, scale, zp, zero, levels, base), scale, zp


def _affine_codes(tape, x: ir.Value, scale: ir.Value, zp: ir.Value, zero: ir.Value, levels: ir.Value,
                  base: str) -> ir.Value:
    """``clip(round(x / scale) + zp, 0, 255)`` per token (as float values)."""
    rounded = tape.op("Round", [tape.op("Div", [x, scale], name=f"{base}/div")], name=f"{base}/round")
    shifted = tape.op("Add", [rounded, zp], name=f"{base}/shift")
    return tape.op("Clip", [shifted, zero, levels], name=f"{base}/clip")


def refine_asymmetric(tape: ir_tape.Tape, graph: ir.Graph, x: ir.Value, codes: ir.Value, scale: ir.Value,
                      base: str, rounds: int) -> tuple[ir.Value, ir.Value, ir.Value]:
    """``rounds`` rounds of refining each token's scale and zero point (float32 ``x``): given the codes ``c``, the
    least-squares fit ``x ~ a c + b`` per token (``a = cov(c, x) / var(c)``, ``b = mean(x) - a mean(c)``) gives the
    scale ``a`` and the zero point ``round(-b / a)`` (clipped to [0, 255]), from which the codes are made again.
    Returns (codes, scale, zero point) after the last round."""
    f32 = np.float32
    axes = edit.add_initializer(graph, f"{base}/refine_axes", np.array([-1], np.int64))
    zero = edit.add_initializer(graph, f"{base}/refine_zero", np.array(0.0, f32))
    levels = edit.add_initializer(graph, f"{base}/refine_levels", np.array(255.0, f32))
    tiny = edit.add_initializer(graph, f"{base}/refine_tiny", np.array(1e-12, f32))

    def mean(v, name):
        return tape.op("ReduceMean", [v, axes], {"keepdims": 1}, name=f"{base}/{name}")

    mx = mean(x, "mean_x")
    zp = None
    for r in range(rounds):
        n = f"r{r}"
        mc = mean(codes, f"{n}/mean_c")
        cov = tape.op("Sub", [mean(tape.op("Mul", [codes, x], name=f"{base}/{n}/cx"), f"{n}/mean_cx"),
                              tape.op("Mul", [mc, mx], name=f"{base}/{n}/mc_mx")], name=f"{base}/{n}/cov")
        var = tape.op("Sub", [mean(tape.op("Mul", [codes, codes], name=f"{base}/{n}/cc"), f"{n}/mean_cc"),
                              tape.op("Mul", [mc, mc], name=f"{base}/{n}/mc2")], name=f"{base}/{n}/var")
        a = tape.op("Max", [tape.op("Div", [cov, tape.op("Max", [var, tiny], name=f"{base}/{n}/var_safe")],
                                    name=f"{base}/{n}/slope"), tiny], name=f"{base}/{n}/scale")
        b = tape.op("Sub", [mx, tape.op("Mul", [a, mc], name=f"{base}/{n}/a_mc")], name=f"{base}/{n}/offset")
        zp = tape.op("Clip", [tape.op("Round", [tape.op("Div", [tape.op("Neg", [b], name=f"{base}/{n}/neg_b"), a],
                                                        name=f"{base}/{n}/zp_f")], name=f"{base}/{n}/zp_r"),
                              zero, levels], name=f"{base}/{n}/zp")
        scale = a
        codes = _affine_codes(tape, x, scale, zp, zero, levels, f"{base}/{n}")
    return codes, scale, zp


@register
@dataclasses.dataclass
class Int8Token(W8A8Lowering):
    name = "int8-token"
    providers = ("cuda",)
    summary = "per-token symmetric int8 x int8 MatMulInteger (ONNX Runtime's CUDA provider runs every node)"

    def quantize_activation(self, tape, graph, x, dtype, base):
        rounded, amax, _ = per_token_codes(tape, graph, x, dtype, base)
        xq = tape.op("Cast", [rounded], {"to": ir.DataType.INT8}, name=f"{base}/to_int8")
        xq.type = ir.TensorType(ir.DataType.INT8)
        return xq, _as_f32(tape, amax, dtype, f"{base}/amax_f32")

    def product(self, tape, graph, base, act, wq, q, scale, wzp=None):
        xq, amax = act
        acc = tape.op("MatMulInteger", [xq, wq], name=f"{base}/matmul_int8")
        return _rescale(tape, graph, base, acc, amax, scale / 127.0)


@register
@dataclasses.dataclass
class Uint8Token(W8A8Lowering):
    name = "uint8-token"
    providers = ("cpu",)
    summary = ("per-token symmetric codes shifted to uint8 (zero point 128) x int8 MatMulInteger: the same products "
               "as int8-token, on the CPU's fast u8 x s8 kernels")
    uint8_activations = True

    def quantize_activation(self, tape, graph, x, dtype, base):
        rounded, amax, _ = per_token_codes(tape, graph, x, dtype, base)
        offset = edit.add_initializer(graph, f"{base}/offset", np.array(128.0, dtype.numpy()))
        shifted = tape.op("Add", [rounded, offset], name=f"{base}/shift")
        xu = tape.op("Cast", [shifted], {"to": ir.DataType.UINT8}, name=f"{base}/to_uint8")
        xu.type = ir.TensorType(ir.DataType.UINT8)
        zp = edit.add_initializer(graph, f"{base}/zero_point", np.array(128, np.uint8))
        return xu, zp, _as_f32(tape, amax, dtype, f"{base}/amax_f32")

    def product(self, tape, graph, base, act, wq, q, scale, wzp=None):
        xu, zp, amax = act
        acc = tape.op("MatMulInteger", [xu, wq, zp] + ([wzp] if wzp is not None else []), name=f"{base}/matmul_u8s8")
        return _rescale(tape, graph, base, acc, amax, scale / 127.0)


@register
@dataclasses.dataclass
class Uint8TokenQL(Uint8Token):
    """uint8-token with the codes made by one blocked ``QuantizeLinear`` (opset 21, one block per token) instead of
    Mul/Round/Add/Cast, and the GEMM and rescale by ``com.microsoft.MatMulIntegerToFloat`` (int32 -> float in the
    GEMM's output pass) and one Mul by the token scale."""

    name = "uint8-token-ql"
    summary = "uint8-token with a blocked QuantizeLinear per token and MatMulIntegerToFloat (fewer passes)"
    domains = {"com.microsoft": 1, "": 21}

    def quantize_activation(self, tape, graph, x, dtype, base):
        amax, qmax = token_amax(tape, graph, x, dtype, base)
        step = tape.op("Div", [amax, qmax], name=f"{base}/step")
        # a zero point of the scale's shape (the op wants one per block): 128 for every token, in one node: the
        # step quantized per tensor with the dtype's largest scale (step / max < 1/2 rounds to 0) and zero point 128
        huge = edit.add_initializer(graph, f"{base}/huge", np.array(np.finfo(dtype.numpy()).max, dtype.numpy()))
        offset = edit.add_initializer(graph, f"{base}/offset", np.array(128, np.uint8))
        zp = tape.op("QuantizeLinear", [step, huge, offset], name=f"{base}/zp")
        zp.type = ir.TensorType(ir.DataType.UINT8)
        k = x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int) else None
        if k is None:
            raise UnsupportedGraphError(f"{base}: uint8-token-ql needs a static hidden size "
                                        "(use --lowering uint8-token)")
        xu = tape.op("QuantizeLinear", [x, step, zp], {"axis": -1, "block_size": k}, name=f"{base}/quantize")
        xu.type = ir.TensorType(ir.DataType.UINT8)
        return xu, _as_f32(tape, amax, dtype, f"{base}/amax_f32")

    def product(self, tape, graph, base, act, wq, q, scale, wzp=None):
        xu, amax = act
        y = matmul_integer_to_float(tape, graph, base, xu, wq, scale / 127.0, 128, wzp)
        return tape.op("Mul", [y, amax], name=f"{base}/token_scale")


def matmul_integer_to_float(tape, graph: ir.Graph, base: str, xu: ir.Value, wq: ir.Value, channel_scale: np.ndarray,
                            a_zero_point: int, wzp: ir.Value | None = None) -> ir.Value:
    """``com.microsoft.MatMulIntegerToFloat(xu, wq, 1, channel_scale, a_zero_point[, wzp])`` on ``tape``: the uint8
    codes' product with the weights, each output channel times its scale, as float32 (the token scale left out)."""
    one = edit.add_initializer(graph, f"{base}/a_scale", np.array(1.0, np.float32))
    wscale = edit.add_initializer(graph, f"{base}.weight_scale", np.asarray(channel_scale).astype(np.float32))
    zp = edit.add_initializer(graph, f"{base}/a_zero_point", np.array(a_zero_point, np.uint8))
    ins = [xu, wq, one, wscale, zp] + ([wzp] if wzp is not None else [])
    return tape.op("MatMulIntegerToFloat", ins, domain="com.microsoft", name=f"{base}/matmul_u8s8")


@dataclasses.dataclass
class _Asymmetric(W8A8Lowering):
    """Asymmetric per-token activations; the zero point enters as a rank-one correction after the GEMM."""

    activations: ClassVar[tuple[str, ...]] = ("asym",)
    code_offset = 0  # stored code = code - code_offset
    rounds = 0  # refinement rounds of each token's scale and zero point (refine_asymmetric)

    def quantize_activation(self, tape, graph, x, dtype, base):
        if self.rounds:  # the least-squares sums need float32 (255 * |x| overflows float16)
            x, dtype = _as_f32(tape, x, dtype, f"{base}/x_f32"), FLOAT32
        codes, scale, zp = asymmetric_codes(tape, graph, x, dtype, base)
        if self.rounds:
            codes, scale, zp = refine_asymmetric(tape, graph, x, codes, scale, base, self.rounds)
        if self.code_offset:
            offset = edit.add_initializer(graph, f"{base}/offset", np.array(float(self.code_offset), dtype.numpy()))
            codes = tape.op("Sub", [codes, offset], name=f"{base}/to_signed")
        to = ir.DataType.INT8 if self.code_offset else ir.DataType.UINT8
        xq = tape.op("Cast", [codes], {"to": to}, name=f"{base}/to_{to.name.lower()}")
        xq.type = ir.TensorType(to)
        zp = _as_f32(tape, zp, dtype, f"{base}/zp_f32")
        if self.code_offset:
            offset32 = edit.add_initializer(graph, f"{base}/offset_f32", np.array(float(self.code_offset), np.float32))
            zp = tape.op("Sub", [zp, offset32], name=f"{base}/zp_signed")
        return xq, zp, _as_f32(tape, scale, dtype, f"{base}/scale_f32")

    def product(self, tape, graph, base, act, wq, q, scale, wzp=None):
        xq, zp, s = act
        ins = [xq, wq]
        if wzp is not None:  # the activations' zero point enters below: 0 here
            ins += [edit.add_initializer(graph, f"{base}/a_zero_point", np.array(0, np.uint8)), wzp]
        acc = tape.op("MatMulInteger", ins, name=f"{base}/matmul_int8")
        accf = tape.op("Cast", [acc], {"to": FLOAT32}, name=f"{base}/acc_f32")
        colsum = edit.add_initializer(graph, f"{base}.weight_colsum", q.astype(np.int64).sum(axis=0).astype(np.float32))
        correction = tape.op("Mul", [zp, colsum], name=f"{base}/zp_correction")
        centred = tape.op("Sub", [accf, correction], name=f"{base}/centred")
        y = tape.op("Mul", [centred, s], name=f"{base}/token_scale")
        wscale = edit.add_initializer(graph, f"{base}.weight_scale", scale.astype(np.float32))
        return tape.op("Mul", [y, wscale], name=f"{base}/channel_scale")


@register
@dataclasses.dataclass
class Uint8TokenAsym(_Asymmetric):
    name = "uint8-token-asym"
    providers = ("cpu",)
    summary = "per-token asymmetric uint8 codes (a zero point per token, applied as a rank-one correction) x int8"
    uint8_activations = True


@register
@dataclasses.dataclass
class Int8TokenAsym(_Asymmetric):
    name = "int8-token-asym"
    providers = ("cuda",)
    summary = "per-token asymmetric codes stored as int8 (code - 128) x int8, rank-one zero-point correction"
    code_offset = 128


@register
@dataclasses.dataclass
class Uint8TokenIter(_Asymmetric):
    name = "uint8-token-iter"
    providers = ("cpu",)
    summary = "uint8-token-asym with each token's scale and zero point refined by 5 rounds of least squares"
    activations: ClassVar[tuple[str, ...]] = ("iter",)
    rounds = 5
    uint8_activations = True


@register
@dataclasses.dataclass
class Int8TokenIter(_Asymmetric):
    name = "int8-token-iter"
    providers = ("cuda",)
    summary = "int8-token-asym with each token's scale and zero point refined by 5 rounds of least squares"
    activations: ClassVar[tuple[str, ...]] = ("iter",)
    code_offset = 128
    rounds = 5


@register
@dataclasses.dataclass
class Uint8Tensor(W8A8Lowering):
    name = "uint8-tensor"
    providers = ("cpu",)
    summary = "ONNX-standard DynamicQuantizeLinear (per-tensor asymmetric uint8) x int8 MatMulInteger"
    activations: ClassVar[tuple[str, ...]] = ("tensor",)
    uint8_activations = True

    def quantize_activation(self, tape, graph, x, dtype, base):
        x32 = _as_f32(tape, x, dtype, f"{base}/to_f32")
        xq, sx, zp = tape.op_multi_out("DynamicQuantizeLinear", [x32], num_outputs=3, name=f"{base}/dql")
        xq.type, zp.type = ir.TensorType(ir.DataType.UINT8), ir.TensorType(ir.DataType.UINT8)
        return xq, sx, zp

    def product(self, tape, graph, base, act, wq, q, scale, wzp=None):
        xq, sx, zp = act
        acc = tape.op("MatMulInteger", [xq, wq, zp] + ([wzp] if wzp is not None else []), name=f"{base}/matmul_int8")
        accf = tape.op("Cast", [acc], {"to": FLOAT32}, name=f"{base}/acc_f32")
        wscale = edit.add_initializer(graph, f"{base}.weight_scale", scale.astype(np.float32))
        s = tape.op("Mul", [sx, wscale], name=f"{base}/scale")
        return tape.op("Mul", [accf, s], name=f"{base}/dequant")

    def node_issue(self, node, provider):
        if provider == "cuda" and node.op_type == "DynamicQuantizeLinear":
            return f"DynamicQuantizeLinear '{node.name}': no CUDA kernel"
        return super().node_issue(node, provider)


def _dtype(value: ir.Value | None) -> ir.DataType | None:
    if value is None:
        return None
    if value.dtype is not None:
        return value.dtype
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast":
        return ir.DataType(producer.attributes.get_int("to"))
    if producer is not None and producer.op_type == "DynamicQuantizeLinear":
        return ir.DataType.UINT8
    return None
