"""Run the model on token windows and capture intermediate activations, one window at a time.

The graph gets extra outputs for the requested values (the inputs of weight MatMuls), ONNX Runtime
runs it window by window (an onnxruntime-genai KV-cache graph with an empty past and a mask of
ones: :func:`onnxqf.genai.feeds.feed_function`), and each window's activations are handed to the caller
and dropped: memory depends on the window, not on how many windows are run.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxqf.genai.feeds import feed_function
from onnxqf.graph.graphio import GraphIO
from onnxqf.graph.store import park, unpark
from onnxqf.graph.structure import SITE_KINDS, Structure
from onnxqf.maths.metrics import ChannelStats
from onnxqf.runtime.session import make_session, saved

__all__ = ["SiteStats", "capture", "collect", "collect_hessians", "graph_io", "site_values"]


def graph_io(model: ir.Model) -> GraphIO:
    """The model's GraphIO, with the cache dims the graph leaves symbolic taken from its recognized structure."""
    io = GraphIO.from_model(model)
    if not io.kv_shape_known:
        from onnxqf.recognize import recognize

        cfg = recognize(model).config
        io = io.with_kv_shape(cfg.num_kv_heads, cfg.head_dim)
    return io


def site_values(structure: Structure, kinds: tuple[str, ...] = SITE_KINDS) -> dict[str, ir.Value]:
    """The activation each site's linears read, by site name (e.g. 'layers.3.down_in')."""
    return {site.name: site.value for site in structure.sites(kinds)}


def capture(model: ir.Model, values: dict[str, ir.Value], windows: np.ndarray, *, desc: str = "calibrating",
            progress: bool = True, ep: str = "cpu") -> Iterator[dict[str, np.ndarray]]:
    """Yield, per window, {name: activation [tokens, channels] as float32}."""
    feed = feed_function(graph_io(model))  # an input it cannot feed is refused before the session is made
    graph = model.graph
    added = []
    for name, value in values.items():
        if value.is_graph_output():
            continue
        if value.type is None:
            value.type = ir.TensorType(ir.DataType.FLOAT)
        graph.outputs.append(value)
        added.append(value)
    try:
        with saved(model) as path:
            session = make_session(path, ep=ep)
        # the session keeps its own copy of the weights; the temporary file can go
    finally:
        for value in added:
            graph.outputs.remove(value)
    out_names = [o.name for o in session.get_outputs()]
    index = {name: out_names.index(value.name) for name, value in values.items()}
    for w in tqdm(windows, desc=desc, unit="window", disable=not progress):
        results = session.run(None, feed(np.asarray(w, np.int64)[None, :]))
        yield {name: np.asarray(results[i], np.float32).reshape(-1, results[i].shape[-1]) for name, i in index.items()}


class SiteStats:
    """Per-channel statistics of one activation site plus a bounded random sample of its tokens
    (``sample [<= max_sample, channels]``; kept on disk while a store is active: onnxqf.graph.store.park)."""

    def __init__(self, stats: ChannelStats, sample: np.ndarray):
        self.stats = stats
        self._sample = park(np.asarray(sample, np.float32))

    @property
    def sample(self) -> np.ndarray:
        return unpark(self._sample)


def collect(model: ir.Model, values: dict[str, ir.Value], windows: np.ndarray, *, max_sample: int = 1024,
            seed: int = 0, progress: bool = True, ep: str = "cpu",
            layered: Structure | None = None) -> dict[str, SiteStats]:
    """Channel statistics and a token sample for each value, streaming over windows.

    ``layered``: the model's structure, to run it one layer at a time (:func:`onnxqf.calib.layerwise.capture`:
    one layer's weights in ONNX Runtime at a time) instead of in one session. Each site draws its
    sample from its own random stream, so both orders pick the same tokens.
    """
    per_window = max(1, max_sample // max(1, len(windows)))
    rngs = {name: np.random.default_rng([seed, i]) for i, name in enumerate(values)}
    stats: dict[str, ChannelStats] = {name: ChannelStats() for name in values}
    samples: dict[str, list[np.ndarray]] = {name: [] for name in values}
    if layered is not None:
        from onnxqf.calib import layerwise

        acts_per_window = layerwise.capture(model, layered, values, windows, progress=progress, ep=ep)
    else:
        acts_per_window = capture(model, values, windows, progress=progress, ep=ep)
    out: dict[str, SiteStats] = {}
    for acts in acts_per_window:
        for name, X in acts.items():
            stats[name].update(X)
            take = rngs[name].choice(X.shape[0], size=min(per_window, X.shape[0]), replace=False)
            samples[name].append(X[np.sort(take)])
            if len(samples[name]) == len(windows):  # the site is complete (layer by layer: its layer is done)
                out[name] = SiteStats(stats[name], np.concatenate(samples.pop(name))[:max_sample])
    return {name: out[name] for name in values}


def collect_hessians(model: ir.Model, values: dict[str, ir.Value], windows: np.ndarray, *, progress: bool = True,
                     ep: str = "cpu", max_bytes: int = 2 << 30) -> dict[str, np.ndarray]:
    """X^T X of each site's activations (float64), streaming over windows.

    Sites are processed in groups whose Hessians fit in ``max_bytes``, one pass over the windows
    per group, so memory stays bounded for large models.
    """
    from onnxqf.maths.gptq import HessianAccumulator

    names = list(values)
    groups, current, size = [], [], 0
    for name in names:
        c = values[name].shape[-1] if values[name].shape is not None and isinstance(values[name].shape[-1], int) else 0
        need = 8 * c * c
        if current and size + need > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += need
    if current:
        groups.append(current)
    out: dict[str, np.ndarray] = {}
    for i, group in enumerate(groups):
        acc = {name: HessianAccumulator() for name in group}
        desc = "collecting X^T X" + (f" ({i + 1}/{len(groups)})" if len(groups) > 1 else "")
        for acts in capture(model, {n: values[n] for n in group}, windows, desc=desc, progress=progress, ep=ep):
            for name, X in acts.items():
                acc[name].update(X)
        out.update({name: a.H for name, a in acc.items()})
    return out
