"""Layer-streamed calibration: the model run one layer at a time equals the whole model, and sequential
GPTQ feeds each layer the outputs of the layers before it with their weights rounded."""

import numpy as np
import pytest

from onnxqf.calib import calibrate, layerwise
from onnxqf.graph import edit
from onnxqf.graph.modelfile import load_model
from onnxqf.lowering.nbits import MatMulNBits
from onnxqf.lowering.w8a8 import Uint8Token
from onnxqf.passes.quantize import QuantizePass
from onnxqf.pipeline import rewrite
from onnxqf.recognize import recognize

from helpers import options


def _windows(text_ids, n=3, seq=48):
    return text_ids[: n * seq].reshape(n, seq)


def _close(a: dict, b: dict, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=rtol * np.abs(b[k]).max(), err_msg=k)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied", "qwen2-bias", "llama-odd"])
def test_layer_by_layer_equals_whole_model(tiny_models, text_ids, name):
    """Float weights: X^T X of every site, one layer at a time, equal those of one run of the whole model."""
    model = load_model(tiny_models[name])
    structure = recognize(model)
    wins = _windows(text_ids)
    whole = calibrate.collect_hessians(model, calibrate.site_values(structure), wins, progress=False)
    streamed = layerwise.sequential_hessians(model, structure, wins, None, progress=False)
    _close(streamed, whole)


def test_segments_hold_one_layer_each(tiny_models):
    model = load_model(tiny_models["llama-gqa"])
    structure = recognize(model)
    segments = layerwise.split(model, structure)
    assert len(segments) == len(structure.layers)
    for seg, layer in zip(segments, structure.layers):
        nodes = set(seg.nodes)
        assert all(lin.node in nodes for lin in layer.linears())
        assert seg.nodes[-1] is layer.down.node
        # what crosses a cut: never an initializer, and the next segment's inputs are all there
        assert all(v.const_value is None for v in seg.inputs)
    for prev, seg in zip(segments, segments[1:]):
        assert {v.name for v in seg.inputs} <= prev.live | {v.name for v in model.graph.inputs}


@pytest.mark.parametrize("make_pass", [lambda: QuantizePass(Uint8Token()),
                                       lambda: QuantizePass(MatMulNBits(bits=4, block_size=16))],
                         ids=["int8", "int4"])
def test_sequential_hessians_see_rounded_earlier_layers(tiny_models, text_ids, make_pass):
    """Layer 0's X^T X are the float model's; layer 1's equal those of a model whose layer 0 carries the
    rounded weights the pass will write (written here by hand into a copy)."""
    path = tiny_models["qwen2-bias"]
    model = load_model(path)
    structure = recognize(model)
    wins = _windows(text_ids)
    qpass = make_pass()
    seq = layerwise.sequential_hessians(model, structure, wins, qpass.rounded, progress=False)
    float_h = calibrate.collect_hessians(model, calibrate.site_values(structure), wins, progress=False)
    for site in structure.layers[0].sites():
        np.testing.assert_allclose(seq[site.name], float_h[site.name], rtol=1e-5,
                                   atol=1e-5 * np.abs(float_h[site.name]).max())
    # the reference: layer 0 rounded in a copy of the model, then the whole model run once
    ref_model = load_model(path)
    ref_structure = recognize(ref_model)
    edit.prepare_linears(ref_model.graph, ref_structure)
    ref_structure = recognize(ref_model)
    for site in ref_structure.layers[0].sites():
        for lin, B in qpass.rounded(ref_structure, site, seq[site.name]).items():
            edit.set_weight_matrix(lin, B)
    ref = calibrate.collect_hessians(ref_model, calibrate.site_values(recognize(ref_model)), wins, progress=False)
    changed = 0
    for site in structure.layers[1].sites():
        np.testing.assert_allclose(seq[site.name], ref[site.name], rtol=1e-4, atol=1e-4 * np.abs(ref[site.name]).max())
        changed += not np.allclose(seq[site.name], float_h[site.name], rtol=1e-6, atol=0)
    assert changed == 4  # rounding layer 0 changed every input of layer 1


def test_rewrite_sequential_is_recorded_and_differs(tiny_models, ids_file, tmp_path):
    """--quant int4 with GPTQ: sequential (default) and float-model Hessians give different weights; the
    report says which was used."""
    reports, weights = {}, {}
    for sequential in (True, False):
        model = load_model(tiny_models["llama-gqa"])
        reports[sequential] = rewrite(model, options(transform="rotate", quant="int4", block_size=16,
                                                     calib=str(ids_file), calib_windows=2, calib_seq=64,
                                                     sequential=sequential, progress=False))
        weights[sequential] = {v.name: v.const_value.numpy().copy() for v in model.graph.initializers.values()
                               if "layers.1.down_proj" in v.name and "weight_q4" in v.name}
    assert reports[True].calibration["gptq"] == "sequential"
    assert reports[False].calibration["gptq"] == "float model"
    (a,), (b,) = weights[True].values(), weights[False].values()
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_half_layer_segments(tiny_models):
    """With halves, each layer is cut after o_proj too: attention (q, k, v, o) then MLP (gate, up, down)."""
    model = load_model(tiny_models["llama-gqa"])
    structure = recognize(model)
    segments = layerwise.split(model, structure, halves=True)
    assert len(segments) == 2 * len(structure.layers)
    for attn, mlp, layer in zip(segments[::2], segments[1::2], structure.layers):
        assert attn.layer == mlp.layer == layer.index
        assert attn.nodes[-1] is layer.o.node and mlp.nodes[-1] is layer.down.node
        assert {lin.node for lin in (layer.q, layer.k, layer.v, layer.o)} <= set(attn.nodes)
        assert {lin.node for lin in (layer.gate, layer.up, layer.down)} <= set(mlp.nodes)
    for prev, seg in zip(segments, segments[1:]):
        assert {v.name for v in seg.inputs} <= prev.live | {v.name for v in model.graph.inputs}


def test_capture_stops_at_the_last_segment_with_something_to_capture(tiny_models, text_ids):
    """Capturing only the last layer's attention input: its MLP half (whose outputs nothing reads) is not run,
    and what is captured equals one run of the whole model."""
    model = load_model(tiny_models["llama-gqa"])
    structure = recognize(model)
    site = structure.layers[-1].site("attn_in")
    wins = _windows(text_ids, n=2, seq=16)
    got = list(layerwise.capture(model, structure, {site.name: site.value}, wins, progress=False))
    whole = list(calibrate.capture(model, {site.name: site.value}, wins, progress=False))
    assert len(got) == len(whole) == 2
    for g, w in zip(got, whole):
        assert set(g) == {site.name} and g[site.name].shape == (16, structure.config.hidden)
        np.testing.assert_allclose(g[site.name], w[site.name], rtol=1e-5, atol=1e-5)
