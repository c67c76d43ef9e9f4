"""One plan: the α search's predicted layer errors are the errors of the graph that is written."""

import numpy as np
import pytest

from onnxqf.calib import calibrate
from onnxqf.calib.data import load_tokens, windows
from onnxqf.errors import OnnxqfError
from onnxqf.graph.modelfile import load_model
from onnxqf.graph.structure import SITE_KINDS
from onnxqf.maths.metrics import layer_error
from onnxqf.maths.smoothing import relative_error
from onnxqf.pipeline import rewrite
from onnxqf.plan import PRESETS, Plan
from onnxqf.recognize import recognize

from helpers import options


class ByteTokenizer:
    """Byte-level ids (< 256) for the tiny models' 512-token vocabulary."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}


def test_plan_is_a_function_of_config_preset_and_seed(tiny_models):
    cfg = recognize(load_model(tiny_models["llama-gqa"])).config
    a, b, c = Plan.build(cfg, "hybrid", 3), Plan.build(cfg, "hybrid", 3), Plan.build(cfg, "hybrid", 4)
    np.testing.assert_array_equal(a.norm_out.matrix(), b.norm_out.matrix())
    assert not np.array_equal(a.norm_out.matrix(), c.norm_out.matrix())
    assert a.residual is None and a.smooth == SITE_KINDS
    folded = Plan.build(cfg, "hybrid-folded", 3)
    assert folded.residual is not None and folded.norm_out is None and folded.smooth == ("o_in", "down_in")
    for kind in SITE_KINDS:  # every site rotation is orthogonal
        R = a.site_rotation(kind, cfg)
        np.testing.assert_allclose(R @ R.T, np.eye(R.shape[0]), atol=1e-10)
    assert Plan.build(cfg, "smooth").site_rotation("attn_in", cfg) is None
    with pytest.raises(OnnxqfError):
        Plan.build(cfg, "nonsense")
    assert set(PRESETS) == {"none", "smooth", "rotate", "rotate-offline", "hybrid", "hybrid-folded"}
    full, offline = Plan.build(cfg, "rotate", 5), Plan.build(cfg, "rotate-offline", 5)
    assert offline.down is None and offline.heads is None  # nothing that would need a node
    np.testing.assert_array_equal(offline.residual.matrix(), full.residual.matrix())
    np.testing.assert_array_equal(offline.head.matrix(), full.head.matrix())


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias"])
def test_alpha_search_prediction_equals_written_graph(tiny_models, name):
    """For every site, the relative W8A8 layer error the α search predicted for its choice equals the
    error of the rewritten float graph's actual activation and weight on the same tokens."""
    model = load_model(tiny_models[name])
    opts = options(transform="hybrid", quant="none", alpha="auto", calib="builtin", calib_windows=1, calib_seq=64,
                          progress=False)
    report = rewrite(model, opts, tokenizer=ByteTokenizer())
    assert len(report.sites) == 4 * 2
    # the calibration window, captured in the written graph: every token was in the α search's sample
    wins = windows(load_tokens("builtin", ByteTokenizer()), 1, 64)
    s = recognize(model)
    acts = next(calibrate.capture(model, calibrate.site_values(s), wins, progress=False))
    other_seed = Plan.build(s.config, "hybrid", seed=1)
    mismatched = 0
    for site in s.sites():
        err, ref = layer_error(acts[site.name], site.matrix(), 8)
        measured = err / ref
        choice = report.sites[site.name]
        assert choice.predicted <= choice.unsmoothed
        assert measured == pytest.approx(choice.predicted, rel=2e-2), site.name
        # the same sample scored against a rotation the plan did not apply predicts something else
        X_written, B_written = acts[site.name].astype(np.float64), site.matrix()
        R_other = other_seed.site_rotation(site.kind, s.config)
        if abs(relative_error(X_written, B_written, None, R_other) - measured) > 2e-2 * measured:
            mismatched += 1
    assert mismatched > 0


def test_fast_alpha_scorer_matches_the_exact_error(monkeypatch):
    """The α search's float32 scorer with Kronecker rotations equals the float64 dense definition; on a
    subset of columns (forced here by a small budget) it estimates it."""
    from onnxqf.graph.structure import ModelConfig
    from onnxqf.maths import smoothing

    cfg = ModelConfig(hidden=48, num_heads=3, num_kv_heads=1, head_dim=16, intermediate=80, vocab=10)
    plan = Plan.build(cfg, "hybrid", seed=3)
    rng = np.random.default_rng(0)
    for kind, (n, out) in {"attn_in": (48, 80), "o_in": (48, 48), "down_in": (80, 48)}.items():
        X = rng.standard_normal((200, n))
        X[:, :3] *= 40.0
        B = rng.standard_normal((n, out))
        s = smoothing.site_scales(np.abs(X).max(axis=0), B, 0.5)
        R = plan.site_transform(kind, cfg)
        np.testing.assert_allclose(R.matrix(), plan.site_rotation(kind, cfg), atol=1e-12)
        for scales in (None, s):
            exact = relative_error(X, B, scales, R.matrix())
            assert smoothing._Scorer(X, B, R)(scales) == pytest.approx(exact, rel=1e-3)
    monkeypatch.setattr(smoothing, "MAX_SCORED_WEIGHTS", 48 * 300)
    monkeypatch.setattr(smoothing, "MIN_SCORED_COLUMNS", 1)
    X = rng.standard_normal((300, 48))
    X[:, :3] *= 40.0
    B = rng.standard_normal((48, 1200))
    R = plan.site_transform("attn_in", cfg)
    scorer = smoothing._Scorer(X, B, R)
    assert scorer.B.shape == (48, 300)
    assert scorer(None) == pytest.approx(relative_error(X, B, None, R.matrix()), rel=0.15)


@pytest.mark.parametrize("preset", ["hybrid", "hybrid-folded"])
def test_scored_weights_read_in_slices_equal_the_whole_weight(tiny_models, monkeypatch, preset):
    """The α search reads its readers' weights a column slice at a time (bounded memory); the scored
    columns and row maxima equal those of the whole weight with the plan's output folds (v_proj's head
    rotation and up_proj's down-rotation signs act on slices too)."""
    from onnxqf.graph import edit
    from onnxqf.maths import smoothing
    from onnxqf.passes.smooth import SmoothPass

    model = load_model(tiny_models["llama-gqa"])
    s = recognize(model)
    edit.prepare_linears(model.graph, s)
    plan = Plan.build(s.config, preset, seed=2)
    monkeypatch.setattr(smoothing, "MAX_SCORED_WEIGHTS", 64 * 40)  # a subset of columns at every site
    monkeypatch.setattr(smoothing, "MIN_SCORED_COLUMNS", 8)
    p = SmoothPass(plan, {}, "auto")
    monkeypatch.setattr(SmoothPass, "SCORE_SLICE_BYTES", 8 * 64 * s.config.head_dim)  # one head per slice
    for site in s.sites(plan.smooth):
        B = np.concatenate([plan.reader_output(lin.role, lin.matrix(), s.config) for lin in site.readers], axis=1)
        cols = smoothing.scored_columns(*B.shape)
        got, w = p._scored_weights(site, s.config)
        np.testing.assert_allclose(got, B if cols is None else B[:, cols], rtol=1e-12, atol=1e-12, err_msg=site.name)
        np.testing.assert_allclose(w, np.abs(B).max(axis=1), rtol=1e-12, err_msg=site.name)
