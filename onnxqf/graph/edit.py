"""Editing the graph: initializers, private weights, and online rotations inserted as nodes (onnx-ir).

Weights are read as float64 (:meth:`onnxqf.graph.structure.Linear.matrix`) and written back in their
original dtype here, so every fold happens in float64 whatever the model's precision.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from onnxqf.errors import UnsupportedGraphError
from onnxqf.graph import store
from onnxqf.graph.structure import ONLINE_ROTATION, Linear, Structure, const_array, read
from onnxqf.graph.tensors import add_initializer, unique_name, write  # noqa: F401  (edit.write etc.)
from onnxqf.maths.hadamard import ONLINE_GROUP_MAX, online_groups

__all__ = ["weight_layout", "set_weight_matrix", "SLICE_BYTES", "update_matrix", "update_slices", "set_bias_vector",
           "make_private", "make_bias_private", "private_embedding", "prepare_linears", "OnlineStyle",
           "rotate_value_online", "ONLINE_GROUPS", "OnlineRotation", "online_rotation_of", "add_initializer",
           "unique_name", "write"]


def weight_layout(lin: Linear, B: np.ndarray, stored: np.ndarray | None = None) -> np.ndarray:
    """The initializer array that makes ``lin.matrix()`` equal ``B`` ([in, out]): transposed when the
    MatMul reads the weight through a Transpose, and for one column block of a shared (packed q/k/v)
    weight, ``stored`` (default: a copy of the initializer's data) with that block replaced.

    A block is written into a copy of ``stored`` in ``stored``'s own dtype (the initializer's, by default):
    the other blocks keep their values, and the block is rounded as :func:`write` would round it, without a
    float64 copy of the whole packed weight."""
    if lin.cols is not None:
        full = store.to_numpy(lin.weight.const_value, copy=True) if stored is None else np.array(stored)
        view = full.T if lin.transpose is not None else full
        view[:, lin.cols[0]:lin.cols[1]] = B
        return full
    return B.T if lin.transpose is not None else B


def set_weight_matrix(lin: Linear, B: np.ndarray) -> None:
    write(lin.weight, weight_layout(lin, B))


#: float64 working copies of a weight above this size are processed in slices (onnxqf.graph.store)
SLICE_BYTES = 128 << 20


def update_matrix(lin: Linear, fn, by: str) -> None:
    """``B <- fn(B)`` for a map that acts on each column (``by="columns"``: ``fn(B) = M B``) or each row
    (``by="rows"``: ``fn(B) = B M``) of ``B [in, out]`` on its own.

    A large weight is processed in slices of columns or rows, each read as float64 and written back
    in the weight's dtype, so memory stays at one slice in float64 plus the weight in its own dtype
    (an lm_head of 32000 x 4096: 128 MB slices instead of two 1 GB float64 copies).
    """
    axis = {"columns": 1, "rows": 0}[by]
    K, N = lin.shape
    if lin.cols is not None or 8 * K * N <= SLICE_BYTES:
        set_weight_matrix(lin, fn(lin.matrix()))
        return
    update_slices(lin.weight, fn, axis, transposed=lin.transpose is not None)


def update_slices(value: ir.Value, fn, axis: int, transposed: bool = False) -> None:
    """``A <- fn(A)`` for an initializer's 2-D array ``A`` (``transposed``: of its transpose) and a map that
    treats each slice along ``axis`` (1: columns, 0: rows) on its own; see :func:`update_matrix`."""
    stored = store.to_numpy(value.const_value, copy=True)
    A = stored.T if transposed else stored
    length = A.shape[axis]
    other = A.shape[1 - axis]
    step = max(1, SLICE_BYTES // (8 * max(1, other)))
    for a in range(0, length, step):
        sl = (slice(None), slice(a, a + step)) if axis == 1 else (slice(a, a + step), slice(None))
        A[sl] = fn(np.asarray(A[sl], np.float64))
    write(value, stored)


def set_bias_vector(lin: Linear, b: np.ndarray) -> None:
    if lin.cols is not None:
        full = np.asarray(const_array(lin.bias), np.float64).copy()
        full[lin.cols[0]:lin.cols[1]] = b
        b = full
    write(lin.bias, b)


def make_private(graph: ir.Graph, lin: Linear) -> None:
    """Give ``lin`` its own [in, out] weight initializer (untie, drop the Transpose node).

    Afterwards the weight can be changed without touching anything else that read the old one
    (a tied embedding table, another linear).
    """
    shared = len(list(lin.weight.uses())) > 1 or lin.transpose is not None
    if not shared and lin.weight.is_initializer():
        return
    if lin.cols is not None:
        raise ValueError(f"{lin.name}: a column block of a shared weight cannot be made private")
    B = lin.matrix()
    new = add_initializer(graph, (lin.weight.name or "weight") + ".untied", B, lin.weight.const_value.dtype)
    old_transpose = lin.transpose
    lin.node.replace_input_with(1, new)
    for rec in (lin, *lin.blocks):  # a packed weight's blocks read the new initializer too
        rec.weight, rec.transpose = new, None
    if old_transpose is not None and not list(old_transpose.outputs[0].uses()):
        graph.remove(old_transpose, safe=True)


def make_bias_private(graph: ir.Graph, lin: Linear) -> None:
    """Give ``lin`` its own bias initializer (a Constant node or a shared one is copied)."""
    if lin.bias is None or (lin.bias.is_initializer() and len(list(lin.bias.uses())) == 1):
        return
    dtype = lin.bias.dtype or lin.weight.const_value.dtype
    new = add_initializer(graph, (lin.bias.name or "bias") + ".private", np.asarray(const_array(lin.bias), np.float64),
                          dtype)
    lin.bias_node.replace_input_with(list(lin.bias_node.inputs).index(lin.bias), new)
    for rec in (lin, *lin.blocks):
        rec.bias = new


def private_embedding(graph: ir.Graph, structure: Structure) -> None:
    """Give the embedding Gather its own [vocab, hidden] table when it reads Transpose(W) of a
    [hidden, vocab] initializer (the model builder's tied lm_head), and drop the Transpose.

    Afterwards ``structure.embedding_table`` is an initializer that the residual rotation can
    rewrite without touching lm_head.
    """
    t = structure.embedding_transpose()
    if t is None:
        return
    perm = t.attributes.get_ints("perm", [1, 0])
    if list(perm) != [1, 0] or not t.inputs[0].is_initializer():
        raise UnsupportedGraphError(f"embedding Transpose '{t.name}' is not a 2-D transpose of an initializer")
    source = t.inputs[0]
    new = add_initializer(graph, (source.name or "embedding") + ".embedding", read(source).T, source.const_value.dtype)
    structure.embedding.replace_input_with(0, new)
    if not list(t.outputs[0].uses()):
        graph.remove(t, safe=True)


def prepare_linears(graph: ir.Graph, structure: Structure) -> None:
    """Make every weight and bias of the structure private, so folds never leak across users.

    A packed q/k/v weight is one MatMul's own initializer already: it is handled once, as
    ``Layer.qkv``, never copied per column block. A tied embedding read through a Transpose gets
    its own table (:func:`private_embedding`).
    """
    private_embedding(graph, structure)
    for lin in structure.linears():
        make_private(graph, lin)
        make_bias_private(graph, lin)


@dataclasses.dataclass(frozen=True)
class OnlineStyle:
    """How :func:`rotate_value_online` emits a rotation (a property of the target: what runs fastest on it).

    Attributes:
        max_group: the largest merged Kronecker factor (fewer, larger factors: fewer nodes, more multiply-adds).
        batched: each non-last factor as a left-multiplication broadcast over the other axes (a batched GEMM, no
            Transpose) instead of a GEMM on the last axis followed by a Transpose that cycles the axes.
    """

    max_group: int = ONLINE_GROUP_MAX
    batched: bool = False

    def describe(self) -> str:
        return f"{'batched' if self.batched else 'cycle'}:{self.max_group}"

    def kwargs(self) -> dict:
        """The keywords of :func:`rotate_value_online` for this style."""
        return {"max_group": self.max_group, "batched": self.batched}

    @classmethod
    def parse(cls, text: str) -> "OnlineStyle":
        """``cycle`` | ``batched``, optionally ``:MAX_GROUP`` (e.g. ``batched:64``)."""
        kind, _, group = text.partition(":")
        if kind not in ("cycle", "batched") or (group and not group.isdigit()) or (group and int(group) < 2):
            raise ValueError(f"an online rotation style is cycle or batched, optionally :MAX_GROUP >= 2, not '{text}'")
        return cls(int(group) if group else ONLINE_GROUP_MAX, kind == "batched")


ONLINE_GROUPS = "onnxqf.online_groups"


@dataclasses.dataclass
class OnlineRotation:
    """An online rotation block of the graph (:func:`rotate_value_online`), read back.

    Attributes:
        nodes: the block's nodes.
        input: the value it rotates.
        output: the rotated value.
        groups: ``[(size, matrix or None)]`` in Kronecker order (None: identity), float64.
    """

    nodes: list[ir.Node]
    input: ir.Value
    output: ir.Value
    groups: list[tuple[int, np.ndarray | None]]

    def private(self) -> bool:
        """Only the block's own nodes read its intermediate values (the block can be replaced as a whole)."""
        inside = set(map(id, self.nodes))
        return all(id(c) in inside for node in self.nodes for out in node.outputs if out is not self.output
                   for c in out.consumers())

    def remove(self, graph: ir.Graph) -> None:
        """Delete the block's nodes and the initializers only they read (its output must have no readers left)."""
        inits = {inp.name: inp for node in self.nodes for inp in node.inputs
                 if inp is not None and inp.name in graph.initializers}
        graph.remove(list(reversed(self.nodes)), safe=True)
        for name, value in inits.items():
            if not list(value.consumers()):
                del graph.initializers[name]


def online_rotation_of(graph: ir.Graph, value: ir.Value) -> OnlineRotation | None:
    """The online rotation block whose output is ``value``, or None (not one, or written before the groups were
    recorded)."""
    node = value.producer()
    if node is None or ONLINE_GROUPS not in node.metadata_props or ONLINE_ROTATION not in node.metadata_props:
        return None
    name = node.metadata_props[ONLINE_ROTATION]
    nodes = [n for n in graph if n.metadata_props.get(ONLINE_ROTATION) == name]
    shapes = [n for n in nodes if n.op_type == "Shape"]
    if len(shapes) != 1 or shapes[0].inputs[0] is None:
        return None
    groups: list[tuple[int, np.ndarray | None]] = []
    for size, init, transposed in json.loads(node.metadata_props[ONLINE_GROUPS]):
        if init is None:
            groups.append((int(size), None))
            continue
        if init not in graph.initializers:
            return None
        f = np.asarray(read(graph.initializers[init]), np.float64)
        groups.append((int(size), np.ascontiguousarray(f.T) if transposed else f))
    return OnlineRotation(nodes, shapes[0].inputs[0], value, groups)


def rotate_value_online(
    graph: ir.Graph,
    value: ir.Value,
    factors: list[np.ndarray | None],
    dtype: ir.DataType,
    name: str,
    sizes: list[int] | None = None,
    max_group: int = ONLINE_GROUP_MAX,
    batched: bool = False,
) -> list[ir.Node]:
    """Insert ``x <- x @ kron(F_1, ..., F_r)`` on ``value``; every reader of ``value`` reads the result.

    ``factors[i]`` is an f_i x f_i matrix, or None for an identity factor (then ``sizes`` gives
    its size). The factors are first regrouped by :func:`onnxqf.maths.hadamard.online_groups` (typically
    two groups, e.g. 4096 = 256 x 16). Each MatMul has a 2-D weight on its right, so ONNX Runtime
    runs it as one GEMM over all rows (a 2-D weight on the left of a 3-D input becomes a pointer-array
    batched GEMM on CUDA, measured 15x slower in docs/benchmarks.md). With groups g_1..g_k, the input
    is viewed as [rows, g_1, ..., g_k]; k times, the last axis is multiplied by its group's matrix
    (skipped for an identity group) and moved to the front with a Transpose, which brings the axes
    back to their order after k steps. A single dense group, or identities followed by one dense
    group, needs no Transpose. Cost: n * sum(g_i) multiply-adds per row instead of n^2.
    The nodes go right after ``value``'s producer. The last node (the restore Reshape) records the groups in
    Kronecker order (metadata ``ONLINE_GROUPS``: size, factor initializer or null, stored transposed), so that a
    lowering can compute the rotation another way (:func:`online_rotation_of`).
    """
    groups = online_groups(factors, sizes, max_group)
    n = int(np.prod([g for g, _ in groups]))
    readers = list(value.consumers())
    tape = ir_tape.Tape(graph)
    shape = tape.op("Shape", [value], name=f"{name}/shape")
    y = value
    consts: dict[tuple, ir.Value] = {}

    def const_shape(*dims: int) -> ir.Value:
        if dims not in consts:
            consts[dims] = add_initializer(graph, f"{name}/shape", np.array(dims, np.int64))
        return consts[dims]

    record: list[list] = [[size, None, False] for size, _ in groups]

    def matmul(y: ir.Value, step: int, size: int, f: np.ndarray, group: int) -> ir.Value:
        y = tape.op("Reshape", [y, const_shape(-1, size)], name=f"{name}/rows{step}")
        w = add_initializer(graph, f"{name}/factor{step}", f, dtype)
        record[group][1] = w.name
        return tape.op("MatMul", [y, w], name=f"{name}/matmul{step}")

    if all(f is None for _, f in groups[:-1]):
        size, f = groups[-1]
        if f is not None:
            y = matmul(y, 0, size, f, len(groups) - 1)
    elif batched:
        for step, (size, f) in enumerate(groups):
            if f is None:
                continue
            after = int(np.prod([g for g, _ in groups[step + 1:]], dtype=np.int64))
            if after == 1:
                y = matmul(y, step, size, f, step)
                continue
            y = tape.op("Reshape", [y, const_shape(-1, size, after)], name=f"{name}/view{step}")
            w = add_initializer(graph, f"{name}/factor{step}_t", np.ascontiguousarray(np.asarray(f).T), dtype)
            record[step][1:] = [w.name, True]
            y = tape.op("MatMul", [w, y], name=f"{name}/matmul{step}")
    else:
        order = list(range(len(groups)))
        for step in range(len(groups)):
            size, f = groups[order[-1]]
            if f is not None:
                y = matmul(y, step, size, f, order[-1])
            y = tape.op("Reshape", [y, const_shape(-1, n // size, size)], name=f"{name}/view{step}")
            y = tape.op("Transpose", [y], attributes={"perm": [0, 2, 1]}, name=f"{name}/cycle{step}")
            order = order[-1:] + order[:-1]
    y = tape.op("Reshape", [y, shape], name=f"{name}/restore")
    y.shape, y.type = value.shape, value.type
    for node in tape.nodes:  # so that recognition sees through the block (structure.ONLINE_ROTATION)
        node.metadata_props[ONLINE_ROTATION] = name
    tape.nodes[-1].metadata_props[ONLINE_GROUPS] = json.dumps(record)
    producer = value.producer()
    if producer is None:
        graph.insert_before(readers[0], tape.nodes)
    else:
        graph.insert_after(producer, tape.nodes)
    for node in readers:
        for j, inp in enumerate(node.inputs):
            if inp is value:
                node.replace_input_with(j, y)
    return list(tape.nodes)
