"""Initializers: write one in place (keeping its dtype and name) or add a new one with a unique name.

The lowest layer of graph editing, below the records of :mod:`onnxqf.graph.structure` (whose accessors
write through it) and :mod:`onnxqf.graph.edit`.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir

from onnxqf.graph import store

__all__ = ["add_initializer", "unique_name", "write"]

_counter = itertools.count()


def unique_name(graph: ir.Graph, base: str) -> str:
    while True:
        name = f"{base}_{next(_counter)}"
        if name not in graph.initializers:
            return name


def write(value: ir.Value, array: np.ndarray) -> None:
    """Replace an initializer's data, keeping its dtype and name."""
    old = value.const_value
    dtype = old.dtype
    arr = np.asarray(array).astype(dtype.numpy(), copy=False)
    assert tuple(arr.shape) == tuple(old.shape.numpy()), (arr.shape, old.shape)
    value.const_value = store.make_tensor(arr, dtype, value.name)  # on disk while a TensorStore is active
    store.replaced(old)


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """A new initializer named ``base_N`` (the one way the passes create constants)."""
    name = unique_name(graph, base)
    array = np.asarray(array)
    dtype = dtype or ir.DataType.from_numpy(array.dtype)
    tensor = store.make_tensor(array, dtype, name)
    value = ir.Value(name=name, shape=ir.Shape(list(tensor.shape)), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value
