"""Layer-streamed calibration: run the decoder one layer at a time, and GPTQ in layer order.

The graph's nodes (in their topological order) are cut after each layer's down_proj MatMul. Every
node of layer ``i`` that reads the residual stream depends on down_proj of layer ``i - 1``, so it
falls after that cut, and every linear of layer ``i`` is an ancestor of its down_proj, so it falls
before the next one: segment ``i`` holds exactly the linears of layer ``i`` (segment 0 also holds
the embedding and whatever the graph computes once for all layers, such as rotary tables and
masks; nodes that do not depend on any layer may sit in any segment, which changes nothing). The
final norm and lm_head after the last cut are never run.

Each segment becomes a small model of its own (its nodes and initializers; as inputs, the values
it reads from earlier segments or from the graph's inputs; as outputs, the values later segments
read, plus the activations asked for) and runs in its own ONNX Runtime session, window by window.
The values that cross a cut are kept per window between segments (for a Llama-2-7B-shaped model,
the residual stream of 32 windows of 512 tokens is 256 MB in float32) and dropped once no later
segment reads them.

:func:`sequential_hessians` is the order GPTQ (Frantar et al.) and QuaRot calibrate in: layer
``i``'s ``X^T X`` are collected on the outputs of layers ``0 .. i-1`` *with their weights already
rounded* (as they will be written), then layer ``i``'s weights are rounded and it is run again to
produce the inputs of layer ``i + 1``. The whole model is run twice, one layer at a time, instead of
once in float: rounding error made early is seen, and compensated, by the layers after it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxqf.errors import UnsupportedGraphError
from onnxqf.genai.feeds import feed_function
from onnxqf.graph.graphio import GraphIO
from onnxqf.graph.store import discard, park, release, trim_heap, unpark
from onnxqf.graph.structure import Linear, Site, Structure
from onnxqf.runtime.session import make_session, saved

__all__ = ["LayerRunner", "LazyHessians", "Rounder", "Segment", "capture", "layer_hessians", "put_weight",
           "segment_model", "sequential_hessians", "split"]

logger = logging.getLogger(__name__)

#: the weights a quantization pass will write for the linears that read a site, given the site's
#: ``X^T X``: ``(structure, site, H) -> {linear: B as stored, dequantized, float64 [in, out]}``
Rounder = Callable[[Structure, Site, np.ndarray], dict[Linear, np.ndarray]]


@dataclasses.dataclass(eq=False)
class Segment:
    """A run of nodes of one layer (the first one also holds everything before layer 0), and what crosses its cuts."""

    layer: int
    nodes: list[ir.Node]
    inputs: list[ir.Value]  # non-constant values read here, produced before (or graph inputs)
    outputs: list[ir.Value]  # values produced here that a later segment reads
    live: frozenset[str]  # names of the values (made here or before) that a later segment reads


def split(model: ir.Model, structure: Structure, *, halves: bool = False) -> list[Segment]:
    """One segment per decoder layer, cut after each down_proj MatMul (see the module doc); with ``halves``
    two per layer, also cut after o_proj (attention, then MLP: every MLP node that reads the layer's
    residual stream depends on o_proj), so that half a layer's weights are in one ONNX Runtime session."""
    nodes = list(model.graph)
    position = {node: i for i, node in enumerate(nodes)}
    cuts, layer_of_cut = [0], []
    for layer in structure.layers:
        end = position[layer.down.node] + 1
        if end <= cuts[-1]:
            raise UnsupportedGraphError(f"layer {layer.index}'s down_proj comes before layer {layer.index - 1}'s "
                                        "in the graph's node order; cannot run the model layer by layer")
        mid = position[layer.o.node] + 1
        if halves and cuts[-1] < mid < end and all(position[lin.node] >= mid for lin in (layer.gate, layer.up)):
            cuts.append(mid)
            layer_of_cut.append(layer.index)
        cuts.append(end)
        layer_of_cut.append(layer.index)
    n_seg = len(layer_of_cut)
    seg_of = {}
    for k in range(n_seg):
        for node in nodes[cuts[k]:cuts[k + 1]]:
            seg_of[node] = k
    last_read: dict[ir.Value, int] = {}  # value -> the last segment that reads it
    for node, k in seg_of.items():
        for v in node.inputs:
            if v is not None and not _is_constant(v):
                last_read[v] = max(last_read.get(v, -1), k)
    segments = []
    for k in range(n_seg):
        seg_nodes = nodes[cuts[k]:cuts[k + 1]]
        inputs = [v for v in _ordered_inputs(seg_nodes) if not _is_constant(v) and _made_by(v, seg_of) < k]
        live = [v for v, last in last_read.items() if last > k and _made_by(v, seg_of) <= k]
        outputs = sorted((v for v in live if _made_by(v, seg_of) == k), key=lambda v: v.name or "")
        segments.append(Segment(layer_of_cut[k], seg_nodes, inputs, outputs, frozenset(v.name for v in live)))
    return segments


def _is_constant(v: ir.Value) -> bool:
    return v.const_value is not None and v.producer() is None


def _made_by(v: ir.Value, seg_of: dict) -> int:
    """The segment that produces v, or -1 for a graph input."""
    p = v.producer()
    return -1 if p is None else seg_of.get(p, 10**9)


def _ordered_inputs(nodes: list[ir.Node]) -> list[ir.Value]:
    seen, out = set(), []
    for node in nodes:
        for v in node.inputs:
            if v is not None and v not in seen:
                seen.add(v)
                out.append(v)
    return out


# ----------------------------------------------------------------------------------------------
# one segment as a model of its own


def segment_model(model: ir.Model, seg: Segment, wanted: Iterable[ir.Value]) -> ir.Model:
    """A model of the segment's nodes (copies; the original graph is not touched).

    ``wanted``: extra outputs (activations to capture). Inputs keep the graph's types; the runner
    sets them from the arrays it feeds (:meth:`LayerRunner.run`). Initializers share the original's
    tensors (on disk until read).
    """
    vmap: dict[ir.Value, ir.Value] = {}
    inputs = []
    for v in seg.inputs:
        new = ir.Value(name=v.name, shape=_copy(v.shape), type=v.type)
        vmap[v] = new
        inputs.append(new)
    initializers = []
    nodes = []
    for node in seg.nodes:
        ins = []
        for v in node.inputs:
            if v is None:
                ins.append(None)
                continue
            if v not in vmap:  # an initializer (the rest was mapped as an input or an earlier node's output)
                c = ir.Value(name=v.name, shape=_copy(v.shape), type=v.type, const_value=v.const_value)
                initializers.append(c)
                vmap[v] = c
            ins.append(vmap[v])
        attrs = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
        new = ir.Node(node.domain, node.op_type, ins, attrs, overload=node.overload, num_outputs=len(node.outputs),
                      version=node.version, name=node.name)
        for old, out in zip(node.outputs, new.outputs):
            out.name, out.type, out.shape = old.name, old.type, _copy(old.shape)
            vmap[old] = out
        nodes.append(new)
    outputs, seen = [], set()
    for v in list(seg.outputs) + list(wanted):
        if v.name in seen:
            continue
        seen.add(v.name)
        outputs.append(vmap[v])
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers,
                     opset_imports=dict(model.graph.opset_imports),
                     name=f"layer{seg.layer}")
    return ir.Model(graph, ir_version=model.ir_version)


def _copy(shape: ir.Shape | None) -> ir.Shape | None:
    return None if shape is None else shape.copy()


# ----------------------------------------------------------------------------------------------
# running


class LayerRunner:
    """Runs the decoder layer by layer over calibration windows, keeping what crosses the cuts.

    ``wanted``: per layer index, the activations to capture there ({name: value}). Each layer runs as
    two segments (attention, MLP: :func:`split` with ``halves``), one ONNX Runtime session each, so
    that only half a layer's weights are in a session at a time. Every segment's model is built here,
    before anything runs, so that a pass may rewrite layer ``i`` of the graph (quantize it) while later
    layers are still to be run: the segments are copies.
    """

    def __init__(self, model: ir.Model, structure: Structure, windows: np.ndarray,
                 wanted: dict[int, dict[str, ir.Value]] | None = None, *, ep: str = "cpu"):
        self.model, self.structure, self.ep = model, structure, ep
        self.segments = split(model, structure, halves=True)
        cfg = structure.config
        feed = feed_function(GraphIO.from_model(model).with_kv_shape(cfg.num_kv_heads, cfg.head_dim))
        graph_inputs = {v.name for v in model.graph.inputs}
        # per window: value name -> array; starts with the graph's inputs
        self.state = [{k: a for k, a in feed(np.asarray(w, np.int64)[None, :]).items() if k in graph_inputs}
                      for w in windows]
        self.of_layer: dict[int, list[int]] = {}
        for i, seg in enumerate(self.segments):
            self.of_layer.setdefault(seg.layer, []).append(i)
        # each wanted activation is an output of the segment of its layer that computes it
        self.wanted: list[dict[str, ir.Value]] = [{} for _ in self.segments]
        for layer, values in (wanted or {}).items():
            idx = self.of_layer[layer]
            for name, v in values.items():
                home = next((i for i in idx if v.producer() in set(self.segments[i].nodes)), idx[0])
                self.wanted[home][name] = v
        self.subs = [segment_model(model, seg, self.wanted[i].values()) for i, seg in enumerate(self.segments)]

    def run(self, layer: int, *, weights: dict[str, np.ndarray] | None = None, advance: bool, desc: str = "",
            progress: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """Run decoder layer ``layer`` on every window; yields {name: activation [tokens, channels] float32}
        of its wanted activations, per window and segment (a dict per segment that has some).

        ``weights``: replacement data for initializers, by name (in the initializer's layout), e.g.
        rounded weights. With ``advance``, the layer's outputs replace the state (the next layer
        reads them); the segments of one layer always hand their outputs on to each other.
        """
        idx = self.of_layer[layer]
        if not advance:  # only as far as the last segment with something to capture
            idx = idx[: 1 + max((j for j, i in enumerate(idx) if self.wanted[i]), default=-1)]
        before = None if advance else list(self.state)  # the second half reads the first's outputs: put back after
        for i in idx:
            yield from self._run_segment(i, weights or {}, advance=advance or i != idx[-1],
                                         desc=desc or f"layer {layer}",
                                         progress=progress)
        if before is not None:
            self.state = before

    def _run_segment(self, i: int, weights: dict[str, np.ndarray], *, advance: bool, desc: str,
                     progress: bool) -> Iterator[dict[str, np.ndarray]]:
        seg, sub = self.segments[i], self.subs[i]
        for value in sub.graph.inputs:  # the types of what crosses the cut, from the arrays that will be fed
            if value.name in self.state[0]:
                value.type = ir.TensorType(ir.DataType.from_numpy(self.state[0][value.name].dtype))
        swapped = _swap_weights(sub, {n: a for n, a in weights.items() if n in sub.graph.initializers})
        try:
            with saved(sub) as path:
                session = make_session(path, ep=self.ep, arena=False)
        finally:
            for value, tensor in swapped:
                value.const_value = tensor
            for value in sub.graph.initializers.values():
                release(value.const_value)  # ONNX Runtime holds its own copy now
        names = [v.name for v in seg.inputs]
        out_names = [o.name for o in session.get_outputs()]
        wanted = self.wanted[i]
        keep = seg.live
        for w, state in enumerate(tqdm(self.state, desc=desc, unit="window", disable=not progress, leave=False)):
            results = dict(zip(out_names, session.run(None, {n: state[n] for n in names})))
            if wanted:
                yield {name: np.asarray(results[v.name], np.float32).reshape(-1, results[v.name].shape[-1])
                       for name, v in wanted.items()}
            if advance:
                self.state[w] = {n: (results[n] if n in results else state[n]) for n in keep}
        del session
        trim_heap()


def _swap_weights(sub: ir.Model, weights: dict[str, np.ndarray]) -> list[tuple[ir.Value, object]]:
    """Put ``weights`` (by initializer name) into the segment model; returns what to restore."""
    swapped = []
    for name, array in weights.items():
        value = sub.graph.initializers[name]
        swapped.append((value, value.const_value))
        dtype = value.const_value.dtype
        data = np.ascontiguousarray(array).astype(dtype.numpy(), copy=False)
        value.const_value = ir.tensor(data, dtype=dtype, name=name)
    return swapped


def capture(model: ir.Model, structure: Structure, values: dict[str, ir.Value], windows: np.ndarray, *,
            desc: str = "calibrating, layer by layer", progress: bool = True,
            ep: str = "cpu") -> Iterator[dict[str, np.ndarray]]:
    """Like :func:`onnxqf.calib.calibrate.capture`, one layer at a time: yields, per layer and window, the
    activations of ``values`` (keyed by their site names, e.g. ``layers.3.down_in``) in that layer.

    Only one layer's weights are in an ONNX Runtime session at a time.
    """
    layer_of = {site.name: site.layer for site in structure.sites()}
    wanted: dict[int, dict[str, ir.Value]] = {}
    for name, value in values.items():
        if name not in layer_of:
            raise ValueError(f"{name}: not a site of the decoder's layers")
        wanted.setdefault(layer_of[name], {})[name] = value
    runner = LayerRunner(model, structure, windows, wanted, ep=ep)
    last = max(wanted, default=-1)
    for layer in tqdm(structure.layers[: last + 1], desc=desc, unit="layer", disable=not progress):
        yield from runner.run(layer.index, advance=layer.index < last, progress=progress)


def layer_hessians(model: ir.Model, structure: Structure, windows: np.ndarray, rounder: Rounder | None, *,
                   progress: bool = True, ep: str = "cpu") -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(layer index, {site name: X^T X}) for each layer in order, each layer fed by the layers before it.

    ``rounder`` (a quantization pass's ``rounded``) gives the weights as they will be stored, and
    the next layer is fed by this layer with those weights; None keeps the weights float (the
    Hessians are then those of the float model, one layer at a time).
    """
    from onnxqf.maths.gptq import HessianAccumulator

    layers = structure.layers
    runner = LayerRunner(model, structure, windows, {layer.index: {s.name: s.value for s in layer.sites()}
                                                     for layer in layers}, ep=ep)
    for layer in tqdm(layers, desc="calibration for GPTQ, layer by layer", unit="layer", disable=not progress):
        sites = layer.sites()
        acc = {site.name: HessianAccumulator() for site in sites}
        last = layer.index == len(layers) - 1
        for acts in runner.run(layer.index, advance=rounder is None and not last, progress=progress,
                               desc=f"layer {layer.index}: X^T X"):
            for name, X in acts.items():
                acc[name].update(X)
        hessians = {name: a.H for name, a in acc.items()}
        del acc
        if rounder is not None and not last:
            weights: dict[str, np.ndarray] = {}
            for site in sites:
                for lin, B_hat in rounder(structure, site, hessians[site.name]).items():
                    put_weight(weights, lin, B_hat)
            for _ in runner.run(layer.index, weights=weights, advance=True, progress=progress,
                                desc=f"layer {layer.index}: rounded"):
                pass
            del weights
        yield layer.index, hessians


def sequential_hessians(model: ir.Model, structure: Structure, windows: np.ndarray, rounder: Rounder | None, *,
                        progress: bool = True, ep: str = "cpu") -> dict[str, np.ndarray]:
    """X^T X of every site (all layers at once; :class:`LazyHessians` holds one layer at a time)."""
    out: dict[str, np.ndarray] = {}
    for _, hessians in layer_hessians(model, structure, windows, rounder, progress=progress, ep=ep):
        out.update(hessians)
    return out


class LazyHessians:
    """The Hessians a quantization pass reads (``get(site name)``), computed a layer at a time on demand.

    The pass asks for its sites in layer order; asking for a site of layer ``i`` runs the layers up to
    ``i`` (:func:`layer_hessians`) and forgets the Hessians of earlier layers, so at most one layer's
    Hessians are kept — in files of the active TensorStore when there is one (onnxqf.graph.store), so that
    only the one being used is in memory. ``get`` returns a fresh copy each time (the caller may
    overwrite it: ``hands_out_copies``). Must be made after every pass that changes the float graph
    (the segments are built when it is made).
    """

    hands_out_copies = True

    def __init__(self, model: ir.Model, structure: Structure, windows: np.ndarray, rounder: Rounder | None = None, *,
                 progress: bool = True, ep: str = "cpu"):
        self._layer_of = {site.name: site.layer for site in structure.sites()}
        self._layers = layer_hessians(model, structure, windows, rounder, progress=progress, ep=ep)
        self._done = -1
        self._current: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._layer_of

    def get(self, name: str, default=None) -> np.ndarray | None:
        layer = self._layer_of.get(name)
        if layer is None:
            return default
        if layer < self._done:
            raise RuntimeError(f"Hessian of {name} asked for after layer {self._done}'s "
                               "(sites must come in layer order)")
        while self._done < layer:
            self._drop()
            self._done, hessians = next(self._layers)
            # empty the generator's dict too: it is paused holding it
            self._current = {k: park(hessians.pop(k)) for k in list(hessians)}
        return unpark(self._current[name])

    def _drop(self) -> None:
        for parked in self._current.values():
            discard(parked)
        self._current = {}


def put_weight(weights: dict[str, np.ndarray], lin: Linear, B: np.ndarray) -> None:
    """Write B ([in, out] of this linear) into the replacement array of its initializer (by name), in its
    layout and storage dtype."""
    from onnxqf.graph.edit import weight_layout

    name = lin.weight.name
    dtype = lin.weight.const_value.dtype.numpy()
    weights[name] = np.asarray(weight_layout(lin, B, weights.get(name)), dtype)
