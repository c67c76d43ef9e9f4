"""The rotated float graph computes the same function as the original, on real text."""

import numpy as np
import onnx
import pytest

from conftest import TINY_NAMES, kl_per_token, run_logits
from onnxqf.recognize import recognize
from onnxqf.modelfile import load_model, save_model
from onnxqf.passes.fold_norms import FoldNormsPass
from onnxqf.passes.online_hadamard import DownProjHadamardPass
from onnxqf.passes.rotate_residual import RotateResidualPass
from onnxqf.passes.rotate_vo import ValueOutputRotationPass
from onnxqf.pipeline import RewriteOptions, rewrite

PASS_SETS = {
    "fold": [FoldNormsPass],
    "residual": [FoldNormsPass, RotateResidualPass],
    "down": [FoldNormsPass, DownProjHadamardPass],
    "vo": [FoldNormsPass, ValueOutputRotationPass],
    "all": [FoldNormsPass, RotateResidualPass, DownProjHadamardPass, ValueOutputRotationPass],
}


def windows(text_ids, n=2, length=128):
    return text_ids[: n * length].reshape(n, length)


def assert_equivalent(orig, new, ids):
    ref, out = run_logits(orig, ids), run_logits(new, ids)
    assert np.abs(out - ref).max() <= 1e-3 * np.abs(ref).max()
    assert kl_per_token(ref, out) <= 1e-6


@pytest.mark.parametrize("name", TINY_NAMES)
@pytest.mark.parametrize("passes", list(PASS_SETS))
def test_passes_preserve_logits(tiny_models, text_ids, tmp_path, name, passes):
    model = load_model(tiny_models[name])
    for p in PASS_SETS[passes]:
        p()(model)
    out = save_model(model, tmp_path / "rot.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    assert_equivalent(tiny_models[name], out, windows(text_ids))


@pytest.mark.parametrize("name", TINY_NAMES)
def test_rotate_preset_changes_weights_and_keeps_function(tiny_models, text_ids, tmp_path, name):
    orig = load_model(tiny_models[name])
    model = load_model(tiny_models[name])
    report = rewrite(model, RewriteOptions(rotate=True, quant="none", progress=False))
    out = save_model(model, tmp_path / "rot.onnx")
    assert_equivalent(tiny_models[name], out, windows(text_ids))
    # really rotated: the first q_proj weight differs substantially
    from onnxqf.edit import weight_matrix

    a = weight_matrix(recognize(orig).layers[0].q)
    b = weight_matrix(recognize(model).layers[0].q)
    assert np.abs(a - b).max() > 0.1 * np.abs(a).max()
    assert [p["pass"] for p in report["passes"]] == ["FoldNormsPass", "RotateResidualPass", "DownProjHadamardPass", "ValueOutputRotationPass"]


def test_rotation_reduces_activation_outliers(tiny_models, text_ids):
    """Max |x| at the down_proj input drops once the online Hadamard mixes the channels."""
    from onnxqf.calibrate import capture, site_values

    wins = windows(text_ids, 1, 128)
    def maxima(model):
        vals = {k: v for k, v in site_values(recognize(model)).items() if k.endswith("down_in")}
        acts = next(capture(model, vals, wins, progress=False))
        return np.array([np.abs(acts[k]).max() / np.sqrt(np.mean(acts[k] ** 2)) for k in sorted(acts)])

    before = maxima(load_model(tiny_models["llama-gqa"]))
    model = load_model(tiny_models["llama-gqa"])
    rewrite(model, RewriteOptions(rotate=True, quant="none", progress=False))
    after = maxima(model)
    assert np.all(after < before)


def test_tied_embedding_is_untied_and_table_rotated(tiny_models):
    model = load_model(tiny_models["llama-tied"])
    s = recognize(model)
    assert s.tied()
    FoldNormsPass()(model)
    s = recognize(model)
    assert not s.tied()
    assert s.lm_head.weight is not s.embedding_table


def test_fp16_rotation(tiny_fp16, text_ids, tmp_path):
    model = load_model(tiny_fp16)
    rewrite(model, RewriteOptions(rotate=True, quant="none", progress=False))
    out = save_model(model, tmp_path / "rot16.onnx")
    ids = windows(text_ids, 1, 64)
    ref, new = run_logits(tiny_fp16, ids).astype(np.float32), run_logits(out, ids).astype(np.float32)
    # float16 arithmetic: the fold is done in float64, so only fp16 rounding differs
    assert np.abs(new - ref).max() <= 2e-2 * np.abs(ref).max()
