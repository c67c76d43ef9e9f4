"""Resident memory of onnxqf's layer-by-layer runner: the peak while each layer runs and what stays
resident after its ONNX Runtime sessions are gone, with and without ONNX Runtime's CPU memory arena.

    python scripts/layer_session_memory.py /work/big/g3/model.onnx --layers 2 [--arena]

MODEL: a decoder ONNX file (e.g. a 3-layer Llama-2-7B-shaped model: scripts/synthetic_llama.py, then
`onnxqf export DIR --kv-cache --dtype float16`). Runs layers 0.. on 4 windows of 512 random token ids,
capturing every site of layer 0, and samples VmRSS every 50 ms.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--arena", action="store_true", help="keep ONNX Runtime's CPU memory arena (the old default)")
    args = ap.parse_args()

    from onnxqf.calib import layerwise
    from onnxqf.runtime import session as runtime
    from onnxqf.graph import store
    from onnxqf.graph.modelfile import load_model
    from onnxqf.recognize import recognize

    if args.arena:  # what LayerRunner asks for (arena=False), overridden
        make = runtime.make_session
        layerwise.make_session = lambda path, **kw: make(path, **{**kw, "arena": True})
    model = load_model(args.model)
    structure = recognize(model)
    wins = np.random.default_rng(0).integers(0, structure.config.vocab, size=(4, 512))
    runner = layerwise.LayerRunner(model, structure, wins, {0: {s.name: s.value for s in structure.layers[0].sites()}})
    peak = [0.0]

    def sample():
        while True:
            peak[0] = max(peak[0], rss_gb())
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    print(f"arena {'on' if args.arena else 'off'}; before: {rss_gb():.3f} GB")
    for k in range(args.layers):
        peak[0], t = 0.0, time.time()
        for _ in runner.run(k, advance=True, progress=False):
            pass
        store.trim_heap()
        print(f"layer {k}: peak {peak[0]:.3f} GB, after {rss_gb():.3f} GB, {time.time() - t:.1f} s")


if __name__ == "__main__":
    main()
