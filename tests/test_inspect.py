"""Tests for `onnxqf inspect`: the transform/metric math by hand, and the command end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from onnxqf.analysis.inspection import (
    SITES,
    TRANSFORMS,
    SiteAccumulator,
    parse_layers,
    site_metrics,
    transform_pair,
)
from onnxqf.errors import OnnxqfError
from onnxqf.maths.metrics import channel_magnitudes, difficulty, layer_error
from onnxqf.maths.smoothing import site_scales

H2 = np.array([[1.0, 1.0], [1.0, -1.0]]) / math.sqrt(2.0)


# ----------------------------------------------------------------------------- parse_layers


def test_parse_layers_spec():
    assert parse_layers("0,5,10-12", 30) == [0, 5, 10, 11, 12]
    assert parse_layers(" 3 , 1-2,2 ", 4) == [1, 2, 3]  # sorted, unique, spaces allowed
    assert parse_layers(None, 3) == [0, 1, 2]
    assert parse_layers("all", 2) == [0, 1]
    assert parse_layers("29", 30) == [29]


@pytest.mark.parametrize("spec", ["", "a", "1,,2", "3-1", "-1", "1-", "1.5", "0;1"])
def test_parse_layers_malformed(spec):
    with pytest.raises(OnnxqfError, match="--layers"):
        parse_layers(spec, 30)


@pytest.mark.parametrize("spec", ["30", "0,31", "28-30"])
def test_parse_layers_out_of_range(spec):
    with pytest.raises(OnnxqfError, match="out of range"):
        parse_layers(spec, 30)


# ----------------------------------------------------------------------------- transforms by hand


def test_rotation_by_h2_equalizes_channel_norms():
    # one outlier channel: norms (4, 0) -> std 2; after H/sqrt(2) both channels carry 4/sqrt(2)
    X = np.array([[4.0, 0.0], [0.0, 0.0]])
    B = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert difficulty(channel_magnitudes(X)) == pytest.approx(2.0)
    Xr, Br = transform_pair(X, B, np.ones(2), H2, "rotate")
    np.testing.assert_allclose(Xr, [[2 * math.sqrt(2), 2 * math.sqrt(2)], [0.0, 0.0]])
    np.testing.assert_allclose(Br, H2.T @ B)
    np.testing.assert_allclose(channel_magnitudes(Xr), [2 * math.sqrt(2)] * 2)
    assert difficulty(channel_magnitudes(Xr)) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(Xr @ Br, X @ B)  # the product is unchanged
    # the max shrinks by sqrt(2), the token norm is preserved
    assert np.abs(Xr).max() == pytest.approx(4 / math.sqrt(2))
    assert np.linalg.norm(Xr[0]) == pytest.approx(4.0)


def test_smoothing_alpha_one_on_a_diagonal():
    # alpha = 1: s_j = max|X_j|, so every smoothed channel has max 1 and all the range goes to B
    X = np.diag([4.0, 0.5])
    B = np.array([[1.0, 2.0], [3.0, 4.0]])
    s = site_scales(np.abs(X).max(axis=0), B, alpha=1.0)
    np.testing.assert_allclose(s, [4.0, 0.5])
    Xs, Bs = transform_pair(X, B, s, None, "smooth")
    np.testing.assert_allclose(Xs, np.eye(2))
    np.testing.assert_allclose(Bs, [[4.0, 8.0], [1.5, 2.0]])
    assert difficulty(channel_magnitudes(Xs)) == 0.0
    np.testing.assert_allclose(Xs @ Bs, X @ B)


def test_smooth_then_rotate_composes_in_that_order():
    rng = np.random.default_rng(0)
    X, B = rng.standard_normal((5, 2)), rng.standard_normal((2, 3))
    s = np.array([2.0, 0.25])
    Xh, Bh = transform_pair(X, B, s, H2, "smooth+rotate")
    np.testing.assert_allclose(Xh, (X / s) @ H2)
    np.testing.assert_allclose(Bh, H2.T @ (s[:, None] * B))
    np.testing.assert_allclose(Xh @ Bh, X @ B)
    Xo, Bo = transform_pair(X, B, s, H2, "original")
    np.testing.assert_array_equal(Xo, X)
    np.testing.assert_array_equal(Bo, B)
    with pytest.raises(ValueError):
        transform_pair(X, B, s, H2, "nonsense")


def test_error_zero_when_exactly_representable():
    # per-token scale max|row|/127 = 1 and per-column scale max|col|/127 = 1: nothing rounds
    X = np.array([[127.0, -64.0, 3.0], [-127.0, 5.0, 0.0]])
    B = np.array([[127.0, -1.0], [2.0, 127.0], [-3.0, 0.0]])
    m = site_metrics(X, B, np.ones(3), np.eye(3))
    assert m["original"]["error8"] == 0.0
    assert m["original"]["error8_rel"] == 0.0
    assert m["original"]["act_max"] == 127.0
    assert m["original"]["top_channel"] == 0


def test_error_by_hand_at_two_bits():
    # 2 bits: qmax = 1. X row [1, 0.4] -> scale 1 -> Q(X) = [1, 0]; B = [[1], [1]] is exact.
    # XB = 1.4, Q(X)Q(B) = 1: error 0.16, relative 0.16 / 1.96
    acc = SiteAccumulator(np.ones(2), np.eye(2), transforms=("original",), bits=(2,))
    r = acc.update(np.array([[1.0, 0.4]]), np.array([[1.0], [1.0]])).result()["original"]
    assert r["error2"] == pytest.approx(0.16)
    assert r["error2_rel"] == pytest.approx(0.16 / 1.96)


def test_weight_difficulty_is_std_of_row_norms():
    B = np.array([[3.0, 4.0], [0.0, 1.0]])  # row norms 5 and 1 -> std 2
    m = site_metrics(np.ones((2, 2)), B, np.ones(2), H2)
    assert m["original"]["weight_difficulty"] == pytest.approx(2.0)
    rows = np.linalg.norm(H2.T @ B, axis=1)
    assert m["rotate"]["weight_difficulty"] == pytest.approx(np.std(rows))


def test_streaming_equals_one_chunk_and_matches_layer_error():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 8))
    X[:, 3] *= 30.0
    B = rng.standard_normal((8, 5))
    s = site_scales(np.abs(X).max(axis=0), B, 0.5)
    from onnxqf.maths.hadamard import rotation

    Q = rotation(8, np.random.default_rng(0)).matrix()
    whole = site_metrics(X, B, s, Q)
    acc = SiteAccumulator(s, Q)
    for chunk in np.array_split(X, 4):
        acc.update(chunk.astype(np.float32), B)  # capture hands float32
    parts = acc.result()
    for t in TRANSFORMS:
        for k in ("act_difficulty", "act_max", "error8", "error4", "error8_rel", "weight_difficulty"):
            assert parts[t][k] == pytest.approx(whole[t][k], rel=1e-5), (t, k)
        Xt, Bt = transform_pair(X, B, s, Q, t)
        err, total = layer_error(Xt, Bt, 8)
        assert whole[t]["error8"] == pytest.approx(err, rel=1e-9)
        assert whole[t]["error8_rel"] == pytest.approx(err / total, rel=1e-9)
    # an outlier channel: rotation and smoothing both lower the difficulty
    assert whole["rotate"]["act_difficulty"] < whole["original"]["act_difficulty"]
    assert whole["smooth+rotate"]["act_max"] < whole["original"]["act_max"]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="session")
def inspect_model(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from onnxqf.models.export import export_model

    from tiny import tiny_model

    d = tmp_path_factory.mktemp("inspect")
    model = export_model(tiny_model("llama-gqa"), d / "llama-gqa.onnx")
    ids = np.random.default_rng(0).integers(0, 512, size=3 * 64).astype(np.int64)
    np.save(d / "ids.npy", ids)
    return model, d / "ids.npy"


@pytest.fixture(scope="session")
def inspected(inspect_model, tmp_path_factory) -> tuple[Path, str]:
    """One full run (both layers, --json); returns the output folder and what it printed."""
    import contextlib
    import io

    from onnxqf.cli import main

    model, ids = inspect_model
    out = tmp_path_factory.mktemp("inspect-out") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["inspect", str(model), "--tokens", str(ids), "--windows", "3", "--seq", "64", "--out", str(out),
                   "--json"])
    assert rc == 0
    return out, printed.getvalue()


def test_inspect_writes_every_file(inspected):
    out, _ = inspected
    names = {p.name for p in out.iterdir()}
    assert {"metrics.csv", "metrics.json"} <= names
    for site in SITES:
        for kind in ("difficulty", "weight_difficulty", "error8", "error4", "max"):
            assert f"{kind}_{site}.png" in names
    heat = json.loads((out / "metrics.json").read_text())["heatmap_layer"]
    for site in SITES:
        assert f"heatmap_layer{heat}_{site}.png" in names
    assert not [n for n in names if n.startswith(".")]
    assert [p.name for p in out.parent.iterdir()] == ["run"]  # no partial folders left


def test_inspect_csv_rows(inspected):
    out, _ = inspected
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = {(int(r["layer"]), r["site"], r["transform"]) for r in rows}
    assert keys == {(i, s, t) for i in range(2) for s in SITES for t in TRANSFORMS}
    assert len(rows) == 2 * 4 * 4
    for r in rows:
        assert int(r["tokens"]) == 3 * 64
        assert float(r["error8"]) >= 0.0 and float(r["error4"]) >= float(r["error8"])
    assert {int(r["channels"]) for r in rows if r["site"] != "down_in"} == {64}
    assert {int(r["channels"]) for r in rows if r["site"] == "down_in"} == {96}
    down = [r for r in rows if r["site"] == "down_in"]
    mean = lambda t: np.mean([float(r["act_difficulty"]) for r in down if r["transform"] == t])  # noqa: E731
    assert mean("smooth+rotate") <= mean("original")


def test_inspect_json(inspected):
    out, printed = inspected
    lines = printed.strip().splitlines()
    assert len(lines) == 1  # --json: one JSON object, nothing else on stdout
    obj = json.loads(lines[0])
    assert obj["layers"] == [0, 1] and obj["windows"] == 3 and obj["seq"] == 64
    assert set(obj["summary"]) == set(SITES)
    for site in SITES:
        assert set(obj["summary"][site]) == set(TRANSFORMS)
    data = json.loads((out / "metrics.json").read_text())
    assert data["summary"] == obj["summary"]
    assert len(data["rows"]) == 32


def test_inspect_table_and_replace(inspect_model, tmp_path, capsys):
    from onnxqf.cli import main
    from onnxqf.graph.modelfile import load_model, save_model

    model, ids = inspect_model
    # a model file named model.onnx (its data file has the name of capture's temporary copy)
    model = save_model(load_model(model), tmp_path / "m" / "model.onnx")
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.csv").write_text("old\n")  # an earlier output: replaced, but only at the end
    (out / "stale.png").write_bytes(b"")
    rc = main(["inspect", str(model), "--tokens", str(ids), "--windows", "1", "--seq", "32", "--layers", "1",
               "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "smooth+rotate" in table and "down_in" in table and "heatmap layer 1" in table
    assert (out / "heatmap_layer1_down_in.png").is_file()
    assert not (out / "stale.png").exists()
    assert (out / "metrics.csv").read_text().startswith("layer,site,transform")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "o"]


@pytest.mark.parametrize("extra, message", [
    (["--layers", "0-7"], "out of range"),
    (["--layers", "x"], "--layers"),
    (["--heatmap-layer", "5"], "--heatmap-layer"),
])
def test_inspect_bad_options_exit_2(inspect_model, tmp_path, capsys, extra, message):
    from onnxqf.cli import main

    model, ids = inspect_model
    out = tmp_path / "bad"
    rc = main(["inspect", str(model), "--tokens", str(ids), "--windows", "1", "--seq", "32", "--out", str(out), *extra])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxqf: error:") and message in err[0]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_inspect_bad_model_and_foreign_out_folder(inspect_model, tmp_path, capsys):
    from onnxqf.cli import main

    _, ids = inspect_model
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert main(["inspect", str(junk), "--tokens", str(ids)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable ONNX model" in err[0]

    model, _ = inspect_model
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["inspect", str(model), "--tokens", str(ids), "--out", str(foreign)]) == 2
    assert "not an earlier inspect output" in capsys.readouterr().err
    assert (foreign / "keep.txt").read_text() == "mine"
