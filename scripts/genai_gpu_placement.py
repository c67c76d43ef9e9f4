"""Do onnxruntime-genai folders, and onnxqf's rewrites of them, run with every node on CUDA?

Here (CPU, builds the folders; small enough to travel with .ortgpu):

    python scripts/genai_gpu_placement.py build out/genai_tiny

On the GPU machine (onnxruntime-gpu from .ortgpu; onnxruntime-genai cannot travel there, so the
KV-cache loop is `onnxqf bench`'s, with IOBinding):

    source .ortgpu/activate.sh && pip install -q --no-deps --no-build-isolation -e . && \
        python scripts/genai_gpu_placement.py check out/genai_tiny --json $OUT/genai_placement.json

The model is tests/tiny.py's `llama-gqa` (random weights, hidden 64, GQA) exported float16 for CUDA
by onnxruntime-genai's model builder (`onnxqf export --kv-cache --dtype float16 --ep cuda`), then
rewritten by `onnxqf rewrite` with --rotate --quant none, W8A8 (token), --quant int4, --rotate
--quant int4 and --hybrid. `check` runs `onnxqf check --ep cuda` (placement; the rewrites with `--baseline` the float folder) and `onnxqf bench --ep
cuda` (prefill 1x64, decode from a past of 128) on each folder. Timings of a model this small are
launch overhead only; the point is placement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "rotate-float": ["--rotate", "--quant", "none"],
    "w8a8": [],
    "int4": ["--quant", "int4"],
    "rotate-int4": ["--rotate", "--quant", "int4"],
    "hybrid": ["--hybrid"],
}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    print("$ onnxqf " + " ".join(args), flush=True)
    return subprocess.run([sys.executable, "-m", "onnxqf.cli", *args], check=check, capture_output=not check, text=True)


def build(out: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import save_byte_tokenizer, tiny_model

    out.mkdir(parents=True, exist_ok=True)
    hf = out / "hf"
    if not (hf / "config.json").is_file():
        model = tiny_model("llama-gqa")
        model.config.eos_token_id = 0
        model.save_pretrained(str(hf))
        save_byte_tokenizer(hf)
    base = out / "fp16"
    if not (base / "genai_config.json").is_file():
        cli("export", str(hf), "--kv-cache", "--dtype", "float16", "--ep", "cuda", "-o", str(base / "model.onnx"))
    ids = out / "calib.npy"
    np.save(ids, np.random.default_rng(0).integers(1, 250, 2048))
    for name, flags in VARIANTS.items():
        if not (out / name / "genai_config.json").is_file():
            cli("rewrite", str(base), *flags, "--calib", str(ids), "--calib-windows", "4", "--calib-seq", "256", "-q",
                "-o", str(out / name / "model.onnx"))
    import shutil

    shutil.rmtree(hf)  # not needed on the GPU machine


def check(out: Path, json_path: str | None) -> int:
    results = {}
    worst = 0
    for name in ["fp16", *VARIANTS]:
        folder = out / name
        base = [] if name == "fp16" else ["--baseline", str(out / "fp16")]
        r = cli("check", str(folder), "--ep", "cuda", "--json", *base, check=False)
        entry = {"check_rc": r.returncode, "check": r.stdout.strip()[-2000:], "stderr": r.stderr.strip()[-500:]}
        print(f"{name}: check exit {r.returncode}\n{r.stdout.strip()[-600:]}\n{r.stderr.strip()[-300:]}", flush=True)
        worst = max(worst, r.returncode)
        results[name] = entry
    folders = [str(out / n) for n in ["fp16", *VARIANTS]]
    r = cli("bench", *folders, "--ep", "cuda", "--seq", "64", "--past", "128", "--decode-tokens", "16", "--repeats", "10",
            "--json", "-q", check=False)
    print(r.stdout[-4000:], r.stderr[-1000:], flush=True)
    results["bench"] = {"rc": r.returncode, "stdout": r.stdout[-20000:], "stderr": r.stderr[-2000:]}
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["build", "check"])
    ap.add_argument("folder")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.mode == "build":
        build(Path(args.folder))
        return 0
    return check(Path(args.folder), args.json)


if __name__ == "__main__":
    sys.exit(main())
