"""Recognize the structure of a decoder-only LLM in an ONNX graph (on onnx-ir).

The recognizer walks the residual stream from the embedding Gather: each residual value feeds an
RMSNorm and a residual Add; the linears that read the norm's output are q/k/v (three readers) or
gate/up (two readers); the linear that writes into the Add is o_proj or down_proj. Roles are told
apart by what the graph does with each output (q and k meet in the score MatMul, v in the
probability MatMul; gate goes through the activation), never by tensor names, so graphs from other
exporters match too. Norms are matched as the decomposed ``x * 1/sqrt(mean(x^2) + eps) * gamma``
(with or without Casts around it), or as ``RMSNormalization`` / ``SimplifiedLayerNormalization``.

Everything that cannot be matched raises :class:`UnsupportedGraphError` naming what was missing.
"""

from __future__ import annotations

import json
from collections import deque

import onnx_ir as ir

from onnxqf.errors import UnsupportedGraphError
from onnxqf.graph.modelfile import get_metadata
from onnxqf.graph.structure import ONLINE_ROTATION, Layer, Linear, ModelConfig, Norm, Structure, const_array, is_initializer

# Ops that only move data or change dtype: the recognizer looks through them.
PASS_THROUGH = {"Cast", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Expand"}
ACTIVATIONS = {"Sigmoid", "Silu", "Swish", "Gelu", "FastGelu", "QuickGelu", "BiasGelu", "Tanh", "Erf", "Relu"}
FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}


def consumers(value: ir.Value) -> list[ir.Node]:
    return list(value.consumers())


def strip_casts_back(value: ir.Value) -> ir.Value:
    """Follow a value back through Cast/Identity to its source."""
    while True:
        node = value.producer()
        if node is None or node.op_type not in ("Cast", "Identity"):
            return value
        value = node.inputs[0]


def through_casts_fwd(value: ir.Value) -> list[tuple[ir.Node, ir.Value]]:
    """(consumer node, the value it reads) for every consumer, looking through Cast/Identity and
    through the online rotations onnxqf inserted (nodes marked with ``ONLINE_ROTATION``)."""
    out = []
    stack = [value]
    seen: set[int] = set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for node in v.consumers():
            if node.op_type in ("Cast", "Identity") or ONLINE_ROTATION in node.metadata_props:
                stack.extend(node.outputs)
            else:
                out.append((node, v))
    return out


# ----------------------------------------------------------------------------------------------
# matching


def match_linear(node: ir.Node) -> Linear | None:
    """A MatMul whose B is a 2-D initializer (possibly through a Transpose node)."""
    if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) != 2:
        return None
    w = node.inputs[1]
    if w is None:
        return None
    transpose = None
    if not is_initializer(w):
        producer = w.producer()
        if (
            producer is not None
            and producer.op_type == "Transpose"
            and is_initializer(producer.inputs[0])
            and len(producer.inputs[0].const_value.shape) == 2
        ):
            perm = producer.attributes.get_ints("perm", [1, 0])
            if list(perm) != [1, 0]:
                return None
            transpose = producer
            w = producer.inputs[0]
        else:
            return None
    if len(w.const_value.shape) != 2:
        return None
    lin = Linear(node=node, weight=w, transpose=transpose)
    out = node.outputs[0]
    users = consumers(out)
    if len(users) == 1 and users[0].op_type == "Add":
        add = users[0]
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        arr = const_array(other)
        if arr is not None and arr.ndim == 1 and arr.shape[0] == lin.shape[1]:
            lin.bias, lin.bias_node = other, add
    return lin


def _match_decomposed_norm(x_src: ir.Value) -> Norm | None:
    """x -> [Cast] -> Pow(.,2)|Mul(.,.) -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal/Div -> Mul -> [Cast] -> Mul(gamma)."""
    for node, x in through_casts_fwd(x_src):
        sq = None
        if node.op_type == "Pow":
            exp = const_array(node.inputs[1])
            if exp is not None and exp.size == 1 and float(exp.reshape(-1)[0]) == 2.0:
                sq = node
        elif node.op_type == "Mul" and node.inputs[0] is node.inputs[1]:
            sq = node
        if sq is None:
            continue
        red = _single(consumers(sq.outputs[0]), "ReduceMean")
        add = red and _single(consumers(red.outputs[0]), "Add")
        sqrt = add and _single(consumers(add.outputs[0]), "Sqrt")
        if not sqrt:
            continue
        nxt = consumers(sqrt.outputs[0])
        normed = None
        if len(nxt) == 1 and nxt[0].op_type == "Reciprocal":
            mul = _single(consumers(nxt[0].outputs[0]), "Mul")
            if mul is not None and x in mul.inputs:
                normed = mul.outputs[0]
        elif len(nxt) == 1 and nxt[0].op_type == "Div" and nxt[0].inputs[0] is x:
            normed = nxt[0].outputs[0]
        if normed is None:
            continue
        # optional Cast back, then the gamma Mul
        out = normed
        users = consumers(out)
        if len(users) == 1 and users[0].op_type == "Cast":
            out = users[0].outputs[0]
            users = consumers(out)
        if len(users) == 1 and users[0].op_type == "Mul":
            mul = users[0]
            other = mul.inputs[1] if mul.inputs[0] is out else mul.inputs[0]
            if is_initializer(other) and len(other.const_value.shape) == 1:
                return Norm("decomposed", x_src, mul.outputs[0], other, mul)
        return Norm("decomposed", x_src, out, None, None)
    return None


def _match_fused_norm(x_src: ir.Value) -> Norm | None:
    for node, _x in through_casts_fwd(x_src):
        if node.op_type in ("RMSNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
            if node.op_type == "SkipSimplifiedLayerNormalization":
                raise UnsupportedGraphError(
                    "SkipSimplifiedLayerNormalization (residual add fused into the norm) is not supported; "
                    "export without ORT's transformer fusions"
                )
            scale = node.inputs[1] if len(node.inputs) > 1 else None
            if scale is not None and not is_initializer(scale):
                raise UnsupportedGraphError(f"{node.op_type} node '{node.name}' has a non-constant scale")
            return Norm(node.op_type, x_src, node.outputs[0], scale, node)
        if node.op_type == "LayerNormalization":
            raise UnsupportedGraphError(
                f"LayerNormalization '{node.name}' subtracts the mean and is not rotation-invariant; "
                "only RMSNorm models are supported"
            )
    return None


def match_norm(x: ir.Value) -> Norm | None:
    return _match_fused_norm(x) or _match_decomposed_norm(x)


def _single(nodes: list[ir.Node], op_type: str) -> ir.Node | None:
    return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op_type else None


def _readers(value: ir.Value) -> list[Linear]:
    """Weight linears that read ``value`` (through casts) as their activation input."""
    out = []
    for node, v in through_casts_fwd(value):
        lin = match_linear(node)
        if lin is not None and node.inputs[0] is v:
            out.append(lin)
    return out


def _writer(value: ir.Value) -> Linear | None:
    """The weight linear whose output (after bias, casts) is ``value``."""
    v = value
    for _ in range(4):
        node = v.producer()
        if node is None:
            return None
        if node.op_type == "MatMul":
            return match_linear(node)
        if node.op_type == "Add":  # a bias Add
            for i, inp in enumerate(node.inputs):
                if const_array(inp) is not None:
                    v = node.inputs[1 - i]
                    break
            else:
                return None
        elif node.op_type in ("Cast", "Identity"):
            v = node.inputs[0]
        else:
            return None
    return None


def _first_mixing_op(start: ir.Value, limit: int = 64) -> tuple[ir.Node, int] | None:
    """BFS forward to the first MatMul of two activations (or fused attention op)."""
    seen: set[int] = set()
    queue: deque[ir.Value] = deque([start])
    steps = 0
    while queue and steps < limit:
        v = queue.popleft()
        for node in v.consumers():
            steps += 1
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in FUSED_ATTENTION:
                return node, list(node.inputs).index(v)
            if node.op_type == "MatMul" and node.domain == "":
                if match_linear(node) is None:
                    return node, list(node.inputs).index(v)
                continue
            if node.op_type in ("Softmax", "ReduceMean", "Sqrt"):
                continue
            queue.extend(node.outputs)
    return None


def _classify_qkv(readers: list[Linear], where: str) -> tuple[Linear, Linear, Linear]:
    hits = []
    for lin in readers:
        hit = _first_mixing_op(lin.output)
        if hit is None:
            raise UnsupportedGraphError(f"{where}: cannot follow '{lin.node.name}' to an attention MatMul")
        hits.append(hit)
    q = k = v = None
    for lin, (node, slot) in zip(readers, hits):
        if node.op_type in FUSED_ATTENTION:
            role = {0: "q", 1: "k", 2: "v"}.get(slot)
        else:
            shared = sum(1 for n, _ in hits if n is node)
            role = ("q" if slot == 0 else "k") if shared == 2 else ("v" if slot == 1 else None)
        if role == "q" and q is None:
            q = lin
        elif role == "k" and k is None:
            k = lin
        elif role == "v" and v is None:
            v = lin
        else:
            raise UnsupportedGraphError(f"{where}: cannot tell q/k/v apart (reader '{lin.node.name}')")
    return q, k, v


def _classify_gate_up(readers: list[Linear], where: str) -> tuple[Linear, Linear]:
    gate = [lin for lin in readers if any(n.op_type in ACTIVATIONS for n, _ in through_casts_fwd(lin.output))]
    if len(gate) != 1:
        raise UnsupportedGraphError(f"{where}: cannot tell gate_proj from up_proj (expected one to feed an activation)")
    up = [lin for lin in readers if lin is not gate[0]]
    return gate[0], up[0]


def _find_gather(model: ir.Model) -> ir.Node:
    graph = model.graph
    candidates = []
    for node in graph:
        if node.op_type != "Gather" or not is_initializer(node.inputs[0]):
            continue
        if len(node.inputs[0].const_value.shape) != 2:
            continue
        idx = strip_casts_back(node.inputs[1])
        if idx.is_graph_input():
            candidates.append(node)
    if len(candidates) != 1:
        raise UnsupportedGraphError(
            "no token embedding found (expected one Gather of a 2-D initializer indexed by a graph input)"
            if not candidates
            else f"{len(candidates)} embedding-like Gathers found; cannot tell which is the token embedding"
        )
    return candidates[0]


def _residual_add(x: ir.Value, norm: Norm, where: str) -> tuple[ir.Node, ir.Value]:
    """The Add that consumes ``x`` next to its norm, and the Add's other input."""
    adds = [n for n in x.consumers() if n.op_type == "Add" and n.domain == ""]
    if len(adds) != 1:
        raise UnsupportedGraphError(f"{where}: expected one residual Add reading the residual stream, found {len(adds)}")
    add = adds[0]
    other = add.inputs[1] if add.inputs[0] is x else add.inputs[0]
    return add, other


def recognize(model: ir.Model) -> Structure:
    """Match the decoder structure of ``model`` or raise UnsupportedGraphError.

    Graphs of onnxruntime-genai's model builder (fused norms, packed q/k/v, GroupQueryAttention)
    are matched by :func:`onnxqf.recognize.genai.recognize_genai`.
    """
    from onnxqf.recognize.genai import is_builder_graph, recognize_genai

    structure = recognize_genai(model) if is_builder_graph(model) else _recognize_plain(model)
    check_consistent(structure)
    return structure


_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def check_consistent(structure: Structure) -> None:
    """Refuse, in one line, a structure whose weights cannot be what the graph computes with: a
    non-float weight, or shapes that disagree between a layer's linears (e.g. an edited file)."""
    cfg = structure.config
    q_width = cfg.num_heads * cfg.head_dim
    for lin in structure.linears():
        dtype = lin.weight.const_value.dtype
        if dtype not in _FLOAT_TYPES:
            raise UnsupportedGraphError(f"{lin.name}: the weight '{lin.weight.name}' is {dtype.name}, not a float type "
                                        "(an already quantized or malformed model?)")
    for layer in structure.layers:
        want = {"q_proj": (cfg.hidden, q_width), "k_proj": (cfg.hidden, layer.k.shape[1]), "v_proj": (cfg.hidden, layer.k.shape[1]),
                "o_proj": (q_width, cfg.hidden), "gate_proj": (cfg.hidden, cfg.intermediate),
                "up_proj": (cfg.hidden, cfg.intermediate), "down_proj": (cfg.intermediate, cfg.hidden)}
        for lin in layer.linears():
            if lin.shape != want[lin.role]:
                raise UnsupportedGraphError(f"{lin.name}: weight is [in, out] = {list(lin.shape)}, the model's other shapes "
                                            f"say {list(want[lin.role])} (hidden {cfg.hidden}, d_ff {cfg.intermediate})")
    if structure.lm_head.shape != (cfg.hidden, cfg.vocab):
        raise UnsupportedGraphError(f"lm_head: weight is [in, out] = {list(structure.lm_head.shape)}, expected "
                                    f"{[cfg.hidden, cfg.vocab]}")


def _recognize_plain(model: ir.Model) -> Structure:
    gather = _find_gather(model)
    x = gather.outputs[0]
    layers: list[Layer] = []
    final_norm = lm_head = None
    while True:
        idx = len(layers)
        where = f"layer {idx}"
        norm = match_norm(x)
        if norm is None:
            raise UnsupportedGraphError(f"{where}: no RMSNorm found on the residual stream")
        readers = _readers(norm.output)
        if len(readers) == 1 and not [n for n in x.consumers() if n.op_type == "Add"]:
            final_norm, lm_head = norm, readers[0]
            lm_head.role = "lm_head"
            break
        if len(readers) != 3:
            raise UnsupportedGraphError(
                f"{where}: expected q/k/v projections (3 weight MatMuls) after the attention norm, found {len(readers)}"
            )
        q, k, v = _classify_qkv(readers, where)
        add1, attn_out = _residual_add(x, norm, where)
        o = _writer(attn_out)
        if o is not None and any(o.node is r.node for r in readers):
            o = None
        if o is None:
            raise UnsupportedGraphError(f"{where}: no o_proj weight MatMul feeds the attention residual Add")
        x2 = add1.outputs[0]
        norm2 = match_norm(x2)
        if norm2 is None:
            raise UnsupportedGraphError(f"{where}: no RMSNorm before the MLP")
        readers2 = _readers(norm2.output)
        if len(readers2) != 2:
            raise UnsupportedGraphError(
                f"{where}: expected gate/up projections (2 weight MatMuls) after the MLP norm, found {len(readers2)}"
            )
        gate, up = _classify_gate_up(readers2, where)
        add2, mlp_out = _residual_add(x2, norm2, where)
        down = _writer(mlp_out)
        if down is not None and any(down.node is r.node for r in readers2):
            down = None
        if down is None:
            raise UnsupportedGraphError(f"{where}: no down_proj weight MatMul feeds the MLP residual Add")
        mlp_mul = down.input.producer()
        if mlp_mul is not None and not (mlp_mul.op_type == "Mul" and up.output in mlp_mul.inputs):
            mlp_mul = None
        for lin, role in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj"), (o, "o_proj"), (gate, "gate_proj"), (up, "up_proj"), (down, "down_proj")):
            lin.role, lin.layer = role, idx
        layers.append(Layer(idx, norm, q, k, v, o, add1, norm2, gate, up, down, add2, mlp_mul))
        x = add2.outputs[0]
    if not layers:
        raise UnsupportedGraphError("no decoder layers found")
    config = _infer_config(model, gather, layers, lm_head)
    for layer in layers:
        layer.kv_groups = config.kv_groups
    return Structure(gather, layers, final_norm, lm_head, config)


def _infer_config(model: ir.Model, gather: ir.Node, layers: list[Layer], lm_head: Linear) -> ModelConfig:
    vocab, hidden = (int(d) for d in gather.inputs[0].const_value.shape.numpy())
    l0 = layers[0]
    q_out, kv_out, d_ff = l0.q.shape[1], l0.k.shape[1], l0.gate.shape[1]
    meta = get_metadata(model, "config")
    head_dim = None
    if meta:
        info = json.loads(meta)
        head_dim = info.get("head_dim")
    if head_dim is None:
        head_dim = _head_dim_from_reshape(l0.k) or _head_dim_from_reshape(l0.q)
    if head_dim is None or q_out % head_dim or kv_out % head_dim:
        raise UnsupportedGraphError(
            "cannot determine the attention head size from the graph; export with onnxqf or pass --head-dim"
        )
    return ModelConfig(hidden, q_out // head_dim, kv_out // head_dim, int(head_dim), d_ff, vocab)


def _head_dim_from_reshape(lin: Linear) -> int | None:
    """The last entry of the shape that splits a projection into heads, if it is a constant."""
    for node, _ in through_casts_fwd(lin.output):
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

