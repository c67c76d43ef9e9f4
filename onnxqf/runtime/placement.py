"""Where does each node run? Measured with ONNX Runtime, never assumed.

``check_placement`` builds a session for the provider, runs one short input with profiling on,
and reads each node's provider from the profile; a second session with
``session.disable_cpu_ep_fallback=1`` confirms that ORT itself accepts the graph with no CPU
fallback. The static rules (:meth:`onnxqf.runtime.target.Target.node_issues`: nodes the provider has no
kernel for or runs on a slow path, a graph lowered for another target) need no provider and are checked
in CI too.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from onnxqf.errors import OnnxqfError
from onnxqf.runtime.session import FPA_INTB_ENV, make_session, ort
from onnxqf.runtime.target import get_target

__all__ = ["FPA_INTB_ENV", "FPA_INTB_BLOCK_SIZES", "fpa_intb_blocker", "nbits_kernels", "format_nbits_kernels",
           "check_placement", "compare_to_baseline", "with_static_issues", "format_placement"]

# MatMulNBits on CUDA has a second set of kernels: TensorRT-LLM's CUTLASS weight-only GEMMs ("fpA_intB"),
# used only when this environment variable is set (read when a session builds its kernels), and only for
# the nodes they cover. onnxruntime-gpu 1.31.1's wheels carry the "compact" set: float16 activations,
# 4 or 8 bits, block 32, no zero points, no g_idx, no bias, N a multiple of 64 (4-bit) or 32 (8-bit).
# Measured on an H200 (docs/benchmarks.md, section f): faster than the default kernels at 16 tokens per
# step, slower at 1 token and at prefill; nodes outside these rules keep the default kernels (blocks 64/128
# and zero points measured identical with and without the variable). FPA_INTB_ENV (the variable) lives in session.py.
FPA_INTB_BLOCK_SIZES = (32,)


def fpa_intb_blocker(*, bits: int, block_size: int, K: int, N: int, float_type: str, zero_points: bool,
                     g_idx: bool, bias: bool) -> str | None:
    """Why the fpA_intB kernels would not take this MatMulNBits node, or None if they would."""
    if float_type != "float16":
        return f"{float_type} activations (float16 only)"
    if bits not in (4, 8):
        return f"{bits} bits"
    if block_size not in FPA_INTB_BLOCK_SIZES:
        return f"block {block_size} (block 32 only)"
    if zero_points:
        return "zero points (symmetric only)"
    if g_idx:
        return "g_idx"
    if bias:
        return "bias"
    align = 64 if bits == 4 else 32
    if N % align:
        return f"N = {N} not a multiple of {align}"
    if K % block_size:
        return f"K = {K} not a multiple of the block"
    return None


def nbits_kernels(proto) -> dict:
    """MatMulNBits nodes of an onnx.ModelProto (no external data needed) and which the fpA_intB kernels take:
    ``{"nodes": n, "fpa_intb": eligible, "blockers": {reason: count}}``."""
    from onnx import helper

    inits = {t.name: t for t in proto.graph.initializer}
    report = {"nodes": 0, "fpa_intb": 0, "blockers": {}}
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        report["nodes"] += 1
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs = list(node.input) + [""] * 6
        scales = inits.get(inputs[2])
        float_type = helper.tensor_dtype_to_np_dtype(scales.data_type).name if scales is not None else "unknown"
        reason = fpa_intb_blocker(bits=int(attrs.get("bits", 4)), block_size=int(attrs.get("block_size", 0)),
                                  K=int(attrs.get("K", 0)), N=int(attrs.get("N", 0)), float_type=float_type,
                                  zero_points=bool(inputs[3]), g_idx=bool(inputs[4]), bias=bool(inputs[5]))
        if reason is None and (inputs[1] not in inits or scales is None):
            reason = "weights or scales not constant"
        if reason is None:
            report["fpa_intb"] += 1
        else:
            report["blockers"][reason] = report["blockers"].get(reason, 0) + 1
    return report


def format_nbits_kernels(report: dict) -> str | None:
    if not report["nodes"]:
        return None
    text = (f"MatMulNBits: {report['nodes']} nodes, {report['fpa_intb']} eligible for ONNX Runtime's CUTLASS "
            f"weight-only kernels ({FPA_INTB_ENV}=1; `onnxqf bench --nbits-kernel both` measures them)")
    if report["blockers"]:
        text += "; not eligible: " + ", ".join(f"{n} x {r}" for r, n in sorted(report["blockers"].items()))
    return text


def check_placement(path, ep: str = "cuda", seq: int = 16) -> dict:
    rt = ort()
    provider = get_target(ep).provider
    if provider not in rt.get_available_providers():
        return {"status": "unavailable", "provider": provider, "message": f"{provider} is not available in onnxruntime "
                                                                          f"{rt.__version__}"}
    result: dict = {"provider": provider, "onnxruntime": rt.__version__}
    with tempfile.TemporaryDirectory(prefix="onnxqf-prof-") as tmp:
        session = make_session(path, ep=ep, profile=os.path.join(tmp, "prof"))
        from onnxqf.genai.feeds import feed_function, graph_io

        feed = feed_function(graph_io(path))  # plain graphs: input_ids; genai graphs: mask and an empty past too
        session.run(None, feed(np.ones((1, seq), np.int64)))
        profile = session.end_profiling()
        events = json.loads(Path(profile).read_text())
    per_provider: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    memcpy = []
    seen = set()
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        args = ev.get("args", {})
        node = ev["name"][: -len("_kernel_time")]
        if node in seen:
            continue
        seen.add(node)
        op, prov = args.get("op_name", "?"), args.get("provider", "?")
        per_provider[prov][op] += 1
        if op.startswith("Memcpy"):
            memcpy.append(node)
    off = {p: dict(c) for p, c in per_provider.items() if p != provider}
    result["nodes"] = {p: sum(c.values()) for p, c in per_provider.items()}
    result["off_provider_ops"] = off
    result["memcpy"] = memcpy
    strict_error = None
    if ep != "cpu":
        try:
            make_session(path, ep=ep, strict_ep=True)
        except OnnxqfError as exc:
            strict_error = str(exc)
    result["strict_session_error"] = strict_error
    ok = not off and not memcpy and strict_error is None
    result["status"] = "ok" if ok else "fallback"
    return result


def compare_to_baseline(result: dict, baseline: dict) -> dict:
    """Judge ``result`` against a reference graph's placement: only what the rewrite *added* counts.

    Some graphs put a few nodes on the CPU by design (onnxruntime-genai's builder graphs compute
    GroupQueryAttention's total sequence length, a CPU input, with a Gather and a Cast). With a
    baseline, ``status`` is ok when no op type has more off-provider nodes and no more Memcpy nodes
    than the baseline; ``added_off_provider_ops`` lists the excess.
    """
    if result["status"] == "unavailable" or baseline.get("status") == "unavailable":
        return result
    added: dict[str, dict[str, int]] = {}
    for prov, ops in result["off_provider_ops"].items():
        base = baseline["off_provider_ops"].get(prov, {})
        extra = {op: n - base.get(op, 0) for op, n in ops.items() if n > base.get(op, 0)}
        if extra:
            added[prov] = extra
    result = dict(result, baseline_off_provider_ops=baseline["off_provider_ops"], added_off_provider_ops=added)
    ok = not added and len(result["memcpy"]) <= len(baseline["memcpy"])
    result["status"] = "ok" if ok else "fallback"
    return result


def with_static_issues(result: dict, issues: list[str]) -> dict:
    """``result`` with the target's static rules (:meth:`onnxqf.runtime.target.Target.node_issues`): any issue
    fails the check (status ``fallback``) unless the provider is unavailable (then they are reported only)."""
    result = dict(result, static_issues=issues)
    if issues and result["status"] == "ok":
        result["status"] = "fallback"
    return result


def _format_static(issues: list[str]) -> str:
    text = (f"static rules: {len(issues)} node(s) the provider cannot run, or runs on a slow path, "
            "or a graph lowered for another target")
    return text + "".join(f"\n  {i}" for i in issues[:10]) + ("\n  ..." if len(issues) > 10 else "")


def format_placement(r: dict) -> str:
    if r["status"] == "unavailable":
        text = f"skipped: {r['message']}"
        if r.get("static_issues"):
            text += "\n" + _format_static(r["static_issues"])
        return text
    lines = [f"provider {r['provider']} (onnxruntime {r['onnxruntime']}): "
             + ", ".join(f"{p}: {n} nodes" for p, n in r["nodes"].items())]
    for p, ops in r["off_provider_ops"].items():
        lines.append(f"  on {p}: " + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())))
    if r["memcpy"]:
        lines.append(f"  Memcpy nodes: {len(r['memcpy'])}")
    if r["strict_session_error"]:
        lines.append(f"  with CPU fallback disabled: {r['strict_session_error']}")
    if r.get("static_issues"):
        lines.append(_format_static(r["static_issues"]))
    if "added_off_provider_ops" in r:
        base = ", ".join(f"{op} x{n}" for ops in r["baseline_off_provider_ops"].values()
                         for op, n in sorted(ops.items())) or "none"
        lines.append(f"  the baseline graph already has off the provider: {base}")
        added = ", ".join(f"{op} x{n}" for ops in r["added_off_provider_ops"].values() for op, n in sorted(ops.items()))
        lines.append("OK: the rewrite adds no node off the provider and no copy" if r["status"] == "ok" else
                     f"FAIL: the rewrite adds nodes off the provider or copies: {added}" if added else
                     "FAIL: the static rules above")
        return "\n".join(lines)
    measured_ok = not r["off_provider_ops"] and not r["memcpy"] and not r["strict_session_error"]
    lines.append("OK: every node on the provider, no copies" if r["status"] == "ok" else
                 "FAIL: the static rules above" if measured_ok else "FAIL: nodes off the provider or copies inserted")
    return "\n".join(lines)
