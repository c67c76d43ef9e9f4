"""`onnxqf inspect`: how quantization-friendly each linear's input is, before and after each transform.

For every selected layer and each of the four activation sites (``attn_in``: q/k/v input,
``o_in``: o_proj input, ``mlp_in``: gate/up input, ``down_in``: down_proj input) the captured
activations ``X`` [tokens, channels] and the site's weight ``B`` [in, out] (the readers' weights
side by side: ``[q|k|v]``, ``[gate|up]``, ``o``, ``down``) are transformed four ways, without
writing any model:

==============  =====================  ========================
transform       activation ``X'``      weight ``B'``
==============  =====================  ========================
original        ``X``                  ``B``
smooth          ``X / s``              ``diag(s) B``
rotate          ``X Q``                ``Q^T B``
smooth+rotate   ``(X / s) Q``          ``Q^T diag(s) B``
==============  =====================  ========================

``s`` are SmoothQuant scales from the per-channel ``max|X|`` over all windows
(:func:`onnxqf.maths.smoothing.site_scales`, grouped per KV head for ``o_in``) and ``Q`` the rotation
that ``onnxqf rewrite --hybrid --seed SEED`` applies to that site's activation in the written graph
(:meth:`onnxqf.plan.Plan.site_rotation` of the plan drawn from the same seed: after each norm for
``attn_in`` / ``mlp_in``, the per-head rotation and head mixing for ``o_in``, the down rotation for
``down_in``), so what inspect scores is what the rewrite applies. ``X' B' = X B`` in every
case; what changes is how well ``X'`` and ``B'`` quantize. Per (layer, site, transform) it reports
the activation difficulty (std of the channel L2 norms), the weight difficulty (std of the row L2
norms of ``B'``), ``max|X'|`` and the layer error ``||X B - Q(X') Q(B')||_F^2`` at 8 and 4 bits
(per-token activations, per-output-channel weights).

The model is run twice over the windows (pass 1: per-channel absmax for the scales; pass 2: the
metrics), one window at a time, so memory does not grow with the number of windows. The norm
scales are folded into the weights first (:class:`FoldNormsPass`, in memory), so the q/k/v and
gate/up inputs are the γ-free normalized activations, as the rewrite sees them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxqf.errors import OnnxqfError
from onnxqf.graph.fileio import atomic_dir
from onnxqf.graph.structure import SITE_KINDS as SITES
from onnxqf.graph.structure import SITE_TITLES
from onnxqf.maths.fold import smooth_rotate
from onnxqf.maths.metrics import ChannelStats, difficulty, layer_error, weight_channel_magnitudes
from onnxqf.plan import Plan

__all__ = ["SITES", "INSPECT_PRESET", "TRANSFORMS", "BITS", "HEATMAP_TOKENS", "COLUMNS", "SUMMARY_KEYS", "PLOTS",
           "parse_layers", "transform_pair", "SiteAccumulator", "site_metrics", "summarize", "format_summary",
           "InspectOptions", "run_inspect", "print_report"]

#: the plan whose rotations inspect scores: the full hybrid's, a rotation at every site (``rotate`` draws the same
#: ones from the same seed at the sites both rotate)
INSPECT_PRESET = "hybrid"
TRANSFORMS = ("original", "smooth", "rotate", "smooth+rotate")
BITS = (8, 4)
HEATMAP_TOKENS = 256
# The CSV columns, in order (one row per layer, site, transform).
COLUMNS = (
    "layer", "site", "transform", "channels", "tokens",
    "act_difficulty", "act_l2_mean", "act_max", "top_channel",
    "weight_difficulty",
    "error8", "error8_rel", "error4", "error4_rel",
)
# Averaged over layers in the summary.
SUMMARY_KEYS = ("act_difficulty", "act_max", "weight_difficulty", "error8", "error8_rel", "error4", "error4_rel")
# The per-site plots: file prefix -> (CSV column, title, y label); all on a log y axis.
PLOTS = {
    "difficulty": ("act_difficulty", "activation quantization difficulty", r"std$_j$ of $\|X'_{:,j}\|_2$"),
    "weight_difficulty": ("weight_difficulty", "weight quantization difficulty", r"std$_j$ of $\|B'_{j,:}\|_2$"),
    "error8": ("error8", "layer error, W8A8", r"$\|XB - Q(X')\,Q(B')\|_F^2$"),
    "error4": ("error4", "layer error, W4A4", r"$\|XB - Q(X')\,Q(B')\|_F^2$"),
    "max": ("act_max", "largest activation magnitude", r"max $|X'|$"),
}


# ----------------------------------------------------------------------------------------------
# pure math


def parse_layers(spec: str | None, n: int) -> list[int]:
    """Layer indices from a spec like ``'0,5,10-12'`` (inclusive ranges), sorted, unique.

    ``None`` or ``'all'`` selects every layer. Raises :class:`OnnxqfError` on a malformed
    spec or an index outside ``[0, n)``.
    """
    if spec is None or spec.strip().lower() == "all":
        return list(range(n))
    out: set[int] = set()
    parts = spec.split(",")
    for part in parts:
        p = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", p)
        if m is None:
            raise OnnxqfError(
                f"--layers: cannot read '{p}' in '{spec}' (expected indices and ranges like '0,5,10-12')"
            )
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise OnnxqfError(f"--layers: range '{p}' is empty (start after end)")
        if b >= n:
            raise OnnxqfError(f"--layers: layer {b} is out of range (the model has {n} layers: 0-{n - 1})")
        out.update(range(a, b + 1))
    return sorted(out)


def transform_pair(X: np.ndarray | None, B: np.ndarray | None, s: np.ndarray | None, Q: np.ndarray | None,
                   kind: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(X', B')`` of one transform kind (see the module docstring): :func:`onnxqf.maths.fold.smooth_rotate`."""
    if kind not in TRANSFORMS:
        raise ValueError(f"unknown transform '{kind}' (expected one of {', '.join(TRANSFORMS)})")
    smooths, rotates = kind in ("smooth", "smooth+rotate"), kind in ("rotate", "smooth+rotate")
    return smooth_rotate(X, B, s if smooths else None, Q if rotates else None)


@dataclass
class SiteAccumulator:
    """Streaming metrics of one site under every transform.

    ``update(X, B)`` takes one chunk of activations and the site's (untransformed) weight; the
    weight is not kept between chunks, so many sites can be accumulated at once. Errors add up
    :func:`onnxqf.maths.metrics.layer_error` per chunk, so the totals and ``value / reference`` are those
    of the whole stream.
    """

    s: np.ndarray
    Q: np.ndarray | None  # None: the plan rotates nothing at this site ("rotate" scores as "original")
    transforms: tuple[str, ...] = TRANSFORMS
    bits: tuple[int, ...] = BITS
    stats: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # (transform, bits) -> [value, reference]
    weight_difficulty: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for t in self.transforms:
            self.stats[t] = ChannelStats()
            for b in self.bits:
                self.errors[(t, b)] = [0.0, 0.0]

    def update(self, X: np.ndarray, B: np.ndarray) -> "SiteAccumulator":
        X = np.asarray(X, dtype=np.float64).reshape(-1, np.shape(X)[-1])
        B = np.asarray(B, dtype=np.float64)
        Y = X @ B  # X'B' = XB for every transform: the reference is computed once
        reference = float(np.einsum("ij,ij->", Y, Y))
        for t in self.transforms:
            Xt, Bt = transform_pair(X, B, self.s, self.Q, t)
            self.stats[t].update(Xt)
            if t not in self.weight_difficulty:
                self.weight_difficulty[t] = difficulty(weight_channel_magnitudes(Bt))
            for b in self.bits:
                err, _ = layer_error(Xt, Bt, b, Y=Y)
                e = self.errors[(t, b)]
                e[0] += err
                e[1] += reference
        return self

    def result(self) -> dict[str, dict]:
        """Metrics per transform (keys of :data:`COLUMNS` after ``transform``)."""
        out = {}
        for t in self.transforms:
            st = self.stats[t]
            l2, absmax = st.l2, st.absmax
            row = {
                "channels": st.channels,
                "tokens": st.count,
                "act_difficulty": difficulty(l2),
                "act_l2_mean": float(np.mean(l2)),
                "act_max": st.max,
                "top_channel": int(np.argmax(absmax)),
                "weight_difficulty": self.weight_difficulty[t],
            }
            for b in self.bits:
                value, ref = self.errors[(t, b)]
                row[f"error{b}"] = value
                row[f"error{b}_rel"] = value / ref if ref > 0 else float("nan")
            out[t] = row
        return out


def site_metrics(X: np.ndarray, B: np.ndarray, s: np.ndarray, Q: np.ndarray) -> dict[str, dict]:
    """All metrics of one in-memory site (the streaming accumulator over a single chunk)."""
    return SiteAccumulator(np.asarray(s, np.float64), np.asarray(Q, np.float64)).update(X, B).result()


def summarize(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{site: {transform: {key: mean over layers}}} for the keys in :data:`SUMMARY_KEYS`."""
    out: dict = {}
    for site in SITES:
        for t in TRANSFORMS:
            sel = [r for r in rows if r["site"] == site and r["transform"] == t]
            if not sel:
                continue
            out.setdefault(site, {})[t] = {k: float(np.mean([r[k] for r in sel])) for k in SUMMARY_KEYS}
    return out


def format_summary(summary: dict, header: str = "") -> str:
    """A compact table: per site and transform, means over layers."""
    lines = [header] if header else []
    lines.append(f"{'site':<8} {'transform':<14} {'difficulty':>11} {'max|x|':>9} {'error8':>10} {'error8 rel':>10}")
    for site, per_t in summary.items():
        for i, (t, m) in enumerate(per_t.items()):
            lines.append(
                f"{site if i == 0 else '':<8} {t:<14} {m['act_difficulty']:>11.4g} {m['act_max']:>9.4g} "
                f"{m['error8']:>10.3e} {m['error8_rel']:>10.3e}"
            )
    lines.append("(means over the inspected layers; error8: ||XB - Q(X')Q(B')||_F^2 summed over all tokens, W8A8)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the model side


@dataclass
class InspectOptions:
    windows: int = 8
    seq: int = 512
    layers: str | None = None
    alpha: float = 0.5
    heatmap_layer: int | None = None
    seed: int = 0
    progress: bool = True


def _check_out_dir(out: Path) -> None:
    """Refuse to replace something that is not an earlier inspect output."""
    if out.exists() and not out.is_dir():
        raise OnnxqfError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "metrics.csv").is_file():
        raise OnnxqfError(f"{out}: folder exists and is not an earlier inspect output (no metrics.csv); "
                          "choose another --out")


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def run_inspect(model_path: str | os.PathLike, source: str, out: str | os.PathLike | None = None,
                opts: InspectOptions | None = None, tokenizer_dir: str | None = None) -> dict:
    """Compute everything, write ``out`` atomically; returns the JSON-able result."""
    from onnxqf.calib import calibrate
    from onnxqf.calib.data import token_windows
    from onnxqf.graph.modelfile import load_model
    from onnxqf.maths.smoothing import site_scales
    from onnxqf.passes.fold_norms import FoldNormsPass
    from onnxqf.recognize import recognize

    opts = opts or InspectOptions()
    if isinstance(opts.alpha, str) or not 0.0 <= opts.alpha <= 1.0:
        raise OnnxqfError(f"--alpha must be a number in [0, 1] for inspect, not {opts.alpha!r}")
    model_path = Path(model_path)
    out = Path(out) if out is not None else model_path.with_name(model_path.stem + "-inspect")
    _check_out_dir(out)

    model = load_model(model_path)
    structure = recognize(model)  # a clear error for non-LLM graphs, before anything else
    n_layers = len(structure.layers)
    layers = parse_layers(opts.layers, n_layers)
    if opts.heatmap_layer is not None and opts.heatmap_layer not in layers:
        raise OnnxqfError(
            f"--heatmap-layer {opts.heatmap_layer} is not among the inspected layers ({_layers_text(layers)})"
        )
    wins = token_windows(source, model_path, model, opts.windows, opts.seq, tokenizer=tokenizer_dir,
                         vocab=structure.config.vocab)

    FoldNormsPass()(model)
    structure = recognize(model)  # records of the folded (private) weights
    config = structure.config
    sites = {(site.layer, site.kind): site for site in structure.sites() if site.layer in layers}
    keys = list(sites)
    values = {site.name: site.value for site in sites.values()}

    # pass 1: per-channel absmax of every site (for the smoothing scales and the heatmap layer)
    stats = {k: ChannelStats() for k in keys}
    for acts in calibrate.capture(model, values, wins, desc="inspect 1/2 (absmax)", progress=opts.progress):
        for i, site in keys:
            stats[(i, site)].update(acts[sites[(i, site)].name])
    heat_layer = opts.heatmap_layer
    if heat_layer is None:
        heat_layer = max(layers, key=lambda i: stats[(i, "down_in")].max)

    # the rotations `rewrite --hybrid --seed` applies at each site (the same for every layer of one mixer kind)
    plan = Plan.build(config, INSPECT_PRESET, opts.seed)
    rotations = {(site.kind, site.mixer): plan.site_rotation(site.kind, config, site.mixer) for site in sites.values()}
    accs: dict[tuple[int, str], SiteAccumulator] = {}
    for i, site in keys:
        B = sites[(i, site)].matrix()
        s = site_scales(stats[(i, site)].absmax, B, opts.alpha, sites[(i, site)].kv_groups)
        accs[(i, site)] = SiteAccumulator(s, rotations[site, sites[(i, site)].mixer])
    stats.clear()  # the scales are made: the absmax of every site can go

    # pass 2: the four transforms of every window, into streaming accumulators
    heat: dict[str, np.ndarray] = {}
    second = calibrate.capture(model, values, wins, desc="inspect 2/2 (metrics)", progress=opts.progress)
    for w, acts in enumerate(second):
        for i, site in keys:
            X = acts[sites[(i, site)].name]
            accs[(i, site)].update(X, sites[(i, site)].matrix())
            if w == 0 and i == heat_layer:
                heat[site] = np.array(X[:HEATMAP_TOKENS], dtype=np.float64)
        del acts

    rows = []
    for i, site in keys:
        for t, m in accs[(i, site)].result().items():
            rows.append({"layer": i, "site": site, "transform": t, **m})
    summary = summarize(rows)
    result = {
        "model": str(model_path),
        "source": str(source),
        "windows": int(wins.shape[0]),
        "seq": int(wins.shape[1]),
        "tokens": int(wins.size),
        "layers": layers,
        "alpha": opts.alpha,
        "seed": opts.seed,
        "heatmap_layer": heat_layer,
        "config": {"hidden": config.hidden, "num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads,
                   "head_dim": config.head_dim, "intermediate": config.intermediate},
        "out": str(out),
        "summary": summary,
    }

    with atomic_dir(out) as tmp:  # an earlier inspect output there is replaced only now
        _write_outputs(tmp, rows, result, layers, heat, heat_layer, accs)
    return result


def _layers_text(layers: list[int]) -> str:
    return ",".join(str(i) for i in layers) if len(layers) <= 8 else f"{len(layers)} layers"


def _write_outputs(d: Path, rows: list[dict], result: dict, layers: list[int], heat: dict,
                   heat_layer: int, accs: dict) -> None:
    from onnxqf.analysis.plots import plot_channel_heatmap, plot_metric_vs_layer

    with open(d / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(COLUMNS)
        for r in rows:
            wr.writerow([_csv_cell(r[c]) for c in COLUMNS])
    with open(d / "metrics.json", "w", encoding="utf-8") as f:
        json.dump(_json_safe({**result, "rows": rows}), f, indent=1)
        f.write("\n")

    span = max(layers) + 1  # x = layer index; layers not inspected are gaps (NaN)
    what = f"{result['windows']}×{result['seq']} tokens"
    for site in SITES:
        for name, (key, title, ylabel) in PLOTS.items():
            curves = {}
            for t in TRANSFORMS:
                y = np.full(span, np.nan)
                for r in rows:
                    if r["site"] == site and r["transform"] == t:
                        y[r["layer"]] = r[key]
                curves[t] = y
            plot_metric_vs_layer(curves, f"{SITE_TITLES[site]}: {title}\n({what}, α={result['alpha']})",
                                 ylabel, d / f"{name}_{site}.png", logy=True)
        if site in heat:
            acc = accs[(heat_layer, site)]
            panels = {t: transform_pair(heat[site], None, acc.s, acc.Q, t)[0] for t in TRANSFORMS}
            plot_channel_heatmap(
                panels,
                f"layer {heat_layer}, {SITE_TITLES[site]}: |X'| of the first {heat[site].shape[0]} tokens "
                "(each panel on its own colour scale)",
                d / f"heatmap_layer{heat_layer}_{site}.png",
                shared_scale=False,
            )


def _csv_cell(v):
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else repr(v)
    return v


def print_report(result: dict, as_json: bool, file=None) -> None:
    file = file if file is not None else sys.stdout
    if as_json:
        keys = ("model", "source", "windows", "seq", "tokens", "layers", "alpha", "seed", "heatmap_layer", "out",
                "summary")
        print(json.dumps(_json_safe({k: result[k] for k in keys})), file=file)
        return
    header = (f"{result['model']}: {len(result['layers'])} layers, {result['windows']} x {result['seq']} tokens, "
              f"alpha {result['alpha']}, heatmap layer {result['heatmap_layer']} -> {result['out']}")
    print(format_summary(result["summary"], header), file=file)
