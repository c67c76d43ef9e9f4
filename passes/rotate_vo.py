"""Rotate the attention value/output path: per-head rotation folded into v_proj, head mixing online."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxqf.errors import OnnxqfError
from onnxqf.graph import edit
from onnxqf.graph.edit import OnlineStyle
from onnxqf.maths import fold
from onnxqf.maths.hadamard import Rotation
from onnxqf.passes.base import RewritePass
from onnxqf.recognize.families import FOLDED_OUTPUT_ROTATION, GENERIC

__all__ = ["ValueOutputRotationPass"]


class ValueOutputRotationPass(RewritePass):
    """o_proj's input is rotated by ``T = (I ⊗ R_dh)(R_nh ⊗ I)``, a full n_heads·head_dim rotation.

    Rules: ``R_dh`` (randomized Hadamard of the head size) folds into v_proj's output columns, the
    same for every KV head — each query head's output is its KV head's values mixed by softmax, so
    it carries ``R_dh`` too, and GQA works. The head mixing ``R_nh ⊗ I`` over the ``num_heads`` (not
    ``num_kv_heads``) axis runs online before o_proj (without signs: they could not fold into shared
    KV heads), and o_proj's rows get ``T^T``.

    Without ``heads`` (the ``rotate-offline`` preset) there is no head mixing: ``T = I ⊗ R_dh`` is undone
    in o_proj's rows and no node is added.

    Only attention layers: a conv layer (LFM2) has no per-head values, and no rotation folds through its gates
    into in_proj; its out_proj input is rotated online by
    :class:`~onnxqf.passes.rotate_conv_out.ConvOutputHadamardPass`. Without ``heads`` the preset promises every
    o_proj/out_proj input rotated with no node added, which conv layers cannot keep: ``requires`` refuses it
    through the family (:data:`~onnxqf.recognize.families.FOLDED_OUTPUT_ROTATION`). When v_proj's output is
    clamped (``ModelConfig.value_clip``, OLMo's clip_qkv) ``R_dh`` must be the identity (the plan makes it so):
    ``clip(v R_dh) ≠ clip(v) R_dh``; the head mixing, after the attention, stays exact.

    Attributes:
        head: the plan's head_dim rotation; heads: its num_heads rotation (only the mixing is used), or None.
    """

    def __init__(self, head: Rotation, heads: Rotation | None, report=None, online=None):
        super().__init__(report)
        self.head, self.heads, self.online = head, heads, online or OnlineStyle()

    def requires(self, model: ir.Model) -> None:
        s = self.structure(model)
        cfg = s.config
        if self.heads is None and s.conv_layers():
            (s.family or GENERIC).check(FOLDED_OUTPUT_ROTATION)
        if self.head.n != cfg.head_dim or (self.heads is not None and self.heads.n != cfg.num_heads):
            raise OnnxqfError(f"value/output rotations of sizes {self.head.n}/{self.heads and self.heads.n} for "
                              f"head_dim {cfg.head_dim}, {cfg.num_heads} heads")
        if cfg.value_clip and not np.array_equal(self.head.matrix(), np.eye(cfg.head_dim)):
            raise OnnxqfError("a per-head value rotation is not exact here: a Clip reads v_proj's output (clip_qkv) "
                              "and the rotation would fold into v_proj's columns under it")

    def apply(self, model: ir.Model) -> bool:
        s = self.structure(model)
        edit.prepare_linears(model.graph, s)
        cfg = s.config
        R_dh = self.head.matrix()
        online = self.heads is not None and cfg.num_heads > 1
        R_nh = self.heads.mixing() if online else np.eye(cfg.num_heads)
        for layer in s.attention_layers():
            v, o = layer.v, layer.o
            edit.update_matrix(v, lambda B: fold.headwise_output(B, R_dh, cfg.head_dim), by="rows")
            if v.bias is not None:
                edit.set_bias_vector(v, fold.headwise_vector(v.bias_vector(), R_dh, cfg.head_dim))
            edit.update_matrix(o, lambda B: fold.head_mix_input(B, R_dh, R_nh, cfg.num_heads), by="columns")
            if online:
                edit.rotate_value_online(model.graph, o.input, [R_nh, None], s.dtype,
                                         f"layers.{layer.index}.o_proj/head_mix",
                                         sizes=[cfg.num_heads, cfg.head_dim], **self.online.kwargs())
        return True
