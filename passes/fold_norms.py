"""Fold every RMSNorm's scale into the linears that read it, and untie a tied lm_head."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxqf.graph import edit
from onnxqf.maths import fold
from onnxqf.passes.base import RewritePass

__all__ = ["FoldNormsPass"]


class FoldNormsPass(RewritePass):
    """``norm(x) * g`` feeding ``B_i`` becomes ``norm(x)`` feeding ``diag(g) B_i``; g is set to ones.

    Rules: exact for any g (``(n ⊙ g) B = n (diag(g) B)``). The Mul by g stays in the graph with
    ones, so that smoothing and the full hybrid can later put their scales there. Every weight is
    made private first: a tied embedding is untied, because the final norm's scale must land on
    lm_head only, never on the embedding table. Modified: when a scale was not already all ones or
    a weight had to be untied.
    """

    def requires(self, model: ir.Model) -> None:
        self.structure(model)

    def apply(self, model: ir.Model) -> bool:
        structure = self.structure(model)
        modified = structure.tied() or any(lin.transpose is not None for lin in structure.linears())
        edit.prepare_linears(model.graph, structure)
        for norm, readers in structure.norm_readers():
            if norm.is_unit():
                continue
            g = norm.scale()
            for lin in readers:  # each weight MatMul once (a packed q/k/v as a whole)
                edit.update_matrix(lin, lambda B, g=g: fold.scale_rows(B, g), by="columns")
            norm.set_scale(np.ones_like(g))
            modified = True
        return modified
