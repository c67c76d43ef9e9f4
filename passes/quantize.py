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

An activation read by several linears (q/k/v, gate/up) is quantized once. Float16 models compute
the rescale in float32 (int32 accumulators overflow float16) and cast back.
"""

from __future__ import annotations

import fnmatch
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx_ir import tape as ir_tape

from onnxqf import edit, qmath
from onnxqf.errors import OnnxqfError, UnsupportedGraphError
from onnxqf.passes.base import RewritePass
from onnxqf.recognize import recognize
from onnxqf.structure import Linear

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
        weights = self._round_weights(structure, linears)
        quantized_inputs: dict[int, tuple] = {}
        for lin in linears:
            edit.make_private(graph, lin)
            x = lin.input
            dtype = x.dtype or lin.weight.const_value.dtype
            if id(x) not in quantized_inputs:
                quantized_inputs[id(x)] = self._quantize_activation(graph, lin, x, dtype)
            self._replace(graph, lin, dtype, quantized_inputs[id(x)], weights[lin.name])
            self.report.quantized.append(lin.name or lin.node.name)
        common_passes.RemoveUnusedNodesPass()(model)
        return True

    # -- subgraphs ------------------------------------------------------------------------------

    def _quantize_activation(self, graph: ir.Graph, first: Linear, x: ir.Value, dtype: ir.DataType):
        """Nodes that quantize ``x``, inserted right after its producer (before all its readers)."""
        tape = ir_tape.Tape(graph)
        base = f"{first.name or first.node.name}/act_quant"
        if self.act_quant == "token":
            absx = tape.op("Abs", [x], name=f"{base}/abs")
            axes = edit.add_initializer(graph, f"{base}/axes", np.array([-1], np.int64))
            amax = tape.op("ReduceMax", [absx, axes], {"keepdims": 1}, name=f"{base}/amax")
            tiny = edit.add_initializer(graph, f"{base}/tiny", np.array(1e-6 if dtype == FLOAT32 else 1e-4, dtype.numpy()))
            amax = tape.op("Max", [amax, tiny], name=f"{base}/amax_safe")
            qmax = edit.add_initializer(graph, f"{base}/qmax", np.array(127.0, dtype.numpy()))
            inv = tape.op("Div", [qmax, amax], name=f"{base}/inv_scale")
            scaled = tape.op("Mul", [x, inv], name=f"{base}/scale")
            rounded = tape.op("Round", [scaled], name=f"{base}/round")
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

    def _round_weights(self, structure, linears: list[Linear]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """int8 weights and scales per linear: GPTQ where a Hessian of the input is known, else RTN."""
        from tqdm.auto import tqdm

        from onnxqf.gptq import gptq_quantize

        by_input: dict[int, list[Linear]] = {}
        for lin in linears:
            by_input.setdefault(id(lin.input), []).append(lin)
        site_of = structure.site_of()
        out = {}
        for group in tqdm(list(by_input.values()), desc="rounding weights", unit="group", disable=not self.progress):
            Bs = [lin.matrix() for lin in group]
            B = np.concatenate(Bs, axis=1)
            site = site_of.get(group[0].name)
            H = None if site is None else self.hessians.get(site.name)
            if H is not None:
                _, scale = qmath.quantize_weight_per_channel(B, bits=8, clip_search=self.clip_search)
                q, scale = gptq_quantize(B, H, scale=scale)
                how = "gptq"
            else:
                q, scale = qmath.quantize_weight_per_channel(B, bits=8, clip_search=self.clip_search)
                how = "rtn"
            col = 0
            for lin, b in zip(group, Bs):
                out[lin.name] = (q[:, col : col + b.shape[1]], scale[col : col + b.shape[1]])
                self.report.rounding[lin.name] = how
                col += b.shape[1]
        return out

    def _replace(self, graph: ir.Graph, lin: Linear, dtype: ir.DataType, quantized, weight) -> None:
        q, scale = weight
        tape = ir_tape.Tape(graph)
        base = lin.name or lin.node.name
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
        graph.insert_before(lin.node, tape.nodes)
        old = lin.node.outputs[0]
        y.shape, y.type = old.shape, old.type
        was_output, name = old.is_graph_output(), old.name
        old.replace_all_uses_with(y, replace_graph_outputs=True)
        if was_output:  # keep the graph output's name (e.g. logits)
            old.name, y.name = f"{name}.float", name
        graph.remove(lin.node, safe=True)


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
