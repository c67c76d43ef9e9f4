"""The model's structure: what each part of a decoder-only LLM graph is (records on onnx-ir values).

:func:`onnxqf.recognize.recognize` fills these records from a graph; the passes read and edit the
graph through them. A :class:`Site` is one quantized activation of a layer — the value that a group
of linears reads — together with where a smoothing scale on it can fold. Every module that talks
about "the attention input of layer 3" uses a :class:`Site`, never a string it parses.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxqf.graph.store import to_numpy
from onnxqf.graph.tensors import add_initializer, write

if TYPE_CHECKING:
    from onnxqf.recognize.families import Family

__all__ = [
    "MIXERS", "ONLINE_ROTATION", "SITE_KINDS", "SITE_TITLES", "ConvMixer", "Layer", "Linear", "ModelConfig", "Norm",
    "Site", "Structure", "const_array", "distinct_matmuls", "group_by_input", "is_initializer", "read",
]

# Node metadata key marking the nodes of an online rotation that onnxqf inserted (value: its name).
# Recognition looks through such a block as through a Cast: the readers after it are still the site's.
ONLINE_ROTATION = "onnxqf.online_rotation"

# The four quantized inputs of a decoder layer, in graph order.
SITE_KINDS = ("attn_in", "o_in", "mlp_in", "down_in")
SITE_TITLES = {
    "attn_in": "q/k/v_proj (in_proj) input (attn_in)",
    "o_in": "o_proj (out_proj) input (o_in)",
    "mlp_in": "gate/up_proj input (mlp_in)",
    "down_in": "down_proj input (down_in)",
}


# What mixes the tokens in a layer, before its MLP: attention (q/k/v, o_proj), or LFM2's short gated
# convolution (in_proj, conv, out_proj; :class:`ConvMixer`).
MIXERS = ("attention", "conv")


# ----------------------------------------------------------------------------------------------
# small value helpers


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (initializer or Constant node), or None."""
    if value is None:
        return None
    if value.const_value is not None:
        return to_numpy(value.const_value)
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain == "":
        attr = producer.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
    return None


def is_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and value.const_value is not None


def read(value: ir.Value) -> np.ndarray:
    """An initializer as float64."""
    return to_numpy(value.const_value, np.float64)


# ----------------------------------------------------------------------------------------------
# records


@dataclasses.dataclass(eq=False)
class Linear:
    """A weight MatMul: ``y = x @ W (+ b)`` with W an initializer of shape [in, out]."""

    node: ir.Node
    weight: ir.Value  # the initializer the MatMul reads (through ``transpose`` if set)
    transpose: ir.Node | None = None  # Transpose(W[out,in]) between the initializer and the MatMul
    bias: ir.Value | None = None
    bias_node: ir.Node | None = None
    role: str = ""
    layer: int | None = None
    # [start, stop) of this linear's output columns when several linears share one MatMul (the
    # model builder's packed q/k/v); None: the whole weight (and bias) is this linear's
    cols: tuple[int, int] | None = None
    # a packed weight (the whole MatMul: the model builder's or Phi-3's qkv_proj, Phi-3's gate_up_proj): the
    # column-block Linears it holds, in column order; () for a plain linear or a block
    blocks: tuple[Linear, ...] = ()
    # a block's own value when the graph splits the packed output (Slice/Split of Phi-3's qkv_proj), else None
    block_output: ir.Value | None = None

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        if self.block_output is not None:
            return self.block_output
        return self.bias_node.outputs[0] if self.bias_node is not None else self.node.outputs[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(in, out) of the MatMul's B."""
        rows, cols = self.weight.const_value.shape.numpy()
        n_in, n_out = (int(cols), int(rows)) if self.transpose is not None else (int(rows), int(cols))
        return (n_in, n_out) if self.cols is None else (n_in, self.cols[1] - self.cols[0])

    @property
    def name(self) -> str:
        return self.role if self.layer is None else f"layers.{self.layer}.{self.role}"

    def matrix(self) -> np.ndarray:
        """B of the MatMul in [in, out] layout, float64."""
        return self._layout(read(self.weight))

    def stored_matrix(self) -> np.ndarray:
        """B in [in, out] layout in the weight's own dtype (a copy; a quarter of float64 for float16): for
        code that converts it to float64 a slice at a time."""
        return self._layout(to_numpy(self.weight.const_value, copy=True))

    def _layout(self, w: np.ndarray) -> np.ndarray:
        """The initializer's array as this MatMul's [in, out] (through the Transpose, its column block)."""
        w = w.T if self.transpose is not None else w
        return w if self.cols is None else w[:, self.cols[0]:self.cols[1]]

    def bias_vector(self) -> np.ndarray | None:
        if self.bias is None:
            return None
        b = np.asarray(const_array(self.bias), np.float64)
        return b if self.cols is None else b[self.cols[0]:self.cols[1]]

    def block(self, start: int, stop: int, role: str = "", output: ir.Value | None = None) -> Linear:
        """The Linear of output columns [start, stop) of this (packed) MatMul: reads and writes go to that block
        (``output``: the value the graph splits off for it, if any)."""
        return Linear(self.node, self.weight, self.transpose, self.bias, self.bias_node, role=role, layer=self.layer,
                      cols=(start, stop), block_output=output)

    def is_packed(self) -> bool:
        return bool(self.blocks)


def distinct_matmuls(linears) -> list[Linear]:
    """The first Linear of each distinct weight MatMul among ``linears`` (column blocks of one packed weight
    count once)."""
    out: list[Linear] = []
    seen: set[int] = set()
    for lin in linears:
        if id(lin.node) in seen:
            continue
        seen.add(id(lin.node))
        out.append(lin)
    return out


def group_by_input(linears: list[Linear]) -> list[list[Linear]]:
    """The linears grouped by the activation they read (q/k/v, gate/up), in order of first appearance."""
    groups: dict[int, list[Linear]] = {}
    for lin in linears:
        groups.setdefault(id(lin.input), []).append(lin)
    return list(groups.values())


@dataclasses.dataclass(eq=False)
class Norm:
    """An RMSNorm: ``out = x / rms(x) * (offset + gamma)``.

    Passes read and write the multiplier only through :meth:`scale` / :meth:`set_scale`, which see the
    effective multiplier whatever form the family stores it in (γ, or Gemma's ``1 + γ`` where the graph
    adds the one: ``offset`` 1).

    ``centres``: the norm is a ``LayerNormalization`` (OLMo's parameter-free LayerNorm), which subtracts the mean
    first: ``out = RMSNorm(x − mean(x)) * gamma``. It commutes with no rotation until the residual stream is centred
    and the node replaced by an RMSNorm (:class:`~onnxqf.passes.centre_residual.CentreResidualPass`).
    """

    kind: str  # "decomposed", "RMSNormalization", "SimplifiedLayerNormalization" or "LayerNormalization"
    input: ir.Value
    output: ir.Value
    gamma: ir.Value | None  # 1-D initializer, None when the norm has no scale
    gamma_node: ir.Node | None  # the Mul by the multiplier (decomposed), or the fused node
    offset: float = 0.0  # the norm multiplies by ``offset + gamma``
    offset_node: ir.Node | None = None  # the Add(gamma, offset) that reads gamma, when offset != 0
    centres: bool = False  # a LayerNormalization: subtracts the mean before normalizing

    @property
    def has_scale(self) -> bool:
        return self.gamma is not None

    def scale(self) -> np.ndarray | None:
        """The effective multiplier (``offset + γ``) as float64, or None when the norm has no scale."""
        if self.gamma is None:
            return None
        return read(self.gamma) + self.offset

    def is_unit(self) -> bool:
        """True when the norm multiplies by ones (or has no scale): it commutes with a rotation."""
        v = self.scale()
        return v is None or bool(np.all(v == 1.0))

    def set_scale(self, value: np.ndarray) -> None:
        """Make the effective multiplier ``value``, written in the graph's form (``value - offset``); the
        norm gets its own initializer first if the exporter shared one between norms."""
        self.make_private()
        write(self.gamma, np.asarray(value, np.float64) - self.offset)

    def make_private(self) -> None:
        """Give the norm its own γ initializer (exporters sometimes share one constant)."""
        if len(list(self.gamma.uses())) == 1:
            return
        reader = self.offset_node if self.offset_node is not None else self.gamma_node
        new = add_initializer(reader.graph, (self.gamma.name or "gamma") + ".private", read(self.gamma),
                              self.gamma.const_value.dtype)
        reader.replace_input_with(list(reader.inputs).index(self.gamma), new)
        self.gamma = new


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    """One quantized activation of a layer: the value ``readers`` read, and where ``1/s`` folds.

    A smoothing scale ``x <- x / s`` (``B <- diag(s) B`` for every reader) folds into
    ``fold_norm``'s gamma (attention and MLP inputs) or into ``fold_linear``'s output columns
    (v_proj for o_proj's input, up_proj for down_proj's: ``act(gate) * up`` is linear in up). For
    o_proj's input ``kv_groups = (n_kv_heads, heads per group, head_dim)``: the scales must be equal
    across the query heads that share a KV head, since they all read the same value channels. In a conv
    layer (``mixer`` "conv", LFM2) the attention input is in_proj's and o_proj's is out_proj's, whose scale
    folds into in_proj's ``C`` columns (a per-channel scale passes through the gate ``C·``).
    """

    layer: int
    kind: str  # one of SITE_KINDS
    value: ir.Value  # what the readers' MatMuls read: the activation that is quantized
    readers: tuple[Linear, ...]
    fold_norm: Norm | None = None
    fold_linear: Linear | None = None
    kv_groups: tuple[int, int, int] | None = None
    packed: tuple[Linear, ...] = ()  # the packed MatMuls whose blocks are among the readers
    mixer: str = "attention"  # the layer's mixer (one of MIXERS): which rotations its o_in gets

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.kind}"

    @property
    def width(self) -> int:
        return self.readers[0].shape[0]

    def matmuls(self) -> list[Linear]:
        """The weight MatMuls that read the site, each once (a packed weight as one Linear): where a map on
        the rows of B (a scale, a rotation of the input) is applied."""
        packed = {id(p.node): p for p in self.packed}
        return [packed.get(id(lin.node), lin) for lin in distinct_matmuls(self.readers)]

    def matrix(self) -> np.ndarray:
        """The readers' weights side by side, [in, sum of outs], float64."""
        mats = [lin.matrix() for lin in self.readers]
        return mats[0] if len(mats) == 1 else np.concatenate(mats, axis=1)


@dataclasses.dataclass(eq=False)
class ConvMixer:
    """LFM2's short gated convolution, the mixer of a conv layer in place of attention::

        y = RMSNorm(x) @ in_proj -> [B | C | x'] (column blocks) -> B·x' -> depthwise causal conv -> C·(...)
          -> @ out_proj -> residual Add

    ``in_proj`` is one packed MatMul whose ``blocks`` are ``b``, ``c``, ``xs`` (in column order); ``conv`` is the
    ONNX ``Conv`` (one kernel per channel: ``group`` = channels) or the model builder's ``CausalConvWithState``.
    Only a per-channel (diagonal) map passes through the gates and the conv, never a rotation: out_proj's input
    can be smoothed or sign-flipped into ``c``'s columns, and rotated only online.
    """

    in_proj: Linear
    conv: ir.Node
    b: Linear
    c: Linear
    xs: Linear


@dataclasses.dataclass(eq=False)
class Layer:
    """One decoder layer: a norm, a mixer (attention: ``q/k/v/o``; or a conv block: ``conv`` with ``in_proj`` and
    ``o`` = out_proj, ``q/k/v`` None), the residual Add, a norm, the gated MLP, the residual Add."""

    index: int
    attn_norm: Norm
    q: Linear | None  # None in a conv layer
    k: Linear | None
    v: Linear | None
    o: Linear  # o_proj, or a conv layer's out_proj: the linear that writes the mixer's output
    attn_add: ir.Node
    mlp_norm: Norm
    gate: Linear
    up: Linear
    down: Linear
    mlp_add: ir.Node
    mlp_mul: ir.Node | None  # act(gate) * up, the producer of down's input
    kv_groups: tuple[int, int, int] | None = None  # (n_kv_heads, heads per group, head_dim), set by recognize
    # the one MatMul that q, k and v share when they are column blocks of a packed weight (the model
    # builder's qkv_proj), as a Linear of its own (role "qkv_proj", no cols); None for separate q/k/v
    qkv: Linear | None = None
    # the one MatMul that gate and up share (Phi-3's gate_up_proj: columns [gate | up]), like ``qkv``
    gate_up: Linear | None = None
    # norms applied to a block's output before the residual Add (Gemma 2/3), None when absent
    post_attn_norm: Norm | None = None
    post_mlp_norm: Norm | None = None
    # per-head RMSNorms of the queries and keys before rotary (Qwen3, Gemma 3), None when absent
    q_norm: Norm | None = None
    k_norm: Norm | None = None
    # a conv layer's mixer (LFM2), None in an attention layer
    conv: ConvMixer | None = None

    @property
    def mixer(self) -> str:
        """What mixes the tokens: "attention" or "conv" (see :data:`MIXERS`)."""
        return "attention" if self.conv is None else "conv"

    def mixer_linears(self) -> list[Linear]:
        """The mixer's projections by role: q, k, v, o_proj; or a conv layer's in_proj (whole) and out_proj."""
        if self.conv is not None:
            return [self.conv.in_proj, self.o]
        return [self.q, self.k, self.v, self.o]

    def linears(self) -> list[Linear]:
        """The projections by role: q/k/v, o, gate, up, down (q/k/v, gate/up may be column blocks of one packed
        MatMul); a conv layer's in_proj and out_proj in place of q/k/v and o."""
        return [*self.mixer_linears(), self.gate, self.up, self.down]

    def matmuls(self) -> list[Linear]:
        """The weight MatMuls of the layer, each once: a packed q/k/v (gate/up, a conv's in_proj) is one Linear,
        not its blocks."""
        if self.conv is not None:
            mixer = [self.conv.in_proj, self.o]
        else:
            mixer = [*([self.qkv] if self.qkv is not None else [self.q, self.k, self.v]), self.o]
        gate_up = [self.gate_up] if self.gate_up is not None else [self.gate, self.up]
        return [*mixer, *gate_up, self.down]

    def sites(self) -> list[Site]:
        """The four quantized inputs of this layer, in graph order (see :data:`SITE_KINDS`)."""
        i, m = self.index, self.mixer
        packed_mlp = (self.gate_up,) if self.gate_up is not None else ()
        if self.conv is not None:
            in_proj = self.conv.in_proj
            mixer = [Site(i, "attn_in", in_proj.input, (in_proj,), fold_norm=self.attn_norm, mixer=m),
                     Site(i, "o_in", self.o.input, (self.o,), fold_linear=self.conv.c, mixer=m)]
        else:
            packed_qkv = (self.qkv,) if self.qkv is not None else ()
            mixer = [Site(i, "attn_in", self.q.input, (self.q, self.k, self.v), fold_norm=self.attn_norm,
                          packed=packed_qkv),
                     Site(i, "o_in", self.o.input, (self.o,), fold_linear=self.v, kv_groups=self.kv_groups)]
        return [
            *mixer,
            Site(i, "mlp_in", self.gate.input, (self.gate, self.up), fold_norm=self.mlp_norm, packed=packed_mlp,
                 mixer=m),
            Site(i, "down_in", self.down.input, (self.down,), fold_linear=self.up, mixer=m),
        ]

    def post_norms(self) -> list[Norm]:
        return [n for n in (self.post_attn_norm, self.post_mlp_norm) if n is not None]

    def site(self, kind: str) -> Site:
        return self.sites()[SITE_KINDS.index(kind)]


@dataclasses.dataclass
class ModelConfig:
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    conv_layers: int = 0  # layers whose mixer is a short convolution (LFM2), not attention
    # v_proj's outputs are clamped (OLMo's clip_qkv: a Clip reads them): no per-channel scale or rotation folds into
    # v_proj's columns under the clamp, so o_proj's input is neither smoothed nor rotated per head (onnxqf.plan)
    value_clip: bool = False

    @property
    def kv_groups(self) -> tuple[int, int, int]:
        return (self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


@dataclasses.dataclass(eq=False)
class Structure:
    embedding: ir.Node  # the Gather
    layers: list[Layer]
    final_norm: Norm
    lm_head: Linear
    config: ModelConfig
    # what the family hooks say about this model (norm form, multipliers, what cannot be exact); set by
    # onnxqf.recognize.recognize, None for a Structure built by hand
    family: Family | None = None

    @property
    def embedding_table(self) -> ir.Value:
        """What the Gather reads: an initializer, or (model builder, tied) Transpose(lm_head's weight)
        until :func:`onnxqf.graph.edit.private_embedding` gives it its own table."""
        return self.embedding.inputs[0]

    def embedding_transpose(self) -> ir.Node | None:
        """The Transpose between a [hidden, vocab] initializer and the Gather, or None."""
        producer = self.embedding_table.producer()
        return producer if producer is not None and producer.op_type == "Transpose" else None

    @property
    def dtype(self) -> ir.DataType:
        """The model's compute dtype: that of the embedding table."""
        t = self.embedding_transpose()
        return (t.inputs[0] if t is not None else self.embedding_table).const_value.dtype

    def linears(self, include_lm_head: bool = True) -> list[Linear]:
        """Every weight MatMul once (a packed q/k/v is one Linear, see :meth:`Layer.matmuls`)."""
        out = [lin for layer in self.layers for lin in layer.matmuls()]
        if include_lm_head:
            out.append(self.lm_head)
        return out

    def sites(self, kinds: tuple[str, ...] = SITE_KINDS) -> list[Site]:
        """Every layer's sites of the given kinds, layer by layer."""
        return [site for layer in self.layers for site in layer.sites() if site.kind in kinds]

    def attention_layers(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.conv is None]

    def conv_layers(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.conv is not None]

    def site_of(self) -> dict[str, Site]:
        """Linear name -> the site it reads (a packed q/k/v or gate/up under its own name too)."""
        out = {lin.name: site for site in self.sites() for lin in site.readers}
        for layer in self.layers:
            if layer.qkv is not None:
                out[layer.qkv.name] = layer.site("attn_in")
            if layer.gate_up is not None:
                out[layer.gate_up.name] = layer.site("mlp_in")
        return out

    def norms(self) -> list[Norm]:
        """The norms that read the residual stream: each layer's attention and MLP norms, and the final norm."""
        return [n for layer in self.layers for n in (layer.attn_norm, layer.mlp_norm)] + [self.final_norm]

    def centring_norms(self) -> list[Norm]:
        """The norms of :meth:`norms` that subtract the mean (LayerNormalization, OLMo): while there are any, the
        residual stream must be centred before it is rotated (``passes/centre_residual.py``)."""
        return [n for n in self.norms() if n.centres]

    def norm_readers(self) -> list[tuple[Norm, tuple[Linear, ...]]]:
        """Each RMSNorm before linears with the weight MatMuls that read its output, each once (a packed
        weight whole; the final norm: lm_head)."""
        out = [(site.fold_norm, tuple(site.matmuls())) for site in self.sites(("attn_in", "mlp_in"))]
        return out + [(self.final_norm, (self.lm_head,))]

    def stream_readers(self) -> list[Linear]:
        """The weight MatMuls that read the (normed) residual stream, each once: q/k/v (in_proj), gate/up,
        lm_head."""
        return [lin for _, readers in self.norm_readers() for lin in readers]

    def stream_writers(self) -> list[Linear]:
        """The weight MatMuls that write into the residual stream: o_proj (out_proj) and down_proj."""
        return [lin for layer in self.layers for lin in (layer.o, layer.down)]

    def tied(self) -> bool:
        """True when lm_head reads the embedding table's initializer (directly or through a Transpose)."""
        t = self.embedding_transpose()
        return self.lm_head.weight is (t.inputs[0] if t is not None else self.embedding_table)
