"""A model keeps reading its own weights after being saved elsewhere (any file names)."""

import numpy as np

from onnxqf.graph.modelfile import load_model, save_model
from onnxqf.recognize import recognize
from onnxqf.runtime.session import saved


def test_saving_does_not_repoint_weights(tiny_models, tmp_path):
    src = tmp_path / "model.onnx"  # the same name runtime.saved uses for its temporary copy
    save_model(load_model(tiny_models["llama-gqa"]), src)
    model = load_model(src)
    before = recognize(model).layers[1].down.matrix()
    with saved(model):
        pass
    (tmp_path / "sub").mkdir()
    save_model(model, tmp_path / "sub" / "model.onnx")  # same names, another folder
    np.testing.assert_array_equal(recognize(model).layers[1].down.matrix(), before)
