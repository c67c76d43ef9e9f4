"""numpy's strided transpose copy against onnxqf.maths.layout.transpose_copy, on Llama-2-7B weight shapes
(docs/benchmarks.md "Rewrite speed on the CPU"): the best of --repeats runs of each, in one process, same bytes checked.

    python scripts/transpose_bench.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxqf.maths.layout import transpose_copy  # noqa: E402

SHAPES = [("lm_head int8 codes", (4096, 32000), np.int8), ("down_proj int8 codes", (11008, 4096), np.int8),
          ("gate/up int8 codes", (4096, 11008), np.int8), ("int4 codes as uint8, [N, K]", (11008, 4096), np.uint8)]


def best(fn, a, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(a)
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    for name, shape, dtype in SHAPES:
        a = rng.integers(-127 if dtype == np.int8 else 0, 128, shape).astype(dtype)
        if not np.array_equal(transpose_copy(a), a.T):
            raise SystemExit(f"{name}: transpose_copy differs from numpy's")
        strided = best(lambda x: np.ascontiguousarray(x.T), a, args.repeats)
        tiled = best(transpose_copy, a, args.repeats)
        print(f"{name} {shape[0]} x {shape[1]}: numpy {strided:.3f} s, tiled {tiled:.3f} s ({strided / tiled:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
