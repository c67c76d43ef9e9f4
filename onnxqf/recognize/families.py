"""Model families: what differs between decoder families, and what onnxqf refuses for each.

The recognizers find a decoder by dataflow (:mod:`onnxqf.recognize.match`), whatever the family; a
:class:`Family` records what a family adds to the Llama pattern, so that export accepts or refuses it
in one line and each transform can say, before it runs, whether it is exact for the family:

* ``norm_offset``: the norm multiplies by ``offset + γ`` (Gemma: 1). Where the graph computes the Add,
  :class:`~onnxqf.graph.structure.Norm` carries the offset and its ``scale()``/``set_scale()`` read and
  write the effective multiplier; exporters that fold the one into γ leave a plain norm;
* ``embedding_scale``: a constant multiplies the embedding (Gemma √hidden, Granite's multiplier); a
  scalar commutes with every rotation, the recognizer looks through it;
* ``packed``: projections stored as one weight in the source model (Phi-3 ``qkv_proj``, ``gate_up_proj``);
  the recognizer splits them into column blocks (:meth:`~onnxqf.graph.structure.Linear.block`);
* ``post_norms``: RMSNorms on a block's output before the residual Add (Gemma 2/3). A folded residual
  rotation ``Q`` does not commute with them (``RMSNorm(y)·γ`` is not ``RMSNorm(y Q)·γ·Q`` for a general γ),
  so it is refused; the online rotations need no residual rotation and stay exact;
* ``qk_norms``: per-head RMSNorms on queries and keys before rotary (Qwen3, Gemma 3): they read q_proj's
  and k_proj's outputs, which no transform changes;
* ``multipliers``: scalar residual, attention and logit multipliers (Granite): scalars commute;
* ``conv``: layers whose mixer is a short gated convolution instead of attention (LFM2:
  :class:`~onnxqf.graph.structure.ConvMixer`). A residual rotation and online rotations are exact around them,
  smoothing of out_proj's input folds into in_proj's ``C`` columns, but no rotation folds from out_proj's input
  into in_proj (the gates and the depthwise conv act channel by channel): that input is rotated online only;
* ``centre_residual``: the norms on the residual stream are LayerNorms (OLMo's, without parameters), which subtract
  the mean and commute with no rotation. ``LayerNorm(x) = RMSNorm(x − mean(x))``: once every writer of the stream
  (the embedding, o_proj, down_proj) writes zero-mean vectors, each LayerNorm is an RMSNorm with the same ε, and
  the model is the Llama pattern (:class:`~onnxqf.passes.centre_residual.CentreResidualPass`, run first by the
  pipeline for every transform). The recognizer accepts LayerNormalization on the residual stream only for such a
  family (or a graph that records none).

Adding a family: an entry in :data:`FAMILIES` (and, for a new graph pattern such as a new norm form, its
matcher in :mod:`onnxqf.recognize.match`), and a tiny model in ``tests/tiny.py``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from types import MappingProxyType

import onnx_ir as ir

from onnxqf.errors import UnsupportedGraphError
from onnxqf.graph.modelfile import get_metadata

__all__ = ["FAMILIES", "FOLDED_OUTPUT_ROTATION", "GENERIC", "REFUSED", "RESIDUAL_ROTATION", "Family", "by_model_type",
           "check_model_type", "family_of_graph"]

#: transform components a family may refuse (the names the passes check)
RESIDUAL_ROTATION = "a residual rotation folded into the weights (--rotate, --hybrid folded)"
FOLDED_OUTPUT_ROTATION = "a rotation of every o_proj/out_proj input folded into the weights, no node added " \
                         "(--rotate offline)"

_BUILDER = "onnxruntime-genai 0.18's model builder "
_CONV_REASON = ("its conv layers gate in_proj's outputs channel by channel (B·x, C·(...)) around a depthwise "
                "convolution, so only a diagonal scale, not a rotation, folds from out_proj's input into in_proj; use "
                "--rotate or --hybrid (out_proj's input rotated online)")
_POST_NORM_REASON = ("its RMSNorms after the attention and MLP blocks do not commute with a rotation of the residual "
                     "stream; use --hybrid (full: online rotations after each norm) or --smooth")


@dataclasses.dataclass(frozen=True)
class Family:
    """What one decoder family adds to the Llama pattern (see the module notes)."""

    name: str  # the Hugging Face model_type (the first of model_types)
    title: str  # for messages: "Gemma 2"
    model_types: tuple[str, ...] = ()
    norm_offset: float = 0.0
    embedding_scale: str | None = None  # "sqrt(hidden)", "multiplier"
    packed: tuple[str, ...] = ()  # "qkv_proj", "gate_up_proj"
    post_norms: bool = False
    qk_norms: bool = False
    multipliers: bool = False
    conv: bool = False
    centre_residual: bool = False
    activation: str = "silu"  # of the gated MLP: "silu", "gelu_tanh"
    genai_refused: str | None = None  # why no onnxruntime-genai folder is made for it (--kv-cache), or None
    refused: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self):
        if not self.model_types:
            object.__setattr__(self, "model_types", (self.name,))

    def check(self, component: str) -> None:
        """Raise :class:`UnsupportedGraphError` (one line) when ``component`` cannot be exact for this family."""
        reason = self.refused.get(component)
        if reason is not None:
            raise UnsupportedGraphError(f"{self.title} ({self.name}): {component} is not exact for this family: "
                                        f"{reason}")


def _refuse(**reasons: str) -> Mapping[str, str]:
    return MappingProxyType(dict(reasons))


FAMILIES: tuple[Family, ...] = (
    Family("llama", "Llama", ("llama",)),
    Family("mistral", "Mistral"),
    Family("qwen2", "Qwen2"),
    Family("qwen3", "Qwen3", qk_norms=True),
    # layers without rotary: nothing a transform touches
    Family("smollm3", "SmolLM3", genai_refused=_BUILDER + "fails on its layers without rotary (KeyError "
                                                          "'position_ids'); use the plain export"),
    Family("phi3", "Phi-3", packed=("qkv_proj", "gate_up_proj")),
    Family("gemma", "Gemma", norm_offset=1.0, embedding_scale="sqrt(hidden)", activation="gelu_tanh"),
    Family("gemma2", "Gemma 2", norm_offset=1.0, embedding_scale="sqrt(hidden)", post_norms=True,
           activation="gelu_tanh", refused=_refuse(**{RESIDUAL_ROTATION: _POST_NORM_REASON})),
    Family("gemma3_text", "Gemma 3", ("gemma3_text",), norm_offset=1.0, embedding_scale="sqrt(hidden)", post_norms=True,
           qk_norms=True, activation="gelu_tanh", refused=_refuse(**{RESIDUAL_ROTATION: _POST_NORM_REASON}),
           genai_refused=_BUILDER + "cannot read transformers 5's rope_parameters per layer type (KeyError "
                                    "'rope_type'); use the plain export"),
    Family("granite", "Granite", embedding_scale="multiplier", multipliers=True),
    Family("ernie4_5", "Ernie 4.5"),  # the Llama pattern: an entry is all it takes
    # per-head q/k norms after rotary (on q/k's outputs: nothing a transform touches)
    Family("hunyuan_v1_dense", "HunYuan dense", qk_norms=True),
    # the Llama pattern in transformers' exports; the builder writes no folder for them
    Family("seed_oss", "Seed-OSS", genai_refused=_BUILDER + "has no Seed-OSS architecture; use the plain export"),
    Family("internlm3", "InternLM3", genai_refused=_BUILDER + "has no InternLM3 architecture (only InternLM2); use "
                                                              "the plain export"),
    Family("glm", "GLM-4", packed=("gate_up_proj",),
           genai_refused=_BUILDER + "has no GLM architecture; use the plain export"),
    # short gated convolutions between attention layers (which have per-head q/k norms)
    Family("lfm2", "LFM2", qk_norms=True, conv=True, refused=_refuse(**{FOLDED_OUTPUT_ROTATION: _CONV_REASON})),
    # LayerNorms without parameters: the residual stream is centred, then they are RMSNorms
    Family("olmo", "OLMo", centre_residual=True,
           genai_refused=_BUILDER + "writes its LayerNorm as an RMSNorm (SimplifiedLayerNormalization: the mean is "
                                    "not subtracted) and drops clip_qkv, so its folder does not compute the model; use "
                                    "the plain export"),
)

#: families the builder (or transformers) can write that onnxqf refuses, with the reason
REFUSED: Mapping[str, str] = MappingProxyType({
    "phi": "LayerNorm subtracts the mean (not rotation-invariant) and attention and MLP run in parallel",
    "stablelm": "LayerNorm subtracts the mean and is not rotation-invariant",
    "cohere": "LayerNorm subtracts the mean and attention and MLP run in parallel",
    "olmo2": "its norms come only after the blocks, so no norm precedes q/k/v and gate/up to fold a scale into",
    "gpt2": "LayerNorm subtracts the mean and the MLP is not gated",
    "nemotron": "its LayerNorm1P subtracts the mean and its MLP is not gated",
    "gemma3": "a vision-language checkpoint; export its text model (gemma3_text)",
})

#: a graph whose family is not recorded (e.g. a model builder graph): only what its structure shows
GENERIC = Family("decoder", "this model", ())

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def by_model_type(model_type: str | None) -> Family | None:
    return _BY_TYPE.get(model_type or "")


def check_model_type(model_type: str | None) -> Family:
    """The family of a Hugging Face ``model_type``, or one line saying why onnxqf refuses it."""
    family = by_model_type(model_type)
    if family is not None:
        return family
    supported = ", ".join(sorted(_BY_TYPE))
    if model_type in REFUSED:
        raise UnsupportedGraphError(f"architecture '{model_type}' is not supported: {REFUSED[model_type]} "
                                    f"(supported: {supported})")
    raise UnsupportedGraphError(f"architecture '{model_type}' is not supported (supported: {supported}): the passes "
                                "need RMSNorm, q/k/v projections and a gated MLP")


def family_of_graph(model: ir.Model, post_norms: bool, conv: bool = False, centres: bool = False) -> Family:
    """The family a graph records (onnxqf's export writes the model_type into its metadata); otherwise LFM2 for a
    graph with conv layers (``conv``), or a generic family that refuses what the recognized structure rules out
    (norms after the blocks) or centres its residual stream (``centres``: LayerNorms on it)."""
    meta = get_metadata(model, "config")
    if meta:
        try:
            family = by_model_type(json.loads(meta).get("model_type"))
        except (ValueError, AttributeError):
            family = None
        if family is not None:
            return family
    if conv:
        return _BY_TYPE["lfm2"]
    if post_norms:
        return Family("decoder", "a model with norms after its blocks (Gemma 2/3)", ("decoder",), post_norms=True,
                      centre_residual=centres, refused=_refuse(**{RESIDUAL_ROTATION: _POST_NORM_REASON}))
    if centres:
        return Family("decoder", "a model with LayerNorms", ("decoder",), centre_residual=True)
    return GENERIC
