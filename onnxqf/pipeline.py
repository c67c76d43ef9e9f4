"""Presets: which passes run, in which order, for `onnxqf rewrite`.

    [centre the residual stream] -> simplify shapes -> fold norms -> [calibrate -> smooth] -> [rotations]
      -> [quantize]

Centring (:class:`~onnxqf.passes.centre_residual.CentreResidualPass`) runs when the recognizer found LayerNorms on
the residual stream (OLMo: ``Structure.centring_norms()``, allowed by the family's ``centre_residual``) and the
transform is not ``none``: every transform then sees RMSNorms, as in a Llama (the residual rotation needs them; the
others would be exact on LayerNorms too, but one graph form keeps the passes simple). ``none`` (quantization only)
leaves the graph as exported, so plain W8A8 changes no weight but by rounding.

One :class:`~onnxqf.plan.Plan` (sites to smooth, every rotation, one seed) is built from the model
and the options; the smoothing pass tunes against the plan's rotations and the rotation passes apply
them, so what the α search measures is what is written. Transforms (``RewriteOptions.transform.kind``):

- ``none``: quantization only (the W8A8 baseline)
- ``smooth``: SmoothQuant at all four sites (scales folded into norms, v_proj and up_proj)
- ``rotate``: residual rotation (folded) + online Hadamard before down_proj + value/output rotation (a conv
  layer's out_proj input, LFM2: an online Hadamard, its signs folded into in_proj)
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

import contextlib
import functools
import logging
import os
import tempfile
import time
from typing import Callable

import numpy as np
import onnx_ir as ir

from onnxqf.calib import calibrate, layerwise
from onnxqf.calib.data import load_tokens, windows
from onnxqf.errors import OnnxqfError
from onnxqf.graph import store
from onnxqf.graph.edit import OnlineStyle
from onnxqf.graph.modelfile import set_metadata
from onnxqf.options import RewriteOptions
from onnxqf.passes.centre_residual import CentreResidualPass
from onnxqf.passes.fold_norms import FoldNormsPass
from onnxqf.passes.online_hadamard import DownProjHadamardPass
from onnxqf.passes.quantize import QuantizePass, matches
from onnxqf.passes.rotate_conv_out import ConvOutputHadamardPass
from onnxqf.passes.rotate_norm_outputs import NormOutputHadamardPass
from onnxqf.passes.rotate_residual import RotateResidualPass
from onnxqf.passes.rotate_vo import ValueOutputRotationPass
from onnxqf.passes.simplify_shapes import SimplifyShapesPass
from onnxqf.passes.smooth import SmoothPass
from onnxqf.plan import OFFLINE_ONLY, Plan
from onnxqf.recognize import recognize
from onnxqf.report import RewriteReport
from onnxqf.runtime.target import METADATA_LOWERING, METADATA_TARGET, default_target_name, get_target

__all__ = ["LOW_MEMORY_AUTO_BYTES", "weight_bytes", "low_memory", "rewrite"]

logger = logging.getLogger("onnxqf")

LOW_MEMORY_AUTO_BYTES = 2 << 30


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the model's initializers (from their shapes: nothing is read)."""
    total = 0
    for value in model.graph.initializers.values():
        t = value.const_value
        if t is not None:
            total += int(np.prod(t.shape.numpy(), dtype=np.int64) * t.dtype.itemsize)
    return total


def low_memory(model: ir.Model, opts: RewriteOptions) -> bool:
    """Whether the rewrite runs in bounded memory (``opts.low_memory``, or automatically for big models)."""
    return opts.low_memory if opts.low_memory is not None else weight_bytes(model) > LOW_MEMORY_AUTO_BYTES


def rewrite(model: ir.Model, opts: RewriteOptions, tokenizer=None, *, genai_provider: str | None = None,
            scratch: str | os.PathLike | None = None,
            save: Callable[[ir.Model], object] | None = None) -> RewriteReport:
    """Apply ``opts`` to ``model`` in place; returns the report (passes, plan, α choices, quantized), also
    recorded in the model's metadata (``rewrite``).

    The target is ``opts.target``, else the model's (:func:`onnxqf.runtime.target.default_target_name`; a genai
    folder's provider is ``genai_provider``); it is recorded in the model's metadata with the lowering used.
    In bounded memory (:func:`low_memory`) rewritten weights go to a scratch folder inside ``scratch`` (default:
    the system's temporary folder) until ``save(model)`` has written the result: pass ``save`` to write it while
    they are still there (the folder goes afterwards, on errors too). A store the caller has made active
    (:func:`onnxqf.graph.store.spilling`) is used instead, and outlives the call.
    """
    layered = low_memory(model, opts)
    # a store the caller made active stays in charge; else one of our own for the rewrite and the save
    own = layered and store.active() is None
    spill = store.spilling(scratch or tempfile.gettempdir()) if own else contextlib.nullcontext()
    with spill:
        report = _rewrite(model, opts, tokenizer, layered, genai_provider)
        set_metadata(model, "rewrite", report.to_json())
        if save is not None:
            save(model)
    return report


def _rewrite(model: ir.Model, opts: RewriteOptions, tokenizer, layered: bool,
             genai_provider: str | None) -> RewriteReport:
    structure = recognize(model)  # fail early, with a clear message, on graphs we cannot match
    target = get_target(opts.target or default_target_name(structure.dtype, genai_provider))
    lowering = target.lowering(opts.quant) if opts.quant is not None else None
    if opts.quant is not None:
        _check_keep_float(structure, opts.keep_float)
    plan = Plan.build(structure.config, opts.transform.kind, opts.transform.seed)
    report = RewriteReport(options=opts.label, layers=len(structure.layers), rotations=plan.describe())
    t0 = time.time()
    calib = opts.calibration
    skipped = plan.skipped(structure.config, opts.transform.kind)
    if skipped:
        logger.warning("%s", skipped)

    if opts.transform.kind != "none" and structure.centring_norms():
        _run(model, CentreResidualPass(report))  # OLMo's LayerNorms: first, so every other pass sees RMSNorms
    _run(model, SimplifyShapesPass(report))
    if opts.transform.kind != "none":
        _run(model, FoldNormsPass(report))
    wins = None
    if opts.needs_calibration:
        ids = load_tokens(calib.source, tokenizer, structure.config.vocab)
        wins = windows(ids, calib.windows, calib.seq, what="calibration text")
        report.calibration = {"source": str(calib.source), "windows": int(wins.shape[0]), "seq": int(wins.shape[1])}
        if wins.size < 8192:
            logger.info("note: calibrating on only %d tokens; GPTQ and smoothing work best with 8k+ tokens of "
                        "in-domain text (--calib FILE --calib-windows 16)", wins.size)
    if plan.smooth:
        structure = recognize(model)
        values = calibrate.site_values(structure, plan.smooth)
        stats = calibrate.collect(model, values, wins, progress=opts.progress, seed=opts.transform.seed,
                                  layered=structure if layered else None)
        _run(model, SmoothPass(plan, stats, opts.transform.alpha, report, progress=opts.progress))
    rotations = []
    online = OnlineStyle.parse(opts.online_rotation) if opts.online_rotation else target.online
    if plan.residual is not None:
        rotations.append(RotateResidualPass(plan.residual, report))
    if plan.norm_out is not None:
        rotations.append(NormOutputHadamardPass(plan.norm_out, report, online, head=opts.quantize_lm_head))
    if plan.down is not None:
        rotations.append(DownProjHadamardPass(plan.down, report, online))
    elif plan.rotates and opts.transform.kind not in OFFLINE_ONLY:
        logger.warning("d_ff=%d: no Hadamard construction and a dense factor over the online limit; down_proj inputs "
                       "are not rotated", structure.config.intermediate)
    if plan.rotates:
        rotations.append(ValueOutputRotationPass(plan.head, plan.heads, report, online))
    if plan.conv_out is not None:
        rotations.append(ConvOutputHadamardPass(plan.conv_out, report, online))
    if rotations:
        _run(model, ir.passes.Sequential(*rotations))
    if lowering is not None:
        if opts.quant.format == "int8" and opts.quant.activations == "tensor" and target.name == "cuda":
            logger.warning("--act-quant tensor uses DynamicQuantizeLinear and uint8 MatMulInteger: ONNX Runtime's CUDA "
                           "provider runs these nodes on the CPU (use --act-quant token for CUDA)")
        quantize = functools.partial(QuantizePass, lowering, quantize_lm_head=opts.quantize_lm_head,
                                     keep_float=opts.keep_float, progress=opts.progress, report=report,
                                     head_lowering=target.head_lowering(opts.quant))
        hessians = None
        if calib.rounding == "gptq":  # (sequential GPTQ rounds the layers before with the pass's own rounding)
            hessians = _hessians(model, quantize(), wins, layered, calib.sequential, opts.progress)
            report.calibration["gptq"] = "sequential" if calib.sequential else "float model"
        _run(model, quantize(hessians=hessians))
        model.metadata_props[METADATA_TARGET] = target.name
        model.metadata_props[METADATA_LOWERING] = lowering.describe()
    report.target, report.lowering = target.name, None if lowering is None else lowering.describe()
    report.seconds = round(time.time() - t0, 1)
    return report


def _hessians(model: ir.Model, quantize: QuantizePass, wins, layered: bool, sequential: bool, progress: bool):
    """GPTQ's X^T X per site: from one float run, layer by layer in bounded memory (computed while the pass
    asks for them), or sequentially (each layer after the layers before it are rounded)."""
    t = time.time()
    structure = recognize(model)
    if layered:
        return layerwise.LazyHessians(model, structure, wins, quantize.rounded if sequential else None,
                                      progress=progress)
    if sequential:
        H = layerwise.sequential_hessians(model, structure, wins, quantize.rounded, progress=progress)
    else:
        H = calibrate.collect_hessians(model, calibrate.site_values(structure), wins, progress=progress)
    logger.info("collected input Hessians for GPTQ%s (%.1f s)", ", layer by layer" if sequential else "",
                time.time() - t)
    return H


def _check_keep_float(structure, patterns: tuple[str, ...]) -> None:
    """A --keep-float pattern cannot keep one block of a packed q/k/v MatMul (genai graphs) float."""
    for layer in structure.layers:
        for p in patterns:
            if layer.qkv is not None and not matches(layer.qkv.name, (p,)) and any(
                    matches(lin.name, (p,)) for lin in (layer.q, layer.k, layer.v)):
                raise OnnxqfError(f"--keep-float {p}: q, k and v are one packed MatMul in this graph, quantized "
                                  "together; keep all three float with --keep-float qkv_proj")


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
