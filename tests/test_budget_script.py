"""scripts/hybrid_budget.py's float simulation of W8A8 computes what the int8 graph computes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from onnxqf.graph.modelfile import load_model, save_model
from onnxqf.lowering.w8a8 import Int8Token
from onnxqf.passes.quantize import QuantizePass
from onnxqf.recognize import recognize

from helpers import run_logits

ROOT = Path(__file__).resolve().parents[1]


def _budget():
    spec = importlib.util.spec_from_file_location("hybrid_budget", ROOT / "scripts" / "hybrid_budget.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fake_quant_activations_match_the_int8_graph(tiny_models, text_ids, tmp_path):
    """RTN int8 weights (dequantized) + per-token fake-quant activations == the int8-token lowering's MatMulInteger
    graph."""
    budget = _budget()
    src = tiny_models["llama-gqa"]
    ids = text_ids[None, :96]
    sim = load_model(budget.weights_only(src, tmp_path / "w_rtn.onnx", None))
    budget.fake_quant_activations(sim, [s.value for s in recognize(sim).sites()])
    sim_path = save_model(sim, tmp_path / "sim.onnx")
    real = load_model(src)
    QuantizePass(Int8Token())(real)
    real_path = save_model(real, tmp_path / "real.onnx")

    ref, a, b = run_logits(src, ids), run_logits(sim_path, ids), run_logits(real_path, ids)
    scale = np.abs(ref).max()
    assert np.abs(a - ref).max() > 1e-3 * scale  # quantization is visible ...
    assert np.abs(a - b).max() <= 1e-4 * scale  # ... and the simulation reproduces it
    # activations only: weights untouched, still an error
    act = budget.activations_only(src, tmp_path / "a8.onnx", ("mlp_in",))
    c = run_logits(act, ids)
    assert 0 < np.abs(c - ref).max() < np.abs(a - ref).max()
