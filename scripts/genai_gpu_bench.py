"""Speed of onnxruntime-genai folders: the model builder's float and int4 graphs against onnxqf's rewrites of
the float one, prefill and KV-cache decode, on CUDA at Llama-2-7B layer shapes (issues 8 and 9) or on the CPU
provider (``--ep cpu``: float32, hidden 2048, d_ff 5632, 32 heads of 64, vocab 32000; issue 18).

On the GPU machine (its onnxruntime-gpu from .ortgpu; onnxruntime-genai's native library cannot travel
there, but its model builder is Python: copy the package's ``models`` folder, with a two-line
``__init__.py`` standing in for the native one, into a git-ignored folder that travels):

    python scripts/genai_gpu_bench.py stage-builder .gbuild         # here, once
    source .ortgpu/activate.sh && python scripts/genai_gpu_bench.py run --builder .gbuild --out $OUT

onnxruntime-genai's own generation loop on the GPU machine's CPU (its Python is 3.12): ``stage-genai`` downloads the
cp312 wheels of onnxruntime and onnxruntime-genai (about 38 MB) into a git-ignored folder that travels; there, unzip
them onto ``PYTHONPATH`` for scripts/genai_generate_bench.py (docs/benchmarks.md §h run 8):

    python scripts/genai_gpu_bench.py stage-genai .whl/312           # here, once
    mkdir -p /dev/shm/py312 && for w in .whl/312/*.whl; do python3 -m zipfile -e $w /dev/shm/py312; done
    PYTHONPATH=/dev/shm/py312 python3 scripts/genai_generate_bench.py FP32_FOLDER OTHER_FOLDER ...

``run`` makes a random-weight Llama with Llama-2-7B layer shapes (hidden 4096, 32 heads of 128, d_ff
11008, vocab 32000; --layers, default 4) as a Hugging Face folder in float16, builds it with the model
builder (``-p fp16 -e cuda``: GroupQueryAttention, fused residual-add + RMSNorm, packed q/k/v; and ``-p
int4 -e cuda``, the builder's own int4 RTN, block 32), rewrites the FP16 folder with ``onnxqf rewrite``
(``--quant int4``, ``--rotate --quant int4``, W8A8 token, ``--hybrid``; round-to-nearest weights:
GPTQ's calibration would run the 7B-shaped model on the CPU, and weight values do not change speed),
checks placement (``onnxqf check --ep cuda --baseline FP16``) and times every folder in one
``onnxqf bench --ep cuda`` run: prefill 1 x --seq and decode from a past of --past, the builder's FP16
folder as the reference. Each step has a time limit; results go to OUT/genai_gpu_bench.json as they
come. ``--tiny`` runs the same at tiny shapes on the CPU (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()

# name -> onnxqf rewrite arguments (of the builder's float folder), per provider; in order of importance:
# what does not fit the time budget is skipped from the end. A rewrite lowers for the folder's provider.
REWRITES = {
    "cuda": {
        "onnxqf rotate + int4": ["--rotate", "--quant", "int4"],
        "onnxqf W8A8 token": [],
        "onnxqf int4": ["--quant", "int4"],
        "onnxqf hybrid W8A8": ["--hybrid", "--alpha", "0.5"],
        # onnxqf's own CUDA kernels (kernels/; ONNXQF_KERNELS names the built library)
        "onnxqf W8A8 kernels": ["--lowering", "onnxqf-cuda"],
        "onnxqf hybrid W8A8 kernels": ["--hybrid", "--alpha", "0.5", "--lowering", "onnxqf-cuda"],
        "onnxqf W8A8 kernels + lm_head": ["--lowering", "onnxqf-cuda", "--quantize-lm-head"],
        "onnxqf hybrid W8A8 kernels + lm_head": ["--hybrid", "--alpha", "0.5", "--lowering", "onnxqf-cuda",
                                                 "--quantize-lm-head"],
        # the norms left as ONNX Runtime's SkipSimplifiedLayerNormalization nodes (the op's skip_norm off)
        "onnxqf W8A8 kernels norm nodes + lm_head": ["--lowering", "onnxqf-cuda:fuse_norm=false", "--quantize-lm-head"],
        # the op's asymmetric codes (a step and a zero point per token: int8-token-asym's, docs/benchmarks.md g18)
        "onnxqf W8A8 kernels asym + lm_head": ["--lowering", "onnxqf-cuda", "--act-quant", "asym",
                                              "--quantize-lm-head"],
        "onnxqf hybrid W8A8 kernels asym + lm_head": ["--hybrid", "--alpha", "0.5", "--lowering", "onnxqf-cuda",
                                                      "--act-quant", "asym", "--quantize-lm-head"],
    },
    "cpu": {
        "onnxqf W8A8 token": [],
        "onnxqf W8A8 token + lm_head": ["--quantize-lm-head"],
        "onnxqf W8A8 token ql + lm_head": ["--lowering", "uint8-token-ql", "--quantize-lm-head"],
        "onnxqf hybrid W8A8 ql batched:64 + lm_head": ["--hybrid", "--alpha", "0.5", "--lowering", "uint8-token-ql",
                                                        "--online-rotation", "batched:64", "--quantize-lm-head"],
        "onnxqf hybrid W8A8 ql cycle:64 + lm_head": ["--hybrid", "--alpha", "0.5", "--lowering", "uint8-token-ql",
                                                      "--online-rotation", "cycle:64", "--quantize-lm-head"],
        "onnxqf int4 + lm_head int4": ["--quant", "int4", "--quantize-lm-head", "--lm-head-bits", "4"],
        # lm_head as 8-bit MatMulNBits (accuracy_level 4: MLAS's int8 kernels, block-wise int8 activations)
        "onnxqf W8A8 token ql + lm_head 8-bit": ["--lowering", "uint8-token-ql", "--quantize-lm-head",
                                                 "--lm-head-bits", "8"],
        "onnxqf hybrid W8A8 ql + lm_head 8-bit": ["--hybrid", "--alpha", "0.5", "--quantize-lm-head",
                                                  "--lm-head-bits", "8"],
        "onnxqf int8w + lm_head 8-bit": ["--quant", "int8w", "--quantize-lm-head"],
        "onnxqf W8A8 token ql + lm_head int4": ["--lowering", "uint8-token-ql", "--quantize-lm-head",
                                                "--lm-head-bits", "4"],
        "onnxqf hybrid W8A8 ql + lm_head int4": ["--hybrid", "--alpha", "0.5", "--quantize-lm-head",
                                                 "--lm-head-bits", "4"],
        "onnxqf hybrid W8A8": ["--hybrid", "--alpha", "0.5"],
        "onnxqf int4": ["--quant", "int4"],
        "onnxqf W8A8 int8 x int8": ["--lowering", "int8-token"],
        "onnxqf W8A8 token ql": ["--lowering", "uint8-token-ql"],
        # onnxqf's CPU op library (kernels/build_cpu.sh; ONNXQF_CPU_KERNELS names the built library)
        # (symmetric codes, as in run 6; the lowering's default is asymmetric since 2026-12-06: the asym rows)
        "onnxqf W8A8 cpu op + lm_head": ["--lowering", "onnxqf-cpu", "--act-quant", "token", "--quantize-lm-head"],
        "onnxqf hybrid W8A8 cpu op + lm_head": ["--hybrid", "--alpha", "0.5", "--lowering", "onnxqf-cpu",
                                                "--act-quant", "token", "--quantize-lm-head"],
        "onnxqf W8A8 cpu op asym + lm_head": ["--lowering", "onnxqf-cpu", "--act-quant", "asym", "--quantize-lm-head"],
        "onnxqf hybrid W8A8 cpu op asym + lm_head": ["--hybrid", "--alpha", "0.5", "--lowering", "onnxqf-cpu",
                                                     "--act-quant", "asym", "--quantize-lm-head"],
        "onnxqf W8A8 cpu linear + lm_head": ["--lowering", "onnxqf-cpu:gemm=onnxqf", "--act-quant", "asym",
                                             "--quantize-lm-head"],
        "onnxqf hybrid W8A8 cpu linear + lm_head": ["--hybrid", "--alpha", "0.5", "--lowering",
                                                    "onnxqf-cpu:gemm=onnxqf", "--act-quant", "asym",
                                                    "--quantize-lm-head"],
        "onnxqf hybrid W8A8 cpu op, rotation nodes + lm_head": [
            "--hybrid", "--alpha", "0.5", "--lowering", "onnxqf-cpu:fuse_rotations=false", "--act-quant", "token",
            "--quantize-lm-head"],
        "onnxqf W8A8 asym": ["--act-quant", "asym"],
        "onnxqf int4 accuracy_level 0": ["--quant", "int4", "--accuracy-level", "0"],
        "onnxqf rotate + int4": ["--rotate", "--quant", "int4"],
    },
}
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                 vocab_size=512),
    "cuda": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 head_dim=128, vocab_size=32000),
    "cpu": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=32, head_dim=64,
                vocab_size=32000),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    vocab_size=49152),
}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def stage_builder(dest: Path) -> None:
    """Copy onnxruntime-genai's Python model builder (not its native library) into ``dest``."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or spec.origin is None:
        sys.exit("onnxruntime-genai is not installed here: pip install onnxruntime-genai")
    src = Path(spec.origin).parent
    pkg = dest / "onnxruntime_genai"
    shutil.rmtree(pkg, ignore_errors=True)
    shutil.copytree(src / "models", pkg / "models", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    meta = {k: getattr(__import__("onnxruntime_genai"), k) for k in ("__version__", "__commit__")}
    (pkg / "__init__.py").write_text("".join(f"{k} = {v!r}\n" for k, v in meta.items()))
    size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
    print(f"{pkg}: onnxruntime-genai {meta['__version__']} model builder, {size / 1e6:.1f} MB")


def sh(args: list, env: dict, timeout: float, cwd: Path | None = None, keep: int = 4000) -> dict:
    """Run a child; ``cwd`` matters for ``python -m``, which puts the working folder first on sys.path. The last
    ``keep`` characters of its stdout are kept (0: all of it, for output that is parsed)."""
    log("$ " + " ".join(str(a) for a in args))
    t = time.perf_counter()
    try:
        p = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=max(5.0, timeout),
                           cwd=cwd)
        r = {"rc": p.returncode, "stdout": p.stdout[-keep:] if keep else p.stdout, "stderr": p.stderr[-2000:]}
    except subprocess.TimeoutExpired:
        r = {"rc": "timeout", "stdout": "", "stderr": ""}
    r["seconds"] = round(time.perf_counter() - t, 1)
    log(f"  -> rc {r['rc']} in {r['seconds']} s {'' if r['rc'] == 0 else r['stderr'].strip()[-300:]}")
    return r


def source_tree(base: Path) -> Path:
    """A folder from which this checkout imports as an install would (onnxqf, onnxqf.passes, onnxqf.models: the
    layout pyproject.toml maps), so that machines where onnxqf is not installed, or installed from elsewhere, run
    exactly this tree; it goes first on the children's PYTHONPATH."""
    site = base / "site"
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(ROOT / "onnxqf", site / "onnxqf", ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("passes", "models"):  # over any copy of them already in onnxqf/ (as on the GPU machine's checkout)
        shutil.copytree(ROOT / sub, site / "onnxqf" / sub, ignore=shutil.ignore_patterns("__pycache__"),
                        dirs_exist_ok=True)
    return site


def make_hf(path: Path, layers: int, shape: str) -> None:
    """A random Llama of the shape as a Hugging Face folder (scripts/synthetic_llama.py: one layer in memory at a time;
    weight values do not change speed)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from synthetic_llama import write_folder

    write_folder(path, layers, shape=SHAPES[shape])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stage-builder")
    st.add_argument("dest", type=Path)
    sg = sub.add_parser("stage-genai", help="download onnxruntime and onnxruntime-genai wheels for another Python")
    sg.add_argument("dest", type=Path)
    sg.add_argument("--python-version", default="3.12")
    sg.add_argument("--onnxruntime", default="1.32.0", help="onnxruntime version (genai 0.18 needs >= 1.31)")
    sg.add_argument("--genai", default="0.18.0", help="onnxruntime-genai version")
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--builder", type=Path, help="folder made by stage-builder (default: the installed "
                                                "onnxruntime-genai)")
    r.add_argument("--ep", choices=["cuda", "cpu"], default="cuda",
                   help="provider: cuda (float16 folders, Llama-2-7B layer shapes) or cpu (float32, hidden 2048)")
    r.add_argument("--shape", choices=["cuda", "cpu", "smollm2"],
                   help="layer shapes (default: the provider's: Llama-2-7B's for cuda, hidden 2048 for cpu)")
    r.add_argument("--layers", type=int, default=4)
    r.add_argument("--seq", type=int, default=2048)
    r.add_argument("--past", default="512")
    r.add_argument("--rewrites", help="comma-separated names of REWRITES to make (default: all)")
    r.add_argument("--nbits-kernel", choices=["default", "fpa-intb", "both"], default="default",
                   help="passed to onnxqf bench: also time MatMulNBits graphs with ORT's CUTLASS weight-only kernels")
    r.add_argument("--batches", default="1", help="comma-separated decode batch sizes, one bench run each; batches "
                   "above 1 prefill --batch-seq tokens per sequence")
    r.add_argument("--batch-seq", type=int, default=128)
    r.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    r.add_argument("--rewrite-limit", type=float, default=200.0, help="seconds for one rewrite")
    r.add_argument("--builders", default="float,int4", help="which builder folders to make besides the reference: "
                   "float,int4 (default) or float")
    r.add_argument("--cuda-graph", action="store_true", help="passed to onnxqf bench: also decode steps replayed as "
                   "CUDA graphs")
    r.add_argument("--op-times", action="store_true", help="passed to onnxqf bench: also where the time goes (per "
                   "operator type on the CPU, per GPU kernel on CUDA)")
    r.add_argument("--tiny", action="store_true", help="tiny shapes, CPU (tests)")
    r.add_argument("--work", type=Path, help="scratch folder (default: under /dev/shm or the temp folder)")
    args = ap.parse_args()
    if args.cmd == "stage-builder":
        stage_builder(args.dest)
        return 0
    if args.cmd == "stage-genai":
        args.dest.mkdir(parents=True, exist_ok=True)
        return subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                               "--python-version", args.python_version, "-d", str(args.dest),
                               f"onnxruntime=={args.onnxruntime}", f"onnxruntime-genai=={args.genai}"]).returncode

    import tempfile

    ep = "cpu" if args.tiny else args.ep
    precision = "fp32" if ep == "cpu" else "fp16"
    rewrites = REWRITES[ep]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = args.work or Path(tempfile.mkdtemp(prefix="onnxqf-genai-bench-",
                                              dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    paths = [str(source_tree(base))] + ([str(args.builder.absolute())] if args.builder else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # the children import the copy above, whose checkout has no kernels/build: name this checkout's built libraries
    # (where the environment names none), or `rewrite --lowering onnxqf-cuda` finds no library
    for var, lib in (("ONNXQF_KERNELS", "libonnxqf_kernels.so"), ("ONNXQF_CPU_KERNELS", "libonnxqf_cpu.so")):
        if not env.get(var) and (ROOT / "kernels" / "build" / lib).is_file():
            env[var] = str(ROOT / "kernels" / "build" / lib)
    result: dict = {"layers": args.layers, "tiny": args.tiny, "ep": ep, "shape": args.shape or ep, "seq": args.seq,
                    "past": args.past, "steps": {}}
    res_path = out / "genai_gpu_bench.json"

    def save():
        res_path.write_text(json.dumps(result, indent=1))

    def left() -> float:
        return args.budget - (time.perf_counter() - T0)

    hf = base / "hf"
    t = time.perf_counter()
    make_hf(hf, args.layers, "tiny" if args.tiny else args.shape or ep)
    result["steps"]["hf"] = {"seconds": round(time.perf_counter() - t, 1)}
    log(f"random Llama ({args.layers} layers) saved in {result['steps']['hf']['seconds']} s")
    py = sys.executable
    # the builder imports onnxruntime.quantization, which needs onnxruntime.transformers: a slimmed
    # onnxruntime-gpu (.ortgpu drops that subpackage) is left off its path, the machine's own one serves
    builder_env = dict(env, PYTHONPATH=os.pathsep.join(
        p for p in env["PYTHONPATH"].split(os.pathsep)
        if not ((Path(p) / "onnxruntime").is_dir() and not (Path(p) / "onnxruntime" / "transformers").is_dir())))
    folders = {}
    int4_options = ["hf_token=false", "block_size=32"] + (["int4_accuracy_level=4"] if ep == "cpu" else [])
    builder = {f"builder {precision}": ["-p", precision]}
    if "int4" in args.builders.split(","):
        builder["builder int4 (RTN, block 32)"] = ["-p", "int4", "--extra_options", *int4_options]
    for name, extra in builder.items():
        dst = base / name.split()[1]
        cmd = [py, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", dst, "-e", ep, "-c", base / "cache",
               *extra]
        if "--extra_options" not in extra:
            cmd += ["--extra_options", "hf_token=false"]
        result["steps"][name] = sh(cmd, builder_env, min(240.0, left() - 60), cwd=base)
        if result["steps"][name]["rc"] == 0 and (dst / "genai_config.json").is_file():
            folders[name] = dst
        save()
    ref = folders.get(f"builder {precision}")
    if ref is None:
        log(f"the builder's {precision} folder failed; nothing to compare")
        return 1
    chosen = args.rewrites.split(",") if args.rewrites else list(rewrites)
    unknown = [n for n in chosen if n not in rewrites]
    if unknown:
        sys.exit(f"unknown rewrites {unknown}; choose from {list(rewrites)}")
    for name, extra in ((n, rewrites[n]) for n in chosen):
        if left() < 120:
            result["steps"][name] = {"skipped": "out of time"}
            continue
        dst = base / name.replace(" ", "_").replace("+", "")
        calib = ["--calib-windows", "1", "--calib-seq", "32"] if "--hybrid" in extra else []
        step = sh([py, "-m", "onnxqf.cli", "rewrite", ref, *extra, "--weight-rounding", "rtn", *calib, "-o", dst, "-q"],
                  env, min(args.rewrite_limit, left() - 90), cwd=base)
        result["steps"][name] = step
        if step["rc"] == 0:
            folders[name] = dst
        save()
    result["check"] = {}
    for name, folder in folders.items():
        cmd = [py, "-m", "onnxqf.cli", "check", folder, "--ep", ep, "--json"]
        if folder != ref:
            cmd += ["--baseline", ref]
        c = sh(cmd, env, 60, cwd=base)
        try:
            placed = json.loads(c["stdout"])
        except Exception:
            placed = None
        result["check"][name] = {"rc": c["rc"], "placement": placed}
        save()
    names = list(folders)
    batches = [int(b) for b in args.batches.split(",")]
    for k, batch in enumerate(batches):
        seq = args.seq if batch == 1 else args.batch_seq
        b = sh([py, "-m", "onnxqf.cli", "bench", *[folders[n] for n in names], "--ep", ep, "--batch", str(batch),
                "--seq", str(seq), "--past", args.past, "--decode-tokens", "32", "--repeats", "10", "--warmup", "3",
                "--nbits-kernel", args.nbits_kernel, *(["--cuda-graph"] if args.cuda_graph else []),
                *(["--op-times"] if args.op_times else []), "--json"],
               env, max(30.0, (left() - 5) / (len(batches) - k)),
               cwd=base, keep=0)
        key = "bench" if batch == 1 else f"bench_batch{batch}"
        try:
            result[key] = json.loads(b["stdout"])
            label = {folders[n].name: n for n in names}
            for row in result[key]["models"]:
                base_name = Path(row["path"]).name
                row["label"] = (label.get(base_name, base_name)
                                + (" [fpA_intB]" if row.get("nbits_kernel") == "fpa-intb" else ""))
        except Exception as exc:
            result[key] = {"error": f"{type(exc).__name__}: {exc}; {b['stderr'][-1000:]}", "rc": b["rc"]}
        save()
        print_table(result, key)
    return 0


def print_table(result: dict, key: str = "bench") -> None:
    bench = result.get(key, {})
    if "models" not in bench:
        print("bench failed:", bench.get("error", "")[-500:])
        return
    past = str(bench["past"][0]) if bench["past"] else None
    print(f"\n{result['layers']} layers ({result.get('shape', result['ep'])} shape), onnxruntime-genai layout, "
          f"{bench['provider']}, onnxruntime {bench['onnxruntime']}, batch {bench['batch']}\n")
    graphs = bool(bench.get("cuda_graph"))
    print(f"| folder | `check` rc | prefill {bench['batch']}x{bench['seq']} ms | x ref | decode past {past} tok/s | x "
          "ref | ms/step |" + (" CUDA-graph step tok/s | x ref |" if graphs else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if graphs else ""))
    for row in bench["models"]:
        d = (row.get("decode") or {}).get(past, {})
        tps = d.get("tokens_per_s", {}).get("median")
        sp = row["speedup"]["decode"].get(past) if past else None
        g = ((row.get("decode_graph") or {}).get(past) or {}).get("tokens_per_s", {}).get("median")
        gsp = (row["speedup"].get("decode_graph") or {}).get(past)
        tail = (f" {g:.0f} | {gsp:.2f} |" if g and gsp else " - | - |") if graphs else ""
        print(f"| {row['label']} | {result['check'].get(row['label'].removesuffix(' [fpA_intB]'), {}).get('rc', '-')} "
              f"| {row['prefill_ms']['median']:.2f} | {row['speedup']['prefill']:.2f} | {tps:.0f} | {sp:.2f} | "
              f"{bench['batch'] * 1e3 / tps:.3f} |{tail}" if tps else
              f"| {row['label']} | - | {row['prefill_ms']['median']:.2f} | {row['speedup']['prefill']:.2f} | - | - | - "
              f"|{tail}")
        if row.get("decode_graph_note"):
            print(f"  ({row['label']}: {row['decode_graph_note'][:300]})")
    for row in bench["models"]:
        for phase in ("prefill", "decode"):
            times = (row.get("op_times") or {}).get(phase)
            if times:
                top = ", ".join(f"{k} {ms:.3f}" for k, ms in list(times.items())[:12])
                print(f"  {row['label']} {phase}: {sum(times.values()):.3f} ms = {top}")


if __name__ == "__main__":
    sys.exit(main())
