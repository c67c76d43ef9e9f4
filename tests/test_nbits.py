"""Block-wise MatMulNBits weights: packing against a hand-written decoder, against onnxruntime's kernel
and its own quantizer, block-wise GPTQ, and the pass on a tiny model."""

import collections

import numpy as np
import pytest

from onnxqf.maths import nbits

from helpers import kl_per_token, run_logits


def hand_dequant(B_packed, scales, zero_points, K, N, bits, block_size):
    """MatMulNBits' weight, element by element, straight from the operator's definition."""
    nb = (K + block_size - 1) // block_size
    scales = np.asarray(scales, np.float64).reshape(N, nb)
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    zp_bytes = None if zero_points is None else np.asarray(zero_points).reshape(N, -1)
    W = np.zeros((K, N))
    for n in range(N):
        for k in range(K):
            b, i = divmod(k, block_size)
            byte = int(B_packed[n, b, i // per_byte])
            code = (byte >> (bits * (i % per_byte))) & mask
            if zp_bytes is None:
                zp = 1 << (bits - 1)
            else:
                zbyte = int(zp_bytes[n, b // per_byte])
                zp = (zbyte >> (bits * (b % per_byte))) & mask
            W[k, n] = (code - zp) * scales[n, b]
    return W


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("K", [64, 100])
def test_packing_matches_hand_decoder(bits, block_size, symmetric, K):
    rng = np.random.default_rng(bits + block_size + K)
    N = 5
    B = rng.normal(size=(K, N)) * rng.uniform(0.1, 3, size=(1, N))
    q = nbits.quantize_blockwise(B, bits, block_size, symmetric=symmetric)
    packed, scales, zp = q.pack()
    nb = -(-K // block_size)
    assert packed.dtype == np.uint8 and packed.shape == (N, nb, block_size * bits // 8)
    assert scales.dtype == np.float32 and scales.shape == (N, nb)
    if symmetric:
        assert zp is None
    else:
        assert zp.dtype == np.uint8 and zp.shape == (N, -(-nb * bits // 8))
    ref = hand_dequant(packed, scales, zp, K, N, bits, block_size)
    np.testing.assert_array_equal(q.dequantize(), ref)
    np.testing.assert_array_equal(nbits.dequantize_packed(packed, scales, zp, K, bits, block_size), ref)
    # round to nearest: within half a step, except where the range is one level short on one side
    # (symmetric: +/-m maps to -2^(b-1) but only 2^(b-1)-1 above; asymmetric: zero point rounded)
    rows = np.arange(K) // block_size
    step = np.abs(q.scales[rows])
    err = np.abs(ref - B)
    tol = 1e-6 * np.abs(B).max()
    assert np.all(err <= step + tol)
    assert np.mean(err <= 0.5 * step + tol) > 0.9


def test_symmetric_convention_spends_all_levels():
    """The largest-magnitude element maps exactly to the lowest level -2^(bits-1) (onnxruntime's
    convention), so the scale takes that element's sign and may be negative."""
    B = np.tile(np.array([[1.0, 3.0], [-3.5, -1.0], [0.25, 0.5]]), (11, 1))[:32]
    q = nbits.quantize_blockwise(B, 4, 32)
    np.testing.assert_allclose(q.scales[0], [3.5 / 8, -3.0 / 8])
    assert q.codes[1, 0] == 0 and q.codes[0, 1] == 0
    W = q.dequantize()
    assert W[1, 0] == -3.5 and W[0, 1] == 3.0


def test_zero_block_and_constant_block():
    B = np.zeros((40, 3))
    B[32:, 1] = 2.0
    for sym in (True, False):
        q = nbits.quantize_blockwise(B, 4, 32, symmetric=sym)
        np.testing.assert_allclose(q.dequantize(), B, atol=1e-7)


def test_scales_are_stored_exactly():
    rng = np.random.default_rng(3)
    B = rng.normal(size=(64, 8))
    for dtype in (np.float32, np.float16):
        q = nbits.quantize_blockwise(B, 4, 32, scale_dtype=dtype)
        _, scales, _ = q.pack()
        assert scales.dtype == dtype
        np.testing.assert_array_equal(scales.astype(np.float64).T, q.scales)


# ----------------------------------------------------------------------------------------------
# onnxruntime: its kernel and its quantizer


def _nbits_model(K, N, q, accuracy_level=0):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    packed, scales, zp = q.pack()
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")]
    inputs = ["x", "B", "scales"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "zp"))
        inputs.append("zp")
    attrs = dict(K=K, N=N, bits=q.bits, block_size=q.block_size)
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, N])], inits)
    model = helper.make_model(graph,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block_size", [32, 128])
@pytest.mark.parametrize("K", [256, 200])
@pytest.mark.parametrize("symmetric", [True, False])
def test_onnxruntime_computes_x_times_dequant(bits, block_size, K, symmetric):
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(K + bits)
    N = 48
    B = rng.normal(size=(K, N)).astype(np.float32)
    q = nbits.quantize_blockwise(B, bits, block_size, symmetric=symmetric)
    sess = ort.InferenceSession(_nbits_model(K, N, q), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(2, 7, K)).astype(np.float32)
    y = sess.run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ q.dequantize()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("K,block_size", [(256, 32), (200, 32), (320, 128)])
def test_rtn_bytes_equal_onnxruntime_quantizer(bits, symmetric, K, block_size):
    """Same RTN settings as onnxruntime's MatMulNBitsQuantizer: identical B, scales, zero points."""
    pytest.importorskip("onnxruntime")
    mq = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    N = 96
    B = (rng.normal(size=(K, N)) * rng.uniform(0.01, 2, size=(1, N))).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
                              [numpy_helper.from_array(B, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    config = mq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
    quantizer = mq.MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    theirs = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    node = next(n for n in quantizer.model.model.graph.node if n.op_type == "MatMulNBits")
    packed, scales, zp = nbits.quantize_blockwise(B, bits, block_size, symmetric=symmetric).pack()
    np.testing.assert_array_equal(packed, theirs[node.input[1]])
    np.testing.assert_array_equal(scales, theirs[node.input[2]].reshape(scales.shape))
    if symmetric:
        assert zp is None and len(node.input) == 3
    else:
        np.testing.assert_array_equal(zp, theirs[node.input[3]].reshape(zp.shape))


# ----------------------------------------------------------------------------------------------
# block-wise GPTQ


def _correlated(rng, K, tokens=3000):
    X = rng.normal(size=(tokens, K)) @ rng.normal(size=(K, K))
    X[:, 5] *= 15
    return X


def _out_err(X, B, W):
    return float(np.sum((X @ B - X @ W) ** 2))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_blockwise_beats_rtn(act_order):
    rng = np.random.default_rng(0)
    K, N = 96, 40
    X = _correlated(rng, K)
    B = rng.normal(size=(K, N))
    rtn = nbits.quantize_blockwise(B, 4, 32)
    g = nbits.gptq_blockwise(B, X.T @ X, 4, 32, act_order=act_order)
    assert g.codes.dtype == np.uint8 and g.codes.max() <= 15
    assert _out_err(X, B, g.dequantize()) < 0.6 * _out_err(X, B, rtn.dequantize())
    # what it stores is exactly what gets dequantized
    packed, scales, zp = g.pack()
    np.testing.assert_array_equal(nbits.dequantize_packed(packed, scales, zp, K, 4, 32), g.dequantize())


def test_gptq_blockwise_identity_hessian_is_rtn():
    rng = np.random.default_rng(1)
    B = rng.normal(size=(80, 12))
    for sym in (True, False):
        g = nbits.gptq_blockwise(B, np.eye(80), 4, 32, symmetric=sym, damp=0.0)
        r = nbits.quantize_blockwise(B, 4, 32, symmetric=sym)
        np.testing.assert_array_equal(g.codes, r.codes)
        np.testing.assert_array_equal(g.scales, r.scales)


def test_gptq_blockwise_options_and_odd_k():
    rng = np.random.default_rng(2)
    K, N = 100, 16
    X = _correlated(rng, K)
    B = rng.normal(size=(K, N))
    H = X.T @ X
    base = _out_err(X, B, nbits.quantize_blockwise(B, 4, 32).dequantize())
    for kw in (dict(symmetric=False), dict(clip_search=True), dict(act_order=True, clip_search=True),
               dict(block_size=64)):
        kw = {"block_size": 32, **kw}
        g = nbits.gptq_blockwise(B, H, 4, **kw)
        assert g.scales.shape == (-(-K // kw["block_size"]), N)
        assert _out_err(X, B, g.dequantize()) < base


# ----------------------------------------------------------------------------------------------
# the pass on a tiny model


def _rewrite(path, tmp_path, **kw):
    import onnx

    from onnxqf.graph.modelfile import load_model, save_model
    from onnxqf.lowering.nbits import MatMulNBits
    from onnxqf.passes.quantize import QuantizePass

    model = load_model(path)
    pass_kw = {k: kw.pop(k) for k in ("hessians", "quantize_lm_head", "keep_float") if k in kw}
    p = QuantizePass(MatMulNBits(**kw), **pass_kw)
    result = p(model)
    assert result.modified
    out = save_model(model, tmp_path / "nbits.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    return model, out, p


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias", "llama-odd"])
def test_pass_int4_close_to_float(tiny_models, text_ids, tmp_path, name):
    model, out, p = _rewrite(tiny_models[name], tmp_path, bits=4, block_size=32)
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["MatMulNBits"] == 14 and len(p.report.quantized) == 14  # 2 layers x 7; lm_head float
    assert set(p.report.rounding.values()) == {"rtn"}
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            assert node.domain == "com.microsoft" and node.attributes["bits"].as_int() == 4
    ids = text_ids[:256].reshape(2, 128)
    ref, new = run_logits(tiny_models[name], ids), run_logits(out, ids)
    assert kl_per_token(ref, new) < 0.05
    assert np.abs(new - ref).max() < 0.25 * np.abs(ref).max()


def test_pass_int8_gptq_lm_head_keep_float(tiny_models, text_ids, tmp_path):
    from onnxqf.calib import calibrate
    from onnxqf.graph.modelfile import load_model
    from onnxqf.recognize import recognize

    path = tiny_models["llama-tied"]
    model = load_model(path)
    s = recognize(model)
    values = {site.name: site.value for site in s.sites()}
    hessians = calibrate.collect_hessians(model, values, text_ids[:512].reshape(4, 128), progress=False)
    model, out, p = _rewrite(path, tmp_path, bits=8, block_size=16, hessians=hessians, quantize_lm_head=True,
                             keep_float=("down_proj",))
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["MatMulNBits"] == 2 * 6 + 1 and ops["MatMul"] >= 2
    assert p.report.rounding["lm_head"] == "rtn" and p.report.rounding["layers.0.q_proj"] == "gptq"
    assert "layers.1.down_proj" not in p.report.rounding
    assert any(o.name == "logits" for o in model.graph.outputs)
    ids = text_ids[1000:1256].reshape(2, 128)
    assert kl_per_token(run_logits(path, ids), run_logits(out, ids)) < 2e-3


def test_pass_refuses_bad_settings():
    from onnxqf.errors import OnnxqfError
    from onnxqf.lowering.nbits import MatMulNBits
    from onnxqf.options import WeightOnly

    with pytest.raises(OnnxqfError):
        MatMulNBits(bits=3)
    with pytest.raises(OnnxqfError):
        MatMulNBits(block_size=48)
    with pytest.raises(OnnxqfError):
        WeightOnly(block_size=48)
    with pytest.raises(OnnxqfError):
        WeightOnly(accuracy_level=5)


def test_cli_asymmetric_int4_writes_zero_points(tiny_models, tmp_path):
    """--asymmetric: every MatMulNBits gets a zero_points input, and the model stays close to float."""
    import onnx

    from onnxqf.cli import main

    from helpers import kl_per_token, run_logits

    out = tmp_path / "a.onnx"
    assert main(["rewrite", str(tiny_models["llama-gqa"]), "--rotate", "offline", "--quant", "int4", "--asymmetric",
                 "--block-size", "16", "--weight-rounding", "rtn", "-o", str(out), "-q"]) == 0
    nodes = [n for n in onnx.load(str(out), load_external_data=False).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 14 and all(len(n.input) == 4 and n.input[3] for n in nodes)
    ids = np.arange(128).reshape(1, 128) % 512
    assert kl_per_token(run_logits(tiny_models["llama-gqa"], ids), run_logits(out, ids)) < 0.1


def test_rewrite_options_reach_the_nbits_lowering():
    """--asymmetric, --clip-search and --accuracy-level reach the MatMulNBits lowering; the target sets the level."""
    from onnxqf.cli import build_parser, rewrite_options
    from onnxqf.runtime.target import TARGETS

    args = build_parser().parse_args(["rewrite", "m.onnx", "--quant", "int4", "--asymmetric", "--clip-search",
                                      "--block-size", "64"])
    quant = rewrite_options(args).quant
    cpu, cuda = TARGETS["cpu"].lowering(quant), TARGETS["cuda"].lowering(quant)
    assert (cpu.bits, cpu.block_size, cpu.symmetric, cpu.clip_search) == (4, 64, False, True)
    assert (cpu.accuracy_level, cuda.accuracy_level) == (4, 0)
    args = build_parser().parse_args(["rewrite", "m.onnx", "--quant", "int8w", "--accuracy-level", "1"])
    assert TARGETS["cpu"].lowering(rewrite_options(args).quant).accuracy_level == 1
