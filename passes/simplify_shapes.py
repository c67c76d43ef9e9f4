"""Replace computed shape tensors by constants so that no shape arithmetic runs on the CPU.

ONNX Runtime's CUDA provider places the small int64 ops that compute a Reshape's or Expand's
target shape (Shape -> Slice -> Concat -> ...) on the CPU on purpose; a session with CPU fallback
disabled then refuses the graph. Exporters emit such chains for dynamic batch and sequence. This
pass evaluates each chain symbolically (entries are integers or symbolic dims like 'batch') and,
where the result can be said with Reshape's own conventions (0 = copy the input's dim, -1 = infer)
or Expand's broadcasting (1), replaces it by an initializer. A Reshape -> Transpose(0,2,1) ->
Reshape chain that only swaps the last two axes of a tensor becomes one Transpose. Everything else
is left untouched, so the pass is always safe; the unused chains are removed.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxqf.graph import edit
from onnxqf.graph.structure import const_array
from onnxqf.passes.base import RewritePass

__all__ = ["reshape_constant", "expand_constant", "SimplifyShapesPass"]

logger = logging.getLogger("onnxqf")

Sym = list  # list of int | str

_INT64_MAX = np.iinfo(np.int64).max


def _dims(value: ir.Value) -> list | None:
    if value.shape is None:
        return None
    out = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        elif getattr(d, "value", None) is not None:
            out.append(str(d.value))
        else:
            return None
    return out


class _Evaluator:
    def __init__(self):
        self.memo: dict[int, Sym | None] = {}

    def __call__(self, value: ir.Value | None) -> Sym | None:
        if value is None:
            return None
        key = id(value)
        if key not in self.memo:
            self.memo[key] = self._eval(value)
        return self.memo[key]

    def _eval(self, value: ir.Value) -> Sym | None:
        arr = const_array(value)
        if arr is not None:
            if not np.issubdtype(np.asarray(arr).dtype, np.integer):
                return None
            return [int(v) for v in np.asarray(arr).reshape(-1)]
        node = value.producer()
        if node is None:
            return None
        op = node.op_type
        if op == "Shape":
            dims = _dims(node.inputs[0])
            if dims is None:
                return None
            start = node.attributes.get_int("start", 0)
            end = node.attributes.get_int("end", len(dims))
            return dims[start:end]
        if op in ("Identity", "Cast", "Squeeze", "Unsqueeze"):
            return self(node.inputs[0])
        if op == "Reshape":
            shape = const_array(node.inputs[1])
            return self(node.inputs[0]) if shape is not None and list(shape.reshape(-1)) == [-1] else None
        if op == "Concat":
            parts = [self(v) for v in node.inputs]
            return None if any(p is None for p in parts) else [e for p in parts for e in p]
        if op == "Slice":
            data = self(node.inputs[0])
            params = [const_array(v) if v is not None else None
                      for v in list(node.inputs[1:]) + [None] * (5 - len(node.inputs))]
            starts, ends, axes, steps = params[:4]
            if data is None or starts is None or ends is None:
                return None
            if axes is not None and list(axes.reshape(-1)) not in ([0], [-1]):
                return None
            step = 1 if steps is None else int(steps.reshape(-1)[0])
            s, e = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
            n = len(data)
            s = max(-n - 1, min(s, n)) if abs(s) < _INT64_MAX else (n if s > 0 else 0)
            e = max(-n - 1, min(e, n)) if abs(e) < _INT64_MAX - 1 else (n if e > 0 else (-n - 1 if step < 0 else 0))
            return data[slice(s, e, step)] if e != -n - 1 else data[slice(s, None, step)]
        if op == "Gather":
            data, idx = self(node.inputs[0]), const_array(node.inputs[1])
            if data is None or idx is None or node.attributes.get_int("axis", 0) != 0:
                return None
            return [data[int(i)] for i in idx.reshape(-1)]
        if op in ("Add", "Sub", "Mul"):
            a, b = self(node.inputs[0]), self(node.inputs[1])
            if a is None or b is None:
                return None
            if op == "Add" and len(a) == len(b) == 1 and isinstance(a[0], int) != isinstance(b[0], int):
                sym, k = (a[0], b[0]) if isinstance(b[0], int) else (b[0], a[0])
                return [sym if k == 0 else f"{sym} + {k}" if k > 0 else f"{sym} - {-k}"]  # exporters' spelling
            if not all(isinstance(x, int) for x in a + b):
                return None
            f = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op]
            return [int(v) for v in np.asarray(f(np.array(a), np.array(b))).reshape(-1)]
        return None


def reshape_constant(target: Sym, x_dims: list | None) -> list[int] | None:
    """Reshape's shape input as constants (0 = copy, -1 = infer), or None."""
    out, unknown = [], []
    for i, e in enumerate(target):
        if isinstance(e, int):
            out.append(e)
        elif x_dims is not None and i < len(x_dims) and x_dims[i] == e:
            out.append(0)
        else:
            out.append(None)
            unknown.append(i)
    if len(unknown) > 1 or (unknown and -1 in out):
        return None
    if unknown:
        out[unknown[0]] = -1
    if 0 in [e for e in target if isinstance(e, int)]:
        return None  # a literal 0 in the target would change meaning
    return out


def expand_constant(target: Sym, x_dims: list | None) -> list[int] | None:
    """Expand's shape input with symbolic dims replaced by 1 where x already has that dim."""
    if x_dims is None:
        return None
    out = []
    offset = len(target) - len(x_dims)
    for i, e in enumerate(target):
        if isinstance(e, int):
            out.append(e)
            continue
        j = i - offset
        if 0 <= j < len(x_dims) and x_dims[j] == e:
            out.append(1)
        else:
            return None
    return out


def _broadcast(x_dims: list | None, target: Sym) -> list | None:
    """Numpy broadcasting of two symbolic shapes (None when it cannot be decided)."""
    if x_dims is None:
        return None
    n = max(len(x_dims), len(target))
    a = [1] * (n - len(x_dims)) + list(x_dims)
    b = [1] * (n - len(target)) + list(target)
    out = []
    for p, q in zip(a, b):
        if p == q or q == 1:
            out.append(p)
        elif p == 1:
            out.append(q)
        else:
            return None
    return out


class SimplifyShapesPass(RewritePass):
    """Computed Reshape/Expand shapes become constants; Reshape-Transpose-Reshape one Transpose; Range a CumSum.

    Rules: a shape is replaced only when the symbolic evaluator proves the constant (with 0 = copy
    and -1 = infer) gives the same result for every batch and sequence length. Modified: when at
    least one shape was replaced (the count is logged).
    """

    def apply(self, model: ir.Model) -> bool:
        self.replaced = 0
        graph = model.graph
        ev = _Evaluator()
        for node in list(graph):
            if node.op_type == "Reshape" and node.domain == "" and const_array(node.inputs[1]) is None:
                if self._swap_last_two(graph, node, ev):
                    continue
                target = ev(node.inputs[1])
                new = None if target is None else reshape_constant(target, _dims(node.inputs[0]))
                if new is not None:
                    # the target has no literal 0 (checked), so 0 may mean "copy this dim"
                    node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
                    self._set_shape(graph, node, new, "reshape")
            elif node.op_type == "Expand" and node.domain == "" and const_array(node.inputs[1]) is None:
                target = ev(node.inputs[1])
                new = None if target is None else expand_constant(target, _dims(node.inputs[0]))
                if new is not None:
                    self._set_shape(graph, node, new, "expand")
                elif target is not None:
                    self._expand_to_input_shape(graph, node, target)
            elif node.op_type == "Slice" and node.domain == "":
                self._slice_to_end(graph, node, ev)
            elif node.op_type == "Range" and node.domain == "":
                self._range_as_cumsum(graph, node, ev)
        common_passes.RemoveUnusedNodesPass()(model)
        if self.replaced:
            logger.info("replaced %d computed shapes by constants", self.replaced)
        return self.replaced > 0

    def _expand_to_input_shape(self, graph, node, target) -> None:
        """Expand to a shape that broadcasts like a graph input's: use Shape(input) instead."""
        x_dims = _dims(node.inputs[0])
        result = _broadcast(x_dims, target)
        if result is None:
            return
        for inp in graph.inputs:
            if _dims(inp) == result:
                shape = ir.node("Shape", [inp], name=f"{node.name}/input_shape")
                graph.insert_before(node, shape)
                node.replace_input_with(1, shape.outputs[0])
                self.replaced += 1
                return

    def _slice_to_end(self, graph, node, ev) -> None:
        """ends = the sliced axis' own length (computed) -> INT64_MAX."""
        if len(node.inputs) < 4 or const_array(node.inputs[2]) is not None:
            return
        axes = const_array(node.inputs[3])
        steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.ones(1)
        if steps is None or steps.size != 1 or int(steps.reshape(-1)[0]) != 1:
            return
        ends = ev(node.inputs[2])
        dims = _dims(node.inputs[0])
        if axes is None or ends is None or dims is None or axes.size != 1 or len(ends) != 1:
            return
        if dims[int(axes.reshape(-1)[0])] == ends[0]:
            value = edit.add_initializer(graph, "slice_end", np.array([_INT64_MAX], np.int64))
            node.replace_input_with(2, value)
            self.replaced += 1

    def _range_as_cumsum(self, graph, node, ev) -> None:
        """Range(0, n, 1) with n a dim of some tensor -> CumSum(ConstantOfShape(Shape(t)[k], 1)) - 1."""
        start, delta = const_array(node.inputs[0]), const_array(node.inputs[2])
        limit = node.inputs[1]
        if start is None or delta is None or int(start) != 0 or int(delta) != 1 or limit.producer() is None:
            return
        squeeze = limit.producer()
        if squeeze.op_type != "Squeeze" or squeeze.inputs[0].producer() is None:
            return
        shape = squeeze.inputs[0]
        if shape.producer().op_type != "Shape" or ev(shape) is None or len(ev(shape)) != 1:
            return
        if node.outputs[0].dtype not in (None, ir.DataType.INT64):
            return
        one = ir.tensor(np.array([1], np.int64))
        ones = ir.node("ConstantOfShape", [shape], {"value": one}, name=f"{node.name}/ones")
        axis = edit.add_initializer(graph, "range_axis", np.array(0, np.int64))
        csum = ir.node("CumSum", [ones.outputs[0], axis], name=f"{node.name}/cumsum")
        minus = edit.add_initializer(graph, "range_one", np.array(1, np.int64))
        sub = ir.node("Sub", [csum.outputs[0], minus], name=f"{node.name}/minus_one")
        graph.insert_before(node, [ones, csum, sub])
        out = sub.outputs[0]
        out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
        node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        self.replaced += 1

    def _set_shape(self, graph, node, shape, base) -> None:
        value = edit.add_initializer(graph, f"{base}_shape", np.array(shape, np.int64))
        node.replace_input_with(1, value)
        self.replaced += 1

    def _swap_last_two(self, graph, first: ir.Node, ev: _Evaluator) -> bool:
        """Reshape(x -> [-1, x[-2], x[-1]]) -> Transpose(0,2,1) -> Reshape(-> x[:-2] + [x[-1], x[-2]])."""
        users = list(first.outputs[0].consumers())
        if (len(users) != 1 or users[0].op_type != "Transpose"
                or list(users[0].attributes.get_ints("perm", [])) != [0, 2, 1]):
            return False
        transpose = users[0]
        users = list(transpose.outputs[0].consumers())
        if len(users) != 1 or users[0].op_type != "Reshape":
            return False
        second = users[0]
        x = first.inputs[0]
        dims = _dims(x)
        a, b = ev(first.inputs[1]), ev(second.inputs[1])
        if dims is None or len(dims) < 3 or a is None or b is None:
            return False
        if a != [-1, dims[-2], dims[-1]] or b != dims[:-2] + [dims[-1], dims[-2]]:
            return False
        perm = list(range(len(dims) - 2)) + [len(dims) - 1, len(dims) - 2]
        new = ir.node("Transpose", [x], {"perm": perm}, name=f"{second.name}/swap_last_two")
        graph.insert_before(second, new)
        out = new.outputs[0]
        out.shape, out.type = second.outputs[0].shape, second.outputs[0].type
        second.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        self.replaced += 1
        return True
