"""SmolLM2 float-equivalence of the rotated graph, and how much rotation shrinks activations.

    python scripts/rotation_check.py out/smollm2.onnx --text ../shared/data/wikitext-2-raw/wiki.test.raw

Writes `onnxqf rewrite --rotate --quant none` of the model next to it, then (1) compares the two
on WINDOWS x SEQ tokens of the text (max |Δlogit| / max |logit|, KL nats/token, PPL) and (2) captures
the inputs of q/k/v (after the norm) and of down_proj in every layer, before and after, and prints
a Markdown table of per-layer max |x|.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from onnxqf.calib.calibrate import capture, site_values
from onnxqf.calib.data import token_windows
from onnxqf.analysis.evaluate import compare
from onnxqf.recognize import recognize
from onnxqf.graph.modelfile import load_model
from onnxqf.passes.fold_norms import FoldNormsPass


def site_maxima(model, wins, sites=("attn_in", "down_in")) -> dict[str, float]:
    values = site_values(recognize(model), sites)
    out = {k: 0.0 for k in values}
    for acts in capture(model, values, wins, desc="capturing", progress=True):
        for k, x in acts.items():
            out[k] = max(out[k], float(np.abs(x).max()))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--text", required=True)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    src = Path(args.model)
    rot = src.with_name(src.stem + ".rotate.float.onnx")
    subprocess.run([sys.executable, "-m", "onnxqf.cli", "rewrite", str(src), "--rotate", "--quant", "none", "-q", "-o", str(rot)], check=True)
    orig = load_model(src)
    wins = token_windows(args.text, src, orig, args.windows, args.seq)
    eq = compare(src, rot, wins, max_abs=True)
    rel = eq["max_abs_diff"] / eq["max_abs_logit"]
    print(f"## Float equivalence, {eq['windows']} x {eq['seq']} tokens\n")
    print("| max abs dlogit / max abs logit | KL nats/token | PPL orig | PPL rotated | top-1 |\n|---|---|---|---|---|")
    print(f"| {rel:.2e} | {eq['kl']:.2e} | {eq['ppl_orig']:.4f} | {eq['ppl_new']:.4f} | {eq['top1']:.4f} |\n")
    before = site_maxima(orig, wins[:4])
    folded = load_model(src)
    FoldNormsPass()(folded)  # the rotation starts from here: q/k/v inputs without the norm's scale
    folded_max = site_maxima(folded, wins[:4])
    after = site_maxima(load_model(rot), wins[:4])
    n = len(recognize(orig).layers)
    print(f"## Max |activation| per layer, first 4 windows\n")
    print("q/k/v input: the attention norm's output; 'norm scale folded' is the same model with the norm's")
    print("scale moved into q/k/v (FoldNormsPass), the graph that the residual rotation then rotates.\n")
    print("| layer | q/k/v input, original | norm scale folded | rotated | down_proj input, original | rotated |")
    print("|---|---|---|---|---|---|")
    for i in range(n):
        a, d = f"layers.{i}.attn_in", f"layers.{i}.down_in"
        print(f"| {i} | {before[a]:.2f} | {folded_max[a]:.2f} | {after[a]:.2f} | {before[d]:.2f} | {after[d]:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"equivalence": eq, "max_before": before, "max_folded": folded_max,
                                               "max_after": after}, indent=1))
    ok = rel <= 1e-3 and eq["kl"] <= 1e-6
    print(f"\n{'PASS' if ok else 'FAIL'}: max |dlogit| <= 1e-3 max |logit| and KL <= 1e-6")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
