"""Feeds for a graph, from its :class:`~onnxqf.graph.graphio.GraphIO`: token ids in, logits out.

A whole-sequence forward, as eval, calibration and placement run it: for a plain graph the ids
alone; for an onnxruntime-genai KV-cache graph also ``attention_mask`` (ones), ``position_ids``
(0..seq-1) when the graph has that input, and an empty past ``[batch, kv_heads, 0, head_dim]`` for
every cache input, in its dtype. The logits are then those of the whole sequence, as a plain graph's.

Rules:

- ids, mask and positions take the integer types the graph declares.
- Cache dims the graph leaves symbolic come from the caller (:meth:`GraphIO.with_kv_shape`), or, for a
  graph file, from the ``genai_config.json`` beside it (:func:`graph_io`).
- A cache input that ONNX Runtime refuses empty (a ``GroupQueryAttention`` keeping a sliding-window cache:
  Gemma 2's local layers, :attr:`GraphIO.min_past`) gets zeros of ``local_window_size`` positions instead, and
  the mask still covers the ids only: GroupQueryAttention counts the valid past from the mask (its sum less the
  new tokens: none), so the zeros are capacity, never attended, and the logits are the plain graph's.
- A conv-state input (onnxruntime-genai's LFM2: ``past.N.conv``, :attr:`GraphIO.conv_state`) gets zeros
  ``[batch, channels, width]``: the state before the first token is the convolution's causal zero padding, so
  the logits are the plain graph's.
- An input that is none of these is refused in one line (:meth:`GraphIO.check_feedable`), before anything runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from onnxqf.genai.folder import genai_dir, model_file, read_genai
from onnxqf.graph.graphio import GraphIO

__all__ = ["feed_function", "graph_io", "logits_function"]


def graph_io(path: str | os.PathLike) -> GraphIO:
    """The GraphIO of a graph file or of an onnxruntime-genai folder's decoder (``DIR`` or ``DIR/model.onnx``),
    with cache dims the graph leaves symbolic taken from the folder's ``genai_config.json`` when there is one."""
    p = Path(path)
    if p.is_dir() and genai_dir(p) is not None:
        p = model_file(p)
    io = GraphIO.read(p)
    if not io.kv_shape_known and genai_dir(p) is not None:
        folder = read_genai(p, check_attention=False)
        io = io.with_kv_shape(folder.kv_heads, folder.head_size)
    return io


def feed_function(io: GraphIO) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """ids [batch, seq] -> the graph's feed (see the module doc); checked here, once."""
    io.check_feedable()
    ids_type = io.int_types[io.ids]
    past = (io.kv_heads, io.head_dim, io.cache_dtype)
    cache = [name for name, _ in io.cache]
    conv = {name: io.conv_shapes[name] for name, _ in io.conv_state}

    def feed(ids: np.ndarray) -> dict[str, np.ndarray]:
        ids = np.asarray(ids)
        b, s = ids.shape
        out = {io.ids: ids.astype(ids_type, copy=False)}
        if io.mask:
            out[io.mask] = np.ones((b, s), io.int_types[io.mask])
        if io.positions:
            out[io.positions] = np.broadcast_to(np.arange(s, dtype=io.int_types[io.positions]), (b, s)).copy()
        for name in cache:
            out[name] = np.zeros((b, past[0], io.min_past.get(name, 0), past[1]), past[2])
        for name, (channels, width, dtype) in conv.items():
            out[name] = np.zeros((b, channels, width), dtype)
        return out

    return feed


def logits_function(session, io: GraphIO) -> Callable[[np.ndarray], np.ndarray]:
    """ids [batch, seq] -> logits [batch, seq, vocab] of ``session`` (a session of the graph ``io`` describes),
    fed by :func:`feed_function`."""
    feed = feed_function(io)
    out = io.logits
    return lambda ids: session.run([out], feed(ids))[0]
