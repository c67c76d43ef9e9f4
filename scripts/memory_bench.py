"""Peak memory and wall time of `onnxqf rewrite` on big models, measured with /usr/bin/time -v.

    python scripts/synthetic_llama.py /work/big/hf8 --layers 8
    onnxqf export /work/big/hf8 --kv-cache --dtype float16 -o /work/big/g8/model.onnx
    python scripts/memory_bench.py /work/big/g8 --preset int4 --preset hybrid --rewrite-args '--calib-windows 4' \
        --json docs/data/memory_bench.json

Each preset runs as its own process (`onnxqf rewrite MODEL ARGS -o TMP`), so the peak resident set
size is that of one rewrite; the output goes to a temporary folder beside the model and is removed
afterwards (its size is recorded). Results are merged into ``--json`` by (model, preset).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {
    "int4": ["--rotate", "--quant", "int4"],
    "hybrid": ["--hybrid"],
}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(model: Path, preset: str, extra: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix="onnxqf-membench-", dir=model.parent))
    out = work / "out" / "model.onnx"
    cmd = ["/usr/bin/time", "-v", "onnxqf", "rewrite", str(model), *PRESETS[preset], *extra, "-o", str(out)]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t
    try:
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-30:]
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(tail))
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
        passes = re.findall(r"\[onnxqf\] (\w+Pass): \w[\w ]* \(([\d.]+) s\)", proc.stderr)
        return {"model": str(model), "preset": preset, "args": PRESETS[preset] + extra,
                "peak_rss_gb": round(rss / 1e6, 3), "wall_s": round(wall, 1),
                "output_gb": round(_du(out.parent) / 1e9, 2),
                "passes_s": {name: float(s) for name, s in passes}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="an onnxruntime-genai folder or .onnx file")
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS), required=True)
    ap.add_argument("--json", type=Path, help="merge the results into this file")
    ap.add_argument("--rewrite-args", default="", help="more `onnxqf rewrite` arguments, one string "
                    "(e.g. '--calib-windows 4')")
    args = ap.parse_args()
    rows = []
    for preset in args.preset:
        row = measure(args.model, preset, shlex.split(args.rewrite_args))
        row["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.exists() else []
        keep = [r for r in old if (r["model"], r["preset"]) not in {(n["model"], n["preset"]) for n in rows}]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(keep + rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
