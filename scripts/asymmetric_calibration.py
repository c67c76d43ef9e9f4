"""A tried-and-rejected idea, kept so that its figures can be re-run: GPTQ fitted to the float model's outputs.

    python scripts/asymmetric_calibration.py out/smollm2.onnx --text ../shared/data/wikitext-2-raw/wiki.test.raw \
        --calib out/calib_tail.txt --calib-windows 8 --fit ridge

Asymmetric calibration (as in GPTAQ): layer by layer, the W8A8 model (rounded weights, per-token int8
activations simulated in float) runs beside the float one on the calibration windows; for each site
with float inputs X and quantized inputs Xq, the readers' weights B are replaced by the ridge fit
B' = (Xq^T Xq + lam I)^-1 (Xq^T X + lam I) B (lam = --lam x the mean diagonal), which reproduces the
float outputs from the quantized inputs, before GPTQ rounds them with Xq^T Xq. ``--fit none`` computes
the same statistics without applying the fit (sequential GPTQ on the W8A8 model's inputs). Prints, per
site, ||M - I||_F / sqrt(n) (M the fitted input-side matrix) and mean diag(Xq^T X) / mean diag(Xq^T Xq),
then the result's KL against the original on --windows windows. Needs the full hybrid's float graph
cached by scripts/hybrid_budget.py (out/<model>.budget/hybrid.float.onnx).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hybrid_budget import fake_quant_activations
from onnxqf.graph import edit
from onnxqf.calib import layerwise
from onnxqf.calib.data import load_tokenizer, load_tokens, token_windows, windows
from onnxqf.analysis.evaluate import compare
from onnxqf.maths.gptq import HessianAccumulator
from onnxqf.graph.modelfile import load_model, save_model
from onnxqf.passes.quantize import QuantizeMatMulsPass
from onnxqf.recognize import recognize


def per_token_int8(X: np.ndarray) -> np.ndarray:
    """What fake_quant_activations computes, on an array (the Hessians are of the rounded inputs)."""
    amax = np.maximum(np.abs(X).max(axis=-1, keepdims=True), 1e-6)
    return np.rint(X * (127.0 / amax)) * (amax / 127.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--text", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--fit", choices=["ridge", "none"], default="ridge")
    ap.add_argument("--lam", type=float, default=0.01)
    ap.add_argument("--json")
    args = ap.parse_args()
    src = Path(args.model)
    work = src.with_name(src.stem + ".budget")
    flt = work / "hybrid.float.onnx"
    if not flt.is_file():
        sys.exit(f"error: {flt} missing: run scripts/hybrid_budget.py on {src} first")
    calib = windows(load_tokens(args.calib, load_tokenizer(src, load_model(src))), args.calib_windows, 512,
                    what="calibration text")

    model, quantized = load_model(flt), load_model(flt)
    structure, q_structure = recognize(model), recognize(quantized)
    float_runner = layerwise.LayerRunner(model, structure, calib, {l.index: {s.name: s.value for s in l.sites()}
                                                                   for l in structure.layers})
    fake_quant_activations(quantized, [s.value for s in q_structure.sites()])  # the runner captures their inputs
    q_runner = layerwise.LayerRunner(quantized, q_structure, calib, {l.index: {s.name: s.value for s in l.sites()}
                                                                     for l in q_structure.layers})
    rounder = QuantizeMatMulsPass("token")
    hessians, stats = {}, []
    for layer in structure.layers:
        H = {s.name: HessianAccumulator() for s in layer.sites()}
        C = {s.name: 0.0 for s in layer.sites()}
        q_acts = q_runner.run(layer.index, advance=False, progress=False)
        for f_acts in float_runner.run(layer.index, advance=True, progress=False):
            for name, Xq in next(q_acts).items():
                Xq = per_token_int8(Xq.astype(np.float64))
                H[name].update(Xq)
                C[name] = C[name] + Xq.T @ f_acts[name].astype(np.float64)
        for _ in q_acts:  # runs the generator to its end (it restores the runner's state there)
            raise RuntimeError("the two runners are out of step")
        weights: dict[str, np.ndarray] = {}
        for site in layer.sites():
            Hs, n = H[site.name].H, site.width
            lam = args.lam * float(np.mean(np.diag(Hs)))
            M = np.linalg.solve(Hs + lam * np.eye(n), C[site.name] + lam * np.eye(n))
            stats.append({"site": site.name, "m_minus_i": float(np.linalg.norm(M - np.eye(n)) / np.sqrt(n)),
                          "diag_ratio": float(np.mean(np.diag(C[site.name])) / np.mean(np.diag(Hs)))})
            print(f"{site.name}: ||M - I|| / sqrt(n) {stats[-1]['m_minus_i']:.4f}, diag ratio {stats[-1]['diag_ratio']:.4f}",
                  flush=True)
            if args.fit == "ridge":
                for lin in site.readers:
                    edit.set_weight_matrix(lin, M @ lin.matrix())
            hessians[site.name] = Hs
            for lin, B_hat in rounder.rounded(structure, site, Hs).items():
                layerwise._put(weights, lin, B_hat)
        for _ in q_runner.run(layer.index, weights=weights, advance=True, progress=False):
            pass
    QuantizeMatMulsPass("token", hessians=hessians)(model)
    dst = save_model(model, work / f"asymmetric_{args.fit}.onnx")
    r = compare(src, dst, token_windows(args.text, src, load_model(src), args.windows, 512), progress=False)
    print(f"--fit {args.fit}, {args.calib_windows} calibration windows: KL {r['kl']:.5f}, top-1 {r['top1']:.4f} "
          f"({args.windows} x 512)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "result": r, "sites": stats}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
