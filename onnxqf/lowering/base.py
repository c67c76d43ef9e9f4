"""What every lowering shares: the group it lowers, the registry, and the node plumbing.

A *lowering* is one way of turning quantized linears into ONNX nodes: it owns its weight rounding (the
codes and scales it needs), the nodes it emits, and the placement rules of those nodes (which execution
providers run them well). Lowerings are registered by name; a :class:`onnxqf.runtime.target.Target` says
which one each format gets on its provider, and ``onnxqf rewrite --lowering NAME`` picks any other.

Rules every lowering keeps:

- ``emit`` replaces the group's MatMuls by nodes computing the same products up to the format's
  rounding; outputs keep the old values' shapes and types, and a graph output keeps its name (logits).
- the nodes go in before the group's first MatMul; nodes that only read the shared activation go right
  after its producer, so that every reader sees them.
- ``round`` is deterministic for a given weight and Hessian, so that :meth:`rounded` (what sequential GPTQ
  runs later layers on) is exactly what ``emit`` writes.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxqf.errors import OnnxqfError
from onnxqf.graph.structure import Linear

__all__ = ["LinearGroup", "Lowering", "REGISTRY", "register", "get", "names", "parse_spec", "insert_after_producer",
           "replace_outputs", "take_over", "FLOAT32"]

FLOAT32 = ir.DataType.FLOAT


@dataclasses.dataclass
class LinearGroup:
    """Linears that read one activation (q/k/v, gate/up, or a single linear), in graph order.

    Attributes:
        linears: the group's linears.
        first: the group's first MatMul node in graph order (new nodes go before it).
        is_head: the group is lm_head.
    """

    linears: list[Linear]
    first: ir.Node
    is_head: bool = False

    @property
    def x(self) -> ir.Value:
        return self.linears[0].input

    @property
    def dtype(self) -> ir.DataType:
        return self.x.dtype or self.linears[0].weight.const_value.dtype

    @property
    def base(self) -> str:
        """Prefix of the names of the nodes and initializers emitted for the group."""
        head = self.linears[0]
        base = head.name or head.node.name
        if len(self.linears) > 1:
            base = f"{base}+{'+'.join(lin.role for lin in self.linears[1:])}"
        return base


class Lowering:
    """One way of lowering a quantized linear group to nodes. Subclasses set the class attributes and
    implement :meth:`round` and :meth:`emit`; :meth:`node_issue` states the placement rules of their nodes.

    Attributes:
        name: the registry key (``--lowering NAME``).
        format: the format it lowers: ``int8`` (W8A8), ``int4`` or ``int8w`` (weight-only).
        providers: execution providers (``cpu``, ``cuda``) on which every node it emits has a fast kernel.
        summary: one line for ``--help`` and the docs.
    """

    name: ClassVar[str]
    format: ClassVar[str]
    providers: ClassVar[tuple[str, ...]]
    summary: ClassVar[str]
    #: the ONNX domains its nodes use, with their versions (added to the graph's opset imports; for the default
    #: domain "" the opset the graph is raised to at least)
    domains: ClassVar[dict[str, int]] = {}

    def prepare(self, H):
        """``H`` (an array, or a function that fetches a copy) made ready for :meth:`round` (GPTQ)."""
        raise NotImplementedError

    def round(self, weight: np.ndarray, prepared, group: LinearGroup):
        """Quantize one weight chunk ``[in, cols]`` (float64) of a linear of ``group``; ``prepared``: from
        :meth:`prepare`, or None for round-to-nearest."""
        raise NotImplementedError

    def concat(self, parts: list):
        """Join the rounded column chunks of one linear."""
        raise NotImplementedError

    def dequantize(self, rounded) -> np.ndarray:
        """The float64 ``[in, out]`` weights that the emitted nodes compute with."""
        raise NotImplementedError

    def emit(self, graph: ir.Graph, group: LinearGroup, weights: list) -> None:
        """Replace the group's MatMuls by this lowering's nodes (``weights``: one rounded entry per linear)."""
        raise NotImplementedError

    def node_issue(self, node: ir.Node, provider: str) -> str | None:
        """Why ``node`` (one this lowering emits) runs badly or not at all on ``provider``; None if it runs well."""
        return None

    def describe(self) -> str:
        return self.name


REGISTRY: dict[str, type[Lowering]] = {}


def register(cls: type[Lowering]) -> type[Lowering]:
    """Class decorator: make a lowering available by its ``name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two lowerings named {cls.name}")
    REGISTRY[cls.name] = cls
    return cls


def parse_spec(spec: str) -> tuple[type[Lowering], dict]:
    """``NAME[:FIELD=VALUE]...`` -> (the registered lowering, its dataclass fields' values), each value parsed as
    the field's default's type (``onnxqf-cpu:fuse_rotations=false``); one line for an unknown name or field."""
    name, *fields = spec.split(":")
    cls = get(name)
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.init} if dataclasses.is_dataclass(cls) else {}
    kwargs = {}
    for item in fields:
        key, _, value = item.partition("=")
        if key not in defaults:
            raise OnnxqfError(f"{name} has no field '{key}' (fields: {', '.join(defaults) or 'none'})")
        kind = type(defaults[key])
        try:
            kwargs[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            raise OnnxqfError(f"{name}: '{value}' is not a {kind.__name__} for {key}") from None
    return cls, kwargs


def get(name: str) -> type[Lowering]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise OnnxqfError(f"unknown lowering '{name}' (one of {', '.join(names())})") from None


def names(fmt: str | None = None) -> list[str]:
    """Registered lowering names, of one format if given."""
    return sorted(n for n, cls in REGISTRY.items() if fmt is None or cls.format == fmt)


def insert_after_producer(graph: ir.Graph, x: ir.Value, nodes, fallback_before: ir.Node) -> None:
    """Insert ``nodes`` right after ``x``'s producer (before the first reader for a graph input)."""
    producer = x.producer()
    if producer is None:
        graph.insert_before(fallback_before, nodes)
    else:
        graph.insert_after(producer, nodes)


def take_over(old: ir.Value, new: ir.Value, suffix: str) -> None:
    """``new`` replaces ``old`` everywhere, with its shape and type; a graph output keeps its name (``old`` is
    renamed with ``suffix``)."""
    new.shape, new.type = old.shape, old.type
    was_output, name = old.is_graph_output(), old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if was_output:
        old.name, new.name = f"{name}{suffix}", name


def replace_outputs(graph: ir.Graph, linears: list[Linear], outs: list[ir.Value]) -> None:
    """Each linear's MatMul output is replaced by the matching new value, and the MatMul removed; a graph
    output keeps its name (e.g. logits)."""
    for lin, y in zip(linears, outs):
        take_over(lin.node.outputs[0], y, ".float")
        graph.remove(lin.node, safe=True)
