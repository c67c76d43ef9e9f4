"""Editing the graph: initializers, private weights, and online rotations inserted as nodes (onnx-ir).

Weights are read as float64 (:meth:`onnxqf.structure.Linear.matrix`) and written back in their
original dtype here, so every fold happens in float64 whatever the model's precision.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from onnxqf.structure import ONLINE_ROTATION, Linear, Norm, Structure, const_array, read

_counter = itertools.count()


def unique_name(graph: ir.Graph, base: str) -> str:
    while True:
        name = f"{base}_{next(_counter)}"
        if name not in graph.initializers:
            return name


def write(value: ir.Value, array: np.ndarray) -> None:
    """Replace an initializer's data, keeping its dtype and name."""
    dtype = value.const_value.dtype
    arr = np.asarray(array).astype(dtype.numpy(), copy=False)
    assert tuple(arr.shape) == tuple(value.const_value.shape.numpy()), (arr.shape, value.const_value.shape)
    value.const_value = ir.tensor(arr, dtype=dtype, name=value.name)


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """A new initializer named ``base_N`` (the one way the passes create constants)."""
    name = unique_name(graph, base)
    if dtype is not None:
        array = np.asarray(array).astype(dtype.numpy())
    tensor = ir.tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(name=name, shape=ir.Shape(list(tensor.shape)), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def set_weight_matrix(lin: Linear, B: np.ndarray) -> None:
    if lin.cols is not None:  # one column block of a shared (packed q/k/v) weight: the rest is kept
        full = read(lin.weight)
        full = full.T if lin.transpose is not None else full
        full[:, lin.cols[0]:lin.cols[1]] = B
        B = full
    write(lin.weight, B.T if lin.transpose is not None else B)


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
    lin.weight, lin.transpose = new, None
    if old_transpose is not None and not list(old_transpose.outputs[0].uses()):
        graph.remove(old_transpose, safe=True)


def make_bias_private(graph: ir.Graph, lin: Linear) -> None:
    """Give ``lin`` its own bias initializer (a Constant node or a shared one is copied)."""
    if lin.bias is None or (lin.bias.is_initializer() and len(list(lin.bias.uses())) == 1):
        return
    dtype = lin.bias.dtype or lin.weight.const_value.dtype
    new = add_initializer(graph, (lin.bias.name or "bias") + ".private", np.asarray(const_array(lin.bias), np.float64), dtype)
    lin.bias_node.replace_input_with(list(lin.bias_node.inputs).index(lin.bias), new)
    lin.bias = new


def private_gamma(graph: ir.Graph, norm: Norm) -> None:
    """Give the norm its own gamma initializer (exporters sometimes share one constant)."""
    if len(list(norm.gamma.uses())) == 1:
        return
    new = add_initializer(graph, (norm.gamma.name or "gamma") + ".private", read(norm.gamma), norm.gamma.const_value.dtype)
    slot = list(norm.gamma_node.inputs).index(norm.gamma)
    norm.gamma_node.replace_input_with(slot, new)
    norm.gamma = new


def prepare_linears(graph: ir.Graph, structure: Structure) -> None:
    """Make every weight and bias of the structure private, so folds never leak across users."""
    for lin in structure.linears():
        make_private(graph, lin)
        make_bias_private(graph, lin)


def rotate_value_online(
    graph: ir.Graph,
    value: ir.Value,
    factors: list[np.ndarray | None],
    dtype: ir.DataType,
    name: str,
    sizes: list[int] | None = None,
) -> list[ir.Node]:
    """Insert ``x <- x @ kron(F_1, ..., F_r)`` on ``value``; every reader of ``value`` reads the result.

    ``factors[i]`` is an f_i x f_i matrix, or None for an identity factor (then ``sizes`` gives
    its size). Each non-identity factor costs one Reshape and one small MatMul: the input is viewed
    as [-1, f_i, f_after] and multiplied by F_i^T from the left (or as [-1, f_r] times F_r for the
    last factor), so the whole rotation costs n * sum(f_i) multiply-adds instead of n^2. A final
    Reshape restores the input's shape. The nodes go right after ``value``'s producer.
    """
    sizes = sizes or [f.shape[0] for f in factors]
    readers = list(value.consumers())
    tape = ir_tape.Tape(graph)
    shape = tape.op("Shape", [value], name=f"{name}/shape")
    y = value
    for i, (f, size) in enumerate(zip(factors, sizes)):
        if f is None:
            continue
        after = int(np.prod(sizes[i + 1 :])) if i + 1 < len(sizes) else 1
        if after == 1:
            view = add_initializer(graph, f"{name}/shape{i}", np.array([-1, size], np.int64))
            y = tape.op("Reshape", [y, view], name=f"{name}/reshape{i}")
            w = add_initializer(graph, f"{name}/factor{i}", np.asarray(f), dtype)
            y = tape.op("MatMul", [y, w], name=f"{name}/matmul{i}")
        else:
            view = add_initializer(graph, f"{name}/shape{i}", np.array([-1, size, after], np.int64))
            y = tape.op("Reshape", [y, view], name=f"{name}/reshape{i}")
            w = add_initializer(graph, f"{name}/factor{i}T", np.asarray(f).T, dtype)
            y = tape.op("MatMul", [w, y], name=f"{name}/matmul{i}")
    y = tape.op("Reshape", [y, shape], name=f"{name}/restore")
    y.shape, y.type = value.shape, value.type
    for node in tape.nodes:  # so that recognition sees through the block (structure.ONLINE_ROTATION)
        node.metadata_props[ONLINE_ROTATION] = name
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
