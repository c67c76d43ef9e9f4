"""Presets: which passes run, in which order, for `onnxqf rewrite`.

    simplify shapes -> fold norms -> [calibrate -> smooth] -> [rotations] -> [quantize]

One :class:`~onnxqf.plan.Plan` (sites to smooth, every rotation, one seed) is built from the model
and the options; the smoothing pass tunes against the plan's rotations and the rotation passes apply
them, so what the α search measures is what is written. Transforms (``RewriteOptions.transform``):

- ``none``: quantization only (the W8A8 baseline)
- ``smooth``: SmoothQuant at all four sites (scales folded into norms, v_proj and up_proj)
- ``rotate``: residual rotation (folded) + online Hadamard before down_proj + value/output rotation
- ``rotate-offline``: only the rotations that fold into weights (residual, per-head value/output):
  no node added
- ``hybrid``: smoothing *before* rotation at all four linear inputs: the scales fold into the norms'
  γ, v_proj and up_proj, then online Hadamards after each norm and before down_proj and the
  value/output rotation. No residual rotation: every quantized input is already rotated online,
  and a folded residual rotation would force γ into the rotated basis (docs/results.md §2).
- ``hybrid-folded``: the earlier two-site hybrid: residual rotation folded, so only the o_proj and
  down_proj inputs can be smoothed first.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time

import numpy as np
import onnx_ir as ir

from onnxqf.calib import calibrate
from onnxqf.calib import layerwise
from onnxqf.calib.data import BUILTIN_CALIB, load_tokens, windows
from onnxqf.errors import OnnxqfError
from onnxqf.passes.fold_norms import FoldNormsPass
from onnxqf.passes.online_hadamard import DownProjHadamardPass
from onnxqf.passes.rotate_norm_outputs import NormOutputHadamardPass
from onnxqf.passes.rotate_residual import RotateResidualPass
from onnxqf.passes.rotate_vo import ValueOutputRotationPass
from onnxqf.passes.simplify_shapes import SimplifyShapesPass
from onnxqf.passes.smooth import SmoothPass
from onnxqf.plan import OFFLINE_ONLY, PRESETS, Plan
from onnxqf.recognize import recognize
from onnxqf.report import RewriteReport

logger = logging.getLogger("onnxqf")

QUANT_FORMATS = ("int8", "int4", "int8w", "none")
LOW_MEMORY_AUTO_BYTES = 2 << 30
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclasses.dataclass
class RewriteOptions:
    transform: str = "none"  # a key of onnxqf.plan.PRESETS
    quant: str = "int8"  # int8 (W8A8), int4 / int8w (weight-only MatMulNBits), or none
    act_quant: str = "token"
    block_size: int = 32
    asymmetric: bool = False  # int4/int8w: a zero point per block (MatMulNBits' zero_points input)
    alpha: float | str = "auto"
    calib: str = BUILTIN_CALIB
    calib_windows: int = 8
    calib_seq: int = 512
    quantize_lm_head: bool = False
    clip_search: bool = False
    keep_float: tuple[str, ...] = ()
    weight_rounding: str = "gptq"  # or "rtn"
    # GPTQ's X^T X: True: each layer's from the outputs of the layers before it with their weights
    # rounded (onnxqf.calib.layerwise; the model runs twice); False (default): from one run of the float
    # model. On SmolLM2 sequential did not help (docs/results.md §5), so the cheaper one is the default
    sequential: bool = False
    seed: int = 0
    progress: bool = True
    # bounded memory (onnxqf.graph.store, docs/benchmarks.md §e): calibration one layer at a time, GPTQ
    # Hessians one layer at a time, rewritten weights on disk. None: when the weights exceed
    # LOW_MEMORY_AUTO_BYTES. The result is the same either way (tests/test_low_memory.py)
    low_memory: bool | None = None

    def validate(self) -> None:
        if self.transform not in PRESETS:
            raise OnnxqfError(f"unknown transform '{self.transform}' (one of {', '.join(PRESETS)})")
        if self.weight_rounding not in ("gptq", "rtn"):
            raise OnnxqfError(f"--weight-rounding must be gptq or rtn, not '{self.weight_rounding}'")
        if self.quant not in QUANT_FORMATS:
            raise OnnxqfError(f"--quant must be one of {', '.join(QUANT_FORMATS)}, not '{self.quant}'")
        if self.block_size not in BLOCK_SIZES:
            raise OnnxqfError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, not {self.block_size}")
        if self.asymmetric and self.quant not in ("int4", "int8w"):
            raise OnnxqfError("--asymmetric applies to the weight-only formats (--quant int4 or int8w)")
        if self.quant == "none" and self.transform == "none":
            raise OnnxqfError("nothing to do: --quant none without --rotate, --smooth or --hybrid")
        if self.quant in ("int4", "int8w") and self.transform in ("smooth", "hybrid", "hybrid-folded"):
            raise OnnxqfError(f"--quant {self.quant} keeps activations in float: smoothing would only move difficulty into "
                              "the weights; use --rotate (or no transform) with weight-only formats")

    @property
    def smooths(self) -> bool:
        return bool(PRESETS[self.transform][0])

    @property
    def needs_calibration(self) -> bool:
        return self.smooths or (self.quant != "none" and self.weight_rounding == "gptq")

    @property
    def label(self) -> str:
        q = self.quant + (f" act={self.act_quant}" if self.quant == "int8" else
                          f" block={self.block_size}{' asymmetric' if self.asymmetric else ''}" if self.quant != "none" else "")
        return f"transform={self.transform} quant={q}"


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the model's initializers (from their shapes: nothing is read)."""
    total = 0
    for value in model.graph.initializers.values():
        t = value.const_value
        if t is not None:
            total += int(np.prod(t.shape.numpy(), dtype=np.int64) * t.dtype.itemsize)
    return total


def low_memory(model: ir.Model, opts: RewriteOptions) -> bool:
    """Whether the rewrite runs in bounded memory (``opts.low_memory``, or automatically for big models).

    The caller also keeps rewritten weights on disk for the rewrite and the save
    (``with onnxqf.graph.store.spilling(output folder):``), as ``onnxqf rewrite`` does.
    """
    return opts.low_memory if opts.low_memory is not None else weight_bytes(model) > LOW_MEMORY_AUTO_BYTES


def rewrite(model: ir.Model, opts: RewriteOptions, tokenizer=None) -> RewriteReport:
    """Apply the preset to ``model`` in place; returns the report (passes, plan, α choices, quantized)."""
    opts.validate()
    layered = low_memory(model, opts)
    structure = recognize(model)  # fail early, with a clear message, on graphs we cannot match
    if opts.quant != "none":
        _check_keep_float(structure, opts.keep_float)
    plan = Plan.build(structure.config, opts.transform, opts.seed)
    report = RewriteReport(options=opts.label, layers=len(structure.layers), rotations=plan.describe())
    t0 = time.time()

    _run(model, SimplifyShapesPass(report))
    if opts.transform != "none":
        _run(model, FoldNormsPass(report))
    wins = None
    if opts.needs_calibration:
        ids = load_tokens(opts.calib, tokenizer, structure.config.vocab)
        wins = windows(ids, opts.calib_windows, opts.calib_seq, what="calibration text")
        report.calibration = {"source": str(opts.calib), "windows": int(wins.shape[0]), "seq": int(wins.shape[1])}
        if wins.size < 8192:
            logger.info("note: calibrating on only %d tokens; GPTQ and smoothing work best with 8k+ tokens of "
                        "in-domain text (--calib FILE --calib-windows 16)", wins.size)
    if plan.smooth:
        values = calibrate.site_values(recognize(model), plan.smooth)
        stats = calibrate.collect(model, values, wins, progress=opts.progress, seed=opts.seed,
                                  layered=recognize(model) if layered else None)
        _run(model, SmoothPass(plan, stats, opts.alpha, report, progress=opts.progress))
    rotations = []
    if plan.residual is not None:
        rotations.append(RotateResidualPass(plan.residual, report))
    if plan.norm_out is not None:
        rotations.append(NormOutputHadamardPass(plan.norm_out, report))
    if plan.down is not None:
        rotations.append(DownProjHadamardPass(plan.down, report))
    elif plan.rotates and opts.transform not in OFFLINE_ONLY:
        logger.warning("d_ff=%d: no Hadamard construction and a dense factor over the online limit; down_proj inputs "
                       "are not rotated", structure.config.intermediate)
    if plan.rotates:
        rotations.append(ValueOutputRotationPass(plan.head, plan.heads, report))
    if rotations:
        _run(model, ir.passes.Sequential(*rotations))
    if opts.quant != "none":
        quantize = _quantize_pass(opts, report)
        if opts.weight_rounding == "gptq":
            t = time.time()
            structure = recognize(model)
            if layered:  # computed a layer at a time while the pass asks for them
                quantize.hessians = layerwise.LazyHessians(model, structure, wins,
                                                           quantize.rounded if opts.sequential else None,
                                                           progress=opts.progress)
            elif opts.sequential:
                quantize.hessians = layerwise.sequential_hessians(model, structure, wins, quantize.rounded,
                                                                  progress=opts.progress)
            else:
                quantize.hessians = calibrate.collect_hessians(model, calibrate.site_values(structure), wins,
                                                               progress=opts.progress)
            if not layered:
                logger.info("collected input Hessians for GPTQ%s (%.1f s)", ", layer by layer" if opts.sequential else "",
                            time.time() - t)
            report.calibration["gptq"] = "sequential" if opts.sequential else "float model"
        _run(model, quantize)
    report.seconds = round(time.time() - t0, 1)
    return report


def _check_keep_float(structure, patterns: tuple[str, ...]) -> None:
    """A --keep-float pattern cannot keep one block of a packed q/k/v MatMul (genai graphs) float."""
    def matches(name: str, p: str) -> bool:
        return fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"layers.*.{p}")

    for layer in structure.layers:
        for p in patterns:
            if layer.qkv is not None and not matches(layer.qkv.name, p) and any(
                    matches(lin.name, p) for lin in (layer.q, layer.k, layer.v)):
                raise OnnxqfError(f"--keep-float {p}: q, k and v are one packed MatMul in this graph, quantized together; "
                                  "keep all three float with --keep-float qkv_proj")


def _quantize_pass(opts: RewriteOptions, report: RewriteReport):
    """The quantization pass of ``opts.quant``; GPTQ Hessians are set on it (``.hessians``) before it runs."""
    if opts.quant == "int8":
        from onnxqf.passes.quantize import QuantizeMatMulsPass

        return QuantizeMatMulsPass(opts.act_quant, opts.quantize_lm_head, opts.clip_search, keep_float=opts.keep_float,
                                   progress=opts.progress, report=report)
    from onnxqf.passes.quantize_nbits import QuantizeNBitsPass

    return QuantizeNBitsPass(bits=4 if opts.quant == "int4" else 8, block_size=opts.block_size,
                             quantize_lm_head=opts.quantize_lm_head, keep_float=opts.keep_float, progress=opts.progress,
                             symmetric=not opts.asymmetric, clip_search=opts.clip_search, report=report)


def _run(model: ir.Model, p: ir.passes.PassBase) -> ir.passes.PassResult:
    """Run a pass (or a Sequential); an OnnxqfError inside comes out as itself, not wrapped by onnx-ir."""
    try:
        return p(model)
    except OnnxqfError:
        raise
    except Exception as exc:
        cause = exc
        while cause is not None:
            if isinstance(cause, OnnxqfError):
                raise cause from None
            cause = cause.__cause__
        raise
