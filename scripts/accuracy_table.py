"""The accuracy table: float / W8A8 / smooth / rotate / hybrid x act-quant token / tensor, and
ONNX Runtime's own quantize_dynamic, on the same windows of text.

    python scripts/accuracy_table.py out/smollm2.onnx --text ../shared/data/wikitext-2-raw/wiki.test.raw

Every variant is made with the `onnxqf rewrite` command printed in the table, evaluated with
`onnxqf eval` semantics (KL(P_float || P_variant) nats/token over all positions, PPL, top-1).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from onnxqf.analysis.evaluate import compare
from onnxqf.calib.data import token_windows
from onnxqf.graph.modelfile import load_model

# label, file key, flags
VARIANTS = [
    ("W8A8, no transform", "w8a8", []),
    ("smooth", "smooth", ["--smooth"]),
    ("rotate", "rotate", ["--rotate"]),
    ("hybrid, folded (two sites)", "hybrid-folded", ["--hybrid", "folded"]),
    ("hybrid (full: four sites)", "hybrid", ["--hybrid"]),
]


def ort_quantize_dynamic(src: Path, dst: Path) -> None:
    """ONNX Runtime's quantize_dynamic with per-channel int8 weights on the same exported graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     use_external_data_format=True, extra_options={"MatMulConstBOnly": True})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--text", required=True)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--calib", help="calibration text (default: the last 400 kB of --text, disjoint from the evaluated "
                                    "windows at its start)")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--only", action="append",
                    help="run only the variants with this file key (repeatable), e.g. hybrid")
    ap.add_argument("--act", action="append", choices=["token", "tensor"],
                    help="activation modes to run (default both)")
    args = ap.parse_args()
    src = Path(args.model)
    orig = load_model(src)
    wins = token_windows(args.text, src, orig, args.windows, args.seq)
    del orig
    calib = args.calib
    if calib is None:
        data = Path(args.text).read_bytes()
        calib = str(src.with_name("calib_tail.txt"))
        Path(calib).write_bytes(data[-400_000:])
        assert len(data) - 400_000 > 4 * args.windows * args.seq, "text too short for disjoint calibration"
    rows = []
    for act in args.act or ("token", "tensor"):
        for label, key, flags in VARIANTS:
            if args.only and key not in args.only:
                continue
            dst = src.with_name(f"{src.stem}.table.{key}.{act}.onnx")
            cmd = ["onnxqf", "rewrite", str(src), *flags, "--act-quant", act, "--calib", calib,
                   "--calib-windows", str(args.calib_windows), "-q", "-o", str(dst)]
            t = time.time()
            subprocess.run([sys.executable, "-m", "onnxqf.cli", *cmd[1:]], check=True)
            r = compare(src, dst, wins, progress=False)
            r.update(variant=label, act_quant=act, command=shlex.join(cmd), rewrite_s=round(time.time() - t, 1))
            rows.append(r)
            print(f"{act:6s} {label:20s} KL={r['kl']:.5f} ppl={r['ppl_new']:.3f} top1={r['top1']:.4f}", flush=True)
    if not args.only:
        dst = src.with_name(f"{src.stem}.table.ort_quantize_dynamic.onnx")
        ort_quantize_dynamic(src, dst)
        r = compare(src, dst, wins, progress=False)
        r.update(variant="ORT quantize_dynamic (per-channel int8 weights)",
                 act_quant="tensor (uint8, DynamicQuantizeLinear)",
                 command="onnxruntime.quantization.quantize_dynamic(per_channel=True, weight_type=QInt8, MatMul only)")
        rows.append(r)
    base = {a: next(x["kl"] for x in rows if x["act_quant"] == a and x["variant"].startswith("W8A8"))
            for a in ("token", "tensor") if any(x["act_quant"] == a and x["variant"].startswith("W8A8") for x in rows)}
    print(f"\n{args.windows} windows x {args.seq} tokens; float PPL {rows[0]['ppl_orig']:.3f}\n")
    print("| activations | variant | PPL | ΔPPL | KL nats/token | KL vs W8A8 | top-1 |\n|---|---|---|---|---|---|---|")
    print(f"| float | reference | {rows[0]['ppl_orig']:.3f} | 0 | 0 | | 1 |")
    for r in rows:
        ratio = ("" if r["act_quant"] not in base else "baseline" if r["variant"].startswith("W8A8")
                 else f"{base[r['act_quant']] / r['kl']:.1f}x lower")
        print(f"| {r['act_quant']} | {r['variant']} | {r['ppl_new']:.3f} | "
              f"{100 * (r['ppl_new'] / r['ppl_orig'] - 1):+.2f}% | {r['kl']:.5f} | {ratio} | {r['top1']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
