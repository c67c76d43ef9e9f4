"""Where the full hybrid's W8A8 error comes from on SmolLM2: weights vs activations, by role.

    python scripts/hybrid_budget.py out/smollm2.onnx --text ../shared/data/wikitext-2-raw/wiki.test.raw \
        --calib out/calib_tail.txt --json docs/data/hybrid_budget.json

Runs the full hybrid transform once (float, `--hybrid --quant none` with the same calibration as the
accuracy table), collects the GPTQ Hessians once, then quantizes copies of that float graph:
W8A8 (everything), W8A8 with one role group kept float, and the weights alone (GPTQ or RTN int8 per
output channel, activations float). Each is compared with the original export on --windows windows
from the start of --text. The transformed float graph and the Hessians are cached beside the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from onnxqf import calibrate, edit, qmath
from onnxqf.data import load_tokenizer, load_tokens, token_windows, windows
from onnxqf.evaluate import compare
from onnxqf.gptq import gptq_quantize
from onnxqf.modelfile import load_model, save_model
from onnxqf.passes.quantize import QuantizeMatMulsPass
from onnxqf.pipeline import RewriteOptions, rewrite
from onnxqf.recognize import recognize

GROUPS = {"q/k/v": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",), "gate/up": ("gate_proj", "up_proj"),
          "down_proj": ("down_proj",)}


def weights_only(src: Path, dst: Path, hessians: dict | None) -> Path:
    """Every decoder weight int8 per output channel (GPTQ with ``hessians``, else RTN); activations float."""
    model = load_model(src)
    s = recognize(model)
    site_of = s.site_of()
    groups: dict[int, list] = {}
    for lin in s.linears(include_lm_head=False):
        groups.setdefault(id(lin.input), []).append(lin)
    for group in groups.values():
        Bs = [lin.matrix() for lin in group]
        B = np.concatenate(Bs, axis=1)
        _, scale = qmath.quantize_weight_per_channel(B, bits=8)
        if hessians is not None:
            q, scale = gptq_quantize(B, hessians[site_of[group[0].name].name], scale=scale)
            Bq = q.astype(np.float64) * scale[None, :]
        else:
            Bq = qmath.fake_quant_weight(B)
        col = 0
        for lin, b in zip(group, Bs):
            edit.set_weight_matrix(lin, Bq[:, col:col + b.shape[1]])
            col += b.shape[1]
    return save_model(model, dst)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--text", required=True)
    ap.add_argument("--calib", required=True, help="calibration text, disjoint from the evaluated windows")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--json")
    args = ap.parse_args()
    src = Path(args.model)
    work = src.with_name(src.stem + ".budget")
    work.mkdir(exist_ok=True)
    flt = work / "hybrid.float.onnx"
    tok = load_tokenizer(src, load_model(src))
    calib = windows(load_tokens(args.calib, tok), args.calib_windows, 512, what="calibration text")
    if not flt.is_file():
        model = load_model(src)
        rewrite(model, RewriteOptions(transform="hybrid", quant="none", calib=args.calib, calib_windows=args.calib_windows), tok)
        save_model(model, flt)
    hfile = work / f"hessians_{args.calib_windows}.npz"
    if hfile.is_file():
        with np.load(hfile) as z:
            H = {k: z[k] for k in z.files}
    else:
        model = load_model(flt)
        H = calibrate.collect_hessians(model, calibrate.site_values(recognize(model)), calib, progress=True)
        np.savez(hfile, **H)
    wins = token_windows(args.text, src, load_model(src), args.windows, args.seq)

    rows = []

    def evaluate(label: str, path: Path) -> None:
        t = time.time()
        r = compare(src, path, wins, progress=False)
        rows.append({"variant": label, **r})
        print(f"| {label} | {r['kl']:.5f} | {r['top1']:.4f} |  ({time.time() - t:.0f} s)", flush=True)

    print(f"| variant | KL nats/token ({args.windows} x {args.seq}) | top-1 |\n|---|---|---|")
    evaluate("float hybrid (rotations + smoothing, no quantization)", flt)
    evaluate("weights only, int8 GPTQ", weights_only(flt, work / "w_gptq.onnx", H))
    evaluate("weights only, int8 RTN", weights_only(flt, work / "w_rtn.onnx", None))
    for label, keep in [("none", ())] + list(GROUPS.items()):
        model = load_model(flt)
        QuantizeMatMulsPass("token", keep_float=keep, hessians=H)(model)
        dst = save_model(model, work / f"w8a8_keep_{label.replace('/', '')}.onnx")
        evaluate(f"W8A8 (GPTQ), float: {label}", dst)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
