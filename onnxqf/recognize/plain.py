"""Recognize a plain exported decoder (torch.onnx and similar exporters): separate ops, no fusions.

The recognizer walks the residual stream from the embedding Gather: each residual value feeds an
RMSNorm and a residual Add; the linears that read the norm's output are q/k/v (three readers) or
gate/up (two readers); the linear that writes into the Add is o_proj or down_proj. Roles are told
apart by what the graph does with each output (q and k meet in the score MatMul, v in the
probability MatMul; gate goes through the activation), never by tensor names, so graphs from other
exporters match too. Norms are matched as the decomposed ``x * 1/sqrt(mean(x^2) + eps) * gamma``
(with or without Casts around it), or as ``RMSNormalization`` / ``SimplifiedLayerNormalization``, or as a
``LayerNormalization`` without a bias (OLMo: a norm that ``centres``, see :mod:`onnxqf.maths.centring`).
"""

from __future__ import annotations

import json

import onnx_ir as ir

from onnxqf.errors import UnsupportedGraphError
from onnxqf.graph.modelfile import get_metadata
from onnxqf.graph.structure import Layer, Linear, ModelConfig, Norm, Structure, const_array
from onnxqf.recognize.match import (
    classify_gate_up,
    classify_qkv,
    find_gather,
    linear_readers,
    match_conv_mixer,
    match_norm,
    post_norm_writer,
    residual_add,
    split_blocks,
    through_casts_fwd,
    through_scalar_mul,
    writer,
)

__all__ = ["clipped", "head_dim_from_reshape", "head_norm", "infer_config", "recognize_plain", "unpack"]


def recognize_plain(model: ir.Model) -> Structure:
    gather = find_gather(model)
    x, _ = through_scalar_mul(gather.outputs[0])  # Gemma's √hidden, Granite's embedding multiplier
    layers: list[Layer] = []
    final_norm = lm_head = None
    while True:
        idx = len(layers)
        where = f"layer {idx}"
        norm = match_norm(x)
        if norm is None:
            raise UnsupportedGraphError(f"{where}: no RMSNorm found on the residual stream")
        readers = linear_readers(norm.output)
        if len(readers) == 1 and not [n for n in x.consumers() if n.op_type == "Add"]:
            final_norm, lm_head = norm, readers[0]
            lm_head.role = "lm_head"
            break
        conv = match_conv_mixer(readers[0]) if len(readers) == 1 else None
        if conv is not None:  # LFM2's short convolution in place of attention
            conv, out_proj = conv
            q = k = v = qkv = None
            readers = [conv.in_proj]
        else:
            readers, qkv = unpack(readers, 3, "qkv_proj", where, "q/k/v projections", "the attention norm")
            q, k, v = classify_qkv(readers, where)
        add1, attn_out = residual_add(x, norm, where)
        o, post_attn = _block_writer(attn_out, readers)
        if o is None or (conv is not None and o.node is not out_proj.node):
            what = "o_proj" if conv is None else "the conv block's out_proj"
            raise UnsupportedGraphError(f"{where}: no {what} weight MatMul feeds the attention residual Add")
        x2 = add1.outputs[0]
        norm2 = match_norm(x2)
        if norm2 is None:
            raise UnsupportedGraphError(f"{where}: no RMSNorm before the MLP")
        readers2, gate_up = unpack(linear_readers(norm2.output), 2, "gate_up_proj", where, "gate/up projections",
                                   "the MLP norm")
        gate, up = classify_gate_up(readers2, where)
        add2, mlp_out = residual_add(x2, norm2, where)
        down, post_mlp = _block_writer(mlp_out, readers2)
        if down is None:
            raise UnsupportedGraphError(f"{where}: no down_proj weight MatMul feeds the MLP residual Add")
        mlp_mul = down.input.producer()
        if mlp_mul is not None and not (mlp_mul.op_type == "Mul" and up.output in mlp_mul.inputs):
            mlp_mul = None
        for lin, role in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj"), (o, "o_proj" if conv is None else "out_proj"),
                          (gate, "gate_proj"), (up, "up_proj"), (down, "down_proj"), (qkv, "qkv_proj"),
                          (gate_up, "gate_up_proj")):
            if lin is not None:
                lin.role, lin.layer = role, idx
        if conv is not None:
            for lin in (conv.in_proj, *conv.in_proj.blocks):
                lin.layer = idx
        layers.append(Layer(idx, norm, q, k, v, o, add1, norm2, gate, up, down, add2, mlp_mul, qkv=qkv, gate_up=gate_up,
                            post_attn_norm=post_attn, post_mlp_norm=post_mlp,
                            q_norm=None if q is None else head_norm(q), k_norm=None if k is None else head_norm(k),
                            conv=conv))
        x = add2.outputs[0]
    if not layers:
        raise UnsupportedGraphError("no decoder layers found")
    config = infer_config(model, gather, layers, lm_head)
    for layer in layers:
        layer.kv_groups = config.kv_groups if layer.conv is None else None
    return Structure(gather, layers, final_norm, lm_head, config)


def unpack(readers: list[Linear], n: int, packed_role: str, where: str, what: str,
           after: str) -> tuple[list[Linear], Linear | None]:
    """The ``n`` linears that read a norm: ``n`` separate MatMuls, or the column blocks of one packed MatMul whose
    output the graph splits into ``n`` (Phi-3's qkv_proj and gate_up_proj), with that packed Linear."""
    if len(readers) == n:
        return readers, None
    if len(readers) == 1:
        whole = readers[0]
        blocks = split_blocks(whole.output, whole.shape[1])
        if blocks is not None and len(blocks) == n:
            parts = [whole.block(a, b, output=value) for a, b, value in blocks]
            whole.role, whole.blocks = packed_role, tuple(parts)
            return parts, whole
    raise UnsupportedGraphError(f"{where}: expected {what} ({n} weight MatMuls, or one split into {n}) after {after}, "
                                f"found {len(readers)}")


def head_norm(lin: Linear) -> Norm | None:
    """The per-head RMSNorm on a projection's output split into heads (Qwen3's and Gemma 3's q/k norms), or None."""
    value = lin.output
    for _ in range(2):  # the split into heads, and the Transpose that may follow it (Gemma 3)
        nxt = [n for n, _ in through_casts_fwd(value) if n.op_type in ("Reshape", "Transpose")]
        if len(nxt) != 1:
            return None
        value = nxt[0].outputs[0]
        try:
            norm = match_norm(value)
        except UnsupportedGraphError:
            return None
        if norm is not None and norm.has_scale:
            return norm
    return None


def _block_writer(out: ir.Value, readers: list[Linear]) -> tuple[Linear | None, Norm | None]:
    """The linear that writes a block's output into the residual Add, and the norm after it (Gemma 2/3) or None."""
    lin, post = writer(out), None
    if lin is None:
        found = post_norm_writer(out)
        if found is not None:
            lin, post = found
    if lin is not None and any(lin.node is r.node for r in readers):
        return None, None
    return lin, post


def infer_config(model: ir.Model, gather: ir.Node, layers: list[Layer], lm_head: Linear) -> ModelConfig:
    vocab, hidden = (int(d) for d in gather.inputs[0].const_value.shape.numpy())
    attention = [layer for layer in layers if layer.conv is None]
    if not attention:
        raise UnsupportedGraphError("no attention layer found (only short convolutions): cannot tell the head size")
    l0 = attention[0]
    q_out, kv_out, d_ff = l0.q.shape[1], l0.k.shape[1], layers[0].gate.shape[1]
    meta = get_metadata(model, "config")
    head_dim = None
    if meta:
        info = json.loads(meta)
        head_dim = info.get("head_dim")
    if head_dim is None:
        head_dim = head_dim_from_reshape(l0.k) or head_dim_from_reshape(l0.q)
    if head_dim is None or q_out % head_dim or kv_out % head_dim:
        raise UnsupportedGraphError(
            "cannot determine the attention head size from the graph; export with onnxqf or pass --head-dim"
        )
    return ModelConfig(hidden, q_out // head_dim, kv_out // head_dim, int(head_dim), d_ff, vocab,
                       conv_layers=len(layers) - len(attention),
                       value_clip=any(clipped(layer.v) for layer in attention))


def clipped(lin: Linear) -> bool:
    """Whether a ``Clip`` reads the projection's output (OLMo's clip_qkv clamps q, k and v)."""
    return any(node.op_type == "Clip" for node, _ in through_casts_fwd(lin.output))


def head_dim_from_reshape(lin: Linear) -> int | None:
    """The last entry of the shape that splits a projection into heads, if it is a constant (after a Clip:
    OLMo's clip_qkv)."""
    readers = [n for n, _ in through_casts_fwd(lin.output)]
    readers += [n for clip in readers if clip.op_type == "Clip" for n, _ in through_casts_fwd(clip.outputs[0])]
    for node in readers:
        if node.op_type != "Reshape":
            continue
        shape = const_array(node.inputs[1])
        if shape is not None and shape.size >= 3 and shape[-1] > 0:
            return int(shape[-1])
        producer = node.inputs[1].producer()
        if producer is not None and producer.op_type == "Concat":
            last = const_array(producer.inputs[-1])
            if last is not None and last.size == 1 and int(last.reshape(-1)[0]) > 0:
                return int(last.reshape(-1)[0])
    return None

