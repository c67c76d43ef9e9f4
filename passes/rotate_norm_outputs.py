"""The full hybrid's online Hadamard after each attention and MLP norm: ``y <- (y ⊙ d) H``."""

from __future__ import annotations

import onnx_ir as ir

from onnxqf.errors import OnnxqfError
from onnxqf.graph import edit
from onnxqf.maths import fold
from onnxqf.passes.base import RotationPass
from onnxqf.recognize.match import through_casts_fwd

__all__ = ["NormOutputHadamardPass"]


class NormOutputHadamardPass(RotationPass):
    """Rotate the q/k/v input and the gate/up input of every layer online, after the norm.

    Rules: the norm's output ``y = n(x) ⊙ γ`` becomes ``(n(x) ⊙ γ ⊙ d) H``: the random signs d fold
    into γ (which already holds any smoothing ``1/s``), the mixing ``H`` is inserted after the norm
    as Kronecker factors (O(n Σ f_i) per token), and each reader gets ``B <- H^T diag(d) B``. Exact
    for any γ, so — unlike the folded residual rotation — smoothing scales can sit in γ in the
    unrotated basis: this is what lets the hybrid smooth *before* rotating at these two sites.
    ``requires``: every norm has a γ initializer and its output is read only by the site's linears.

    Attributes:
        rotation: the plan's ``norm_out`` rotation (hidden x hidden), shared by all layers.
    """

    what = "norm-output rotation"

    def size_of(self, s) -> int:
        return s.config.hidden

    def requires(self, model: ir.Model) -> None:
        s = self.recognize_and_check(model)
        for site in s.sites(("attn_in", "mlp_in")):
            if not site.fold_norm.has_scale:
                raise OnnxqfError(f"{site.name}: the norm has no scale to fold the rotation's signs into")
            nodes = {id(lin.node) for lin in site.readers}
            for node, _ in through_casts_fwd(site.fold_norm.output):
                if id(node) not in nodes:
                    raise OnnxqfError(f"{site.name}: the norm output is also read by a {node.op_type} node "
                                      f"('{node.name}')")

    def apply(self, model: ir.Model) -> bool:
        s = self.structure(model)
        edit.prepare_linears(model.graph, s)
        d, factors = self.rotation.signs, list(self.rotation.factors)
        for site in s.sites(("attn_in", "mlp_in")):
            norm = site.fold_norm
            norm.set_scale(norm.scale() * d)
            for lin in site.matmuls():
                edit.update_matrix(lin, lambda B: fold.kron_input(fold.scale_rows(B, d), factors), by="columns")
            edit.rotate_value_online(model.graph, norm.output, factors, s.dtype, f"{site.name}/hadamard",
                                     **self.online.kwargs())
        return True
