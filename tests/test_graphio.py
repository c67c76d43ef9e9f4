"""GraphIO: one description of an LLM graph's inputs and outputs, read without weights; the feeds built from it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from test_bench import HEAD_DIM, KV_HEADS, LAYERS, VOCAB, kv_graph, plain_graph

from onnxqf.errors import OnnxqfError
from onnxqf.genai.feeds import feed_function, graph_io
from onnxqf.graph.graphio import GraphIO


def test_kv_graph(tmp_path):
    path = kv_graph(tmp_path / "kv.onnx", dtype=TensorProto.FLOAT16)
    io = GraphIO.read(path)
    assert (io.ids, io.mask, io.positions, io.logits) == ("input_ids", "attention_mask", "position_ids", "logits")
    assert io.cache[:2] == (("past_key_values.0.key", "present.0.key"), ("past_key_values.0.value", "present.0.value"))
    assert len(io.cache) == 2 * LAYERS and io.is_kv and io.has_cache and io.kv_shape_known
    assert (io.kv_heads, io.head_dim, io.vocab, io.cache_rank) == (KV_HEADS, HEAD_DIM, VOCAB, 4)
    assert io.cache_dtype == np.float16 and io.logits_dtype == np.float16 and io.int_types["input_ids"] == np.int64
    assert io.path == str(path) and not io.unknown
    # the same description from the in-memory model
    same = GraphIO.from_model(ir.load(str(path)), path=str(path))
    assert same == io

    feed = feed_function(io)(np.array([[1, 2, 3]]))
    assert set(feed) == {"input_ids", "attention_mask", "position_ids", *(p for p, _ in io.cache)}
    assert feed["position_ids"].tolist() == [[0, 1, 2]] and feed["attention_mask"].dtype == np.int64
    past = feed["past_key_values.1.value"]
    assert past.shape == (1, KV_HEADS, 0, HEAD_DIM) and past.dtype == np.float16


def test_plain_graph_and_first_input(tmp_path):
    io = GraphIO.read(plain_graph(tmp_path / "p.onnx"))
    assert not io.is_kv and not io.has_cache and io.ids == "input_ids" and io.vocab == VOCAB
    assert list(feed_function(io)(np.ones((2, 3)))) == ["input_ids"]
    # a plain graph is fed through its first input, whatever its name; logits: the first output otherwise
    graph = helper.make_graph([helper.make_node("Identity", ["tokens"], ["out"])], "g",
                              [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("out", TensorProto.INT64, ["b", "s"])])
    io = GraphIO.from_proto(helper.make_model(graph))
    assert (io.ids, io.logits) == ("tokens", "out")
    assert feed_function(io)(np.ones((1, 2)))["tokens"].dtype == np.int64


def _kv_proto(dims, *, extra=None, dtype=TensorProto.FLOAT, second_dtype=None):
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"]),
              helper.make_tensor_value_info("past_key_values.0.key", dtype, dims),
              helper.make_tensor_value_info("past_key_values.0.value", second_dtype or dtype, dims)]
    if extra:
        inputs.append(helper.make_tensor_value_info(extra, TensorProto.FLOAT, ["b"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 8]),
               helper.make_tensor_value_info("present.0.key", dtype, dims)]
    nodes = [helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs))


def test_symbolic_cache_dims_and_refusals():
    io = GraphIO.from_proto(_kv_proto(["b", 2, "past", "kv_cache_dim"]))
    assert (io.kv_heads, io.head_dim) == (2, None) and not io.kv_shape_known
    assert io.cache[1] == ("past_key_values.0.value", None)  # no present output of that name
    with pytest.raises(OnnxqfError, match="without its genai_config.json"):
        feed_function(io)
    io = io.with_kv_shape(4, 16)
    assert (io.kv_heads, io.head_dim) == (2, 16)  # the graph's static dim wins
    assert feed_function(io)(np.ones((1, 1)))["past_key_values.0.key"].shape == (1, 2, 0, 16)
    with pytest.raises(OnnxqfError, match="differs in dtype or shape"):
        GraphIO.from_proto(_kv_proto(["b", 2, "p", 4], second_dtype=TensorProto.FLOAT16))
    with pytest.raises(OnnxqfError, match="graph input 'scale' is not one onnxqf knows how to feed"):
        feed_function(GraphIO.from_proto(_kv_proto(["b", 2, "p", 4], extra="scale")))
    with pytest.raises(OnnxqfError, match="float32 or float16"):
        feed_function(GraphIO.from_proto(_kv_proto(["b", 2, "p", 4], dtype=TensorProto.DOUBLE)))
    with pytest.raises(OnnxqfError, match="not one onnxqf knows how to feed"):
        feed_function(GraphIO.from_proto(_kv_proto(["b", 2, 4])))


def test_graph_io_of_a_file_reads_no_weights(tmp_path):
    """graph_io reads the graph only: a missing external-data file does not matter."""
    path = kv_graph(tmp_path / "kv.onnx")
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="kv.onnx.data",
              size_threshold=0)
    (tmp_path / "kv.onnx.data").unlink()
    assert graph_io(path).kv_heads == KV_HEADS
