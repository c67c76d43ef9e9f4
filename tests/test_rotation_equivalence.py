"""The rotated float graph computes the same function as the original, on real text."""

import numpy as np
import onnx
import pytest

from onnxqf.graph.modelfile import load_model, save_model
from onnxqf.passes.fold_norms import FoldNormsPass
from onnxqf.passes.online_hadamard import DownProjHadamardPass
from onnxqf.passes.rotate_norm_outputs import NormOutputHadamardPass
from onnxqf.passes.rotate_residual import RotateResidualPass
from onnxqf.passes.rotate_vo import ValueOutputRotationPass
from onnxqf.pipeline import rewrite
from onnxqf.plan import Plan
from onnxqf.recognize import recognize

from helpers import TINY_NAMES, kl_per_token, options, run_logits

PASS_SETS = {
    "fold": [FoldNormsPass],
    "residual": [FoldNormsPass, RotateResidualPass],
    "norm_out": [NormOutputHadamardPass],  # exact for any γ: no folding needed
    "down": [FoldNormsPass, DownProjHadamardPass],
    "vo": [FoldNormsPass, ValueOutputRotationPass],
    "all": [FoldNormsPass, RotateResidualPass, DownProjHadamardPass, ValueOutputRotationPass],
    "hybrid": [FoldNormsPass, NormOutputHadamardPass, DownProjHadamardPass, ValueOutputRotationPass],
    "norm_out+head": ["norm_out+head"],  # the final norm's output too (a quantized lm_head): tied ones untied
}


def make_pass(cls, model):
    """A pass with its rotation(s) from the plan that the presets use."""
    plan = Plan.build(recognize(model).config, "rotate", seed=0)
    hybrid = Plan.build(recognize(model).config, "hybrid", seed=0)
    if cls == "norm_out+head":
        return NormOutputHadamardPass(hybrid.norm_out, head=True)
    return {FoldNormsPass: lambda: cls(), RotateResidualPass: lambda: cls(plan.residual),
            NormOutputHadamardPass: lambda: cls(hybrid.norm_out), DownProjHadamardPass: lambda: cls(plan.down),
            ValueOutputRotationPass: lambda: cls(plan.head, plan.heads)}[cls]()


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
        make_pass(p, model)(model)
    out = save_model(model, tmp_path / "rot.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    assert_equivalent(tiny_models[name], out, windows(text_ids))


@pytest.mark.parametrize("name", TINY_NAMES)
def test_rotate_preset_changes_weights_and_keeps_function(tiny_models, text_ids, tmp_path, name):
    orig = load_model(tiny_models[name])
    model = load_model(tiny_models[name])
    report = rewrite(model, options(transform="rotate", quant="none", progress=False))
    out = save_model(model, tmp_path / "rot.onnx")
    assert_equivalent(tiny_models[name], out, windows(text_ids))
    # really rotated: the first q_proj weight differs substantially
    a = recognize(orig).layers[0].q.matrix()
    b = recognize(model).layers[0].q.matrix()
    assert np.abs(a - b).max() > 0.1 * np.abs(a).max()
    assert [p.name for p in report.passes] == ["SimplifyShapesPass", "FoldNormsPass", "RotateResidualPass",
                                                "DownProjHadamardPass", "ValueOutputRotationPass"]


def test_rotation_reduces_activation_outliers(tiny_models, text_ids):
    """Max |x| at the down_proj input drops once the online Hadamard mixes the channels."""
    from onnxqf.calib.calibrate import capture, site_values

    wins = windows(text_ids, 1, 128)
    def maxima(model):
        vals = site_values(recognize(model), ("down_in",))
        acts = next(capture(model, vals, wins, progress=False))
        return np.array([np.abs(acts[k]).max() / np.sqrt(np.mean(acts[k] ** 2)) for k in sorted(acts)])

    before = maxima(load_model(tiny_models["llama-gqa"]))
    model = load_model(tiny_models["llama-gqa"])
    rewrite(model, options(transform="rotate", quant="none", progress=False))
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
    rewrite(model, options(transform="rotate", quant="none", progress=False))
    out = save_model(model, tmp_path / "rot16.onnx")
    ids = windows(text_ids, 1, 64)
    ref, new = run_logits(tiny_fp16, ids).astype(np.float32), run_logits(out, ids).astype(np.float32)
    # float16 arithmetic: the fold is done in float64, so only fp16 rounding differs
    assert np.abs(new - ref).max() <= 2e-2 * np.abs(ref).max()


@pytest.mark.parametrize("name", TINY_NAMES)
def test_full_hybrid_float_is_exact(tiny_models, text_ids, tmp_path, name):
    """Smoothing at all four sites, online Hadamards after the norms: the float graph is unchanged."""
    model = load_model(tiny_models[name])
    report = rewrite(model, options(transform="hybrid", quant="none", alpha=0.5, progress=False,
                                           calib="builtin", calib_windows=1, calib_seq=64), tokenizer=_ByteTokenizer())
    assert set(report.rotations) == {"norm_out", "down", "head", "heads"}
    assert len(report.sites) == 4 * len(recognize(model).layers)
    out = save_model(model, tmp_path / "hybrid.onnx")
    assert_equivalent(tiny_models[name], out, windows(text_ids))


@pytest.mark.parametrize("name", ["llama-tied", "qwen2-bias"])
def test_full_hybrid_rotates_a_quantized_lm_head_input(tiny_models, text_ids, tmp_path, name):
    """With --quantize-lm-head the full hybrid also rotates the final norm's output online (lm_head's input): one
    more rotation site than without, lm_head quantized, and its W8A8 logits no further from float than without the
    rotation by more than noise (the float version of the same rotation is exact: test_passes_preserve_logits)."""
    import collections

    kl = {}
    for head in (False, True):
        model = load_model(tiny_models[name])
        rewrite(model, options(transform="hybrid", alpha=0.5, quantize_lm_head=head, weight_rounding="rtn",
                               calib="builtin", calib_windows=1, calib_seq=64), tokenizer=_ByteTokenizer())
        names = collections.Counter(n.name.split("/")[0] for n in model.graph if "hadamard" in (n.name or ""))
        assert ("lm_head_in" in names) == head, names
        out = save_model(model, tmp_path / f"h{int(head)}.onnx")
        ref, new = run_logits(tiny_models[name], windows(text_ids)), run_logits(out, windows(text_ids))
        kl[head] = kl_per_token(ref, new)
    assert 0 < kl[True] < 0.1, kl


class _ByteTokenizer:
    """Byte-level ids (< 256) for the tiny models' 512-token vocabulary."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}


@pytest.mark.parametrize("name", ["llama-gqa", "llama-odd"])
def test_rotate_offline_adds_no_node_and_is_exact(tiny_models, text_ids, tmp_path, name):
    """--rotate offline: residual and per-head value rotations folded, no node added, float function kept."""
    import collections

    from onnxqf.graph.modelfile import load_model, save_model
    from onnxqf.pipeline import rewrite

    src = tiny_models[name]
    model = load_model(src)
    before = collections.Counter(n.op_type for n in model.graph)
    report = rewrite(model, options(transform="rotate-offline", quant="none", progress=False))
    after = collections.Counter(n.op_type for n in model.graph)
    assert set(report.rotations) == {"residual", "head"}
    assert sum(after.values()) <= sum(before.values()) and after["MatMul"] == before["MatMul"]
    out = save_model(model, tmp_path / "r.onnx")
    ids = text_ids[:256].reshape(2, 128)
    ref, new = run_logits(src, ids), run_logits(out, ids)
    assert np.abs(new - ref).max() <= 1e-3 * np.abs(ref).max()
