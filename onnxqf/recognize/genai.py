"""Recognize the graphs of onnxruntime-genai's model builder (float32 / float16 genai folders).

The builder's decoder differs from a plain export in four ways this module maps onto the records of
:mod:`onnxqf.graph.structure`:

* the residual Add is fused into the next norm: ``SkipSimplifiedLayerNormalization(residual,
  sublayer_out, gamma)`` has output 0 = the normed value and output 3 = the residual sum (the next
  residual). Layer 0's attention norm is a plain ``SimplifiedLayerNormalization`` of the embedding.
  :class:`Norm` gets ``input`` = the residual value it normalizes (the previous Skip node's output
  3, or the embedding) and ``gamma_node`` = the fused node; ``Layer.attn_add`` / ``mlp_add`` are the
  Skip nodes that do those Adds (their *output 3* is the residual sum, not output 0);
* q, k and v are one MatMul (``qkv_proj``, plus one bias Add for Qwen2) whose columns are
  [q | k | v]: three :class:`Linear` records share the node, each with its ``cols`` block, and
  ``Layer.qkv`` is the whole MatMul (what quantization replaces, once);
* attention is ``GroupQueryAttention`` (rotary inside, KV cache as graph inputs/outputs);
* SiLU is ``Sigmoid`` * ``Mul``; lm_head is its own MatMul of a [hidden, vocab] weight; for tied
  checkpoints the builder stores the table once, as that weight, and the embedding Gather reads it
  through a Transpose (:func:`onnxqf.graph.edit.private_embedding` unties it before a residual rotation).
"""

from __future__ import annotations

import onnx_ir as ir

from onnxqf.errors import UnsupportedGraphError
from onnxqf.recognize import _classify_gate_up, _find_gather, _readers  # _readers sees through onnxqf's online rotations
from onnxqf.graph.structure import Layer, Linear, ModelConfig, Norm, Structure, is_initializer

SKIP_NORM = "SkipSimplifiedLayerNormalization"
NORM = "SimplifiedLayerNormalization"
GQA = "GroupQueryAttention"
# weight MatMuls that are already quantized (the builder's int4 folders, onnxqf's own output)
QUANTIZED_OPS = {"MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "GatherBlockQuantized"}


def is_builder_graph(model: ir.Model) -> bool:
    return any(n.op_type in (GQA, SKIP_NORM) for n in model.graph)


def _norm_node_of(value: ir.Value, where: str) -> ir.Node:
    # the embedding also feeds layer 0's post-attention Skip norm (as its residual input)
    nodes = [n for n in value.consumers() if n.op_type == NORM and n.inputs[0] is value]
    if len(nodes) != 1:
        raise UnsupportedGraphError(f"{where}: expected one SimplifiedLayerNormalization of the embedding, found {len(nodes)}")
    return nodes[0]


def _norm(node: ir.Node, residual: ir.Value, where: str) -> Norm:
    gamma = node.inputs[2] if node.op_type == SKIP_NORM else node.inputs[1]
    if gamma is None or not is_initializer(gamma):
        raise UnsupportedGraphError(f"{where}: {node.op_type} '{node.name}' has no constant scale")
    if node.op_type == SKIP_NORM and len(node.inputs) > 3 and node.inputs[3] is not None:
        raise UnsupportedGraphError(f"{where}: {node.op_type} '{node.name}' has a bias input")
    return Norm(node.op_type, residual, node.outputs[0], gamma, node)


def _residual_out(node: ir.Node, where: str) -> ir.Value:
    """The residual sum a Skip norm writes (output 3)."""
    if node.op_type != SKIP_NORM or len(node.outputs) < 4 or node.outputs[3] is None or not list(node.outputs[3].consumers()):
        raise UnsupportedGraphError(f"{where}: '{node.name}' does not output the residual sum (output 3)")
    return node.outputs[3]




def _only_linear_reader(value: ir.Value, where: str, what: str) -> Linear:
    readers = _readers(value)
    if len(readers) != 1:
        raise UnsupportedGraphError(f"{where}: expected one {what} MatMul, found {len(readers)}")
    return readers[0]


def _qkv(norm_out: ir.Value, where: str) -> tuple[Linear, Linear, Linear, ir.Node, Linear | None]:
    """q, k, v, the attention node, and the packed q/k/v Linear (None when q/k/v are separate)."""
    gqas = []
    readers = _readers(norm_out)
    for lin in readers:
        for node in lin.output.consumers():
            if node.op_type == GQA:
                gqas.append((lin, node))
    if not gqas:
        ops = sorted({n.op_type for r in readers for n in r.output.consumers()})
        raise UnsupportedGraphError(f"{where}: no {GQA} after the attention norm (found {', '.join(ops) or 'nothing'}); "
                                    "other attention ops are not supported")
    attn = gqas[0][1]
    heads = attn.attributes.get_int("num_heads", 0)
    kv_heads = attn.attributes.get_int("kv_num_heads", 0)
    packed = len(attn.inputs) < 3 or (attn.inputs[1] is None and attn.inputs[2] is None)
    if packed:
        base = gqas[0][0]
        width = base.shape[1]
        if heads <= 0 or kv_heads <= 0 or width % (heads + 2 * kv_heads):
            raise UnsupportedGraphError(f"{where}: packed q/k/v width {width} does not split into {heads} + 2*{kv_heads} heads")
        hd = width // (heads + 2 * kv_heads)
        bounds = (0, heads * hd, (heads + kv_heads) * hd, width)
        q, k, v = (Linear(base.node, base.weight, base.transpose, base.bias, base.bias_node, cols=(bounds[i], bounds[i + 1]))
                   for i in range(3))
        base.role = "qkv_proj"
        return q, k, v, attn, base
    by_slot = {}
    for lin, node in gqas:
        if node is attn:
            by_slot[list(node.inputs).index(lin.output)] = lin
    if sorted(by_slot) != [0, 1, 2]:
        raise UnsupportedGraphError(f"{where}: cannot find separate q/k/v projections feeding {GQA}")
    return by_slot[0], by_slot[1], by_slot[2], attn, None


def _find_embedding(model: ir.Model) -> ir.Node:
    """The token Gather: of a [vocab, hidden] initializer, or, for tied embeddings, of
    Transpose(lm_head's [hidden, vocab] weight) -- the builder stores the table once, as lm_head."""
    try:
        return _find_gather(model)
    except UnsupportedGraphError:
        pass
    found = []
    for node in model.graph:
        if node.op_type != "Gather" or node.inputs[1] is None or not node.inputs[1].is_graph_input():
            continue
        t = node.inputs[0].producer()
        if t is not None and t.op_type == "Transpose" and is_initializer(t.inputs[0]) and len(t.inputs[0].const_value.shape) == 2:
            found.append(node)
    if len(found) != 1:
        raise UnsupportedGraphError("no token embedding found (a Gather of an initializer, or of a transposed lm_head weight)")
    return found[0]


def recognize_genai(model: ir.Model) -> Structure:
    """The :class:`Structure` of a model builder graph, or :class:`UnsupportedGraphError` (one line).

    For tied embeddings ``Structure.embedding.inputs[0]`` is the Transpose output, not an
    initializer: passes must read the table through ``lm_head.weight`` (see the module notes).
    """
    quantized = sorted({n.op_type for n in model.graph if n.op_type in QUANTIZED_OPS})
    if quantized:
        raise UnsupportedGraphError(f"the graph is already quantized ({', '.join(quantized)}); rewrite a float32 or float16 "
                                    "genai folder")
    gather = _find_embedding(model)
    x = gather.outputs[0]
    layers: list[Layer] = []
    config = None
    while True:
        idx = len(layers)
        where = f"layer {idx}"
        node = _norm_node_of(x, where) if idx == 0 else next_norm
        norm = _norm(node, x, where)
        readers = _readers(norm.output)
        if len(readers) == 1 and not any(n.op_type == GQA for n in readers[0].output.consumers()):
            final_norm, lm_head = norm, readers[0]
            lm_head.role = "lm_head"
            break
        q, k, v, attn, qkv = _qkv(norm.output, where)
        o = _only_linear_reader(attn.outputs[0], where, "o_proj")
        skips = [n for n in o.output.consumers() if n.op_type == SKIP_NORM]
        if len(skips) != 1 or skips[0].inputs[1] is not o.output:
            raise UnsupportedGraphError(f"{where}: o_proj does not feed a {SKIP_NORM}")
        attn_add = skips[0]
        norm2 = _norm(attn_add, _residual_out(attn_add, where), where)
        readers2 = _readers(norm2.output)
        if len(readers2) != 2:
            raise UnsupportedGraphError(f"{where}: expected gate/up projections (2 MatMuls) after the MLP norm, found {len(readers2)}")
        gate, up = _classify_gate_up(readers2, where)
        mlp_mul = next((n for n in up.output.consumers() if n.op_type == "Mul"), None)
        if mlp_mul is None:
            raise UnsupportedGraphError(f"{where}: up_proj does not feed the gated Mul")
        down = _only_linear_reader(mlp_mul.outputs[0], where, "down_proj")
        skips = [n for n in down.output.consumers() if n.op_type == SKIP_NORM]
        if len(skips) != 1:
            raise UnsupportedGraphError(f"{where}: down_proj does not feed a {SKIP_NORM}")
        mlp_add = skips[0]
        for lin, role in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj"), (o, "o_proj"), (gate, "gate_proj"), (up, "up_proj"),
                          (down, "down_proj")):
            lin.role, lin.layer = role, idx
        if qkv is not None:
            qkv.layer = idx
        heads = attn.attributes.get_int("num_heads", 0)
        kv_heads = attn.attributes.get_int("kv_num_heads", 0)
        head_dim = q.shape[1] // heads
        layer_config = (heads, kv_heads, head_dim, gate.shape[1])
        if config is not None and layer_config != config:
            raise UnsupportedGraphError(f"{where}: heads/head size/MLP width differ from layer 0")
        config = layer_config
        layer = Layer(idx, norm, q, k, v, o, attn_add, norm2, gate, up, down, mlp_add, mlp_mul, qkv=qkv)
        layer.kv_groups = (kv_heads, heads // kv_heads, head_dim)
        layers.append(layer)
        x = mlp_add.outputs[3] if len(mlp_add.outputs) > 3 and mlp_add.outputs[3] is not None else mlp_add.inputs[0]
        next_norm = mlp_add  # the next layer's attention norm, or the final norm
    if not layers:
        raise UnsupportedGraphError("no decoder layers found")
    vocab, hidden = lm_head.shape[1], lm_head.shape[0]
    heads, kv_heads, head_dim, d_ff = config
    return Structure(gather, layers, final_norm, lm_head, ModelConfig(hidden, heads, kv_heads, head_dim, d_ff, vocab))
