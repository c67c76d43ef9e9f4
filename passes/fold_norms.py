"""Fold every RMSNorm's scale into the linears that read it, and untie a tied lm_head.

``norm(x) * g`` feeding ``B_i`` becomes ``norm(x)`` feeding ``diag(g) B_i``; g is set to ones (the
Mul stays, so that smoothing can later put its scales there). A tied embedding is untied first:
the final norm's scale must land on lm_head only, never on the embedding table.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxqf import edit, fold
from onnxqf.recognize import Linear, Norm, recognize


def norm_readers(structure) -> list[tuple[Norm, list[Linear]]]:
    out = []
    for layer in structure.layers:
        out.append((layer.attn_norm, [layer.q, layer.k, layer.v]))
        out.append((layer.mlp_norm, [layer.gate, layer.up]))
    out.append((structure.final_norm, [structure.lm_head]))
    return out


class FoldNormsPass(ir.passes.InPlacePass):
    """gamma -> the readers' weight rows; gamma <- 1."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        structure = recognize(model)
        edit.prepare_linears(model.graph, structure)
        modified = False
        for norm, readers in norm_readers(structure):
            if norm.gamma is None:
                continue
            g = read(norm.gamma)
            if np.all(g == 1.0):
                continue
            private_gamma(model.graph, norm)
            for lin in readers:
                edit.set_weight_matrix(lin, fold.scale_rows(lin.matrix(), g))
            edit.write(norm.gamma, np.ones_like(g))
            modified = True
        return ir.passes.PassResult(model, modified=True if structure.tied() else modified)


def private_gamma(graph: ir.Graph, norm: Norm) -> None:
    """Give the norm its own gamma initializer (exporters sometimes share one constant)."""
    if len(list(norm.gamma.uses())) == 1:
        return
    new = edit.add_initializer(graph, (norm.gamma.name or "gamma") + ".private", read(norm.gamma), norm.gamma.const_value.dtype)
    slot = list(norm.gamma_node.inputs).index(norm.gamma)
    norm.gamma_node.replace_input_with(slot, new)
    norm.gamma = new
