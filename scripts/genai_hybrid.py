"""SmolLM2 as an onnxruntime-genai folder (KV cache), rewritten with --hybrid: accuracy against the
float genai folder and against the plain-export path, and greedy generations in onnxruntime-genai.

    python scripts/genai_hybrid.py --text ../shared/data/wikitext-2-raw/wiki.test.raw --calib out/calib_tail.txt \
        --json docs/data/genai_hybrid.json

Steps (each skipped when its output exists): `onnxqf export smollm2 --kv-cache -o out/genai/fp32/model.onnx`
(the model builder, fp32, CPU); `onnxqf rewrite out/genai/fp32 --hybrid --calib CALIB --calib-windows 32
-o out/genai/hybrid/model.onnx`; `onnxqf eval` of the hybrid folder against the float folder on the first
--windows windows of --text (empty past, all-ones mask); 10 fixed prompts, 32 greedy tokens each, through
onnxruntime-genai's own generator (og.Model + og.Generator), float vs hybrid.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "The French Revolution began in",
    "A good way to learn a new language is",
]
NEW_TOKENS = 32


def run(cmd: list[str]) -> None:
    print("$ onnxqf " + " ".join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "onnxqf.cli", *cmd], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", required=True)
    ap.add_argument("--calib", required=True, help="calibration text, disjoint from the evaluated windows")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--work", default="out/genai")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.work)
    flt, hyb = work / "fp32", work / "hybrid"
    timing = {}
    if not (flt / "genai_config.json").is_file():
        t = time.time()
        run(["export", "smollm2", "--kv-cache", "-o", str(flt / "model.onnx")])
        timing["export_s"] = round(time.time() - t, 1)
    if not (hyb / "genai_config.json").is_file():
        t = time.time()
        run(["rewrite", str(flt), "--hybrid", "--calib", args.calib, "--calib-windows", str(args.calib_windows),
             "-o", str(hyb / "model.onnx")])
        timing["rewrite_s"] = round(time.time() - t, 1)

    from onnxqf.analysis.evaluate import compare
    from onnxqf.calib.data import token_windows
    from onnxqf.genai.folder import model_file
    from onnxqf.genai.generate import generate
    from onnxqf.graph.modelfile import load_model

    plain = Path("out/smollm2.onnx")
    wins = token_windows(args.text, plain, load_model(plain),
                         args.windows, 512)
    acc = compare(flt, hyb, wins, progress=True)
    print(f"hybrid vs float genai folder: KL {acc['kl']:.5f} PPL {acc['ppl_orig']:.3f} -> {acc['ppl_new']:.3f} top-1 "
          f"{acc['top1']:.4f}")
    gens = []
    same_total = 0
    for prompt in PROMPTS:
        sa, sb = io.StringIO(), io.StringIO()
        a = generate(flt, prompt, max_new_tokens=NEW_TOKENS, quiet=True, stream=sa)
        b = generate(hyb, prompt, max_new_tokens=NEW_TOKENS, quiet=True, stream=sb)
        a["text"], b["text"] = sa.getvalue().strip(), sb.getvalue().strip()
        ta, tb = a["tokens"], b["tokens"]
        same = sum(x == y for x, y in zip(ta, tb))
        same_total += same
        gens.append({"prompt": prompt, "float": a.get("text"), "hybrid": b.get("text"), "identical_tokens": same,
                     "float_ids": ta, "hybrid_ids": tb})
        print(f"{same:2d}/{NEW_TOKENS} identical | {prompt!r}", flush=True)
    frac = same_total / (NEW_TOKENS * len(PROMPTS))
    print(f"identical tokens (same position) over {len(PROMPTS)} prompts x {NEW_TOKENS}: {frac:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"accuracy": acc, "generations": gens, "identical_fraction": frac,
                                               "timing": timing, "graph": str(model_file(hyb))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
