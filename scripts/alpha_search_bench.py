"""Time the hybrid's α search for one decoder layer of Llama-2-7B shape (issue 10: target <= 20 s on 2 cores).

    python scripts/alpha_search_bench.py [--layers 1] [--tokens 1024] [--json out.json]

What it times is exactly what `onnxqf rewrite --hybrid` runs per layer: for each of the four sites
(attn_in 4096 -> q/k/v 3 x 4096, o_in 4096 -> 4096 with 32 KV groups, mlp_in 4096 -> gate/up 2 x 11008,
down_in 11008 -> 4096), :func:`onnxqf.maths.smoothing.choose_scales` over the α grid and "no smoothing", with
the plan's rotation of that site (the full hybrid's: 4096 = 16·16·16 after the norms, 11008 =
344·16·2 before down_proj, per-head 128 and 32-head mixing before o_proj). Activations are random
with a few outlier channels (the search's cost does not depend on the values); weights random.
CPU only, on whatever cores the machine has (``nproc``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from onnxqf.graph.structure import ModelConfig
from onnxqf.maths import smoothing
from onnxqf.plan import Plan

SITES = {  # kind: (in, out)
    "attn_in": (4096, 3 * 4096),
    "o_in": (4096, 4096),
    "mlp_in": (4096, 2 * 11008),
    "down_in": (11008, 4096),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1, help="layers to time (default 1)")
    ap.add_argument("--tokens", type=int, default=1024, help="calibration sample per site (rewrite's default: 1024)")
    ap.add_argument("--json", help="write the timings here")
    args = ap.parse_args()
    cfg = ModelConfig(hidden=4096, num_heads=32, num_kv_heads=32, head_dim=128, intermediate=11008, vocab=32000)
    plan = Plan.build(cfg, "hybrid", seed=0)
    rng = np.random.default_rng(0)
    rows = []
    for layer in range(args.layers):
        for kind, (n, out) in SITES.items():
            X = rng.standard_normal((args.tokens, n))
            X[:, rng.choice(n, 8, replace=False)] *= 50.0  # outlier channels
            B = rng.standard_normal((n, out)) * 0.02
            groups = cfg.kv_groups if kind == "o_in" else None
            R = plan.site_transform(kind, cfg)
            t = time.perf_counter()
            choice = smoothing.choose_scales(X, np.abs(X).max(axis=0), B, "auto", groups, R)
            dt = time.perf_counter() - t
            rows.append({"layer": layer, "site": kind, "in": n, "out": out, "seconds": round(dt, 2),
                         "alpha": choice.alpha})
            print(f"layer {layer} {kind:8s} {n:5d} -> {out:5d}: {dt:6.2f} s (alpha {choice.alpha})", flush=True)
    per_layer = sum(r["seconds"] for r in rows) / args.layers
    print(f"\n{per_layer:.1f} s per layer on {os.cpu_count()} cores (tokens {args.tokens})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cores": os.cpu_count(), "tokens": args.tokens, "per_layer_s": per_layer, "sites": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
