"""The benchmark behind docs/benchmarks.md sections a, b and c1, at Llama-2-7B shapes on ONNX Runtime's CUDA
provider; every graph is built by onnxqf itself:

  a   one linear          onnxqf.runtime.linears (`onnxqf bench --linears`): float, int8-token and MatMulNBits
                          (int4 block 32 and 128, int8 block 32), lowered by the registered lowerings
  b   online rotations    onnxqf.graph.edit.rotate_value_online, the function the rotation passes call, with the
                          factors of onnxqf.maths.hadamard.rotation (Hadamard 4096 and 11008, the 32-head mixing
                          before o_proj), and a naive attention as a yardstick
  c1  decoders            a random Llama (scripts/synthetic_llama.py) exported float16 by onnxqf, rewritten by
                          onnxqf.pipeline.rewrite (W8A8, int4, rotate + int4, full hybrid, int8w; round to nearest),
                          timed by `onnxqf bench` (onnxqf.runtime.bench): prefill 1 x --seq and a one-token forward

    source .ortgpu/activate.sh && pip install -q --no-deps --no-build-isolation -e . && \\
        python scripts/gpu_bench.py --out $OUT --sections a,b
    ... python scripts/gpu_bench.py --out $OUT --sections c1

Every result goes to OUT/gpu_bench.json as it comes; OUT/gpu_bench.md gets the tables. Per-linear and rotation
graphs hold --copies independent copies reading one input and report total / copies (ONNX Runtime's per-run
overhead spread out, weights larger than L2 together). ``--ep cpu --tiny`` runs every path at tiny shapes.
KV-cache decode through onnxqf's rewrites is scripts/genai_gpu_bench.py (the model builder's graphs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

T0 = time.perf_counter()
SECTIONS = ("a", "b", "c1")


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Config:
    hidden: int = 4096
    heads: int = 32
    head_dim: int = 128
    d_ff: int = 11008
    vocab: int = 32000
    ms: tuple = (1, 16, 2048)
    rot_ms: tuple = (1, 2048)
    attn_past: int = 512  # the attention yardstick at M = 1 reads this many cached tokens (+1)
    copies: int = 8
    layers: int = 2
    seq: int = 2048
    repeats: int = 30
    warmup: int = 5
    e2e_repeats: int = 20
    e2e_warmup: int = 3

    @property
    def linears(self) -> tuple:
        return (self.hidden, self.d_ff), (self.d_ff, self.hidden), (self.hidden, self.hidden)


def tiny_config() -> Config:
    # d_ff 172 = 43 * 4 has a large non-power-of-two factor, as 11008 = 43 * 256 does
    return Config(hidden=64, heads=4, head_dim=16, d_ff=172, vocab=512, ms=(1, 4, 32), rot_ms=(1, 32), attn_past=16,
                  copies=2, seq=32, repeats=3, warmup=1, e2e_repeats=2, e2e_warmup=1)


# section a: linears (lowering specs of onnxqf.runtime.linears)
LOWERINGS = ("int8-token", "matmulnbits:accuracy_level=0", "matmulnbits:accuracy_level=0:block_size=128",
             "matmulnbits:accuracy_level=0:bits=8")
# section c1: name -> (transform, --quant)
PRESETS = {"w8a8-token": ("none", "int8"), "int4-b32": ("none", "int4"), "rotate-int4-b32": ("rotate", "int4"),
           "hybrid": ("hybrid", "int8"), "int8w-b32": ("none", "int8w")}


def section_a(cfg: Config, ep: str) -> dict:
    from onnxqf.runtime.linears import LinearsOptions, bench_linears

    opts = LinearsOptions(shapes=cfg.linears, ms=cfg.ms, lowerings=LOWERINGS, ep=ep, dtype="float16", copies=cfg.copies,
                          repeats=cfg.repeats, warmup=cfg.warmup)
    return bench_linears(opts, progress=log)


def rotation_model(n: int, factors: list, sizes: list[int], copies: int):
    """``copies`` online rotations of x [M, n], each as onnxqf.graph.edit.rotate_value_online emits it."""
    import onnx_ir as ir

    from onnxqf.graph.edit import rotate_value_online

    f16 = ir.DataType.FLOAT16
    x = ir.Value(name="x", shape=ir.Shape(["M", n]), type=ir.TensorType(f16))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18}, name="rotations")
    for i in range(copies):
        node = ir.Node("", "Identity", [x], name=f"copy{i}")  # a value of its own to rotate (ONNX Runtime drops it)
        graph.append(node)
        nodes = rotate_value_online(graph, node.outputs[0], factors, f16, f"rotation{i}", sizes=sizes)
        y = nodes[-1].outputs[0]
        y.name = f"y{i}"
        graph.outputs.append(y)
    return ir.Model(graph, ir_version=10)


def attention_model(heads: int, head_dim: int, copies: int):
    """softmax(q k^T / sqrt(d)) v, naive, no mask; q [1, h, M, d], k and v [1, h, T, d]."""
    import onnx_ir as ir
    from onnx_ir import tape as ir_tape

    f16 = ir.DataType.FLOAT16
    q, k, v = (ir.Value(name=n, shape=ir.Shape([1, heads, d, head_dim]), type=ir.TensorType(f16))
               for n, d in (("q", "M"), ("k", "T"), ("v", "T")))
    graph = ir.Graph([q, k, v], [], nodes=[], opset_imports={"": 18}, name="attention")
    scale = ir.Value(name="scale", shape=ir.Shape([]), type=ir.TensorType(f16),
                     const_value=ir.tensor(np.array(1 / math.sqrt(head_dim), np.float16), name="scale"))
    graph.register_initializer(scale)
    tape = ir_tape.Tape(graph)
    for i in range(copies):
        s = tape.op("Mul", [tape.op("MatMul", [q, tape.op("Transpose", [k], {"perm": [0, 1, 3, 2]})]), scale])
        y = tape.op("MatMul", [tape.op("Softmax", [s], {"axis": -1}), v])
        y.name = f"y{i}"
        graph.outputs.append(y)
    graph.extend(tape.nodes)
    return ir.Model(graph, ir_version=10)


def section_b(cfg: Config, ep: str) -> list[dict]:
    from onnxqf.maths.hadamard import random_orthogonal, rotation
    from onnxqf.runtime.linears import time_runs
    from onnxqf.runtime.session import make_session, saved

    rng = np.random.default_rng(2)
    items = [(f"hadamard {n}", n, list(rotation(n, 0).factors), None) for n in (cfg.hidden, cfg.d_ff)]
    items.append((f"head mix {cfg.heads}x{cfg.head_dim}", cfg.hidden, [random_orthogonal(cfg.heads, 0), None],
                  [cfg.heads, cfg.head_dim]))
    rows = []
    for name, n, factors, sizes in items + [("attention (naive, reference)", cfg.hidden, None, None)]:
        copies = cfg.copies if factors is not None else max(1, cfg.copies // 2)
        model = (rotation_model(n, factors, sizes, copies) if factors is not None
                 else attention_model(cfg.heads, cfg.head_dim, copies))
        with saved(model) as path:
            session = make_session(path, ep, strict_ep=ep == "cuda")
        row = {"rotation": name, "n": n, "factor_sizes": sizes or [int(f.shape[0]) for f in factors or []], "ms": {}}
        for M in cfg.rot_ms:
            if factors is not None:
                feeds = {"x": rng.standard_normal((M, n), dtype=np.float32).astype(np.float16)}
            else:
                T = cfg.attn_past + 1 if M == 1 else M
                feeds = {"q": rng.standard_normal((1, cfg.heads, M, cfg.head_dim), dtype=np.float32).astype(np.float16)}
                feeds["k"] = feeds["v"] = rng.standard_normal((1, cfg.heads, T, cfg.head_dim),
                                                              dtype=np.float32).astype(np.float16)
            t = time_runs(session, feeds, device=ep, warmup=cfg.warmup, repeats=cfg.repeats)
            row["ms"][str(M)] = float(np.median(t)) * 1e3 / copies
        rows.append(row)
        log(f"b {name}: " + " ".join(f"M={m}: {v:.4f} ms" for m, v in row["ms"].items()))
    return rows


def rotation_shares(cfg: Config, linears: dict, rotations: list[dict]) -> list[dict]:
    """Online rotations as a share of one layer's linears (q, k, v, o, gate, up, down) at the same M: full hybrid
    = 2 x Hadamard(hidden) + Hadamard(d_ff) + head mix; --rotate = Hadamard(d_ff) + head mix."""
    def lin(spec, K, N, M):
        row = next((r for r in linears["rows"] if r["lowering"] == spec and (r["K"], r["N"]) == (K, N)), None)
        return ((row or {}).get("ms", {}).get(str(M)) or {}).get("median")

    rot = {r["rotation"].split(" ")[0] + ("" if "mix" in r["rotation"] else f" {r['n']}"): r["ms"] for r in rotations}
    H, F = cfg.hidden, cfg.d_ff
    out = []
    for M in cfg.rot_ms:
        if str(M) not in linears["rows"][0]["ms"]:
            continue
        row = {"M": M}
        hybrid = 2 * rot[f"hadamard {H}"][str(M)] + rot[f"hadamard {F}"][str(M)] + rot["head"][str(M)]
        rotate = rot[f"hadamard {F}"][str(M)] + rot["head"][str(M)]
        for spec in ("float",) + LOWERINGS[:2]:
            parts = [lin(spec, H, H, M), lin(spec, H, F, M), lin(spec, F, H, M)]
            if None not in parts:
                layer = 4 * parts[0] + 2 * parts[1] + parts[2]
                row[spec] = {"layer_ms": layer, "hybrid_share": hybrid / (layer + hybrid),
                             "rotate_share": rotate / (layer + rotate)}
        out.append({**row, "hybrid_ms": hybrid, "rotate_ms": rotate})
    return out


def section_c1(cfg: Config, ep: str, work: Path, presets: list[str]) -> dict:
    import synthetic_llama

    from onnxqf.graph.modelfile import load_model, save_model
    from onnxqf.models.export import export
    from onnxqf.options import Calibration, RewriteOptions, Transform, quant_config
    from onnxqf.pipeline import rewrite
    from onnxqf.runtime.bench import BenchOptions, run_bench

    shape = {"hidden_size": cfg.hidden, "intermediate_size": cfg.d_ff, "num_attention_heads": cfg.heads,
             "num_key_value_heads": cfg.heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab}
    t = time.perf_counter()
    synthetic_llama.write_folder(work / "hf", cfg.layers, outliers=0, shape=shape)
    models = {"fp16": export(str(work / "hf"), work / "fp16.onnx", dtype="float16")}
    seconds = {"fp16": round(time.perf_counter() - t, 1)}
    ids = work / "calib_ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, cfg.vocab, 4096))
    calibration = Calibration(source=str(ids), windows=1, seq=64, rounding="rtn")  # content does not change speed
    for name in presets:
        kind, fmt = PRESETS[name]
        t = time.perf_counter()
        model = load_model(models["fp16"])
        rewrite(model, RewriteOptions(transform=Transform(kind), quant=quant_config(fmt), calibration=calibration,
                                      target=ep, progress=False))
        models[name] = save_model(model, work / f"{name}.onnx")
        seconds[name] = round(time.perf_counter() - t, 1)
        log(f"c1 rewrite {name}: {seconds[name]} s")
    out = {"layers": cfg.layers, "rewrite_s": seconds, "bench": {}}
    for label, seq in ((f"prefill 1x{cfg.seq}", cfg.seq), ("forward 1x1", 1)):
        opts = BenchOptions(ep=ep, seq=seq, decode_tokens=0, repeats=cfg.e2e_repeats, warmup=cfg.e2e_warmup,
                            progress=False)
        out["bench"][label] = run_bench([str(p) for p in models.values()], opts)
        log(f"c1 {label}: " + ", ".join(f"{n} {r['prefill_ms']['median']:.2f} ms" for n, r in
                                        zip(models, out["bench"][label]["models"])))
    return out


def summary(cfg: Config, data: dict) -> str:
    from onnxqf.runtime.linears import format_linears

    lines = []
    if "a_linears" in data:
        lines += ["## a. One linear", "", format_linears(data["a_linears"]), ""]
    if "b_rotations" in data:
        lines += ["## b. Online rotations, ms per application (median)", "",
                  "| rotation | factors | " + " | ".join(f"M = {m}" for m in cfg.rot_ms) + " |",
                  "|" + "---|" * (2 + len(cfg.rot_ms))]
        lines += [f"| {r['rotation']} | {r['factor_sizes']} | "
                  + " | ".join(f"{r['ms'][str(m)]:.4f}" for m in cfg.rot_ms) + " |" for r in data["b_rotations"]]
        for s in data.get("b_shares", []):
            lines.append(f"\nM = {s['M']}: full-hybrid rotations {s['hybrid_ms']:.4f} ms, --rotate "
                         f"{s['rotate_ms']:.4f} ms; "
                         + "; ".join(f"{k}: layer {v['layer_ms']:.4f} ms, hybrid share {v['hybrid_share']:.1%}, rotate "
                                     f"share {v['rotate_share']:.1%}" for k, v in s.items() if isinstance(v, dict)))
    if "c1_decoders" in data:
        c1 = data["c1_decoders"]
        labels = list(c1["bench"])
        lines += ["", f"## c1. onnxqf export + rewrite, {c1['layers']} layers, float16", "",
                  "| model | rewrite s | " + " | ".join(f"{label} ms | x" for label in labels) + " |",
                  "|" + "---|" * (2 + 2 * len(labels))]
        for i, name in enumerate(c1["rewrite_s"]):
            cells = []
            for label in labels:
                row = c1["bench"][label]["models"][i]
                cells += [f"{row['prefill_ms']['median']:.2f}", f"{row['speedup']['prefill']:.2f}"]
            lines.append(f"| {name} | {c1['rewrite_s'][name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_bench.json and gpu_bench.md")
    ap.add_argument("--ep", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (to run every path on a CPU)")
    ap.add_argument("--sections", default="a,b,c1", help="comma-separated subset of a,b,c1 (default all)")
    ap.add_argument("--presets", default=",".join(PRESETS), help=f"c1's rewrites (default {','.join(PRESETS)})")
    ap.add_argument("--repeats", type=int, help="timed runs per kernel measurement (default 30; 3 with --tiny)")
    ap.add_argument("--layers", type=int, help="decoder layers of section c1 (default 2)")
    args = ap.parse_args(argv)
    cfg = tiny_config() if args.tiny else Config()
    cfg.repeats = args.repeats or cfg.repeats
    cfg.layers = args.layers or cfg.layers
    sections = [s for s in args.sections.split(",") if s]
    presets = [p for p in args.presets.split(",") if p]
    if not set(sections) <= set(SECTIONS) or not set(presets) <= set(PRESETS):
        ap.error(f"sections: a subset of {','.join(SECTIONS)}; presets: a subset of {','.join(PRESETS)}")
    from onnxqf.runtime.session import ort

    args.out.mkdir(parents=True, exist_ok=True)
    data = {"meta": {"ep": args.ep, "onnxruntime": ort().__version__, "tiny": args.tiny, "config": asdict(cfg),
                     "sections": sections}}
    path = args.out / "gpu_bench.json"

    def save():
        path.write_text(json.dumps(data, indent=1))

    if "a" in sections:
        data["a_linears"] = section_a(cfg, args.ep)
        save()
    if "b" in sections:
        data["b_rotations"] = section_b(cfg, args.ep)
        if "a_linears" in data:
            data["b_shares"] = rotation_shares(cfg, data["a_linears"], data["b_rotations"])
        save()
    if "c1" in sections:
        with tempfile.TemporaryDirectory(prefix="onnxqf-gpu-bench-") as work:
            data["c1_decoders"] = section_c1(cfg, args.ep, Path(work), presets)
        save()
    text = summary(cfg, data)
    (args.out / "gpu_bench.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
