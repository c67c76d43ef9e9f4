"""Where the full hybrid's W8A8 error comes from on SmolLM2: weights vs activations, by role.

    python scripts/hybrid_budget.py out/smollm2.onnx --text ../shared/data/wikitext-2-raw/wiki.test.raw \
        --calib out/calib_tail.txt --json docs/data/hybrid_budget.json

Runs the full hybrid transform once (float, `--hybrid --quant none` with the same calibration as the
accuracy table), collects the GPTQ Hessians once, then quantizes copies of that float graph:
W8A8 (everything), W8A8 with one role group kept float, the weights alone (GPTQ or RTN int8 per
output channel, activations float), the activations alone (per-token int8 as the `token` graph
rounds them, simulated in float, weights float; at all four sites and at each site kind alone), and
per-token activations with int8 GPTQ weights of one scale per block of 32 or 128 input channels
(MatMulNBits weights: what an int8 GEMM with block-wise weight scales would compute, which
`MatMulInteger` cannot express). Each is compared with the original export on --windows windows
from the start of --text (--variants: a comma-separated subset of the row keys). The transformed
float graph and the Hessians are cached beside the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from onnxqf.analysis.evaluate import compare
from onnxqf.calib import calibrate
from onnxqf.calib.data import load_tokenizer, load_tokens, token_windows, windows
from onnxqf.graph import edit
from onnxqf.graph.modelfile import load_model, save_model
from onnxqf.lowering.nbits import MatMulNBits
from onnxqf.lowering.w8a8 import Int8Token, per_token_codes
from onnxqf.maths import qmath
from onnxqf.maths.gptq import gptq_quantize
from onnxqf.options import Calibration, RewriteOptions, Transform
from onnxqf.passes.quantize import QuantizePass
from onnxqf.pipeline import rewrite
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


def fake_quant_activations(model, values) -> None:
    """Per-token symmetric int8 rounding of each (float32) value, in float, for its MatMul/MatMulNBits readers:
    the `token` graph's own code nodes (onnxqf.lowering.w8a8.per_token_codes), then codes * max|x| / 127."""
    g = model.graph
    for i, x in enumerate(values):
        readers = [(n, j) for n, j in x.uses() if n.op_type in ("MatMul", "MatMulNBits")]
        tape = ir_tape.Tape(g)
        codes, amax, qmax = per_token_codes(tape, g, x, ir.DataType.FLOAT, f"budget/fake_quant_{i}")
        y = tape.op("Div", [tape.op("Mul", [codes, amax]), qmax])
        g.insert_after(x.producer(), tape.nodes)
        for node, j in readers:
            node.replace_input_with(j, y)


def activations_only(src: Path, dst: Path, kinds: tuple[str, ...] | None, block: int | None = None,
                     hessians: dict | None = None) -> Path:
    """Per-token int8 activations (simulated) at the sites of ``kinds`` (None: all); weights float, or with
    ``block`` int8 GPTQ weights with one scale per ``block`` input channels (MatMulNBits)."""
    model = load_model(src)
    values = [s.value for s in recognize(model).sites() if kinds is None or s.kind in kinds]
    if block is not None:
        QuantizePass(MatMulNBits(bits=8, block_size=block), hessians=hessians)(model)
    fake_quant_activations(model, values)
    return save_model(model, dst)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--text", required=True)
    ap.add_argument("--calib", required=True, help="calibration text, disjoint from the evaluated windows")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--variants", help="comma-separated row keys to run (default: all): float, w-gptq, w-rtn, "
                    "a8, a8-attn_in, a8-o_in, a8-mlp_in, a8-down_in, a8-block32, a8-block128, w8a8, "
                    "w8a8-keep-qkv, w8a8-keep-o_proj, w8a8-keep-gateup, w8a8-keep-down_proj")
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
        rewrite(model, RewriteOptions(Transform("hybrid"), None, Calibration(args.calib, args.calib_windows)), tok)
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
    wanted = None if not args.variants else set(args.variants.split(","))

    def evaluate(key: str, label: str, make) -> None:
        if wanted is not None and key not in wanted:
            return
        t = time.time()
        r = compare(src, make(), wins, progress=False)
        rows.append({"key": key, "variant": label, **r})
        print(f"| {label} | {r['kl']:.5f} | {r['top1']:.4f} |  ({time.time() - t:.0f} s)", flush=True)

    print(f"| variant | KL nats/token ({args.windows} x {args.seq}) | top-1 |\n|---|---|---|")
    evaluate("float", "float hybrid (rotations + smoothing, no quantization)", lambda: flt)
    evaluate("w-gptq", "weights only, int8 GPTQ", lambda: weights_only(flt, work / "w_gptq.onnx", H))
    evaluate("w-rtn", "weights only, int8 RTN", lambda: weights_only(flt, work / "w_rtn.onnx", None))
    evaluate("a8", "activations only, per-token int8 at all four sites",
             lambda: activations_only(flt, work / "a8.onnx", None))
    for kind in ("attn_in", "o_in", "mlp_in", "down_in"):
        evaluate(f"a8-{kind}", f"activations only, per-token int8 at {kind}",
                 lambda kind=kind: activations_only(flt, work / f"a8_{kind}.onnx", (kind,)))
    for block in (32, 128):
        evaluate(f"a8-block{block}", f"per-token int8 activations x int8 GPTQ weights, one scale per {block} inputs",
                 lambda block=block: activations_only(flt, work / f"a8_block{block}.onnx", None, block, H))

    def w8a8(keep):
        def make():
            model = load_model(flt)
            QuantizePass(Int8Token(), keep_float=keep, hessians=H)(model)
            return save_model(model, work / "w8a8.onnx")
        return make

    for label, keep in [("none", ())] + list(GROUPS.items()):
        key = "w8a8" if not keep else f"w8a8-keep-{label.replace('/', '')}"
        evaluate(key, f"W8A8 (GPTQ), float: {label}", w8a8(keep))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
