"""Online Hadamard before every down_proj: ``x <- x D H`` inserted as nodes, ``B <- H^T D B``.

The random signs D fold into up_proj's output columns (``act(gate) * up`` is linear in ``up``
per channel), so the graph only gets the mixing ``H``, emitted as Kronecker factors (one Reshape
and one small MatMul each, O(n sum f_i)). A size whose non-power-of-two part has no Hadamard
construction uses a random orthogonal factor for that part; if that factor is larger than
``max_dense``, the layer is skipped with a warning.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir

from onnxqf import edit, fold
from onnxqf.recognize import recognize
from onnxqf.hadamard import rotation


class DownProjHadamardPass(ir.passes.InPlacePass):
    def __init__(self, seed: int = 1, max_factor: int = 16, max_dense: int = 256):
        super().__init__()
        self.seed, self.max_factor, self.max_dense = seed, max_factor, max_dense
        self.kind = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        s = recognize(model)
        edit.prepare_linears(model.graph, s)
        dtype = s.dtype
        rot = rotation(s.config.intermediate, np.random.default_rng(self.seed), max_factor=self.max_factor)
        self.kind = rot.kind
        if max(f.shape[0] for f in rot.factors) > self.max_dense and rot.kind != "hadamard":
            warnings.warn(f"d_ff={s.config.intermediate}: no Hadamard construction and a dense factor over {self.max_dense}; down_proj inputs are not rotated")
            return ir.passes.PassResult(model, modified=False)
        D = rot.signs
        for layer in s.layers:
            if layer.mlp_mul is None:
                warnings.warn(f"layer {layer.index}: down_proj's input is not act(gate)*up; skipped the online Hadamard")
                continue
            up, down = layer.up, layer.down
            edit.set_weight_matrix(up, fold.scale_cols(up.matrix(), D))
            if up.bias is not None:
                edit.set_bias_vector(up, up.bias_vector() * D)
            B = fold.scale_rows(down.matrix(), D)
            edit.set_weight_matrix(down, kron_transpose_apply(B, rot.factors))
            edit.insert_kron_rotation(
                model.graph, down.node, 0, list(rot.factors), [f.shape[0] for f in rot.factors], dtype,
                f"layers.{layer.index}.down_proj/hadamard",
            )
        return ir.passes.PassResult(model, modified=True)


def kron_transpose_apply(B: np.ndarray, factors: list[np.ndarray]) -> np.ndarray:
    """kron(F)^T @ B, i.e. (B^T @ kron(F))^T, without forming kron(F)."""
    return fold.kron_apply(B.T, list(factors)).T
