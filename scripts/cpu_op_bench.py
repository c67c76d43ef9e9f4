"""The per-token quantization of one activation on ONNX Runtime's CPU provider: onnxqf's CPU op (one
``onnxqf.cpu.QuantizeRows`` node) against the standard nodes of ``uint8-token-ql``, without and with the hybrid's
online rotation in front (docs/benchmarks.md h, run 6 and after).

For each K and M: the graph ``x [M, K] -> (uint8 codes, amax)`` built four ways — the ``uint8-token-ql`` nodes
(:class:`onnxqf.lowering.w8a8.Uint8TokenQL`), the op, the CPU target's online rotation nodes
(:func:`onnxqf.graph.edit.rotate_value_online`, the factors of :func:`onnxqf.maths.hadamard.hadamard_factors`)
followed by the ql nodes, and the op with that rotation inside (:func:`onnxqf.lowering.cpu_kernels.cpu_rotation`);
ms per run, median of --repeats after 3 warm-up runs, default threads. The op's rows check that its codes equal the
nodes' (to the bit unrotated; within one code rotated). The asymmetric codes (``--act-quant asym``) the same way:
``uint8-token-asym``'s nodes (:func:`onnxqf.lowering.w8a8.asymmetric_codes` and a Cast) against the op with
``asymmetric=1``, unrotated and with the rotation inside.

    bash kernels/build_cpu.sh && python scripts/cpu_op_bench.py --k 2048,5632 --m 256,1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxqf.graph import edit  # noqa: E402
from onnxqf.lowering.base import FLOAT32  # noqa: E402
from onnxqf.lowering.cpu_kernels import DOMAIN, cpu_rotation, quantize_rows_node  # noqa: E402
from onnxqf.lowering.w8a8 import Uint8TokenAsym, Uint8TokenQL  # noqa: E402
from onnxqf.maths.hadamard import hadamard_factors  # noqa: E402
from onnxqf.runtime import kernels  # noqa: E402
from onnxqf.runtime.target import get_target  # noqa: E402


def graph(K: int, *, op: bool, rotate: bool, asym: bool = False) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape(["M", K]), type=ir.TensorType(FLOAT32))
    g = ir.Graph([x], [], nodes=[], opset_imports={"": 21, "com.microsoft": 1, DOMAIN: 1}, name="quantize")
    src = x
    rotation = None
    if rotate:
        ident = ir.Node("", "Identity", [x], name="in", num_outputs=1)
        g.append(ident)
        src = ident.outputs[0]
        src.name, src.shape, src.type = "x_in", x.shape, x.type
        sink = ir.Node("", "Identity", [src], name="sink", num_outputs=1)
        g.append(sink)
        edit.rotate_value_online(g, src, hadamard_factors(K), FLOAT32, "rot", **get_target("cpu").online.kwargs())
        block = edit.online_rotation_of(g, sink.inputs[0])
        rotation = cpu_rotation(block.groups, K)
        rotated = sink.inputs[0]
        g.remove(sink, safe=True)
        if op:  # the op reads the unrotated input and rotates itself
            block.remove(g)
        else:
            src = rotated
    tape = ir_tape.Tape(g)
    if op:
        outs = quantize_rows_node(tape, g, src, "op", rotation, asymmetric=asym)
    elif asym:
        outs = Uint8TokenAsym().quantize_activation(tape, g, src, FLOAT32, "asym")
    else:
        outs = Uint8TokenQL().quantize_activation(tape, g, src, FLOAT32, "ql")
    for node in tape.nodes:
        g.append(node)
    outs[0].name = "codes"
    for i, v in enumerate(outs[1:]):
        v.name = f"scale{i}"
    g.outputs.extend(outs)
    return ir.Model(g, ir_version=10)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", default="2048,5632")
    ap.add_argument("--m", default="256,1")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    lib = kernels.cpu_library_path()
    rows = []
    for K in (int(v) for v in args.k.split(",")):
        sessions = {}
        for name, op, rotate, asym in (("ql nodes", False, False, False), ("op", True, False, False),
                                       ("rotation nodes + ql nodes", False, True, False),
                                       ("op, rotation inside", True, True, False),
                                       ("asym nodes", False, False, True), ("op asym", True, False, True),
                                       ("op asym, rotation inside", True, True, True)):
            so = ort.SessionOptions()
            so.log_severity_level = 3
            kernels.register(so, lib)
            proto = ir.serde.serialize_model(graph(K, op=op, rotate=rotate, asym=asym)).SerializeToString()
            sessions[name] = ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"])
        for M in (int(v) for v in args.m.split(",")):
            x = np.random.default_rng(K + M).standard_normal((M, K)).astype(np.float32)
            x[:, 3] *= 30.0
            row = {"K": K, "M": M, "ms": {}}
            outs = {}
            for name, s in sessions.items():
                outs[name] = s.run(None, {"x": x})
                times = []
                for i in range(3 + args.repeats):
                    t = time.perf_counter()
                    s.run(None, {"x": x})
                    if i >= 3:
                        times.append(time.perf_counter() - t)
                row["ms"][name] = float(np.median(times)) * 1e3
            row["op_codes_equal"] = bool(np.array_equal(outs["op"][0], outs["ql nodes"][0]))
            row["op_asym_codes_equal"] = bool(np.array_equal(outs["op asym"][0], outs["asym nodes"][0]))
            row["rotated_codes_max_diff"] = int(np.abs(outs["op, rotation inside"][0].astype(int) -
                                                       outs["rotation nodes + ql nodes"][0].astype(int)).max())
            rows.append(row)
            print(f"K={K} M={M}: " + "  ".join(f"{n} {v:.3f} ms" for n, v in row["ms"].items()) +
                  f"  (codes equal: {row['op_codes_equal']}, asym {row['op_asym_codes_equal']}, rotated max diff "
                  f"{row['rotated_codes_max_diff']})",
                  flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "onnxruntime": ort.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
