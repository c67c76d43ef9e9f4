"""Prefill and decode speed of onnxruntime-genai folders through onnxruntime-genai's own generation loop
(:func:`onnxqf.genai.generate.generate`), the first folder the reference: the way an app runs them, pipeline folders
(``onnxqf pipeline``) included, which ``onnxqf bench`` (one graph, IOBinding) cannot time.

    python scripts/genai_generate_bench.py out/sg out/sg.w8a8 out/sg.int8w out/sg.pipe --out timing.json

A prompt of --prompt-tokens random token ids, --new-tokens greedy tokens, --repeats rounds over the folders in turn;
medians, × = the reference's time / this one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxqf.genai.folder import read_genai  # noqa: E402
from onnxqf.genai.generate import generate  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="genai folders; the first is the reference")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ep", default="cpu")
    ap.add_argument("--cuda-graph", action="store_true", help="--ep cuda: decode steps replayed as CUDA graphs")
    ap.add_argument("--out", help="JSON file for the rows")
    args = ap.parse_args(argv)
    vocab = read_genai(args.folders[0], check_attention=False).vocab or 40000
    ids = np.random.default_rng(0).integers(min(100, vocab - 1), min(40000, vocab), args.prompt_tokens)
    runs: dict[str, list] = {}
    for _ in range(args.repeats):
        for f in args.folders:
            r = generate(f, token_ids=ids, max_new_tokens=args.new_tokens, ep=args.ep, quiet=True,
                         cuda_graph=args.cuda_graph)
            runs.setdefault(f, []).append((r["prefill_s"] * 1e3, r["decode_tok_s"], r["tokens"][:8]))
    rows = {}
    for f, rs in runs.items():
        rows[f] = {"prefill_ms": float(np.median([x[0] for x in rs])),
                   "decode_tok_s": float(np.median([x[1] for x in rs])),
                   "runs": [(round(a, 1), round(b, 1)) for a, b, _ in rs], "first_tokens": rs[0][2]}
    ref = rows[args.folders[0]]
    for f, r in rows.items():
        print(f"{f}: prefill {r['prefill_ms']:.1f} ms ({ref['prefill_ms'] / r['prefill_ms']:.2f}x), decode "
              f"{r['decode_tok_s']:.1f} tok/s ({r['decode_tok_s'] / ref['decode_tok_s']:.2f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
