"""Centre the residual stream and turn its LayerNorms into RMSNorms (OLMo), so that it can be rotated."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from onnxqf.errors import UnsupportedGraphError
from onnxqf.graph import edit
from onnxqf.graph.structure import Norm, const_array
from onnxqf.maths.centring import centre
from onnxqf.passes.base import RewritePass

__all__ = ["CentreResidualPass"]


class CentreResidualPass(RewritePass):
    """Make every vector on the residual stream zero-mean, then replace each LayerNorm that reads it by an RMSNorm.

    Rules (:mod:`onnxqf.maths.centring`): ``LayerNorm(x) = RMSNorm(x − mean(x))`` with the same ε, and
    ``x − mean(x) = x C`` with ``C = I − 11ᵀ/d``. The writers of the stream get ``C`` on their output side: the
    embedding rows ``E <- E C`` (each row minus its mean), o_proj (a conv layer's out_proj) and down_proj
    ``B <- B C`` (each row of ``B [in, hidden]`` minus its mean over the outputs) and their biases ``b <- b C``. A
    sum of zero-mean vectors is zero-mean, so every residual Add keeps the stream centred, every LayerNorm reading
    it (each layer's attention and MLP norms, the final norm) sees ``x C = x`` and computes the same values, and so
    does the RMSNorm that replaces it: ``Pow(2) -> ReduceMean -> Add(ε) -> Sqrt -> Div -> Mul(γ)`` (in float32
    when the LayerNorm's ``stash_type`` says so, cast back before γ, as the LayerNorm does), standard ONNX ops, the
    pattern the plain exports of RMSNorm models have. The readers of the stream (q/k/v, gate/up, lm_head) are
    unchanged. A tied lm_head is untied first (it reads the table, which must keep its rows). Exact in float up to
    the rounding of the centred weights (the stream's mean is then ~1e-7 of its size, not 0).

    Afterwards the model is the Llama pattern and every other pass applies: the norm scales fold, the residual
    rotation is exact (``RMSNorm(x Q) = RMSNorm(x) Q``). The pipeline runs this pass first, for every transform but
    ``none`` (quantization only leaves the graph as exported).

    ``requires``: every norm on the residual stream centres (a LayerNormalization without a bias; the recognizer
    refuses a mixture) and no norm sits after a block (its output would not be zero-mean). ``call``: the writers
    centred, the nodes replaced; modified when there was a LayerNorm. ``ensures``: no LayerNormalization node that
    read the stream is left.
    """

    def __init__(self, report=None):
        super().__init__(report)
        self._replaced: list[ir.Node] = []

    def requires(self, model: ir.Model) -> None:
        s = self.structure(model)
        norms = s.norms()
        centring = s.centring_norms()
        if centring and len(centring) != len(norms):
            raise UnsupportedGraphError("some norms on the residual stream subtract the mean and others do not: the "
                                        "stream cannot be centred for both")
        if centring and any(layer.post_norms() for layer in s.layers):
            raise UnsupportedGraphError("norms after the blocks write normalized, not zero-mean, vectors into the "
                                        "residual stream: it cannot be centred")

    def apply(self, model: ir.Model) -> bool:
        s = self.structure(model)
        self._replaced = [norm.gamma_node for norm in s.centring_norms()]
        if not self._replaced:
            return False
        edit.prepare_linears(model.graph, s)  # a tied lm_head gets its own weight; the table is the embedding's
        edit.update_slices(s.embedding_table, lambda rows: centre(rows, axis=1), axis=0)  # E C
        for lin in s.stream_writers():  # o_proj (out_proj), down_proj
            edit.update_matrix(lin, lambda B: centre(B, axis=1), by="rows")  # B C
            if lin.bias is not None:
                edit.set_bias_vector(lin, centre(lin.bias_vector()))
        for norm in s.centring_norms():
            _replace_by_rms_norm(model, norm)
        return True

    def ensures(self, model: ir.Model) -> None:
        left = [node.name for node in self._replaced if node.graph is not None]
        if left:
            raise UnsupportedGraphError(f"LayerNormalization {left[0]!r} was not replaced")


def _replace_by_rms_norm(model: ir.Model, norm: Norm) -> None:
    """Replace the LayerNormalization of ``norm`` by the decomposed RMSNorm with its ε and scale (γ a new
    initializer of its own: the exporter shares one constant of ones between the norms)."""
    graph = model.graph
    node = norm.gamma_node
    x = node.inputs[0]
    eps = node.attributes.get_float("epsilon", 1e-5)
    dtype = x.dtype if x.dtype is not None else ir.DataType.FLOAT
    stash = node.attributes.get_int("stash_type", 1)
    compute = ir.DataType.FLOAT if stash == 1 else dtype
    name = node.name or "layer_norm"
    gamma = edit.add_initializer(graph, f"{name}.rms_scale", np.asarray(const_array(node.inputs[1]), np.float64),
                                 dtype)
    tape = ir_tape.Tape(graph)
    xs = x if compute == dtype else tape.op("Cast", [x], attributes={"to": compute}, name=f"{name}/rms/cast_in")
    sq = tape.op("Pow", [xs, edit.add_initializer(graph, f"{name}.two", np.array(2.0), compute)],
                 name=f"{name}/rms/pow")
    axis = edit.add_initializer(graph, f"{name}.axes", np.array([-1], np.int64))
    if model.opset_imports.get("", 18) >= 18:
        mean = tape.op("ReduceMean", [sq, axis], attributes={"keepdims": 1}, name=f"{name}/rms/mean")
    else:
        mean = tape.op("ReduceMean", [sq], attributes={"axes": [-1], "keepdims": 1}, name=f"{name}/rms/mean")
    var = tape.op("Add", [mean, edit.add_initializer(graph, f"{name}.eps", np.array(eps), compute)],
                  name=f"{name}/rms/add_eps")
    normed = tape.op("Div", [xs, tape.op("Sqrt", [var], name=f"{name}/rms/sqrt")], name=f"{name}/rms/div")
    if compute != dtype:
        normed = tape.op("Cast", [normed], attributes={"to": dtype}, name=f"{name}/rms/cast_out")
    y = tape.op("Mul", [normed, gamma], name=f"{name}/rms/scale")
    out = node.outputs[0]
    y.shape, y.type = out.shape, out.type
    graph.insert_before(node, tape.nodes)
    out.replace_all_uses_with(y)
    graph.remove(node, safe=True)
