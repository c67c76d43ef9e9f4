"""Speed of block-wise GPTQ (int4, block 32) on one random problem of a given size, and its output error.

    python scripts/gptq_speed.py 4096 2048        # K input channels, N output columns

A random X [2K, K] gives H = X^T X; B [K, N] is random. Prints the time to prepare H (damp, invert,
factor: float32 through PyTorch above onnxqf.maths.gptq.FLOAT64_MAX_CHANNELS) and to round B, and
tr(E^T H E) for E = B - Q(B), so that two versions of the loop can be compared on the same problem.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from onnxqf.maths import gptq, nbits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("K", type=int)
    ap.add_argument("N", type=int)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2 * args.K, args.K)).astype(np.float32)
    H = X.T @ X
    del X
    B = rng.standard_normal((args.K, args.N)) * 0.02
    t = time.perf_counter()
    p = gptq.prepare(H, 0.01, False)
    print(f"prepare: {time.perf_counter() - t:.2f} s ({p.U.dtype})")
    t = time.perf_counter()
    q = nbits.gptq_blockwise(B, p, 4, 32, scale_dtype=np.float16)
    dt = time.perf_counter() - t
    E = B - q.dequantize()
    print(f"gptq_blockwise int4 block 32: {dt:.2f} s, output error tr(E^T H E) = "
          f"{np.sum(E * (H.astype(np.float64) @ E)):.6g}")


if __name__ == "__main__":
    main()
