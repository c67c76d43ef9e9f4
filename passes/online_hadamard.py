"""Online Hadamard before every down_proj: ``x <- x D H`` inserted as nodes, ``B <- H^T D B``."""

from __future__ import annotations

import onnx_ir as ir

from onnxqf.errors import OnnxqfError
from onnxqf.graph import edit
from onnxqf.graph.structure import Linear
from onnxqf.maths import fold
from onnxqf.passes.base import RotationPass

__all__ = ["DownProjHadamardPass", "rotate_gated_input"]


class DownProjHadamardPass(RotationPass):
    """Rotate each down_proj input by the plan's ``D H`` (size d_ff).

    Rules: the random signs D fold into up_proj's output columns (``act(gate) * up`` is linear in
    ``up`` per channel), so the graph only gets the mixing ``H``, emitted as Kronecker factors (one
    Reshape and one small MatMul each, O(n Σ f_i)); down_proj's weight gets ``H^T D B``.
    ``requires``: every layer's down_proj input is ``act(gate) * up``.

    Attributes:
        rotation: the plan's d_ff rotation.
    """

    what = "down_proj rotation"

    def size_of(self, s) -> int:
        return s.config.intermediate

    def requires(self, model: ir.Model) -> None:
        s = self.recognize_and_check(model)
        for layer in s.layers:
            if layer.mlp_mul is None:
                raise OnnxqfError(f"layer {layer.index}: down_proj's input is not act(gate) * up; "
                                  "cannot fold the signs")

    def apply(self, model: ir.Model) -> bool:
        s = self.structure(model)
        edit.prepare_linears(model.graph, s)
        D, factors = self.rotation.signs, list(self.rotation.factors)
        for layer in s.layers:
            rotate_gated_input(model.graph, layer.up, layer.down, D, factors, s.dtype,
                               f"layers.{layer.index}.down_proj/hadamard", self.online)
        return True


def rotate_gated_input(graph: ir.Graph, gate: Linear, reader: Linear, D, factors, dtype, name: str,
                       online) -> None:
    """``reader``'s input ``x`` (linear in ``gate``'s output channel by channel) becomes ``x D H``: the signs D into
    ``gate``'s output columns and bias, the mixing H as online Kronecker factors (``online``: an OnlineStyle) before
    ``reader``, whose weight gets ``H^T D B``."""
    edit.update_matrix(gate, lambda B: fold.scale_cols(B, D), by="rows")
    if gate.bias is not None:
        edit.set_bias_vector(gate, gate.bias_vector() * D)
    edit.update_matrix(reader, lambda B: fold.kron_input(fold.scale_rows(B, D), factors), by="columns")
    edit.rotate_value_online(graph, reader.input, factors, dtype, name, **online.kwargs())
