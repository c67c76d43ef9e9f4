"""External data: models over 2 GB round-trip; saving is atomic."""

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxqf.errors import BadModelFileError
from onnxqf.graph.modelfile import load_model, save_model


def gather_model(rows: int, cols: int = 8) -> ir.Model:
    table = np.zeros((rows, cols), np.float32)
    table[-1] = 7.0
    t = ir.Value(name="table", shape=ir.Shape([rows, cols]), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.tensor(table, name="table"))
    ids = ir.Value(name="ids", shape=ir.Shape([3]), type=ir.TensorType(ir.DataType.INT64))
    node = ir.node("Gather", [t, ids])
    node.outputs[0].name = "out"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    node.outputs[0].shape = ir.Shape([3, cols])
    graph = ir.Graph([ids], node.outputs, nodes=[node], initializers=[t], opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10)


def test_model_over_2gb_round_trips(tmp_path):
    rows = (2**31 + 2**26) // 32  # 2.1 GB of float32 in one initializer
    path = save_model(gather_model(rows), tmp_path / "big.onnx")  # runs onnx.checker full_check
    assert os.path.getsize(path) < 10_000
    assert os.path.getsize(str(path) + ".data") > 2**31
    model = load_model(path)
    assert model.graph.initializers["table"].const_value.numpy()[-1, 0] == 7.0
    onnx.checker.check_model(str(path), full_check=True)


def test_failed_save_leaves_nothing(tmp_path):
    model = gather_model(4)
    model.graph.node(0).op_type = "NoSuchOp"  # the checker rejects it
    with pytest.raises(BadModelFileError):
        save_model(model, tmp_path / "bad.onnx")
    assert os.listdir(tmp_path) == []
