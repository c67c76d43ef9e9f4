"""End-to-end comparison of two ONNX models on the same token windows: KL, perplexity, top-1."""

from __future__ import annotations

import json

import numpy as np
from tqdm.auto import tqdm

from onnxqf.genai.feeds import graph_io, logits_function
from onnxqf.genai.folder import model_file
from onnxqf.maths.metrics import LogitComparison
from onnxqf.runtime.session import make_session

__all__ = ["compare", "format_table", "to_json"]


def compare(orig_path, new_path, wins: np.ndarray, *, ep: str = "cpu", progress: bool = True,
            max_abs: bool = False) -> dict:
    """KL(P_orig || P_new) per token, perplexity of both, top-1 agreement over all positions."""
    orig_path, new_path = model_file(orig_path), model_file(new_path)  # genai folders: their decoder graph
    io_orig, io_new = graph_io(orig_path), graph_io(new_path)  # plain or KV-cache graphs, checked before loading
    s_orig = make_session(orig_path, ep=ep)
    s_new = make_session(new_path, ep=ep)
    f_orig, f_new = logits_function(s_orig, io_orig), logits_function(s_new, io_new)
    acc = LogitComparison()
    worst = 0.0
    scale = 0.0
    for w in tqdm(wins, desc="evaluating", unit="window", disable=not progress):
        ids = np.asarray(w, np.int64)[None, :]
        lo = f_orig(ids)[0].astype(np.float32)
        ln = f_new(ids)[0].astype(np.float32)
        targets = np.full(ids.shape[1], -1, np.int64)
        targets[:-1] = ids[0, 1:]
        acc.update(lo, ln, targets)
        if max_abs:
            worst = max(worst, float(np.abs(lo - ln).max()))
            scale = max(scale, float(np.abs(lo).max()))
    out = acc.result()
    out["windows"], out["seq"] = int(wins.shape[0]), int(wins.shape[1])
    if max_abs:
        out["max_abs_diff"], out["max_abs_logit"] = worst, scale
    return out


def format_table(result: dict, orig: str, new: str) -> str:
    rows = [
        ("tokens (KL, top-1)", f"{result['tokens']}"),
        ("KL(orig || new) nats/token", f"{result['kl']:.6f}"),
        ("perplexity orig", f"{result['ppl_orig']:.4f}"),
        ("perplexity new", f"{result['ppl_new']:.4f}  ({100 * (result['ppl_new'] / result['ppl_orig'] - 1):+.2f}%)"),
        ("top-1 agreement", f"{result['top1']:.4f}"),
    ]
    if "max_abs_diff" in result:
        ratio = result["max_abs_diff"] / max(result["max_abs_logit"], 1e-30)
        rows.append(("max |Δlogit| / max |logit|", f"{ratio:.3e}"))
    width = max(len(r[0]) for r in rows)
    head = f"orig: {orig}\nnew:  {new}\n"
    return head + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def to_json(result: dict) -> str:
    return json.dumps(result, indent=None, sort_keys=True)
