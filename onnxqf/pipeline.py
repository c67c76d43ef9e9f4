"""Presets: which passes run, in which order, for `onnxqf rewrite`.

    fold norms -> [calibrate] -> [smooth] -> [rotate residual, online Hadamard (down), v/o rotation] -> [quantize]

- no transform flag: quantization only (the W8A8 baseline)
- ``--smooth``: SmoothQuant on all four sites (scales folded into norms, v_proj and up_proj)
- ``--rotate``: residual rotation + online Hadamard before down_proj + value/output rotation
- ``--hybrid``: smoothing *before* rotation where the scale can fold under the rotation
  (o_proj's and down_proj's inputs), then the full rotation
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import time
import warnings

import numpy as np
import onnx_ir as ir

from onnxqf import calibrate
from onnxqf.data import BUILTIN_CALIB, load_tokens, windows
from onnxqf.errors import OnnxqfError
from onnxqf.recognize import recognize
from onnxqf.passes.fold_norms import FoldNormsPass
from onnxqf.passes.online_hadamard import DownProjHadamardPass
from onnxqf.passes.quantize import QuantizeMatMulsPass
from onnxqf.passes.rotate_residual import RotateResidualPass
from onnxqf.passes.rotate_vo import ValueOutputRotationPass
from onnxqf.passes.simplify_shapes import SimplifyShapesPass
from onnxqf.passes.smooth import ALL_SITES, SmoothPass

HYBRID_SITES = ("o_in", "down_in")


@dataclasses.dataclass
class RewriteOptions:
    rotate: bool = False
    smooth: bool = False
    hybrid: bool = False
    quant: str = "int8"  # or "none"
    act_quant: str = "token"
    alpha: float | str = "auto"
    calib: str = BUILTIN_CALIB
    calib_windows: int = 8
    calib_seq: int = 512
    quantize_lm_head: bool = False
    clip_search: bool = False
    keep_float: tuple[str, ...] = ()
    weight_rounding: str = "gptq"  # or "rtn"
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.weight_rounding not in ("gptq", "rtn"):
            raise OnnxqfError(f"--weight-rounding must be gptq or rtn, not '{self.weight_rounding}'")
        if self.quant not in ("int8", "none"):
            raise OnnxqfError(f"--quant must be int8 or none, not '{self.quant}'")
        if self.hybrid and (self.rotate or self.smooth):
            raise OnnxqfError("--hybrid already smooths and rotates; do not combine it with --rotate/--smooth")
        if self.quant == "none" and not (self.rotate or self.smooth or self.hybrid):
            raise OnnxqfError("nothing to do: --quant none without --rotate, --smooth or --hybrid")

    @property
    def label(self) -> str:
        t = "hybrid" if self.hybrid else "+".join(x for x, on in (("smooth", self.smooth), ("rotate", self.rotate)) if on) or "none"
        return f"transform={t} quant={self.quant}" + (f" act={self.act_quant}" if self.quant != "none" else "")


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[onnxqf] {msg}", file=sys.stderr, flush=True)


def rewrite(model: ir.Model, opts: RewriteOptions, tokenizer=None) -> dict:
    """Apply the preset to ``model`` in place; returns a report (passes, alphas, rotations)."""
    opts.validate()
    structure = recognize(model)  # fail early, with a clear message, on graphs we cannot match
    report: dict = {"options": opts.label, "layers": len(structure.layers), "passes": []}
    t0 = time.time()

    def run(p, what):
        t = time.time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p(model)
        for w in caught:
            print(f"[onnxqf] warning: {w.message}", file=sys.stderr)
        report["passes"].append({"pass": type(p).__name__, "seconds": round(time.time() - t, 2), **({"kind": p.kind} if getattr(p, "kind", "") else {})})
        _log(f"{what} ({time.time() - t:.1f} s)", opts.progress)
        return p

    shapes = SimplifyShapesPass()
    shapes(model)
    if shapes.replaced:
        _log(f"replaced {shapes.replaced} computed shapes by constants", opts.progress)
    if opts.rotate or opts.smooth or opts.hybrid:
        run(FoldNormsPass(), "folded norm scales")
    wins = None
    if opts.smooth or opts.hybrid or (opts.quant == "int8" and opts.weight_rounding == "gptq"):
        ids = load_tokens(opts.calib, tokenizer, structure.config.vocab)
        wins = windows(ids, opts.calib_windows, opts.calib_seq, what="calibration text")
        report["calibration"] = {"source": str(opts.calib), "windows": int(wins.shape[0]), "seq": int(wins.shape[1])}
        if wins.size < 8192 and opts.progress:
            _log(f"note: calibrating on only {wins.size} tokens; GPTQ and smoothing work best with 8k+ tokens of "
                 "in-domain text (--calib FILE --calib-windows 16)", True)
    if opts.smooth or opts.hybrid:
        sites = HYBRID_SITES if opts.hybrid else ALL_SITES
        s = recognize(model)
        values = {k: v for k, v in calibrate.site_values(s).items() if k.rsplit(".", 1)[1] in sites}
        stats = calibrate.collect(model, values, wins, progress=opts.progress, seed=opts.seed)
        sp = run(SmoothPass(stats, opts.alpha, sites, search_rotation=opts.hybrid, seed=opts.seed), "smoothed " + ", ".join(sites))
        report["alphas"] = sp.alphas
    if opts.rotate or opts.hybrid:
        run(RotateResidualPass(seed=opts.seed), "rotated the residual stream")
        run(DownProjHadamardPass(seed=opts.seed + 1), "inserted online Hadamards before down_proj")
        run(ValueOutputRotationPass(seed=opts.seed + 2), "rotated value/output heads")
    if opts.quant == "int8":
        hessians = None
        if opts.weight_rounding == "gptq":
            t = time.time()
            hessians = calibrate.collect_hessians(model, calibrate.site_values(recognize(model)), wins, progress=opts.progress)
            _log(f"collected input Hessians for GPTQ ({time.time() - t:.1f} s)", opts.progress)
        qp = run(QuantizeMatMulsPass(opts.act_quant, opts.quantize_lm_head, opts.clip_search, keep_float=opts.keep_float,
                                     hessians=hessians, progress=opts.progress),
                 f"quantized MatMuls to int8 ({opts.act_quant}, {opts.weight_rounding} weights)")
        report["quantized"] = len(qp.quantized)
        report["weight_rounding"] = dict(sorted(collections.Counter(qp.rounding.values()).items()))
    report["seconds"] = round(time.time() - t0, 1)
    return report
