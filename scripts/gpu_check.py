"""GPU evidence on the device machine: placement of every rewritten graph and latency vs FP16.

Run on a machine with onnxruntime-gpu (see docs/gpu.md):

    python scripts/gpu_check.py --out $OUT

It builds a SmolLM2-135M-shaped model with random weights (the real model cannot travel to the GPU
machine; placement and speed depend only on the graph and the shapes), exports it with onnxqf in
float32 and float16, rewrites it (W8A8 token, hybrid token, W8A8 tensor), runs
`onnxqf check --ep cuda` on each, and times one forward pass of each on the CUDA provider.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def sh(*args: str) -> subprocess.CompletedProcess:
    print("$", " ".join(args), flush=True)
    p = subprocess.run(list(args), capture_output=True, text=True)
    print(p.stdout[-3000:], p.stderr[-3000:], sep="", flush=True)
    return p


def time_session(path: Path, batch: int, seq: int, reps: int = 20) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CUDAExecutionProvider"])
    ids = ort.OrtValue.ortvalue_from_numpy(np.random.randint(0, 49152, (batch, seq)).astype(np.int64), "cuda", 0)
    io = s.io_binding()
    io.bind_ortvalue_input(s.get_inputs()[0].name, ids)
    io.bind_output(s.get_outputs()[0].name, "cuda", 0)
    for _ in range(3):
        s.run_with_iobinding(io)
    io.synchronize_outputs()
    t = time.perf_counter()
    for _ in range(reps):
        s.run_with_iobinding(io)
    io.synchronize_outputs()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    out = Path(args.out)
    work = Path("/tmp/onnxqf-gpu")
    work.mkdir(exist_ok=True)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from onnxqf.models.export import export_model

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, rope_theta=100000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    results = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    f32, f16 = work / "smol.onnx", work / "smol16.onnx"
    if not f32.exists():  # reuse the exports while the machine stays warm
        export_model(model, f32)
    if not f16.exists():
        export_model(model, f16, dtype="float16")
    np.save(work / "calib.npy", np.random.default_rng(0).integers(0, 49152, 4096))
    variants = {"float32": f32, "float16": f16}
    for name, src, flags in [
        ("w8a8-token", f32, []), ("hybrid-token", f32, ["--hybrid"]), ("w8a8-tensor", f32, ["--act-quant", "tensor"]),
        ("hybrid-token-fp16", f16, ["--hybrid"]),
    ]:
        dst = work / f"{name}.onnx"
        p = sh(sys.executable, "-m", "onnxqf.cli", "rewrite", str(src), *flags, "--calib", str(work / "calib.npy"),
               "--calib-windows", "2", "-q", "-o", str(dst))
        if p.returncode == 0:
            variants[name] = dst
    results["check"] = {}
    for name, path in variants.items():
        p = sh(sys.executable, "-m", "onnxqf.cli", "check", str(path), "--ep", "cuda", "--json")
        try:
            results["check"][name] = {"exit": p.returncode, **json.loads(p.stdout.strip().splitlines()[-1])}
        except Exception:
            results["check"][name] = {"exit": p.returncode, "stderr": p.stderr[-500:]}
    results["latency_ms"] = {}
    for batch, seq in [(1, 512), (8, 512)]:
        for name, path in variants.items():
            try:
                ms = time_session(path, batch, seq)
            except Exception as exc:
                ms = f"error: {str(exc)[:200]}"
            results["latency_ms"][f"{name} b{batch}x{seq}"] = ms
            print(name, batch, seq, ms, flush=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
