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
* attention is ``GroupQueryAttention`` (rotary inside, KV cache as graph inputs/outputs); LFM2's conv layers
  are in_proj, Transpose, Split, the gates and ``CausalConvWithState`` (its state a graph input/output),
  matched by :func:`~onnxqf.recognize.match.match_conv_mixer` as in a plain export;
* SiLU is ``Sigmoid`` * ``Mul``; lm_head is its own MatMul of a [hidden, vocab] weight; for tied
  checkpoints the builder stores the table once, as that weight, and the embedding Gather reads it
  through a Transpose (:func:`onnxqf.graph.edit.private_embedding` unties it before a residual rotation).
"""

from __future__ import annotations

import onnx_ir as ir

from onnxqf.errors import UnsupportedGraphError
from onnxqf.graph.structure import Layer, Linear, ModelConfig, Norm, Structure, is_initializer
from onnxqf.recognize.match import (  # linear_readers sees through onnxqf's online rotations
    classify_gate_up,
    find_gather,
    linear_readers,
    match_conv_mixer,
    scalar_factor,
    split_blocks,
    through_scalar_mul,
)

__all__ = ["GQA", "NORM", "QUANTIZED_OPS", "SKIP_NORM", "is_builder_graph", "recognize_genai"]

SKIP_NORM = "SkipSimplifiedLayerNormalization"
NORM = "SimplifiedLayerNormalization"
GQA = "GroupQueryAttention"
# weight MatMuls that are already quantized (the builder's int4 folders, onnxqf's own output)
QUANTIZED_OPS = {"MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeLinear", "QLinearMatMul",
                 "GatherBlockQuantized", "W8A8Linear"}


def is_builder_graph(model: ir.Model) -> bool:
    return any(n.op_type in (GQA, SKIP_NORM) for n in model.graph)


def _norm_node_of(value: ir.Value, where: str) -> ir.Node:
    # the embedding also feeds layer 0's post-attention Skip norm (as its residual input)
    nodes = [n for n in value.consumers() if n.op_type == NORM and n.inputs[0] is value]
    if len(nodes) != 1:
        raise UnsupportedGraphError(f"{where}: expected one SimplifiedLayerNormalization of the embedding, found "
                                    f"{len(nodes)}")
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
    if (node.op_type != SKIP_NORM or len(node.outputs) < 4 or node.outputs[3] is None
            or not list(node.outputs[3].consumers())):
        raise UnsupportedGraphError(f"{where}: '{node.name}' does not output the residual sum (output 3)")
    return node.outputs[3]




def _only_linear_reader(value: ir.Value, where: str, what: str) -> Linear:
    readers = linear_readers(value)
    if len(readers) != 1:
        raise UnsupportedGraphError(f"{where}: expected one {what} MatMul, found {len(readers)}")
    return readers[0]


def _to_gqa(value: ir.Value, limit: int = 6) -> tuple[ir.Node, int, Norm | None] | None:
    """(the GroupQueryAttention node, the input slot, the per-head norm on the way) that ``value`` reaches through
    Reshapes, a RotaryEmbedding (HunYuan's rotary before its q/k norms) and at most one SimplifiedLayerNormalization
    (Qwen3's q/k norms before rotary), or None."""
    norm = None
    for _ in range(limit):
        users = list(value.consumers())
        for node in users:
            if node.op_type == GQA:
                return node, list(node.inputs).index(value), norm
        if len(users) != 1:
            return None
        node = users[0]
        if node.op_type == NORM and norm is None and len(node.inputs) > 1 and is_initializer(node.inputs[1]):
            norm = Norm(NORM, value, node.outputs[0], node.inputs[1], node)
        elif node.op_type not in ("Reshape", "Cast", "Identity", "RotaryEmbedding") or list(node.inputs).index(value):
            return None
        value = node.outputs[0]
    return None


def _reaches_gqa(lin: Linear) -> bool:
    if _to_gqa(lin.output) is not None:
        return True
    blocks = split_blocks(lin.output, lin.shape[1])
    return blocks is not None and any(_to_gqa(v) is not None for _, _, v in blocks)


def _ops_after(value: ir.Value, depth: int = 4) -> set[str]:
    """The op types within ``depth`` steps after ``value``."""
    found: set[str] = set()
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for node in v.consumers():
                found.add(node.op_type)
                nxt.extend(o for o in node.outputs if o is not None)
        frontier = nxt
    return found


def _vocab(gather: ir.Node) -> int:
    """Rows of the embedding table (read directly, or through the Transpose of a tied [hidden, vocab] weight)."""
    table = gather.inputs[0]
    if table.const_value is not None:
        return int(table.const_value.shape[0])
    return int(table.producer().inputs[0].const_value.shape[1])


def _reaches_output(value: ir.Value, depth: int = 6) -> bool:
    """Whether ``value`` is, or becomes within ``depth`` elementwise steps (logit scaling, soft-capping), a graph
    output: what tells lm_head from another linear after a norm."""
    frontier = [value]
    for _ in range(depth):
        if any(v.is_graph_output() for v in frontier):
            return True
        frontier = [o for v in frontier for node in v.consumers() for o in node.outputs if o is not None]
    return any(v.is_graph_output() for v in frontier)


def _qkv(norm_out: ir.Value, where: str) -> tuple[Linear, Linear, Linear, ir.Node, Linear | None, list]:
    """q, k, v, the attention node, the packed q/k/v Linear (None when q/k/v are separate), and the q/k norms."""
    readers = linear_readers(norm_out)
    if len(readers) == 1:
        base = readers[0]
        width = base.shape[1]
        hit = _to_gqa(base.output)
        if hit is not None:  # one packed input: GroupQueryAttention splits q/k/v itself
            attn = hit[0]
            heads = attn.attributes.get_int("num_heads", 0)
            kv_heads = attn.attributes.get_int("kv_num_heads", 0)
            if heads <= 0 or kv_heads <= 0 or width % (heads + 2 * kv_heads):
                raise UnsupportedGraphError(f"{where}: packed q/k/v width {width} does not split into {heads} + "
                                            f"2*{kv_heads} heads")
            hd = width // (heads + 2 * kv_heads)
            bounds = (0, heads * hd, (heads + kv_heads) * hd, width)
            q, k, v = (base.block(bounds[i], bounds[i + 1]) for i in range(3))
            base.role, base.blocks = "qkv_proj", (q, k, v)
            return q, k, v, attn, base, [None, None]
        blocks = split_blocks(base.output, width)  # Split into q, k, v (the builder's graphs with q/k norms)
        if blocks is not None and len(blocks) == 3:
            hits = [_to_gqa(value) for _, _, value in blocks]
            if all(h is not None for h in hits) and len({id(h[0]) for h in hits}) == 1 and \
                    sorted(h[1] for h in hits) == [0, 1, 2]:
                parts = {h[1]: base.block(a, b, output=value) for (a, b, value), h in zip(blocks, hits, strict=True)}
                norms = {h[1]: h[2] for h in hits}
                if norms[2] is not None:
                    raise UnsupportedGraphError(f"{where}: a norm on the values before {GQA} is not supported")
                base.role, base.blocks = "qkv_proj", tuple(parts[i] for i in range(3))
                return parts[0], parts[1], parts[2], hits[0][0], base, [norms[0], norms[1]]
    hits = [(lin, _to_gqa(lin.output)) for lin in readers]
    found = [(lin, h) for lin, h in hits if h is not None]
    if not found:
        ops = sorted({n.op_type for r in readers for n in r.output.consumers()})
        raise UnsupportedGraphError(f"{where}: no {GQA} after the attention norm (found "
                                    f"{', '.join(ops) or 'nothing'}); other attention ops are not supported")
    attn = found[0][1][0]
    by_slot = {h[1]: (lin, h[2]) for lin, h in found if h[0] is attn}
    if sorted(by_slot) != [0, 1, 2]:
        raise UnsupportedGraphError(f"{where}: cannot find separate q/k/v projections feeding {GQA}")
    return by_slot[0][0], by_slot[1][0], by_slot[2][0], attn, None, [by_slot[0][1], by_slot[1][1]]


def _block_output(lin: Linear, where: str, what: str) -> tuple[ir.Node, Norm | None]:
    """The Skip norm a block's output (o_proj's, down_proj's) goes into, through a scalar multiplier (Granite) and
    a SimplifiedLayerNormalization after the block (Gemma 2), and that norm (or None)."""
    value, post = lin.output, None
    for _ in range(3):
        users = list(value.consumers())
        skips = [n for n in users if n.op_type == SKIP_NORM and len(n.inputs) > 1 and n.inputs[1] is value]
        if len(skips) == 1 and len(users) == 1:
            return skips[0], post
        if len(users) != 1:
            break
        node = users[0]
        if node.op_type == NORM and post is None and len(node.inputs) > 1 and is_initializer(node.inputs[1]):
            post = Norm(NORM, value, node.outputs[0], node.inputs[1], node)
        elif scalar_factor(node) is None:
            break
        value = node.outputs[0]
    raise UnsupportedGraphError(f"{where}: {what} does not feed a {SKIP_NORM}")


def _find_embedding(model: ir.Model) -> ir.Node:
    """The token Gather: of a [vocab, hidden] initializer, or, for tied embeddings, of
    Transpose(lm_head's [hidden, vocab] weight) -- the builder stores the table once, as lm_head."""
    try:
        return find_gather(model)
    except UnsupportedGraphError:
        pass
    found = []
    for node in model.graph:
        if node.op_type != "Gather" or node.inputs[1] is None or not node.inputs[1].is_graph_input():
            continue
        t = node.inputs[0].producer()
        if (t is not None and t.op_type == "Transpose" and is_initializer(t.inputs[0])
                and len(t.inputs[0].const_value.shape) == 2):
            found.append(node)
    if len(found) != 1:
        raise UnsupportedGraphError("no token embedding found (a Gather of an initializer, or of a transposed lm_head "
                                    "weight)")
    return found[0]


def recognize_genai(model: ir.Model) -> Structure:
    """The :class:`Structure` of a model builder graph, or :class:`UnsupportedGraphError` (one line).

    For tied embeddings ``Structure.embedding.inputs[0]`` is the Transpose output, not an
    initializer: passes must read the table through ``lm_head.weight`` (see the module notes).
    """
    quantized = sorted({n.op_type for n in model.graph if n.op_type in QUANTIZED_OPS})
    if quantized:
        raise UnsupportedGraphError(f"the graph is already quantized ({', '.join(quantized)}); rewrite a float32 or "
                                    "float16 genai folder")
    gather = _find_embedding(model)
    x, _ = through_scalar_mul(gather.outputs[0])  # Gemma's √hidden, Granite's embedding multiplier
    vocab = _vocab(gather)
    layers: list[Layer] = []
    config = d_ff = None  # (heads, kv heads, head size) of the attention layers; the MLP width
    next_norm = None  # the Skip norm that ends the previous layer
    while True:
        idx = len(layers)
        where = f"layer {idx}"
        node = _norm_node_of(x, where) if idx == 0 else next_norm
        norm = _norm(node, x, where)
        readers = linear_readers(norm.output)
        conv = None
        if len(readers) == 1 and not _reaches_gqa(readers[0]):
            conv = match_conv_mixer(readers[0])  # LFM2's short convolution (CausalConvWithState)
            if conv is None and (readers[0].shape[1] != vocab or not _reaches_output(readers[0].output)):
                ops = sorted(_ops_after(readers[0].output) - {"Split", "Reshape", "Transpose", "Mul", "Cast"})
                raise UnsupportedGraphError(f"{where}: the norm feeds {', '.join(ops) or 'no attention'} instead of "
                                            f"{GQA} or a short convolution (LFM2's in_proj, gates and "
                                            "CausalConvWithState); other layers are not supported")
            if conv is None:
                final_norm, lm_head = norm, readers[0]
                lm_head.role = "lm_head"
                break
        if conv is not None:
            conv, o = conv
            q = k = v = attn = qkv = None
            qk_norms = [None, None]
            attn_add, post_attn = _block_output(o, where, "out_proj")
        else:
            q, k, v, attn, qkv, qk_norms = _qkv(norm.output, where)
            o = _only_linear_reader(attn.outputs[0], where, "o_proj")
            o.role = "o_proj"
            attn_add, post_attn = _block_output(o, where, "o_proj")
        norm2 = _norm(attn_add, _residual_out(attn_add, where), where)
        readers2 = linear_readers(norm2.output)
        if len(readers2) != 2:
            raise UnsupportedGraphError(f"{where}: expected gate/up projections (2 MatMuls) after the MLP norm, found "
                                        f"{len(readers2)}")
        gate, up = classify_gate_up(readers2, where)
        mlp_mul = next((n for n in up.output.consumers() if n.op_type == "Mul"), None)
        if mlp_mul is None:
            raise UnsupportedGraphError(f"{where}: up_proj does not feed the gated Mul")
        down = _only_linear_reader(mlp_mul.outputs[0], where, "down_proj")
        mlp_add, post_mlp = _block_output(down, where, "down_proj")
        for lin, role in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj"), (gate, "gate_proj"), (up, "up_proj"),
                          (down, "down_proj")):
            if lin is not None:
                lin.role, lin.layer = role, idx
        for lin in (o, qkv, *([] if conv is None else [conv.in_proj, *conv.in_proj.blocks])):
            if lin is not None:
                lin.layer = idx
        if d_ff is not None and gate.shape[1] != d_ff:
            raise UnsupportedGraphError(f"{where}: the MLP width differs from layer 0's")
        d_ff = gate.shape[1]
        layer = Layer(idx, norm, q, k, v, o, attn_add, norm2, gate, up, down, mlp_add, mlp_mul, qkv=qkv,
                      post_attn_norm=post_attn, post_mlp_norm=post_mlp, q_norm=qk_norms[0], k_norm=qk_norms[1],
                      conv=conv)
        if attn is not None:
            heads = attn.attributes.get_int("num_heads", 0)
            kv_heads = attn.attributes.get_int("kv_num_heads", 0)
            head_dim = q.shape[1] // heads
            if config is not None and (heads, kv_heads, head_dim) != config:
                raise UnsupportedGraphError(f"{where}: heads/head size differ from the first attention layer's")
            config = (heads, kv_heads, head_dim)
            layer.kv_groups = (kv_heads, heads // kv_heads, head_dim)
        layers.append(layer)
        x = mlp_add.outputs[3] if len(mlp_add.outputs) > 3 and mlp_add.outputs[3] is not None else mlp_add.inputs[0]
        next_norm = mlp_add  # the next layer's attention norm, or the final norm
    if not layers:
        raise UnsupportedGraphError("no decoder layers found")
    if config is None:
        raise UnsupportedGraphError(f"no {GQA} layer found (only short convolutions): cannot tell the head size")
    vocab, hidden = lm_head.shape[1], lm_head.shape[0]
    heads, kv_heads, head_dim = config
    conv_layers = sum(layer.conv is not None for layer in layers)
    return Structure(gather, layers, final_norm, lm_head,
                     ModelConfig(hidden, heads, kv_heads, head_dim, d_ff, vocab, conv_layers=conv_layers))
