"""Replace weight MatMuls by int8 MatMulInteger subgraphs (W8A8, dynamic activation scales).

Weights: int8, symmetric, per output channel (initializers). Activations, by ``act_quant``:

``token`` (default; every node has a CUDA kernel in ONNX Runtime)::

    amax = ReduceMax(Abs(x), axis=-1)            per-token absolute maximum   [.., 1]
    xq   = Cast<int8>(Round(x * (127 / amax)))   symmetric int8
    acc  = MatMulInteger(xq, Wq)                 int8 x int8 -> int32
    y    = Cast<f32>(acc) * amax * (w_scale / 127)

``tensor`` (the ONNX-standard dynamic quantization, for CPU runtimes; the CUDA provider runs
DynamicQuantizeLinear and uint8 MatMulInteger on the CPU)::

    xq, sx, zp = DynamicQuantizeLinear(x)        per-tensor asymmetric uint8
    y = Cast<f32>(MatMulInteger(xq, Wq, zp)) * (sx * w_scale)

An activation read by several linears (q/k/v, gate/up) is quantized once, and their int8 weights are
concatenated into one MatMulInteger whose rescaled result is Split back into the linears' outputs
(one GEMM and one rescale per activation). Float16 models compute the rescale in float32 (int32
accumulators overflow float16) and cast back.
"""

from __future__ import annotations

import fnmatch
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx_ir import tape as ir_tape

from onnxqf.graph import edit
from onnxqf.maths import qmath
from onnxqf.errors import OnnxqfError, UnsupportedGraphError
from onnxqf.maths.gptq import hessian_of
from onnxqf.passes.base import RewritePass
from onnxqf.recognize import recognize
from onnxqf.graph.structure import Linear, group_by_input

logger = logging.getLogger(__name__)

ACT_QUANT = ("token", "tensor")
FLOAT32 = ir.DataType.FLOAT


class QuantizeMatMulsPass(RewritePass):
    """Every selected weight MatMul becomes int8 weights x dynamically quantized int8 activations.

    Rules: see the module docstring for the two activation lowerings. Weights are rounded with
    GPTQ where ``hessians`` has the X^T X of the linear's site (keyed by site name), else to
    nearest. lm_head stays float unless ``quantize_lm_head``; ``keep_float`` patterns (fnmatch on
    names like ``layers.3.down_proj`` or a bare role) stay float. ``requires``: opset >= 13 and at
    least one linear to quantize. Results: ``report.quantized`` and ``report.rounding``.
    """

    def __init__(self, act_quant: str = "token", quantize_lm_head: bool = False, clip_search: bool = False,
                 keep_float: tuple[str, ...] = (), hessians: dict[str, np.ndarray] | None = None, progress: bool = False,
                 report=None):
        super().__init__(report)
        if act_quant not in ACT_QUANT:
            raise OnnxqfError(f"--act-quant must be one of {', '.join(ACT_QUANT)}, not '{act_quant}'")
        self.act_quant = act_quant
        self.quantize_lm_head = quantize_lm_head
        self.clip_search = clip_search
        self.keep_float = tuple(keep_float)
        self.hessians = hessians or {}
        self.progress = progress

    def requires(self, model: ir.Model) -> None:
        if model.graph.opset_imports.get("", 0) < 13:
            raise OnnxqfError("the model's opset is below 13; re-export with opset >= 18")
        if not select_linears(recognize(model), self.quantize_lm_head, self.keep_float):
            raise UnsupportedGraphError("no weight MatMuls to quantize")

    def apply(self, model: ir.Model) -> bool:
        graph = model.graph
        structure = recognize(model)
        linears = select_linears(structure, self.quantize_lm_head, self.keep_float)
        if self.act_quant == "tensor":
            logger.warning("--act-quant tensor uses DynamicQuantizeLinear and uint8 MatMulInteger: ONNX Runtime's CUDA "
                           "provider runs these nodes on the CPU (use --act-quant token for CUDA)")
        from tqdm.auto import tqdm

        site_of = structure.site_of()
        position = {node: i for i, node in enumerate(graph)}
        # one group at a time: rounded, written (to disk under onnxqf.graph.store) and its nodes replaced, so
        # that no more than one group's weights are in memory
        for group in tqdm(group_by_input(linears), desc="int8 weights", unit="group", disable=not self.progress):
            for lin in group:
                edit.make_private(graph, lin)
            site = site_of.get(group[0].name)
            weights, how = self._round_group(group, hessian_of(self.hessians, None if site is None else site.name))
            for lin in group:
                self.report.rounding[lin.name] = how
            x = group[0].input
            dtype = x.dtype or group[0].weight.const_value.dtype
            quantized = self._quantize_activation(graph, group[0], x, dtype)
            first = min((lin.node for lin in group), key=position.__getitem__)
            self._replace(graph, group, first, dtype, quantized, weights)
            self.report.quantized.extend(lin.name or lin.node.name for lin in group)
        common_passes.RemoveUnusedNodesPass()(model)
        return True

    # -- subgraphs ------------------------------------------------------------------------------

    def _quantize_activation(self, graph: ir.Graph, first: Linear, x: ir.Value, dtype: ir.DataType):
        """Nodes that quantize ``x``, inserted right after its producer (before all its readers)."""
        tape = ir_tape.Tape(graph)
        base = f"{first.name or first.node.name}/act_quant"
        if self.act_quant == "token":
            rounded, amax, _ = per_token_codes(tape, graph, x, dtype, base)
            xq = tape.op("Cast", [rounded], {"to": ir.DataType.INT8}, name=f"{base}/to_int8")
            xq.type = ir.TensorType(ir.DataType.INT8)
            if dtype != FLOAT32:
                amax = tape.op("Cast", [amax], {"to": FLOAT32}, name=f"{base}/amax_f32")
            result = ("token", xq, amax)
        else:
            x32 = x if dtype == FLOAT32 else tape.op("Cast", [x], {"to": FLOAT32}, name=f"{base}/to_f32")
            xq, sx, zp = tape.op_multi_out("DynamicQuantizeLinear", [x32], num_outputs=3, name=f"{base}/dql")
            xq.type, zp.type = ir.TensorType(ir.DataType.UINT8), ir.TensorType(ir.DataType.UINT8)
            result = ("tensor", xq, sx, zp)
        _insert_after_producer(graph, x, tape.nodes, first.node)
        return result

    def _round_group(self, group: list[Linear], H) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
        """([(int8 q [in, out], per-column scale)] per linear, 'gptq' | 'rtn') for linears sharing one input.

        Every output column is rounded on its own (its scale, and GPTQ's error feedback, run down the
        column), so the weights are rounded linear by linear and in column chunks with one prepared
        Hessian: the same result as rounding their concatenation, in bounded memory.
        """
        from onnxqf.maths.gptq import column_chunks, gptq_quantize, prepare

        how = "rtn" if H is None else "gptq"
        prepared = None if H is None else prepare(H)  # H: an array, or a function that fetches a copy
        del H
        out = []
        for lin in group:
            B = lin.stored_matrix()  # in its own dtype; float64 a column chunk at a time
            q = np.empty(B.shape, np.int8)
            scale = np.empty(B.shape[1])
            for cols, chunk in column_chunks(B):
                qc, sc = qmath.quantize_weight_per_channel(chunk, bits=8, clip_search=self.clip_search)
                if prepared is not None:
                    qc, sc = gptq_quantize(chunk, prepared, scale=sc)
                q[:, cols], scale[cols] = qc, sc
            out.append((q, scale))
            del B
        return out, how

    def rounded(self, structure, site, H: np.ndarray) -> dict[Linear, np.ndarray]:
        """The weights this pass will write for the linears reading ``site`` given its ``X^T X``, dequantized
        (float64 [in, out] per linear; :func:`onnxqf.calib.layerwise.sequential_hessians` runs later layers on them)."""
        group = [lin for lin in select_linears(structure, self.quantize_lm_head, self.keep_float) if lin.input is site.value]
        if not group:
            return {}
        weights, _ = self._round_group(group, H)
        return {lin: q.astype(np.float64) * scale for lin, (q, scale) in zip(group, weights)}

    def _replace(self, graph: ir.Graph, group: list[Linear], first: ir.Node, dtype: ir.DataType, quantized,
                 weights: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """One MatMulInteger over the group's concatenated int8 weights, the rescale, then a Split per linear.

        Linears that read one activation (q/k/v, gate/up) share its quantization, so their products
        are column blocks of one product with ``[W_1 | ... | W_k]``: one GEMM and one rescale instead
        of k, the same numbers per column. The nodes go in before the group's first MatMul.
        """
        q = np.concatenate([w[0] for w in weights], axis=1)
        scale = np.concatenate([w[1] for w in weights])
        tape = ir_tape.Tape(graph)
        base = group[0].name or group[0].node.name
        if len(group) > 1:
            base = f"{base}+{'+'.join(lin.role for lin in group[1:])}"
        wq = edit.add_initializer(graph, f"{base}.weight_int8", q.astype(np.int8))
        if quantized[0] == "token":
            _, xq, amax = quantized
            acc = tape.op("MatMulInteger", [xq, wq], name=f"{base}/matmul_int8")
            accf = tape.op("Cast", [acc], {"to": FLOAT32}, name=f"{base}/acc_f32")
            wscale = edit.add_initializer(graph, f"{base}.weight_scale", (scale / 127.0).astype(np.float32))
            y = tape.op("Mul", [accf, amax], name=f"{base}/token_scale")
            y = tape.op("Mul", [y, wscale], name=f"{base}/channel_scale")
        else:
            _, xq, sx, zp = quantized
            acc = tape.op("MatMulInteger", [xq, wq, zp], name=f"{base}/matmul_int8")
            accf = tape.op("Cast", [acc], {"to": FLOAT32}, name=f"{base}/acc_f32")
            wscale = edit.add_initializer(graph, f"{base}.weight_scale", scale.astype(np.float32))
            s = tape.op("Mul", [sx, wscale], name=f"{base}/scale")
            y = tape.op("Mul", [accf, s], name=f"{base}/dequant")
        if dtype != FLOAT32:
            y = tape.op("Cast", [y], {"to": dtype}, name=f"{base}/to_{dtype.name.lower()}")
        if len(group) > 1:
            sizes = edit.add_initializer(graph, f"{base}/split_sizes", np.array([w[0].shape[1] for w in weights], np.int64))
            outs = tape.op_multi_out("Split", [y, sizes], {"axis": -1}, num_outputs=len(group), name=f"{base}/split")
        else:
            outs = [y]
        graph.insert_before(first, tape.nodes)
        for lin, y in zip(group, outs):
            old = lin.node.outputs[0]
            y.shape, y.type = old.shape, old.type
            was_output, name = old.is_graph_output(), old.name
            old.replace_all_uses_with(y, replace_graph_outputs=True)
            if was_output:  # keep the graph output's name (e.g. logits)
                old.name, y.name = f"{name}.float", name
            graph.remove(lin.node, safe=True)


def per_token_codes(tape: ir_tape.Tape, graph: ir.Graph, x: ir.Value, dtype: ir.DataType,
                    base: str) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Nodes (on ``tape``) of per-token symmetric int8 codes of ``x``: (round(x * 127 / max|x|) in ``dtype``,
    max|x| per token (keepdims, at least a tiny floor), the constant 127). The `token` subgraph casts the
    codes to int8 for MatMulInteger; scripts/hybrid_budget.py multiplies them back to simulate it in float."""
    absx = tape.op("Abs", [x], name=f"{base}/abs")
    axes = edit.add_initializer(graph, f"{base}/axes", np.array([-1], np.int64))
    amax = tape.op("ReduceMax", [absx, axes], {"keepdims": 1}, name=f"{base}/amax")
    tiny = edit.add_initializer(graph, f"{base}/tiny", np.array(1e-6 if dtype == FLOAT32 else 1e-4, dtype.numpy()))
    amax = tape.op("Max", [amax, tiny], name=f"{base}/amax_safe")
    qmax = edit.add_initializer(graph, f"{base}/qmax", np.array(127.0, dtype.numpy()))
    inv = tape.op("Div", [qmax, amax], name=f"{base}/inv_scale")
    scaled = tape.op("Mul", [x, inv], name=f"{base}/scale")
    return tape.op("Round", [scaled], name=f"{base}/round"), amax, qmax


def select_linears(structure, quantize_lm_head: bool, keep_float: tuple[str, ...] = ()) -> list[Linear]:
    """The decoder's linears (by recognition), plus lm_head on request, less the keep-float ones."""
    return [lin for lin in structure.linears(include_lm_head=quantize_lm_head) if not _matches(lin.name, keep_float)]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """fnmatch-style: 'down_proj' matches every layer's down_proj, 'layers.29.*' one layer."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"layers.*.{p}") for p in patterns)


def _insert_after_producer(graph: ir.Graph, x: ir.Value, nodes, fallback_before: ir.Node) -> None:
    producer = x.producer()
    if producer is None:  # a graph input: place before the first reader
        graph.insert_before(fallback_before, nodes)
    else:
        graph.insert_after(producer, nodes)
