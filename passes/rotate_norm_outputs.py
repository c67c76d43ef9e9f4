"""The full hybrid's online Hadamard after each attention and MLP norm (and, for a quantized lm_head, after the
final norm): ``y <- (y ⊙ d) H``."""

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

    ``head=True`` (for a quantized lm_head) does the same at the final norm: lm_head's input is the one linear
    input the full hybrid otherwise leaves as the norm makes it, outlier channels and all (docs/results.md §2c). A
    tied embedding is untied first (lm_head gets ``H^T diag(d) B``, the table stays). The rotation costs one online
    node per token, so it is only applied when lm_head is quantized.

    Attributes:
        rotation: the plan's ``norm_out`` rotation (hidden x hidden), shared by all layers (and lm_head's input).
        head: also rotate the final norm's output.
    """

    what = "norm-output rotation"

    def __init__(self, rotation, report=None, online=None, *, head: bool = False):
        super().__init__(rotation, report, online)
        self.head = head

    def _targets(self, s):
        """(name, norm, the linears reading its output, the weight MatMuls among them, each once) of every norm
        this pass rotates."""
        out = [(site.name, site.fold_norm, site.readers, site.matmuls()) for site in s.sites(("attn_in", "mlp_in"))]
        if self.head:
            out.append(("lm_head_in", s.final_norm, [s.lm_head], [s.lm_head]))
        return out

    def size_of(self, s) -> int:
        return s.config.hidden

    def requires(self, model: ir.Model) -> None:
        s = self.recognize_and_check(model)
        for name, norm, readers, _ in self._targets(s):
            if not norm.has_scale:
                raise OnnxqfError(f"{name}: the norm has no scale to fold the rotation's signs into")
            nodes = {id(lin.node) for lin in readers}
            for node, _ in through_casts_fwd(norm.output):
                if id(node) not in nodes:
                    raise OnnxqfError(f"{name}: the norm output is also read by a {node.op_type} node "
                                      f"('{node.name}')")

    def apply(self, model: ir.Model) -> bool:
        s = self.structure(model)
        edit.prepare_linears(model.graph, s)
        d, factors = self.rotation.signs, list(self.rotation.factors)
        for name, norm, _, matmuls in self._targets(s):
            norm.set_scale(norm.scale() * d)
            for lin in matmuls:
                edit.update_matrix(lin, lambda B: fold.kron_input(fold.scale_rows(B, d), factors), by="columns")
            edit.rotate_value_online(model.graph, norm.output, factors, s.dtype, f"{name}/hadamard",
                                     **self.online.kwargs())
        return True
