"""Matplotlib figures for quantization-friendliness analysis (Agg backend, PNG output).

Every function writes its PNG atomically (:mod:`onnxqf.graph.fileio`: written in a scratch folder
beside the target, then renamed into place) and returns the output path.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from onnxqf.graph.fileio import atomic_file  # noqa: E402

__all__ = ["block_max", "plot_bars", "plot_channel_heatmap", "plot_metric_vs_layer", "save_figure"]

DPI = 120
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
# Stable colours for the usual transform labels; others cycle through tab10.
_KNOWN_COLORS = {
    "original": "tab:gray",
    "smooth": "tab:blue",
    "rotate": "tab:orange",
    "smooth+rotate": "tab:green",
}


def _color(label: str, i: int) -> str:
    return _KNOWN_COLORS.get(label, f"C{i % 10}")


def save_figure(fig: "plt.Figure", path: str | os.PathLike) -> str:
    """Save ``fig`` as PNG atomically (:func:`onnxqf.graph.fileio.atomic_file`), close it."""
    path = os.fspath(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.1)
    finally:
        plt.close(fig)
    return path


def plot_metric_vs_layer(
    values: Mapping[str, Sequence[float]],
    title: str,
    ylabel: str,
    path: str | os.PathLike,
    logy: bool = False,
    xlabel: str = "layer",
) -> str:
    """One marked curve per transform label (x = layer index), with legend and grid."""
    n_max = max((len(v) for v in values.values()), default=0)
    fig, ax = plt.subplots(figsize=(max(7.0, min(16.0, 0.25 * n_max + 5.0)), 4.5))
    for i, (label, ys) in enumerate(values.items()):
        y = np.asarray(ys, dtype=np.float64)
        ax.plot(
            np.arange(y.size), y, marker=_MARKERS[i % len(_MARKERS)], markersize=4,
            linewidth=1.5, label=label, color=_color(label, i),
        )
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if n_max:
        ax.set_xlim(-0.5, n_max - 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, which="major", alpha=0.4)
    if logy:
        ax.grid(True, which="minor", alpha=0.15)
    if values:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, borderaxespad=0.0)
    fig.tight_layout()
    return save_figure(fig, path)


def block_max(a: np.ndarray, max_rows: int, max_cols: int) -> np.ndarray:
    """Max-pool a 2-D array down to at most ``max_rows x max_cols`` so outliers stay visible."""
    r, c = a.shape
    fr = max(1, -(-r // max_rows))
    fc = max(1, -(-c // max_cols))
    if fr == 1 and fc == 1:
        return a
    pr, pc = (-r) % fr, (-c) % fc
    a = np.pad(a, ((0, pr), (0, pc)), constant_values=0.0)
    return a.reshape(a.shape[0] // fr, fr, a.shape[1] // fc, fc).max(axis=(1, 3))


def plot_channel_heatmap(
    panels: Mapping[str, np.ndarray],
    title: str,
    path: str | os.PathLike,
    shared_scale: bool = True,
    channel_bars: bool = True,
    max_pixels: tuple[int, int] | None = None,
    cmap: str = "viridis",
) -> str:
    """Token x channel ``|X|`` images, one column per transform, plus per-channel max bars.

    ``panels`` maps a transform label to activations ``[tokens, channels]``. With
    ``shared_scale`` all images (and bar rows) use one colour / y range so transforms are
    directly comparable; otherwise each panel gets its own colorbar. Arrays larger than the
    drawn image are max-pooled (to ``max_pixels = (tokens, channels)``, default: the panel's
    size in pixels) so that isolated outlier channels are not dropped by resampling.
    """
    labels = list(panels)
    if not labels:
        raise ValueError("no panels to plot")
    mags = []
    for k in labels:
        a = np.abs(np.asarray(panels[k], dtype=np.float64))
        if a.ndim == 1:
            a = a[None, :]
        elif a.ndim > 2:
            a = a.reshape(-1, a.shape[-1])
        mags.append(a)
    chmax = [a.max(axis=0) if a.shape[0] else np.zeros(a.shape[1]) for a in mags]
    gmax = max((float(a.max()) if a.size else 0.0) for a in mags) or 1.0

    n = len(labels)
    nrows = 2 if channel_bars else 1
    fig, axes = plt.subplots(
        nrows, n, figsize=(max(5.0, 4.2 * n), 3.6 * nrows + 0.6), squeeze=False, dpi=DPI,
        layout="constrained",  # like tight_layout, but also makes room for the colorbars
        gridspec_kw={"height_ratios": [3, 1.3]} if channel_bars else None,
    )
    im = None
    for i, (label, a) in enumerate(zip(labels, mags)):
        ax = axes[0, i]
        if max_pixels is None:
            ext = ax.get_window_extent()
            img = block_max(a, max(16, int(ext.height)), max(16, int(ext.width)))
        else:
            img = block_max(a, *max_pixels)
        vmax = gmax if shared_scale else (float(a.max()) if a.size and a.max() > 0 else 1.0)
        im = ax.imshow(
            img, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0.0, vmax=vmax,
            extent=(-0.5, a.shape[1] - 0.5, a.shape[0] - 0.5, -0.5),
        )
        ax.set_title(f"{label}\nmax|x|={a.max() if a.size else 0:.3g}", fontsize=10)
        ax.set_xlabel("channel")
        if i == 0:
            ax.set_ylabel("token")
        if channel_bars:
            bx = axes[1, i]
            m = chmax[i]
            bx.fill_between(np.arange(m.size), 0.0, m, step="mid", color=_color(label, i), alpha=0.85)
            bx.set_xlim(-0.5, m.size - 0.5)
            bx.set_ylim(0.0, (gmax if shared_scale else (float(m.max()) if m.size else 1.0) or 1.0) * 1.05)
            bx.set_xlabel("channel")
            if i == 0:
                bx.set_ylabel("max |x| per channel")
            bx.grid(True, alpha=0.3)
    fig.suptitle(title)
    if not shared_scale:
        for i, img_ax in enumerate(axes[0, :]):
            # one colorbar per column, spanning its rows, so images and bars stay aligned
            fig.colorbar(img_ax.images[0], ax=list(axes[:, i]), fraction=0.05, pad=0.01)
    elif im is not None:
        # span all rows so image and bar columns stay aligned
        fig.colorbar(im, ax=list(axes.ravel()), fraction=0.02 if n > 2 else 0.05, pad=0.01, label="|x|")
    return save_figure(fig, path)


def plot_bars(
    values: Mapping[str, float],
    title: str,
    ylabel: str,
    path: str | os.PathLike,
    logy: bool = False,
) -> str:
    """Simple bar chart of one scalar per label (e.g. KL or perplexity per transform)."""
    labels = list(values)
    y = np.asarray([values[k] for k in labels], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(labels) + 2.0), 4.0))
    bars = ax.bar(np.arange(len(labels)), y, color=[_color(k, i) for i, k in enumerate(labels)])
    ax.bar_label(bars, labels=[f"{v:.4g}" for v in y], fontsize=9, padding=2)
    ax.set_xticks(np.arange(len(labels)), labels)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.4)
    fig.tight_layout()
    return save_figure(fig, path)
