"""Rotate the residual stream by an orthogonal Q (randomized Hadamard), folded into weights."""

from __future__ import annotations

import onnx_ir as ir

from onnxqf.errors import OnnxqfError
from onnxqf.graph import edit
from onnxqf.maths import fold
from onnxqf.passes.base import RotationPass
from onnxqf.recognize.families import GENERIC, RESIDUAL_ROTATION

__all__ = ["RotateResidualPass"]


class RotateResidualPass(RotationPass):
    """Every vector on the residual stream becomes ``x Q``, with nothing added to the graph.

    Rules: the embedding rows ``E <- E Q``; linears that read the (normed) stream ``B <- Q^T B``
    (q, k, v, gate, up, lm_head); linears that write into it ``B <- B Q``, ``b <- b Q`` (o, down).
    Exact because ``RMSNorm(x Q) = RMSNorm(x) Q`` when the norm has no scale, so the norm scales
    must be folded first (``requires``: every γ is 1, and only norms and residual Adds read the
    stream; a ``SkipSimplifiedLayerNormalization`` is both, and rotation-equivariant likewise). A
    tied embedding read through a Transpose of lm_head's weight is untied first.

    Attributes:
        rotation: the plan's residual rotation (hidden x hidden).
    """

    what = "residual rotation"

    def size_of(self, s) -> int:
        return s.config.hidden

    def requires(self, model: ir.Model) -> None:
        s = self.recognize_and_check(model)
        (s.family or GENERIC).check(RESIDUAL_ROTATION)  # e.g. Gemma 2/3: norms after the blocks
        if s.centring_norms():
            raise OnnxqfError("residual rotation needs RMSNorms: LayerNormalization subtracts the mean (run "
                              "CentreResidualPass first)")
        for norm in s.norms():
            if not norm.is_unit():
                raise OnnxqfError("residual rotation needs folded norm scales (run FoldNormsPass first)")
        # the residual stream: the embedding and every value a norm normalizes (the residual Adds'
        # outputs, or the fused Skip norms' residual sums)
        values = list({id(v): v for v in [s.embedding.outputs[0]] + [n.input for n in s.norms()]}.values())
        allowed = {"Add", "Pow", "Mul", "Cast", "Div", "RMSNormalization", "SimplifiedLayerNormalization",
                   "SkipSimplifiedLayerNormalization"}
        for v in values:
            for node in v.consumers():
                if node.op_type not in allowed:
                    raise OnnxqfError(f"the residual stream is read by a {node.op_type} node ('{node.name}'); cannot "
                                      "rotate it")

    def apply(self, model: ir.Model) -> bool:
        s = self.structure(model)
        edit.prepare_linears(model.graph, s)
        # Q = diag(signs) kron(factors), applied through its factors: O(n sum f) per row, not n^2
        Q = fold.KronRotation([(self.rotation.signs, self.rotation.factors)])
        table = s.embedding_table
        edit.update_slices(table, Q.apply, axis=0)  # E Q
        for lin in s.stream_readers():  # q/k/v, gate/up (a packed weight once), lm_head
            edit.update_matrix(lin, Q.apply_input, by="columns")  # Q^T B
        for lin in s.stream_writers():  # o_proj, down_proj
            edit.update_matrix(lin, Q.apply, by="rows")  # B Q
            if lin.bias is not None:
                edit.set_bias_vector(lin, Q.apply(lin.bias_vector()))
        return True
