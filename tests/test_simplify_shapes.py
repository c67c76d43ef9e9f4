"""SimplifyShapesPass: computed shapes become constants, the function is unchanged for any shape."""

import collections

import numpy as np
import pytest

from onnxqf.graph.modelfile import load_model, save_model
from onnxqf.passes.simplify_shapes import SimplifyShapesPass, expand_constant, reshape_constant

from helpers import run_logits

SHAPE_INPUTS = {"Reshape": [1], "Expand": [1], "Slice": [1, 2, 3, 4], "Range": [0, 1, 2], "ConstantOfShape": [0],
                "Tile": [1]}


def computed_shape_inputs(model):
    """Shape-like inputs produced by anything but Shape: ORT puts such producers on the CPU."""
    c = collections.Counter()
    for n in model.graph:
        for slot in SHAPE_INPUTS.get(n.op_type, []):
            if slot < len(n.inputs) and n.inputs[slot] is not None:
                p = n.inputs[slot].producer()
                if p is not None and p.op_type not in ("Shape", "Constant"):
                    c[(n.op_type, p.op_type)] += 1
    return c


def test_reshape_and_expand_constants():
    assert reshape_constant(["batch", "seq", -1, 16], ["batch", "seq", 64]) == [0, 0, -1, 16]
    assert reshape_constant(["batch", 4, "seq", 16], ["batch", 2, 2, "seq", 16]) == [0, 4, -1, 16]
    assert reshape_constant(["a", "b"], ["c", "d"]) is None  # two unknowns
    assert expand_constant(["batch", 3, 3, "seq", 16], ["batch", 3, 1, "seq", 16]) == [1, 3, 3, 1, 16]
    assert expand_constant(["batch", 1], [1, "seq"]) is None


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias", "llama-odd"])
def test_exported_graphs_have_no_computed_shapes(tiny_models, name):
    # the exporter runs the pass already
    assert computed_shape_inputs(load_model(tiny_models[name])) == collections.Counter()


def test_pass_is_function_preserving_for_any_shape(tmp_path):
    pytest.importorskip("torch")
    from onnxqf.models.export import export_model

    from tiny import tiny_model

    raw = export_model(tiny_model("qwen2-bias"), tmp_path / "raw.onnx", simplify_shapes=False)
    model = load_model(raw)
    before = computed_shape_inputs(model)
    p = SimplifyShapesPass()
    assert before and p(model).modified
    assert computed_shape_inputs(model) == collections.Counter()
    out = save_model(model, tmp_path / "simple.onnx")
    for shape in [(1, 1), (1, 17), (3, 5), (2, 64)]:
        ids = np.random.default_rng(sum(shape)).integers(0, 512, shape)
        a, b = run_logits(raw, ids), run_logits(out, ids)
        assert a.shape == b.shape == shape + (512,)
        np.testing.assert_array_equal(a, b)
