"""Rotate the attention value/output path.

A per-head rotation ``R_dh`` (randomized Hadamard of the head size) is folded into v_proj's output
columns (the same for every KV head, so it works with GQA: each query head's output is its KV
head's values mixed by softmax, so it carries ``R_dh`` too). An online head mixing ``R_nh ⊗ I``
over the ``num_heads`` (not ``num_kv_heads``) axis is inserted before o_proj, and o_proj's rows get
``((I ⊗ R_dh)(R_nh ⊗ I))^T``. Together o_proj's input is rotated by a full n_heads*head_dim rotation.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxqf import edit, fold
from onnxqf.recognize import recognize
from onnxqf.hadamard import rotation


class ValueOutputRotationPass(ir.passes.InPlacePass):
    def __init__(self, seed: int = 2):
        super().__init__()
        self.seed = seed
        self.kind = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        s = recognize(model)
        edit.prepare_linears(model.graph, s)
        cfg = s.config
        dtype = s.dtype
        rng = np.random.default_rng(self.seed)
        r_dh = rotation(cfg.head_dim, rng)
        r_nh = rotation(cfg.num_heads, rng)
        R_dh = r_dh.matrix()
        # Head mixing runs online; per-head signs cannot fold into shared KV heads, so it has none.
        R_nh = np.eye(cfg.num_heads) if cfg.num_heads == 1 else _kron_dense(r_nh.factors)
        self.kind = f"head {r_dh.kind}, heads {r_nh.kind}"
        for layer in s.layers:
            v, o = layer.v, layer.o
            edit.set_weight_matrix(v, fold.headwise_output(v.matrix(), R_dh, cfg.head_dim))
            if v.bias is not None:
                edit.set_bias_vector(v, fold.headwise_vector(v.bias_vector(), R_dh, cfg.head_dim))
            edit.set_weight_matrix(o, fold.head_mix_input(o.matrix(), R_dh, R_nh, cfg.num_heads))
            if cfg.num_heads > 1:
                edit.insert_kron_rotation(
                    model.graph, o.node, 0, [R_nh, None], [cfg.num_heads, cfg.head_dim], dtype,
                    f"layers.{layer.index}.o_proj/head_mix",
                )
        return ir.passes.PassResult(model, modified=True)


def _kron_dense(factors: list[np.ndarray]) -> np.ndarray:
    out = np.ones((1, 1))
    for f in factors:
        out = np.kron(out, f)
    return out
