"""What ``onnxqf rewrite`` is asked to do, one typed config per concern, each validated once when it is made.

- :class:`Transform`: which transform preset (:data:`onnxqf.plan.PRESETS`), the smoothing strength, the seed.
- the format, one config per method: :class:`W8A8` (int8 weights x int8 activations) or :class:`WeightOnly`
  (4- or 8-bit MatMulNBits), or None for a float model. The lowering (the nodes a linear becomes) is a field of
  the config; left None, the target chooses (:meth:`onnxqf.runtime.target.Target.lowering`).
- :class:`Calibration`: the text the smoothing scales and GPTQ's X^T X come from, and how weights are rounded.
- :class:`RewriteOptions`: the above, plus the target (``cpu``/``cuda``; None: from the model), which linears
  stay float, how online rotations are emitted (None: the target's), and how the run behaves (progress,
  bounded memory).

Configs are frozen dataclasses: a bad value raises :class:`onnxqf.errors.OnnxqfError` (one line, exit 2) at
construction, and a rewrite never sees an invalid combination.
"""

from __future__ import annotations

import dataclasses

from onnxqf.calib.data import BUILTIN_CALIB
from onnxqf.errors import OnnxqfError
from onnxqf.graph.edit import OnlineStyle
from onnxqf.lowering import base as lowering_registry
from onnxqf.plan import PRESETS

__all__ = ["Transform", "W8A8", "WeightOnly", "Calibration", "RewriteOptions", "TRANSFORMS", "FORMATS",
           "ACTIVATIONS", "BLOCK_SIZES", "quant_config"]

TRANSFORMS = tuple(PRESETS)
FORMATS = ("int8", "int4", "int8w", "none")
#: W8A8 activation quantizers: symmetric per token, asymmetric per token (min/max, or refined by 5 rounds of least
#: squares), per tensor (DynamicQuantizeLinear)
ACTIVATIONS = ("token", "asym", "iter", "tensor")
BLOCK_SIZES = (16, 32, 64, 128, 256)


def _choice(what: str, value, choices) -> None:
    if value not in choices:
        raise OnnxqfError(f"{what} must be one of {', '.join(map(str, choices))}, not '{value}'")


@dataclasses.dataclass(frozen=True)
class Transform:
    """kind: a preset of :data:`onnxqf.plan.PRESETS`; alpha: smoothing strength in [0, 1] or ``auto`` (per site,
    by measured error); seed: of every random sign and rotation."""

    kind: str = "none"
    alpha: float | str = "auto"
    seed: int = 0

    def __post_init__(self):
        _choice("the transform", self.kind, TRANSFORMS)
        if self.alpha != "auto" and not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise OnnxqfError(f"alpha must be in [0, 1] or 'auto', not {self.alpha!r}")

    @property
    def smooths(self) -> bool:
        return bool(PRESETS[self.kind][0])


@dataclasses.dataclass(frozen=True)
class W8A8:
    """int8 weights (symmetric per output channel) x int8 activations quantized at run time.

    activations: ``token`` (symmetric per token), ``asym`` (a scale and a zero point per token), ``iter`` (asym
    refined) or ``tensor`` (ONNX's DynamicQuantizeLinear); None: the lowering's own default (``token``, but ``asym``
    for ``onnxqf-cpu``); clip_search: searched clipping per weight channel; lowering: a registered
    W8A8 lowering by name, optionally with fields of its dataclass (``onnxqf-cpu:fuse_rotations=false``; None: the
    target's for ``activations``); lm_head_bits: with ``quantize_lm_head``, lm_head as weight-only MatMulNBits of 4
    or 8 bits (block 32, the target's accuracy level) instead of W8A8."""

    activations: str | None = None
    clip_search: bool = False
    lowering: str | None = None
    lm_head_bits: int | None = None  # a quantized lm_head as weight-only MatMulNBits of these bits (None: W8A8)

    format = "int8"

    def __post_init__(self):
        if self.activations is not None:
            _choice("--act-quant", self.activations, ACTIVATIONS)
        if self.lm_head_bits is not None:
            _choice("--lm-head-bits", self.lm_head_bits, (4, 8))
        if self.lowering is not None and lowering_registry.parse_spec(self.lowering)[0].format != self.format:
            names = ", ".join(lowering_registry.names(self.format))
            raise OnnxqfError(f"--lowering {self.lowering} is not a W8A8 lowering (one of {names}); "
                              "weight-only formats are MatMulNBits")

    @property
    def label(self) -> str:
        return f"int8 act={self.activations or 'default'}" + (f" lowering={self.lowering}" if self.lowering else "")


@dataclasses.dataclass(frozen=True)
class WeightOnly:
    """Block-wise 4- or 8-bit weights (``com.microsoft.MatMulNBits``), float activations.

    accuracy_level: MatMulNBits' compute type (None: the target's: 4 on the CPU, 0 on CUDA); lm_head_bits: for
    a quantized lm_head; damp and act_order: GPTQ's."""

    bits: int = 4
    block_size: int = 32
    asymmetric: bool = False
    clip_search: bool = False
    accuracy_level: int | None = None
    lm_head_bits: int = 8
    damp: float = 0.01
    act_order: bool = False

    format = "nbits"

    def __post_init__(self):
        _choice("bits", self.bits, (4, 8))
        _choice("--block-size", self.block_size, BLOCK_SIZES)
        _choice("--lm-head-bits", self.lm_head_bits, (4, 8))
        if self.accuracy_level is not None:
            _choice("--accuracy-level", self.accuracy_level, (0, 1, 2, 3, 4))
        if not 0.0 < self.damp < 1.0:
            raise OnnxqfError(f"damp must be in (0, 1), not {self.damp}")

    @property
    def name(self) -> str:
        return "int4" if self.bits == 4 else "int8w"

    @property
    def label(self) -> str:
        return f"{self.name} block={self.block_size}{' asymmetric' if self.asymmetric else ''}"


@dataclasses.dataclass(frozen=True)
class Calibration:
    """source: a text file or .npy of token ids (default: the built-in English text); windows x seq tokens;
    rounding: ``gptq`` (with the inputs' X^T X) or ``rtn``; sequential: GPTQ's X^T X from the outputs of the
    layers before with their weights already rounded (the model runs twice) instead of one float run."""

    source: str = BUILTIN_CALIB
    windows: int = 8
    seq: int = 512
    rounding: str = "gptq"
    sequential: bool = False

    def __post_init__(self):
        _choice("--weight-rounding", self.rounding, ("gptq", "rtn"))
        if self.windows < 1 or self.seq < 1:
            raise OnnxqfError(f"calibration windows and their length must be positive, not {self.windows} x {self.seq}")


def quant_config(fmt: str, **kw) -> W8A8 | WeightOnly | None:
    """The config of a ``--quant`` name (``int8``, ``int4``, ``int8w``, ``none``) from the keywords that apply to it."""
    _choice("--quant", fmt, FORMATS)
    if fmt == "none":
        return None
    cls = W8A8 if fmt == "int8" else WeightOnly
    names = {f.name for f in dataclasses.fields(cls)}
    extra = {k: v for k, v in kw.items() if k in names and v is not None}  # None: the config's default
    if cls is WeightOnly:
        extra["bits"] = 4 if fmt == "int4" else 8
    return cls(**extra)


@dataclasses.dataclass(frozen=True)
class RewriteOptions:
    """Everything a rewrite needs; see the module docstring. ``low_memory`` None: on when the weights exceed
    :data:`onnxqf.pipeline.LOW_MEMORY_AUTO_BYTES`; the result is the same either way."""

    transform: Transform = Transform()
    quant: W8A8 | WeightOnly | None = W8A8()
    calibration: Calibration = Calibration()
    target: str | None = None
    quantize_lm_head: bool = False
    keep_float: tuple[str, ...] = ()
    progress: bool = True
    low_memory: bool | None = None
    online_rotation: str | None = None  # cycle|batched[:MAX_GROUP]; None: the target's

    def __post_init__(self):
        if self.online_rotation is not None:
            try:
                OnlineStyle.parse(self.online_rotation)
            except ValueError as exc:
                raise OnnxqfError(f"--online-rotation: {exc}") from None
        if self.target is not None:
            _choice("--ep", self.target, ("cpu", "cuda"))
        if self.quant is None and self.transform.kind == "none":
            raise OnnxqfError("nothing to do: --quant none without --rotate, --smooth or --hybrid")
        if isinstance(self.quant, WeightOnly) and self.transform.smooths:
            raise OnnxqfError(f"--quant {self.quant.name} keeps activations in float: smoothing would only move "
                              "difficulty into the weights; use --rotate (or no transform) with weight-only formats")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))

    @property
    def needs_calibration(self) -> bool:
        return self.transform.smooths or (self.quant is not None and self.calibration.rounding == "gptq")

    @property
    def label(self) -> str:
        return f"transform={self.transform.kind} quant={'none' if self.quant is None else self.quant.label}"
