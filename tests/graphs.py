"""Tiny decoder graphs built by hand with ``onnx.helper``: no torch, no exporter, milliseconds to make.

:func:`decoder` writes the ops an exporter writes for a Llama-style decoder (embedding Gather, RMSNorm
as Pow/ReduceMean/Add/Sqrt/Div/Mul or as one ``SimplifiedLayerNormalization``, q/k/v MatMuls, attention
as Reshape/Transpose/MatMul/Softmax, o_proj, gate/up, SiLU as Sigmoid·Mul, down_proj, residual Adds,
final norm, lm_head), with switches for what model families add: Gemma's ``(1 + γ)`` norm and embedding
scale, norms after the blocks (Gemma 2/3), per-head q/k norms (Qwen3), packed ``qkv_proj`` and
``gate_up_proj`` split by ``Split`` (Phi-3), scalar residual multipliers (Granite), OLMo's parameter-free
``LayerNormalization`` and its ``Clip`` of q/k/v, LFM2's short gated
convolutions in place of attention in some layers (in_proj, Transpose, Split into B/C/x, ``B·x``, a depthwise
causal ``Conv``, ``C·``, Transpose, out_proj). Weights are random
with a few large norm channels, so a pass that gets a fold wrong changes the logits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

__all__ = ["Spec", "decoder", "run"]


@dataclasses.dataclass(frozen=True)
class Spec:
    layers: int = 2
    hidden: int = 32
    heads: int = 4
    head_dim: int = 8
    d_ff: int = 48
    vocab: int = 64
    norm: str = "decomposed"  # or "SimplifiedLayerNormalization", or "LayerNormalization" (OLMo: no parameters)
    norm_offset: float = 0.0  # Gemma: the graph multiplies by (1 + γ)
    embedding_scale: float | None = None  # Gemma: sqrt(hidden); Granite: a multiplier
    residual_multiplier: float | None = None  # Granite: each block's output times a scalar before the Add
    post_norms: bool = False  # Gemma 2/3
    qk_norms: bool = False  # Qwen3, Gemma 3
    packed_qkv: bool = False  # Phi-3
    packed_gate_up: bool = False  # Phi-3
    tied: bool = False
    conv_layers: tuple[int, ...] = ()  # LFM2: these layers mix tokens with a short gated convolution
    conv_bias: bool = False  # biases on in_proj, the conv and out_proj
    clip_qkv: float | None = None  # OLMo: q, k and v clamped to [-c, c]
    seed: int = 0


class _Builder:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, base: str, array) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def ops(self, op_type: str, inputs: list[str], n: int, **attrs) -> list[str]:
        outs = [self.name(op_type.lower()) for _ in range(n)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=outs[0], **attrs))
        return outs

    def weight(self, base: str, n_in: int, n_out: int) -> str:
        return self.const(base, (self.rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32))

    def gamma(self, base: str, n: int) -> str:
        g = 1.0 + 0.3 * self.rng.standard_normal(n)
        g[: max(1, n // 8)] *= 6.0  # outlier channels
        return self.const(base, (g - self.spec.norm_offset).astype(np.float32))

    def norm(self, x: str, n: int, base: str) -> str:
        if self.spec.norm == "LayerNormalization":  # OLMo's: no parameters (the exporter's scale of ones, shared)
            if not hasattr(self, "ones"):
                self.ones = self.const("ones", np.ones(n, np.float32))
            return self.op("LayerNormalization", [x, self.ones], axis=-1, epsilon=1e-5, stash_type=1)
        g = self.gamma(base, n)
        if self.spec.norm_offset:
            g = self.op("Add", [g, self.const("one", np.float32(self.spec.norm_offset))])
        if self.spec.norm == "decomposed":
            sq = self.op("Pow", [x, self.const("two", np.float32(2.0))])
            mean = self.op("ReduceMean", [sq, self.const("axes", np.array([-1], np.int64))], keepdims=1)
            var = self.op("Add", [mean, self.const("eps", np.float32(1e-6))])
            normed = self.op("Div", [x, self.op("Sqrt", [var])])
            return self.op("Mul", [normed, g])
        return self.op(self.spec.norm, [x, g], axis=-1, epsilon=1e-6)

    def scaled(self, x: str, factor: float | None) -> str:
        return x if factor is None else self.op("Mul", [x, self.const("mult", np.float32(factor))])

    def heads(self, x: str, n_heads: int, perm: list[int], norm: str | None = None) -> str:
        hd = self.spec.head_dim
        y = self.op("Reshape", [x, self.const("shape", np.array([0, 0, n_heads, hd], np.int64))])
        if norm is not None:
            y = self.norm(y, hd, norm)
        return self.op("Transpose", [y], perm=perm)

    def biased(self, x: str, n: int, base: str) -> str:
        return self.op("Add", [x, self.const(base, (0.1 * self.rng.standard_normal(n)).astype(np.float32))]) \
            if self.spec.conv_bias else x

    def conv(self, h: str, i: int) -> str:
        """LFM2's short gated convolution (kernel 3, causal: padded on the left only) of the normed input."""
        s = self.spec
        bcx = self.biased(self.op("MatMul", [h, self.weight(f"layers.{i}.in_proj", s.hidden, 3 * s.hidden)]),
                          3 * s.hidden, f"layers.{i}.in_proj.bias")
        t = self.op("Transpose", [bcx], perm=[0, 2, 1])
        b, c, xs = self.ops("Split", [t, self.const("split", np.array([s.hidden] * 3, np.int64))], 3, axis=1)
        kernel = (self.rng.standard_normal((s.hidden, 1, 3)) / np.sqrt(3)).astype(np.float32)
        inputs = [self.op("Mul", [b, xs]), self.const(f"layers.{i}.conv.weight", kernel)]
        if s.conv_bias:
            inputs.append(self.const(f"layers.{i}.conv.bias", (0.1 * self.rng.standard_normal(s.hidden)).astype(
                np.float32)))
        conv = self.op("Conv", inputs, group=s.hidden, kernel_shape=[3], pads=[2, 0])
        y = self.op("Transpose", [self.op("Mul", [c, conv])], perm=[0, 2, 1])
        return self.biased(self.op("MatMul", [y, self.weight(f"layers.{i}.out_proj", s.hidden, s.hidden)]), s.hidden,
                           f"layers.{i}.out_proj.bias")

    def layer(self, x: str, i: int) -> str:
        s = self.spec
        q_width = s.heads * s.head_dim
        h = self.norm(x, s.hidden, f"layers.{i}.input_layernorm")
        if i in s.conv_layers:
            return self.mlp(self.op("Add", [x, self.scaled(self.conv(h, i), s.residual_multiplier)]), i)
        if s.packed_qkv:
            qkv = self.op("MatMul", [h, self.weight(f"layers.{i}.qkv_proj", s.hidden, 3 * q_width)])
            q, k, v = self.ops("Split", [qkv, self.const("split", np.array([q_width] * 3, np.int64))], 3, axis=-1)
        else:
            q, k, v = (self.op("MatMul", [h, self.weight(f"layers.{i}.{r}_proj", s.hidden, q_width)]) for r in "qkv")
        if s.clip_qkv is not None:
            lo, hi = self.const("clip_min", np.float32(-s.clip_qkv)), self.const("clip_max", np.float32(s.clip_qkv))
            q, k, v = (self.op("Clip", [t, lo, hi]) for t in (q, k, v))
        q4 = self.heads(q, s.heads, [0, 2, 1, 3], f"layers.{i}.q_norm" if s.qk_norms else None)
        kt = self.heads(k, s.heads, [0, 2, 3, 1], f"layers.{i}.k_norm" if s.qk_norms else None)
        v4 = self.heads(v, s.heads, [0, 2, 1, 3])
        scores = self.op("Mul", [self.op("MatMul", [q4, kt]), self.const("scale", np.float32(s.head_dim ** -0.5))])
        ctx = self.op("MatMul", [self.op("Softmax", [scores], axis=-1), v4])
        ctx = self.op("Reshape", [self.op("Transpose", [ctx], perm=[0, 2, 1, 3]),
                                  self.const("shape", np.array([0, 0, q_width], np.int64))])
        o = self.op("MatMul", [ctx, self.weight(f"layers.{i}.o_proj", q_width, s.hidden)])
        if s.post_norms:
            o = self.norm(o, s.hidden, f"layers.{i}.post_attention_layernorm")
        return self.mlp(self.op("Add", [x, self.scaled(o, s.residual_multiplier)]), i)

    def mlp(self, x: str, i: int) -> str:
        s = self.spec
        h2 = self.norm(x, s.hidden, f"layers.{i}.pre_feedforward_layernorm")
        if s.packed_gate_up:
            gu = self.op("MatMul", [h2, self.weight(f"layers.{i}.gate_up_proj", s.hidden, 2 * s.d_ff)])
            gate, up = self.ops("Split", [gu, self.const("split", np.array([s.d_ff] * 2, np.int64))], 2, axis=-1)
        else:
            gate, up = (self.op("MatMul", [h2, self.weight(f"layers.{i}.{r}_proj", s.hidden, s.d_ff)])
                        for r in ("gate", "up"))
        act = self.op("Mul", [gate, self.op("Sigmoid", [gate])])
        d = self.op("MatMul", [self.op("Mul", [act, up]), self.weight(f"layers.{i}.down_proj", s.d_ff, s.hidden)])
        if s.post_norms:
            d = self.norm(d, s.hidden, f"layers.{i}.post_feedforward_layernorm")
        return self.op("Add", [x, self.scaled(d, s.residual_multiplier)])

    def model(self) -> onnx.ModelProto:
        s = self.spec
        table = (self.rng.standard_normal((s.vocab, s.hidden))).astype(np.float32)
        emb = self.const("embed_tokens", table)
        x = self.scaled(self.op("Gather", [emb, "input_ids"]), s.embedding_scale)
        for i in range(s.layers):
            x = self.layer(x, i)
        h = self.norm(x, s.hidden, "norm")
        if s.tied:
            head = self.op("Transpose", [emb], perm=[1, 0])
        else:
            head = self.weight("lm_head", s.hidden, s.vocab)
        self.nodes.append(helper.make_node("MatMul", [h, head], ["logits"], name="lm_head"))
        graph = helper.make_graph(
            self.nodes, "tiny_decoder",
            [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", s.vocab])],
            self.inits,
        )
        opsets = [helper.make_opsetid("", 18)]
        if s.norm == "SimplifiedLayerNormalization":
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def decoder(spec: Spec | None = None, **overrides) -> ir.Model:
    """A tiny decoder graph (see the module notes) as an onnx-ir model."""
    spec = dataclasses.replace(spec or Spec(), **overrides)
    return ir.from_proto(_Builder(spec).model())


def run(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    """The logits of ``model`` for ``ids`` [batch, seq], on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    proto = ir.to_proto(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": np.asarray(ids, np.int64)})[0]
