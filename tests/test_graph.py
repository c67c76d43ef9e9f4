"""Graph recognition: roles, config, fused norm ops, and clear errors."""

import numpy as np
import onnx_ir as ir
import pytest

from onnxqf.errors import UnsupportedGraphError
from onnxqf.graph.modelfile import load_model, save_model
from onnxqf.pipeline import rewrite
from onnxqf.recognize import recognize

from helpers import kl_per_token, options, run_logits


@pytest.mark.parametrize("name,heads,kv,tied,bias", [
    ("llama-gqa", 4, 2, False, False), ("llama-tied", 4, 4, True, False),
    ("qwen2-bias", 4, 2, False, True), ("llama-odd", 3, 1, True, False),
])
def test_roles_and_config(tiny_models, name, heads, kv, tied, bias):
    s = recognize(load_model(tiny_models[name]))
    assert len(s.layers) == 2
    assert (s.config.num_heads, s.config.num_kv_heads) == (heads, kv)
    assert s.tied() == tied
    l0 = s.layers[0]
    assert [lin.role for lin in l0.linears()] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]
    biases = (l0.q.bias is not None, l0.k.bias is not None, l0.v.bias is not None, l0.o.bias is not None)
    assert biases == (bias, bias, bias, False)
    assert l0.k.shape[1] == kv * s.config.head_dim
    assert l0.mlp_mul is not None
    assert s.lm_head.shape == (s.config.hidden, 512)


def test_head_dim_inferred_without_metadata(tiny_models):
    model = load_model(tiny_models["llama-gqa"])
    del model.metadata_props["onnxqf.config"]
    assert recognize(model).config.head_dim == 16


def fuse_norms(model: ir.Model, op: str) -> int:
    """Replace each decomposed RMSNorm (x * rsqrt(mean(x^2)+eps) * g) by one fused node."""
    s = recognize(model)
    count = 0
    for norm in s.norms():
        eps = 1e-6
        node = ir.node(op, [norm.input, norm.gamma], {"axis": -1, "epsilon": eps}, name=f"fused_{count}")
        model.graph.insert_before(norm.gamma_node, node)
        out = node.outputs[0]
        out.shape, out.type = norm.output.shape, norm.output.type
        norm.output.replace_all_uses_with(out)
        count += 1
    import onnx_ir.passes.common as common

    common.RemoveUnusedNodesPass()(model)
    return count


@pytest.mark.parametrize("op,opset", [("SimplifiedLayerNormalization", 18), ("RMSNormalization", 23)])
def test_fused_norm_ops_are_recognized_and_rotated(tiny_models, text_ids, tmp_path, op, opset):
    model = load_model(tiny_models["qwen2-bias"])
    assert fuse_norms(model, op) == 5
    model.graph.opset_imports[""] = max(model.graph.opset_imports[""], opset)
    model.opset_imports[""] = model.graph.opset_imports[""]
    fused = save_model(model, tmp_path / "fused.onnx", check=False)
    s = recognize(load_model(fused))
    assert {n.kind for n in s.norms()} == {op}
    ids = text_ids[:256].reshape(2, 128)
    ref = run_logits(fused, ids)
    m = load_model(fused)
    rewrite(m, options(transform="rotate", quant="none", progress=False))
    out = save_model(m, tmp_path / "rot.onnx", check=False)
    new = run_logits(out, ids)
    assert np.abs(new - ref).max() <= 1e-3 * np.abs(ref).max()
    assert kl_per_token(ref, new) <= 1e-6


def test_layernorm_is_refused(tiny_models):
    model = load_model(tiny_models["llama-gqa"])
    s = recognize(model)
    norm = s.layers[0].attn_norm
    node = ir.node("LayerNormalization", [norm.input, norm.gamma], name="ln")
    model.graph.insert_before(norm.gamma_node, node)
    norm.output.replace_all_uses_with(node.outputs[0])
    with pytest.raises(UnsupportedGraphError, match="not rotation-invariant"):
        recognize(model)


def test_error_names_what_is_missing(tiny_models):
    model = load_model(tiny_models["llama-gqa"])
    s = recognize(model)
    # cut the MLP of layer 1: down_proj no longer feeds the residual add
    layer = s.layers[1]
    layer.mlp_add.replace_input_with(list(layer.mlp_add.inputs).index(layer.down.output), layer.up.output)
    with pytest.raises(UnsupportedGraphError, match="layer 1"):
        recognize(model)
