"""A/B of the onnxqf kernels library's small-M settings (environment variables read when a session creates its
kernels) on one linear at a time, against FP16 MatMul, in one process (docs/benchmarks.md g8).

For each shape K:N a float16 graph of --copies independent linears (onnxqf.runtime.linears.linear_model) and its
`onnxqf-cuda` lowering are built once; one session per setting is made with that setting's environment (the
kernels read it at creation), and all sessions are timed round-robin for --rounds rounds of --repeats runs each
(IOBinding, M rows), so that the machine's drift falls on every setting alike. A setting's time is the median over
rounds of each round's median per linear; × = FP16's time / this. Every session's output is checked against the
first setting's (the settings change the schedule, not the sums: equal to the bit; with --rotate, where a setting
may sum a rotation's products in another order, the share of equal outputs is reported instead).

    source .ortgpu/activate.sh && export ONNXQF_KERNELS=$PWD/kernels/build/libonnxqf_kernels.so && \\
        python3 scripts/gemv_ab.py --shapes 4096:4096,4096:11008,11008:4096 --m 1 \\
        --settings "base=;c1=ONNXQF_GEMV_CONFIG=1;pdl=ONNXQF_PDL=1" --out $OUT/gemv_ab.json

(docs/benchmarks.md g8 compared variants of the library this way that were taken out again: its L2-prefetch and
shared-memory settings no longer exist.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxqf.runtime.linears import bound_runs, linear_model, parse_counts, parse_lowering, parse_shapes  # noqa: E402
from onnxqf.runtime.session import make_session, saved  # noqa: E402


def parse_settings(text: str) -> list[tuple[str, dict[str, str]]]:
    """``name=VAR=v,VAR=v;name2=...`` -> [(name, {VAR: v})] (an empty list after ``name=``: the environment as is;
    the key ``rotate_block`` is no variable but the setting's rotation block, main's --rotate)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, rest = part.partition("=")
        pairs = [kv for kv in rest.split(",") if kv]
        if not name or name == "fp16" or any("=" not in kv for kv in pairs):
            raise ValueError(f"--settings: '{part}' is not NAME=VAR=value,... (NAME not 'fp16')")
        if name in (n for n, _ in out):
            raise ValueError(f"--settings: '{name}' twice")
        out.append((name, dict(kv.split("=", 1) for kv in pairs)))
    if not out:
        raise ValueError("--settings: none given")
    return out


@contextlib.contextmanager
def environ(env: dict[str, str]):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kernel_name(name: str) -> str:
    """A short name for a GPU kernel's demangled name: its function's own name, and for CUTLASS's device_kernel
    the schedule and the MMA's types (e.g. 'cutlass Pingpong S32S8S8')."""
    n = name.replace("(anonymous namespace)::", "").removeprefix("void ").split("(")[0]
    base = n.split("<")[0].rsplit("::", 1)[-1].strip() or name[:56]
    if name.startswith("_ZN7cutlass13device_kernel"):  # the profiler may give CUTLASS's kernel mangled
        base = "device_kernel"
    if base == "device_kernel":
        schedule = next((s for s in ("StreamK", "Pingpong", "Cooperative") if s in name), "")
        mma = re.search(r"MMA_\d+x\d+x\d+_([A-Z0-9]+)", name)
        return " ".join(filter(None, ("cutlass", schedule, mma.group(1) if mma else "")))
    return base[:56]


def kernel_times(runs, copies: int, repeats: int = 10) -> dict[str, float]:
    """Device µs per linear of all GPU kernels and of the five longest (by a short name) over `repeats` runs, from
    PyTorch's profiler: against the wall time per linear, what the host adds."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    runs(2, 1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runs(0, repeats)
    total: dict[str, float] = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        name = kernel_name(e.name)
        total[name] = total.get(name, 0.0) + e.time_range.elapsed_us() / (repeats * copies)
    top = dict(sorted(total.items(), key=lambda kv: -kv[1])[:5])
    return {"all kernels": sum(total.values()), **top}


def default_tile(m: int, n: int, rule: int = 0) -> int | None:
    """The GEMM tile the library's rule (ONNXQF_GEMM_RULE) picks for m x n on this GPU
    (onnxqf.runtime.kernels.gemm_tile); None where it cannot say (an older library, no CUDA)."""
    try:
        import torch

        from onnxqf.runtime import kernels

        return kernels.gemm_tile(m, n, torch.cuda.get_device_properties(0).multi_processor_count, rule=rule)
    except Exception:  # noqa: BLE001 (a label in the output, never a reason to stop the timing)
        return None


def write_rows(args, settings, rows) -> None:
    """--out's JSON, replaced whole (a temporary file renamed over it: never half written)."""
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"settings": settings, "copies": args.copies, "repeats": args.repeats,
                               "rounds": args.rounds, "rows": rows}, indent=1))
    os.replace(tmp, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096:4096,4096:11008,11008:4096")
    ap.add_argument("--m", default="1", help="rows, comma-separated")
    ap.add_argument("--settings", required=True, help="name=VAR=v,VAR=v;name2=... (the first is the check's reference)")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rotate", action="store_true",
                    help="each linear behind its online rotation (the hybrid's, inside the op), FP16 without; the "
                         "settings' outputs may then differ where an fp32 sum in another order rounds the other way "
                         "in fp16: the share of equal outputs is reported instead of a stop. A setting's "
                         "rotate_block=N builds its graph with Hadamard block N instead of the smallest one (e.g. "
                         "11008 as Paley's 344 x 32 against Williamson's 172 x 64)")
    ap.add_argument("--kernels", action="store_true",
                    help="also each setting's GPU kernels, device time per linear (PyTorch's profiler, CUPTI: "
                         "every kernel of the process, ONNX Runtime's included), after the timing")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    try:
        settings = parse_settings(args.settings)
    except ValueError as exc:
        ap.error(str(exc))
    for name, env in settings:
        block = env.get("rotate_block")
        if block is not None and not (args.rotate and block.isdigit() and int(block) > 0):
            ap.error(f"--settings: {name}'s rotate_block={block} needs --rotate and a positive integer")
    lowering = parse_lowering("onnxqf-cuda", "cuda")
    rng = np.random.default_rng(1)
    rows = []
    t0 = time.perf_counter()
    for K, N in parse_shapes(args.shapes):
        float_model = linear_model(K, N, None, copies=args.copies, dtype="float16", ep="cuda")
        with saved(float_model) as path:
            sessions = {"fp16": make_session(path, "cuda", strict_ep=True)}
        for block in dict.fromkeys(env.get("rotate_block") for _, env in settings):
            model = linear_model(K, N, lowering, copies=args.copies, dtype="float16", ep="cuda", rotate=args.rotate,
                                 rotate_block=None if block is None else int(block))
            with saved(model) as path:
                for name, env in settings:
                    if env.get("rotate_block") == block:
                        with environ({k: v for k, v in env.items() if k != "rotate_block"}):
                            sessions[name] = make_session(path, "cuda", strict_ep=True)
        for M in parse_counts(args.m):
            x = rng.standard_normal((M, K), dtype=np.float32).astype(np.float16)
            ref, equal = None, {}
            for name, _ in settings:
                outs = sessions[name].run(None, {"x": x})
                if ref is None:
                    ref = outs
                    continue
                equal[name] = float(np.mean([np.mean(a == b) for a, b in zip(outs, ref)]))
                if equal[name] < 1.0 and not args.rotate:
                    raise SystemExit(f"{name}: outputs differ from {settings[0][0]}'s at {K}:{N} M={M}")
            runs = {name: bound_runs(s, {"x": x}, device="cuda") for name, s in sessions.items()}
            per = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, r in runs.items():
                    per[name].append(float(np.median(r(3, args.repeats))) * 1e3 / args.copies)
            ms = {name: float(np.median(v)) for name, v in per.items()}
            row = {"K": K, "N": N, "M": M, "ms": ms, "rounds": per, "equal_to_first": equal,
                   "speedup": {name: ms["fp16"] / v for name, v in ms.items()}, "default_tile": default_tile(M, N),
                   "rule1_tile": default_tile(M, N, rule=1)}
            if args.kernels:
                row["kernels_us"] = {name: kernel_times(r, args.copies) for name, r in runs.items()}
            rows.append(row)
            if args.out:  # after every row: a run stopped at a time limit keeps the rows it timed
                write_rows(args, settings, rows)
            line = f"{K}->{N} M={M} (rule: tile {row['default_tile']}, rule 1: {row['rule1_tile']}): " + "  ".join(
                f"{n} {v * 1e3:.1f}us ({row['speedup'][n]:.2f}x)" for n, v in ms.items())
            if args.rotate:
                line += f"  equal to {settings[0][0]}: " + " ".join(f"{n} {v:.4f}" for n, v in equal.items())
            print(line, f"[{time.perf_counter() - t0:.0f}s]", flush=True)
            for name, kernels in row.get("kernels_us", {}).items():
                print(f"    {name}: " + "  ".join(f"{k} {v:.1f}" for k, v in kernels.items()), flush=True)
        sessions = runs = None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
