"""Recognize the structure of a decoder-only LLM in an ONNX graph (on onnx-ir).

A small registry of recognizers is tried in order (:data:`RECOGNIZERS`): onnxruntime-genai's model
builder graphs (fused norms, packed q/k/v, GroupQueryAttention; :mod:`.genai`), then plain exports
(:mod:`.plain`). Both compose the dataflow matchers of :mod:`.match`; :mod:`.families` says what each
model family adds and what it refuses. Everything that cannot be matched raises
:class:`~onnxqf.errors.UnsupportedGraphError` naming what was missing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import onnx_ir as ir

from onnxqf.errors import UnsupportedGraphError
from onnxqf.graph.structure import Structure
from onnxqf.recognize.families import family_of_graph
from onnxqf.recognize.genai import is_builder_graph, recognize_genai
from onnxqf.recognize.match import through_casts_fwd
from onnxqf.recognize.plain import recognize_plain

__all__ = ["RECOGNIZERS", "Recognizer", "check_centring", "check_consistent", "recognize", "through_casts_fwd"]


class Recognizer(NamedTuple):
    name: str
    accepts: Callable[[ir.Model], bool]  # whether this recognizer is the one for the graph
    recognize: Callable[[ir.Model], Structure]


#: tried in order; the first that accepts a graph recognizes it
RECOGNIZERS: list[Recognizer] = [
    Recognizer("onnxruntime-genai builder", is_builder_graph, recognize_genai),
    Recognizer("plain export", lambda model: True, recognize_plain),
]


def recognize(model: ir.Model) -> Structure:
    """Match the decoder structure of ``model`` or raise UnsupportedGraphError (one line)."""
    for rec in RECOGNIZERS:
        if rec.accepts(model):
            structure = rec.recognize(model)
            break
    else:  # pragma: no cover - the plain recognizer accepts every graph
        raise UnsupportedGraphError("no recognizer accepts this graph")
    check_consistent(structure)
    centring = structure.centring_norms()
    structure.family = family_of_graph(model, any(layer.post_norms() for layer in structure.layers),
                                       conv=bool(structure.conv_layers()), centres=bool(centring))
    check_centring(structure)
    return structure


def check_centring(structure: Structure) -> None:
    """LayerNorms (norms that subtract the mean) on the residual stream only in a family whose stream can be centred
    (:attr:`~onnxqf.recognize.families.Family.centre_residual`, OLMo), and then every norm there is one: centring
    the stream for them would change an RMSNorm that reads it."""
    centring = structure.centring_norms()
    if not centring:
        return
    name = centring[0].gamma_node.name
    family = structure.family
    if family is not None and not family.centre_residual:
        raise UnsupportedGraphError(f"LayerNormalization '{name}' subtracts the mean and is not rotation-invariant; "
                                    f"{family.title}'s norms are RMSNorms")
    if len(centring) != len(structure.norms()):
        raise UnsupportedGraphError(f"LayerNormalization '{name}' subtracts the mean but other norms on the residual "
                                    "stream are RMSNorms: the stream cannot be centred for both")


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
        kv_width = layer.k.shape[1] if layer.k is not None else 0
        want = {"q_proj": (cfg.hidden, q_width), "k_proj": (cfg.hidden, kv_width),
                "v_proj": (cfg.hidden, kv_width), "o_proj": (q_width, cfg.hidden),
                "in_proj": (cfg.hidden, 3 * cfg.hidden), "out_proj": (cfg.hidden, cfg.hidden),  # a conv layer's
                "gate_proj": (cfg.hidden, cfg.intermediate),
                "up_proj": (cfg.hidden, cfg.intermediate), "down_proj": (cfg.intermediate, cfg.hidden)}
        for lin in layer.linears():
            if lin.shape != want[lin.role]:
                raise UnsupportedGraphError(f"{lin.name}: weight is [in, out] = {list(lin.shape)}, the model's other "
                                            f"shapes say {list(want[lin.role])} (hidden {cfg.hidden}, d_ff "
                                            f"{cfg.intermediate})")
    if structure.lm_head.shape != (cfg.hidden, cfg.vocab):
        raise UnsupportedGraphError(f"lm_head: weight is [in, out] = {list(structure.lm_head.shape)}, expected "
                                    f"{[cfg.hidden, cfg.vocab]}")
