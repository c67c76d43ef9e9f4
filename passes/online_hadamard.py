"""Online Hadamard before every down_proj: ``x <- x D H`` inserted as nodes, ``B <- H^T D B``."""

from __future__ import annotations

import onnx_ir as ir

from onnxqf.errors import OnnxqfError
from onnxqf.graph import edit
from onnxqf.maths import fold
from onnxqf.passes.base import RotationPass

__all__ = ["DownProjHadamardPass"]


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
            up, down = layer.up, layer.down
            edit.update_matrix(up, lambda B: fold.scale_cols(B, D), by="rows")
            if up.bias is not None:
                edit.set_bias_vector(up, up.bias_vector() * D)
            edit.update_matrix(down, lambda B: fold.kron_input(fold.scale_rows(B, D), factors), by="columns")
            edit.rotate_value_online(model.graph, down.input, factors, s.dtype,
                                     f"layers.{layer.index}.down_proj/hadamard", **self.online.kwargs())
        return True
