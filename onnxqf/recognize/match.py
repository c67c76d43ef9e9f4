"""Matching helpers shared by the recognizers: dataflow patterns on onnx-ir values, no model knowledge.

Each helper answers one question about the graph around a value (who reads it, through which
data-movement ops; is this MatMul a weight linear; is this an RMSNorm and where is its scale) and
returns records of :mod:`onnxqf.graph.structure` or None. The recognizers (:mod:`.plain`,
:mod:`.genai`) compose them into a :class:`~onnxqf.graph.structure.Structure`.
"""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import onnx_ir as ir

from onnxqf.errors import UnsupportedGraphError
from onnxqf.graph.structure import ONLINE_ROTATION, ConvMixer, Linear, Norm, const_array, is_initializer

__all__ = [
    "linear_readers",
    "ACTIVATIONS", "CONV_OPS", "FUSED_ATTENTION", "PASS_THROUGH", "channel_blocks", "classify_gate_up",
    "classify_qkv", "consumers", "find_gather", "first_mixing_op", "match_conv_mixer", "match_decomposed_norm",
    "match_fused_norm", "match_layer_norm", "match_linear", "match_norm", "norm_scale", "post_norm_writer",
    "residual_add", "scalar_factor", "single", "split_blocks", "strip_casts_back", "through_casts_fwd",
    "through_scalar_mul", "writer",
]

# Ops that only move data or change dtype: the recognizer looks through them.
PASS_THROUGH = {"Cast", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Expand"}
ACTIVATIONS = {"Sigmoid", "Silu", "Swish", "Gelu", "FastGelu", "QuickGelu", "BiasGelu", "Tanh", "Erf", "Relu"}
FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
#: LFM2's depthwise causal convolution: ONNX's Conv (plain exports) or the model builder's CausalConvWithState
CONV_OPS = {"Conv", "CausalConvWithState"}


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


def match_decomposed_norm(x_src: ir.Value) -> Norm | None:
    """x -> [Cast] -> Pow(.,2)|Mul(.,.) -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal/Div -> Mul -> [Cast]
    -> Mul(gamma)."""
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
        red = single(consumers(sq.outputs[0]), "ReduceMean")
        add = red and single(consumers(red.outputs[0]), "Add")
        sqrt = add and single(consumers(add.outputs[0]), "Sqrt")
        if not sqrt:
            continue
        nxt = consumers(sqrt.outputs[0])
        normed = None
        if len(nxt) == 1 and nxt[0].op_type == "Reciprocal":
            mul = single(consumers(nxt[0].outputs[0]), "Mul")
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
            scale = norm_scale(other)
            if scale is not None:
                return Norm("decomposed", x_src, mul.outputs[0], scale[0], mul, offset=scale[1], offset_node=scale[2])
        return Norm("decomposed", x_src, out, None, None)
    return None


def norm_scale(value: ir.Value | None) -> tuple[ir.Value, float, ir.Node | None] | None:
    """(γ initializer, offset, the Add node) when ``value`` is a norm's multiplier: a 1-D initializer γ (offset
    0, no node), or ``Add(γ, c)`` of a 1-D initializer and a scalar constant (Gemma's ``1 + γ``: offset c)."""
    if value is None:
        return None
    if is_initializer(value) and len(value.const_value.shape) == 1:
        return value, 0.0, None
    node = value.producer()
    if node is None or node.op_type != "Add" or node.domain != "" or len(node.inputs) != 2:
        return None
    for gamma, other in (node.inputs, node.inputs[::-1]):
        c = const_array(other)
        if is_initializer(gamma) and len(gamma.const_value.shape) == 1 and c is not None and c.size == 1:
            return gamma, float(c.reshape(-1)[0]), node
    return None


def match_fused_norm(x_src: ir.Value) -> Norm | None:
    for node, _x in through_casts_fwd(x_src):
        if node.op_type in ("RMSNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
            if node.op_type == "SkipSimplifiedLayerNormalization":
                raise UnsupportedGraphError(
                    "SkipSimplifiedLayerNormalization (residual add fused into the norm) is not supported; "
                    "export without ORT's transformer fusions"
                )
            scale = node.inputs[1] if len(node.inputs) > 1 else None
            found = norm_scale(scale)
            if scale is not None and found is None:
                raise UnsupportedGraphError(f"{node.op_type} node '{node.name}' has a non-constant scale")
            gamma, offset, offset_node = found or (None, 0.0, None)
            return Norm(node.op_type, x_src, node.outputs[0], gamma, node, offset=offset, offset_node=offset_node)
        if node.op_type == "LayerNormalization":
            return match_layer_norm(node, x_src)
    return None


def match_layer_norm(node: ir.Node, x_src: ir.Value) -> Norm:
    """A ``LayerNormalization`` over the last axis with a constant scale and no bias (or a zero one), only its
    first output used: a :class:`Norm` that ``centres`` (OLMo's parameter-free LayerNorm, exported with a scale of
    ones). It equals an RMSNorm once the residual stream is centred (:mod:`onnxqf.maths.centring`). Anything else
    is refused in one line: a bias would have to fold into every reader's bias."""
    where = f"LayerNormalization '{node.name}'"
    rank = len(x_src.shape) if x_src.shape is not None else None
    axis = node.attributes.get_int("axis", -1)
    if axis != -1 and (rank is None or axis != rank - 1):
        raise UnsupportedGraphError(f"{where} normalizes axis {axis}, not the hidden axis; not rotation-invariant")
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    if const_array(scale) is None:
        raise UnsupportedGraphError(f"{where} has a non-constant scale")
    bias = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if len(node.inputs) > 2 and node.inputs[2] is not None and (bias is None or np.any(bias != 0)):
        raise UnsupportedGraphError(f"{where} adds a bias; only LayerNorms without a bias (OLMo) are supported")
    if any(list(out.uses()) for out in node.outputs[1:] if out is not None):
        raise UnsupportedGraphError(f"{where}: its mean or inverse deviation output is used")
    gamma, offset, offset_node = norm_scale(scale) or (None, 0.0, None)
    return Norm("LayerNormalization", x_src, node.outputs[0], gamma, node, offset=offset, offset_node=offset_node,
                centres=True)


def match_norm(x: ir.Value) -> Norm | None:
    return match_fused_norm(x) or match_decomposed_norm(x)


def single(nodes: list[ir.Node], op_type: str) -> ir.Node | None:
    return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op_type else None


def linear_readers(value: ir.Value) -> list[Linear]:
    """Weight linears that read ``value`` (through casts) as their activation input."""
    out = []
    for node, v in through_casts_fwd(value):
        lin = match_linear(node)
        if lin is not None and node.inputs[0] is v:
            out.append(lin)
    return out


def writer(value: ir.Value) -> Linear | None:
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
        elif scalar_factor(node) is not None:  # Granite's residual multiplier
            v = next(inp for inp in node.inputs if const_array(inp) is None)
        else:
            return None
    return None


def scalar_factor(node: ir.Node) -> float | None:
    """c when ``node`` is ``Mul(x, c)`` (or ``Div(x, c)``: 1/c) of an activation and a scalar constant, else None."""
    if node.op_type not in ("Mul", "Div") or node.domain != "" or len(node.inputs) != 2:
        return None
    consts = [const_array(inp) for inp in node.inputs]
    if node.op_type == "Div":
        c = consts[1]
        return None if c is None or c.size != 1 or consts[0] is not None else 1.0 / float(c.reshape(-1)[0])
    found = [c for c in consts if c is not None]
    if len(found) != 1 or found[0].size != 1:
        return None
    return float(found[0].reshape(-1)[0])


def through_scalar_mul(value: ir.Value) -> tuple[ir.Value, float | None]:
    """(``value`` times a constant scalar, the scalar) when its only reader is such a Mul (Gemma's √hidden and
    Granite's multiplier on the embedding), else (``value``, None). A scalar commutes with every rotation."""
    users = list(value.consumers())
    if len(users) == 1 and scalar_factor(users[0]) is not None:
        return users[0].outputs[0], scalar_factor(users[0])
    return value, None


def split_blocks(value: ir.Value, width: int) -> list[tuple[int, int, ir.Value]] | None:
    """[(start, stop, value)] when ``value`` (of last-axis width ``width``) is read only by one ``Split`` or by
    ``Slice`` nodes along the last axis (a packed projection's output cut into its blocks), in column order."""
    users = list(value.consumers())
    if len(users) == 1 and users[0].op_type == "Split":
        node = users[0]
        axis = node.attributes.get_int("axis", 0)
        rank = len(value.shape) if value.shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            return None
        bounds = _split_bounds(node, width)
        return None if bounds is None else [(bounds[i], bounds[i + 1], node.outputs[i])
                                            for i in range(len(node.outputs))]
    if not users or any(u.op_type != "Slice" for u in users):
        return None
    out = []
    for node in users:
        starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
        axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        rank = len(value.shape) if value.shape is not None else None
        if starts is None or ends is None or starts.size != 1 or axes is None or axes.size != 1:
            return None
        if int(axes.reshape(-1)[0]) != -1 and (rank is None or int(axes.reshape(-1)[0]) != rank - 1):
            return None
        if steps is not None and int(steps.reshape(-1)[0]) != 1:
            return None
        start, stop = int(starts.reshape(-1)[0]), min(int(ends.reshape(-1)[0]), width)
        start = start + width if start < 0 else start
        stop = stop + width if stop < 0 else stop
        out.append((start, stop, node.outputs[0]))
    out.sort(key=lambda b: b[0])
    if out[0][0] != 0 or out[-1][1] != width or any(a[1] != b[0] for a, b in itertools.pairwise(out)):
        return None
    return out


def _split_bounds(node: ir.Node, width: int) -> list[int] | None:
    """The cumulative bounds [0, s0, s0 + s1, ..., width] of a Split of ``width`` channels (its sizes input, or
    equal parts), or None when they do not add up."""
    sizes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if sizes is None:
        n = len(node.outputs)
        if width % n:
            return None
        sizes = [width // n] * n
    bounds = [0, *list(map(int, sizes))]
    for i in range(1, len(bounds)):
        bounds[i] += bounds[i - 1]
    return bounds if bounds[-1] == width else None


def channel_blocks(value: ir.Value, width: int) -> list[tuple[int, int, ir.Value]] | None:
    """:func:`split_blocks` of a projection's output that is transposed before the ``Split`` (LFM2's in_proj:
    ``[batch, seq, 3H]`` -> Transpose -> ``[batch, 3H, seq]`` -> Split along the channel axis): the blocks' column
    ranges in the projection's output, with the values the Split makes (in the transposed layout)."""
    users = list(value.consumers())
    if len(users) != 1 or users[0].op_type != "Transpose":
        return None
    perm = list(users[0].attributes.get_ints("perm", []))
    splits = list(users[0].outputs[0].consumers())
    if len(perm) < 2 or len(splits) != 1 or splits[0].op_type != "Split":
        return None
    node = splits[0]
    if perm[node.attributes.get_int("axis", 0) % len(perm)] != len(perm) - 1:  # the split axis is the channels'
        return None
    bounds = _split_bounds(node, width)
    return None if bounds is None else [(bounds[i], bounds[i + 1], node.outputs[i]) for i in range(len(node.outputs))]


def _only_reader(value: ir.Value) -> ir.Node | None:
    users = [n for n, _ in through_casts_fwd(value)]
    return users[0] if len(users) == 1 else None


def _depthwise(conv: ir.Node, channels: int) -> bool:
    """Whether ``conv`` convolves each of ``channels`` channels with its own kernel (weight ``[channels, 1, k]``;
    ONNX's Conv with ``group`` = channels)."""
    w = const_array(conv.inputs[1]) if len(conv.inputs) > 1 else None
    if w is None or w.ndim != 3 or w.shape[:2] != (channels, 1):
        return False
    return conv.op_type != "Conv" or conv.attributes.get_int("group", 1) == channels


def match_conv_mixer(lin: Linear) -> tuple[ConvMixer, Linear] | None:
    """(the conv block, its out_proj) when ``lin`` is LFM2's in_proj: its output transposed and split into three
    blocks, two of them multiplied (``B·x``) into a depthwise causal convolution (:data:`CONV_OPS`, a Slice after
    it), whose output the third block gates (``C·``) before a Transpose and the out_proj weight MatMul; else None.
    ``lin`` becomes the packed ``in_proj`` with the blocks ``b``, ``c``, ``xs`` (``b`` is the lower block of the
    product, which is symmetric in the two). Roles are set; layers are the recognizer's to set."""
    blocks = channel_blocks(lin.output, lin.shape[1])
    if blocks is None or len(blocks) != 3:
        return None
    values = [v for _, _, v in blocks]
    index = {id(v): i for i, v in enumerate(values)}
    products = list({id(n): n for v in values for n in v.consumers() if n.op_type == "Mul" and len(n.inputs) == 2
                     and n.inputs[0] is not n.inputs[1] and all(id(x) in index for x in n.inputs)}.values())
    if len(products) != 1:
        return None
    pair = sorted(index[id(x)] for x in products[0].inputs)
    c = ({0, 1, 2} - set(pair)).pop()
    conv = _only_reader(products[0].outputs[0])
    width = blocks[c][1] - blocks[c][0]
    if conv is None or conv.op_type not in CONV_OPS or conv.inputs[0] is not products[0].outputs[0] \
            or not _depthwise(conv, width) or any(b - a != width for a, b, _ in blocks):
        return None
    gate = _only_reader(conv.outputs[0])
    if gate is not None and gate.op_type == "Slice":  # the plain export pads both ends and keeps the first positions
        gate = _only_reader(gate.outputs[0])
    if gate is None or gate.op_type != "Mul" or not any(x is values[c] for x in gate.inputs):
        return None
    value = gate.outputs[0]
    for _ in range(3):  # the Transpose back to [batch, seq, H]
        readers = linear_readers(value)
        if readers:
            break
        nxt = _only_reader(value)
        if nxt is None or nxt.op_type not in PASS_THROUGH:
            return None
        value = nxt.outputs[0]
    if len(readers) != 1:
        return None
    parts = [lin.block(a, b, role=f"in_proj.{name}", output=v)
             for (a, b, v), name in zip(blocks, ["b" if i == pair[0] else "c" if i == c else "x" for i in range(3)],
                                        strict=True)]
    lin.role, lin.blocks = "in_proj", tuple(parts)
    readers[0].role = "out_proj"
    return ConvMixer(lin, conv, parts[pair[0]], parts[c], parts[pair[1]]), readers[0]


def post_norm_writer(value: ir.Value) -> tuple[Linear, Norm] | None:
    """(the linear, the norm) when ``value`` is an RMSNorm of a weight linear's output (through a scalar
    multiplier): Gemma 2/3's norms after the attention and MLP blocks."""
    seen: set[int] = set()
    queue: deque[ir.Value] = deque([value])
    for _ in range(16):
        if not queue:
            return None
        v = queue.popleft()
        node = v.producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "MatMul":
            lin = match_linear(node)
            if lin is None:
                return None
            norm = match_norm(lin.output)
            if norm is not None and norm.output is _through_scalar_back(value):
                return lin, norm
            return None
        queue.extend(inp for inp in node.inputs if inp is not None and const_array(inp) is None)
    return None


def _through_scalar_back(value: ir.Value) -> ir.Value:
    node = value.producer()
    while node is not None and (node.op_type in ("Cast", "Identity") or scalar_factor(node) is not None):
        value = next(inp for inp in node.inputs if const_array(inp) is None)
        node = value.producer()
    return value


def first_mixing_op(start: ir.Value, limit: int = 64) -> tuple[ir.Node, int] | None:
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


def classify_qkv(readers: list[Linear], where: str) -> tuple[Linear, Linear, Linear]:
    """(q, k, v) among three linears (or column blocks), by where each output meets the others."""
    hits = []
    for lin in readers:
        hit = first_mixing_op(lin.output)
        if hit is None:
            raise UnsupportedGraphError(f"{where}: cannot follow '{lin.node.name}' to an attention MatMul")
        hits.append(hit)
    q = k = v = None
    for lin, (node, slot) in zip(readers, hits, strict=True):
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


def classify_gate_up(readers: list[Linear], where: str) -> tuple[Linear, Linear]:
    """(gate, up): gate feeds the activation; with an activation written out as elementwise ops (GELU-tanh), up
    is the one that the gating Mul reads directly, the Mul whose product a weight linear (down_proj) reads."""
    gate = [lin for lin in readers if any(n.op_type in ACTIVATIONS for n, _ in through_casts_fwd(lin.output))]
    if len(gate) != 1:
        ups = [lin for lin in readers if any(n.op_type == "Mul" and linear_readers(n.outputs[0])
                                             for n, _ in through_casts_fwd(lin.output))]
        gate = [lin for lin in readers if lin not in ups] if len(ups) == 1 else gate
    if len(gate) != 1:
        raise UnsupportedGraphError(f"{where}: cannot tell gate_proj from up_proj (expected one to feed an activation)")
    up = [lin for lin in readers if lin is not gate[0]]
    return gate[0], up[0]


def find_gather(model: ir.Model) -> ir.Node:
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


def residual_add(x: ir.Value, norm: Norm, where: str) -> tuple[ir.Node, ir.Value]:
    """The Add that consumes ``x`` next to its norm, and the Add's other input."""
    adds = [n for n in x.consumers() if n.op_type == "Add" and n.domain == ""]
    if len(adds) != 1:
        raise UnsupportedGraphError(f"{where}: expected one residual Add reading the residual stream, "
                                    f"found {len(adds)}")
    add = adds[0]
    other = add.inputs[1] if add.inputs[0] is x else add.inputs[0]
    return add, other
