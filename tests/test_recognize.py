"""The recognizers and the γ / packed-weight accessors on hand-built graphs (tests/graphs.py): no torch."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxqf.errors import OnnxqfError, UnsupportedGraphError
from onnxqf.maths.metrics import kl_divergence
from onnxqf.passes.centre_residual import CentreResidualPass
from onnxqf.passes.fold_norms import FoldNormsPass
from onnxqf.passes.online_hadamard import DownProjHadamardPass
from onnxqf.passes.rotate_conv_out import ConvOutputHadamardPass
from onnxqf.passes.rotate_norm_outputs import NormOutputHadamardPass
from onnxqf.passes.rotate_residual import RotateResidualPass
from onnxqf.passes.rotate_vo import ValueOutputRotationPass
from onnxqf.plan import Plan
from onnxqf.recognize import RECOGNIZERS, recognize
from onnxqf.recognize.families import GENERIC

from graphs import decoder, run

IDS = np.random.default_rng(0).integers(0, 64, (2, 12))


def test_plain_graph_structure():
    s = recognize(decoder())
    assert [r.name for r in RECOGNIZERS] == ["onnxruntime-genai builder", "plain export"]
    assert len(s.layers) == 2 and s.family is GENERIC
    assert (s.config.hidden, s.config.num_heads, s.config.num_kv_heads, s.config.head_dim, s.config.intermediate,
            s.config.vocab) == (32, 4, 4, 8, 48, 64)
    for layer in s.layers:
        assert [lin.role for lin in layer.linears()] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                         "down_proj"]
        assert layer.qkv is None and layer.gate_up is None and not layer.post_norms()
        # the weights the recognizer names are the ones the builder made for that role
        assert layer.q.weight.name.startswith(f"layers.{layer.index}.q_proj")
        assert layer.gate.weight.name.startswith(f"layers.{layer.index}.gate_proj")
        assert layer.attn_norm.kind == "decomposed" and layer.attn_norm.offset == 0.0
    assert s.lm_head.role == "lm_head" and not s.tied()


def test_fused_norms_and_tied_head():
    s = recognize(decoder(norm="SimplifiedLayerNormalization", tied=True))
    assert {n.kind for n in s.norms()} == {"SimplifiedLayerNormalization"} and s.tied()


@pytest.mark.parametrize("norm", ["decomposed", "SimplifiedLayerNormalization"])
def test_offset_norm_accessors(norm):
    """A (1 + γ) norm: scale() is the effective multiplier, set_scale writes γ back in the graph's form."""
    model = decoder(norm=norm, norm_offset=1.0)
    s = recognize(model)
    n = s.layers[0].attn_norm
    assert n.offset == 1.0 and n.offset_node is not None and n.offset_node.op_type == "Add"
    raw = n.gamma.const_value.numpy().astype(np.float64)
    assert np.allclose(n.scale(), raw + 1.0) and not n.is_unit()
    before = run(model, IDS)
    n.set_scale(np.ones(32))
    assert n.is_unit() and np.allclose(n.gamma.const_value.numpy(), 0.0)
    assert not np.allclose(run(model, IDS), before)  # the written γ is the one the graph computes with


def test_shared_gamma_is_made_private():
    model = decoder()
    s = recognize(model)
    a, b = s.layers[0].attn_norm, s.layers[1].attn_norm
    b.gamma_node.replace_input_with(list(b.gamma_node.inputs).index(b.gamma), a.gamma)  # one γ, two norms
    s = recognize(model)
    a, b = s.layers[0].attn_norm, s.layers[1].attn_norm
    assert a.gamma is b.gamma
    a.set_scale(a.scale() * 2.0)
    assert a.gamma is not b.gamma and np.allclose(a.scale(), 2.0 * b.scale())


def _rotate(model, preset: str):
    s = recognize(model)
    plan = Plan.build(s.config, preset, seed=0)
    passes = [FoldNormsPass()]
    if plan.residual is not None:
        passes.append(RotateResidualPass(plan.residual))
    if plan.norm_out is not None:
        passes.append(NormOutputHadamardPass(plan.norm_out))
    passes += [DownProjHadamardPass(plan.down), ValueOutputRotationPass(plan.head, plan.heads)]
    if plan.conv_out is not None:
        passes.append(ConvOutputHadamardPass(plan.conv_out))
    for p in passes:
        p(model)
    return model


@pytest.mark.parametrize("preset", ["rotate", "hybrid"])
@pytest.mark.parametrize("overrides",
                         [{}, {"norm": "SimplifiedLayerNormalization", "tied": True}, {"norm_offset": 1.0}],
                         ids=["decomposed", "fused-tied", "offset"])
def test_rotations_exact_on_hand_built_graph(preset, overrides):
    ref = run(decoder(**overrides), IDS)
    model = _rotate(decoder(**overrides), preset)
    out = run(model, IDS)
    s = recognize(model)
    assert all(n.is_unit() for n in s.norms()) or preset == "hybrid"  # the residual rotation needs folded norms
    assert np.max(np.abs(out - ref)) <= 1e-4 * np.max(np.abs(ref))
    assert kl_divergence(ref, out) <= 1e-6
    assert not np.allclose(recognize(decoder(**overrides)).layers[0].q.matrix(), s.layers[0].q.matrix())  # rotated


def test_each_pass_recognizes_once(monkeypatch):
    import onnxqf.recognize as rec

    calls = []
    real = rec.recognize
    monkeypatch.setattr(rec, "recognize", lambda m: calls.append(1) or real(m))
    model = decoder()
    plan = Plan.build(real(model).config, "rotate", seed=0)
    for p in (FoldNormsPass(), RotateResidualPass(plan.residual), DownProjHadamardPass(plan.down),
              ValueOutputRotationPass(plan.head, plan.heads)):
        calls.clear()
        p(model)
        assert len(calls) == 1, type(p).__name__


def test_unmatched_graph_says_what_is_missing():
    model = decoder(layers=1)
    s = recognize(model)
    # route the MLP's residual Add around down_proj: no linear writes into it any more
    add = s.layers[0].mlp_add
    add.replace_input_with(list(add.inputs).index(s.layers[0].down.output), s.layers[0].up.output)
    with pytest.raises(UnsupportedGraphError, match="no down_proj weight MatMul feeds the MLP residual Add"):
        recognize(model)



FAMILY_GRAPHS = {
    "gemma-like": dict(norm_offset=1.0, embedding_scale=32 ** 0.5, tied=True),
    "granite-like": dict(embedding_scale=12.0, residual_multiplier=0.22),
    "qwen3-like": dict(qk_norms=True),
    "phi3-like": dict(packed_qkv=True, packed_gate_up=True),
    "phi3-fused": dict(packed_qkv=True, packed_gate_up=True, norm="SimplifiedLayerNormalization"),
    "gemma2-like": dict(norm_offset=1.0, embedding_scale=32 ** 0.5, post_norms=True),
    "lfm2-like": dict(conv_layers=(0,), qk_norms=True, tied=True),
    "lfm2-bias": dict(conv_layers=(0,), conv_bias=True, norm="SimplifiedLayerNormalization"),
}


@pytest.mark.parametrize("name", FAMILY_GRAPHS)
def test_family_graphs_recognized(name):
    spec = FAMILY_GRAPHS[name]
    s = recognize(decoder(**spec))
    assert len(s.layers) == 2
    for layer in s.attention_layers():
        assert (layer.qkv is not None) == spec.get("packed_qkv", False)
        assert (layer.gate_up is not None) == spec.get("packed_gate_up", False)
        assert len(layer.post_norms()) == (2 if spec.get("post_norms") else 0)
        assert (layer.q_norm is not None, layer.k_norm is not None) == (spec.get("qk_norms", False),) * 2
        assert layer.attn_norm.offset == spec.get("norm_offset", 0.0)
        if layer.qkv is not None:
            assert [b.cols for b in layer.qkv.blocks] == [(0, 32), (32, 64), (64, 96)]
            assert (layer.q.cols, layer.k.cols, layer.v.cols) == ((0, 32), (32, 64), (64, 96))
            assert layer.matmuls()[0] is layer.qkv and layer.site("attn_in").matmuls() == [layer.qkv]
        if layer.gate_up is not None:
            assert (layer.gate.cols, layer.up.cols) == ((0, 48), (48, 96)) and layer.mlp_mul is not None
    assert s.family.refused == {} or spec.get("post_norms") or spec.get("conv_layers")


@pytest.mark.parametrize("name", FAMILY_GRAPHS)
def test_family_graphs_hybrid_rotations_exact(name):
    ref = run(decoder(**FAMILY_GRAPHS[name]), IDS)
    out = run(_rotate(decoder(**FAMILY_GRAPHS[name]), "hybrid"), IDS)
    assert np.max(np.abs(out - ref)) <= 1e-4 * np.max(np.abs(ref)) and kl_divergence(ref, out) <= 1e-6


@pytest.mark.parametrize("name", [n for n in FAMILY_GRAPHS if not FAMILY_GRAPHS[n].get("post_norms")])
def test_family_graphs_residual_rotation_exact(name):
    ref = run(decoder(**FAMILY_GRAPHS[name]), IDS)
    out = run(_rotate(decoder(**FAMILY_GRAPHS[name]), "rotate"), IDS)
    assert np.max(np.abs(out - ref)) <= 1e-4 * np.max(np.abs(ref)) and kl_divergence(ref, out) <= 1e-6


def test_post_norms_refuse_the_residual_rotation():
    """A residual rotation does not commute with norms after the blocks: refused in one line, graph untouched."""
    model = decoder(post_norms=True)
    s = recognize(model)
    plan = Plan.build(s.config, "rotate", seed=0)
    FoldNormsPass()(model)
    before = run(model, IDS)
    with pytest.raises(Exception) as info:
        RotateResidualPass(plan.residual)(model)
    cause = info.value if isinstance(info.value, UnsupportedGraphError) else info.value.__cause__
    assert isinstance(cause, UnsupportedGraphError)
    msg = str(cause)
    assert "\n" not in msg and "norms after" in msg and "residual rotation" in msg and "--hybrid" in msg
    assert np.array_equal(run(model, IDS), before)


@pytest.mark.parametrize("name", ["lfm2-like", "lfm2-bias"])
def test_conv_layers_recognized(name):
    """LFM2's conv layers: in_proj packed into B | C | x, the conv node, out_proj as the layer's writer; the sites
    read in_proj's and out_proj's inputs, o_in folds into C's columns; the family (no metadata) is LFM2's."""
    s = recognize(decoder(**FAMILY_GRAPHS[name]))
    assert [layer.mixer for layer in s.layers] == ["conv", "attention"] and s.config.conv_layers == 1
    assert s.family.name == "lfm2" and s.family.refused
    conv = s.layers[0]
    assert conv.q is None and conv.kv_groups is None and conv.conv.conv.op_type == "Conv"
    assert [lin.role for lin in conv.linears()] == ["in_proj", "out_proj", "gate_proj", "up_proj", "down_proj"]
    assert conv.matmuls()[0] is conv.conv.in_proj and [b.cols for b in conv.conv.in_proj.blocks] == \
        [(0, 32), (32, 64), (64, 96)]
    assert (conv.conv.b.cols, conv.conv.c.cols, conv.conv.xs.cols) == ((0, 32), (32, 64), (64, 96))
    attn_in, o_in = conv.site("attn_in"), conv.site("o_in")
    assert attn_in.matmuls() == [conv.conv.in_proj] and attn_in.fold_norm is conv.attn_norm
    assert o_in.readers == (conv.o,) and o_in.fold_linear is conv.conv.c and o_in.mixer == "conv"
    assert (conv.conv.in_proj.bias is not None) == FAMILY_GRAPHS[name].get("conv_bias", False)
    assert [lin.name for lin in s.linears(include_lm_head=False)][:2] == ["layers.0.in_proj", "layers.0.out_proj"]
    assert s.layers[1].kv_groups == (4, 1, 8)


@pytest.mark.parametrize("name", ["lfm2-like", "lfm2-bias"])
def test_conv_layer_smoothing_folds_into_c_columns(name):
    """A per-channel scale on out_proj's input folds into in_proj's C columns (and bias): exact."""
    from onnxqf.passes.smooth import fold_scales

    model = decoder(**FAMILY_GRAPHS[name])
    ref = run(model, IDS)
    s = recognize(model)
    scale = np.exp(np.random.default_rng(1).standard_normal(32))
    for site in (s.layers[0].site("o_in"), s.layers[0].site("attn_in")):
        fold_scales(model.graph, site, scale)
    out = run(model, IDS)
    assert np.max(np.abs(out - ref)) <= 1e-4 * np.max(np.abs(ref)) and kl_divergence(ref, out) <= 1e-6


def test_conv_layer_offline_output_rotation_refused():
    """No rotation folds from out_proj's input into in_proj (the gates and the conv are per channel): the
    offline preset (no head mixing, nothing online) is refused in one line through the family, graph untouched."""
    model = decoder(**FAMILY_GRAPHS["lfm2-like"])
    s = recognize(model)
    plan = Plan.build(s.config, "rotate-offline", seed=0)
    assert plan.conv_out is None and plan.heads is None and Plan.build(s.config, "rotate").conv_out is not None
    before = run(model, IDS)
    with pytest.raises(Exception) as info:
        ValueOutputRotationPass(plan.head, plan.heads)(model)
    cause = info.value if isinstance(info.value, UnsupportedGraphError) else info.value.__cause__
    msg = str(cause)
    assert isinstance(cause, UnsupportedGraphError) and "\n" not in msg and "LFM2 (lfm2)" in msg and "--rotate" in msg
    assert np.array_equal(run(model, IDS), before)


# -- OLMo's LayerNorms: the residual stream centred, the LayerNorms replaced by RMSNorms (CentreResidualPass) -------

LAYER_NORM_GRAPHS = {
    "olmo-like": dict(norm="LayerNormalization"),
    "olmo-tied-clip": dict(norm="LayerNormalization", tied=True, clip_qkv=1.0),
}


def _one_line_cause(info) -> str:
    cause = info.value if isinstance(info.value, OnnxqfError) else info.value.__cause__
    assert isinstance(cause, OnnxqfError) and "\n" not in str(cause), info.value
    return str(cause)


@pytest.mark.parametrize("name", LAYER_NORM_GRAPHS)
def test_layer_norm_graph_centred_into_rms_norms(name):
    """Every norm on the stream is a LayerNormalization that centres; the pass centres the embedding rows and the
    writers' outputs and replaces each by the decomposed RMSNorm: same logits, a Llama-like graph (a tied lm_head
    keeps the uncentred table)."""
    spec = LAYER_NORM_GRAPHS[name]
    model = decoder(**spec)
    s = recognize(model)
    assert [n.kind for n in s.norms()] == ["LayerNormalization"] * 5 and len(s.centring_norms()) == 5
    assert s.family.centre_residual and s.family.name == "decoder" and s.config.value_clip == ("clip_qkv" in spec)
    assert s.tied() == spec.get("tied", False)
    ref = run(model, IDS)
    CentreResidualPass()(model)
    out = run(model, IDS)
    assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref)) and kl_divergence(ref, out) <= 1e-9
    s = recognize(model)
    assert not s.centring_norms() and {n.kind for n in s.norms()} == {"decomposed"}
    assert all(n.is_unit() and n.has_scale for n in s.norms()) and len({id(n.gamma) for n in s.norms()}) == 5
    assert not any(node.op_type == "LayerNormalization" for node in model.graph)
    np.testing.assert_allclose(s.embedding_table.const_value.numpy().mean(axis=1), 0.0, atol=1e-6)
    for lin in s.stream_writers():
        np.testing.assert_allclose(lin.matrix().mean(axis=1), 0.0, atol=1e-6)
    assert not s.tied()
    assert CentreResidualPass()(model).modified is False  # nothing left to centre


@pytest.mark.parametrize("preset", ["rotate", "hybrid", "hybrid-folded"])
@pytest.mark.parametrize("name", LAYER_NORM_GRAPHS)
def test_layer_norm_graph_rotations_exact_after_centring(name, preset):
    """After centring, every rotation is exact; with clipped q/k/v the plan rotates o_proj's input by the head
    mixing only (nothing folds into v_proj's columns under the clamp)."""
    spec = LAYER_NORM_GRAPHS[name]
    ref = run(decoder(**spec), IDS)
    model = decoder(**spec)
    CentreResidualPass()(model)
    plan = Plan.build(recognize(model).config, preset, seed=0)
    assert (plan.head.kind == "identity") == ("clip_qkv" in spec) and ("o_in" in plan.smooth) == (
        "clip_qkv" not in spec and preset in ("hybrid", "hybrid-folded"))
    out = run(_rotate(model, preset), IDS)
    assert np.max(np.abs(out - ref)) <= 1e-4 * np.max(np.abs(ref)) and kl_divergence(ref, out) <= 1e-6


def test_layer_norm_graph_refusals():
    """The residual rotation refuses LayerNorms (centre first); the recognizer refuses a LayerNorm with a bias and
    a stream read by LayerNorms and RMSNorms alike; each in one line, the graph untouched."""
    model = decoder(norm="LayerNormalization")
    s = recognize(model)
    plan = Plan.build(s.config, "rotate", seed=0)
    before = run(model, IDS)
    with pytest.raises(Exception) as info:
        RotateResidualPass(plan.residual)(model)
    assert "CentreResidualPass" in _one_line_cause(info) and np.array_equal(run(model, IDS), before)

    ln = s.layers[1].mlp_norm.gamma_node
    bias = ir.Value(name="ln_bias", shape=ir.Shape([32]), type=ir.TensorType(ir.DataType.FLOAT),
                    const_value=ir.tensor(np.full(32, 0.5, np.float32), name="ln_bias"))
    model.graph.register_initializer(bias)
    ln.resize_inputs(3)
    ln.replace_input_with(2, bias)
    with pytest.raises(UnsupportedGraphError, match="adds a bias"):
        recognize(model)

    mixed = decoder()
    norm = recognize(mixed).layers[0].attn_norm
    node = ir.node("LayerNormalization", [norm.input, norm.gamma], attributes={"axis": -1}, name="ln")
    mixed.graph.insert_before(norm.gamma_node, node)
    norm.output.replace_all_uses_with(node.outputs[0])
    with pytest.raises(UnsupportedGraphError, match="other norms on the residual stream are RMSNorms"):
        recognize(mixed)
