"""Online Hadamard before every conv layer's out_proj (LFM2): ``x <- x D H`` inserted as nodes, ``B <- H^T D B``."""

from __future__ import annotations

import onnx_ir as ir

from onnxqf.graph import edit
from onnxqf.passes.base import RotationPass
from onnxqf.passes.online_hadamard import rotate_gated_input

__all__ = ["ConvOutputHadamardPass"]


class ConvOutputHadamardPass(RotationPass):
    """Rotate the out_proj input of every conv layer by the plan's ``conv_out`` rotation ``D H`` (size hidden).

    Rules: out_proj reads ``C ⊙ conv(B ⊙ x)`` (:class:`~onnxqf.graph.structure.ConvMixer`), which is linear in the
    ``C`` block of in_proj's output channel by channel, so the random signs D fold into those columns of in_proj
    (and their bias); the mixing ``H`` cannot fold anywhere (the gates and the depthwise conv pass only diagonal
    maps) and is inserted before out_proj as Kronecker factors; out_proj's weight gets ``H^T D B``. Attention
    layers are left to :class:`~onnxqf.passes.rotate_vo.ValueOutputRotationPass`. ``requires``: the rotation's
    size is the hidden size (every conv layer's width).

    Attributes:
        rotation: the plan's ``conv_out`` rotation.
    """

    what = "conv out_proj rotation"

    def size_of(self, s) -> int:
        return s.config.hidden

    def requires(self, model: ir.Model) -> None:
        self.recognize_and_check(model)

    def apply(self, model: ir.Model) -> bool:
        s = self.structure(model)
        edit.prepare_linears(model.graph, s)
        D, factors = self.rotation.signs, list(self.rotation.factors)
        for layer in s.conv_layers():
            rotate_gated_input(model.graph, layer.conv.c, layer.o, D, factors, s.dtype,
                               f"layers.{layer.index}.out_proj/hadamard", self.online)
        return bool(s.conv_layers())
