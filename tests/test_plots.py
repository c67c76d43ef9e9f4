"""Tests for onnxqf.analysis.plots: files are written atomically and are valid, non-empty PNGs."""

from __future__ import annotations

import os

import numpy as np
import pytest

from onnxqf.analysis import plots
from onnxqf.graph.fileio import is_partial

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_bytes=2000):
    assert os.path.isfile(path)
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_MAGIC
    assert os.path.getsize(path) > min_bytes
    # no temp files left behind
    leftovers = [n for n in os.listdir(os.path.dirname(path)) if is_partial(n) or n.startswith(".tmp-")]
    assert leftovers == []


def _activations(seed=0, tokens=64, channels=256):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((tokens, channels))
    X[:, [7, 100, 201]] *= 40.0  # outlier channels
    return X


def test_backend_is_agg():
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"


@pytest.mark.parametrize("logy", [False, True])
def test_plot_metric_vs_layer(tmp_path, logy):
    rng = np.random.default_rng(0)
    vals = {
        "original": list(rng.uniform(5, 50, 24)),
        "smooth": list(rng.uniform(1, 10, 24)),
        "rotate": list(rng.uniform(1, 5, 24)),
        "smooth+rotate": list(rng.uniform(0.5, 3, 24)),
    }
    out = tmp_path / "sub" / "difficulty.png"  # parent dir is created
    ret = plots.plot_metric_vs_layer(vals, "Quantization difficulty", "std of channel L2", out, logy=logy)
    assert ret == os.fspath(out)
    _check_png(ret)


def test_plot_metric_vs_layer_overwrites(tmp_path):
    out = tmp_path / "m.png"
    plots.plot_metric_vs_layer({"original": [1, 2, 3]}, "t", "y", out)
    plots.plot_metric_vs_layer({"original": [3, 2, 1], "rotate": [1, 1, 1]}, "t", "y", out)
    _check_png(os.fspath(out))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("bars", [True, False])
def test_plot_channel_heatmap(tmp_path, shared, bars):
    X = _activations()
    rot = X @ np.linalg.qr(np.random.default_rng(1).standard_normal((256, 256)))[0]
    panels = {"original": X, "smooth": X / np.sqrt(np.abs(X).max(0)), "rotate": rot}
    out = tmp_path / f"heat_{shared}_{bars}.png"
    ret = plots.plot_channel_heatmap(panels, "layer 3 q_proj input", out, shared_scale=shared, channel_bars=bars)
    _check_png(ret)


def test_plot_channel_heatmap_large_is_pooled(tmp_path):
    X = _activations(tokens=700, channels=3000).astype(np.float32)
    ret = plots.plot_channel_heatmap({"original": X}, "big", tmp_path / "big.png", max_pixels=(128, 256))
    _check_png(ret)
    pooled = plots.block_max(np.abs(X.astype(np.float64)), 128, 256)
    assert pooled.shape[0] <= 128 and pooled.shape[1] <= 256
    assert pooled.max() == np.abs(X).max()  # outliers survive pooling


def test_plot_channel_heatmap_empty_raises(tmp_path):
    with pytest.raises(ValueError):
        plots.plot_channel_heatmap({}, "none", tmp_path / "x.png")


def test_plot_bars(tmp_path):
    ret = plots.plot_bars(
        {"original": 0.0, "smooth": 0.012, "rotate": 0.004, "smooth+rotate": 0.003},
        "KL vs fp32", "KL (nats)", tmp_path / "bars.png",
    )
    _check_png(ret)


def test_png_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        ret = plots.plot_metric_vs_layer({"original": [1.0, 2.0]}, "t", "y", tmp_path / "perm.png")
    finally:
        os.umask(old)
    assert os.stat(ret).st_mode & 0o777 == 0o644
