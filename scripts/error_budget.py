"""Where does the W8A8 error of SmolLM2 come from? Weight-only vs full quantization, by role.

    python scripts/error_budget.py out/smollm2.onnx --text ../shared/data/wikitext-2-raw/wiki.test.raw

Rows: (1) only the weights rounded to int8 (RTN, per output channel), activations float, on the
original and on the rotated float graph; (2) `--hybrid` W8A8 with RTN weights, and with one role
group kept in float (`--keep-float`), to see which linears carry the error. KL against the float
model on WINDOWS x SEQ tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from onnxqf.graph import edit
from onnxqf.maths import qmath
from onnxqf.calib.data import token_windows
from onnxqf.analysis.evaluate import compare
from onnxqf.recognize import recognize
from onnxqf.graph.modelfile import load_model, save_model


def weight_only(src: Path, dst: Path) -> Path:
    model = load_model(src)
    for lin in recognize(model).linears(include_lm_head=False):
        edit.set_weight_matrix(lin, qmath.fake_quant_weight(lin.matrix()))
    return save_model(model, dst)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--text", required=True)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    src = Path(args.model)
    wins = token_windows(args.text, src, load_model(src), args.windows, args.seq)
    cli = [sys.executable, "-m", "onnxqf.cli"]
    rot = src.with_name(src.stem + ".budget.rotate.float.onnx")
    subprocess.run(cli + ["rewrite", str(src), "--rotate", "--quant", "none", "-q", "-o", str(rot)], check=True)
    rows = [("int8 weights only (RTN), original graph", weight_only(src, src.with_name(src.stem + ".budget.w.onnx"))),
            ("int8 weights only (RTN), rotated graph", weight_only(rot, src.with_name(src.stem + ".budget.rw.onnx")))]
    groups = {"none": [], "q/k/v": ["q_proj", "k_proj", "v_proj"], "o_proj": ["o_proj"],
              "gate/up": ["gate_proj", "up_proj"], "down_proj": ["down_proj"]}
    for label, roles in groups.items():
        dst = src.with_name(f"{src.stem}.budget.keep-{label.replace('/', '')}.onnx")
        keep = [a for r in roles for a in ("--keep-float", r)]
        subprocess.run(cli + ["rewrite", str(src), "--hybrid", "--weight-rounding", "rtn", *keep, "-q", "-o", str(dst)], check=True)
        rows.append((f"hybrid W8A8 (RTN weights), float: {label}", dst))
    print(f"| variant | KL nats/token ({args.windows} x {args.seq} tokens) | top-1 |\n|---|---|---|")
    out = []
    for label, path in rows:
        r = compare(src, path, wins, progress=False)
        out.append({"variant": label, **r})
        print(f"| {label} | {r['kl']:.5f} | {r['top1']:.4f} |", flush=True)
    Path(src.with_name("error_budget.json")).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
