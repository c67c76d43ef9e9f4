"""GPU tests of onnxqf's CUDA kernels (onnxqf.W8A8Linear). Not collected by CI (no GPU there): run them on a machine
with an H100/H200, onnxruntime-gpu and the built library::

    python -m pytest -q kernels/tests/test_kernels_gpu.py

They check every path of the op (GEMV at small M, the CUTLASS tensor-core GEMM with each tile, the any-shape
fallback) against a numpy reference of the definition in kernels/README.md, and bit-for-bit against onnxqf's
standard-op int8-token graph; the outputs are poisoned with NaN first, so an unwritten element fails.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from onnxqf.runtime import kernels  # imports no onnxruntime: the skips below still decide

ROOT = Path(__file__).resolve().parents[2]

ort = pytest.importorskip("onnxruntime")
if "CUDAExecutionProvider" not in ort.get_available_providers() and __name__ != "__main__":
    pytest.skip("onnxruntime has no CUDA provider", allow_module_level=True)

F16 = TensorProto.FLOAT16


def reference(x: np.ndarray, q: np.ndarray, wscale: np.ndarray,
              bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """numpy: (y fp16, codes int8) by the definition (fp16 amax, fp16 127/amax, fp16 product, round half even)."""
    amax = np.max(np.abs(x), axis=-1, keepdims=True).astype(np.float16)
    amax = np.maximum(amax, np.float16(2.0 ** -9))  # onnxqf's fp16 floor: 127 / amax is a finite fp16
    inv = (np.float16(127.0) / amax).astype(np.float16)
    scaled = (x * inv).astype(np.float16).astype(np.float32)
    codes = np.clip(np.rint(scaled), -127, 127).astype(np.int8)
    acc = codes.astype(np.float64) @ q.T.astype(np.float64)  # exact: |acc| < 2^53
    t = acc.astype(np.float32) * amax.astype(np.float32)
    y = t * wscale[None, :]
    if bias is not None:
        y = y + bias.astype(np.float32)[None, :]
    return y.astype(np.float16), codes


def session(K, N, with_bias, env=None, standard=False, q=None, wscale=None, bias=None):
    inits = []
    if standard:
        return _session(standard_graph(K, N, q, wscale), False, env)
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(wscale, "ws")]
    ins = ["x", "wq", "ws"]
    if with_bias:
        inits.append(numpy_helper.from_array(bias, "b"))
        ins.append("b")
    node = helper.make_node(kernels.W8A8_LINEAR, ins, ["y"], domain=kernels.DOMAIN)
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", F16, ["B", "S", K])],
                          [helper.make_tensor_value_info("y", F16, ["B", "S", N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)])
    m.ir_version = 9
    return _session(m, True, env)


def standard_graph(K, N, q, wscale, lowering="int8-token"):
    """onnxqf's own int8-token lowering (or ``lowering``, e.g. int8-token-asym) of one float16 linear
    (onnxqf.runtime.linears), its int8 weight and scale replaced by ``q`` ([N, K], stored [K, N] as MatMulInteger
    reads it) and ``wscale`` (int8-token: already / 127; int8-token-asym: the steps), and the weights' per-channel sums
    where the lowering has them."""
    import onnx_ir as ir

    from onnxqf.runtime.linears import linear_model, parse_lowering

    model = linear_model(K, N, parse_lowering(lowering), copies=1, dtype="float16")
    inits = model.graph.initializers
    inits.pop("linear0.weight")  # the float weight the lowering replaced
    values = {"linear0.weight_int8": np.ascontiguousarray(q.T), "linear0.weight_scale": wscale,
              "linear0.weight_colsum": q.astype(np.int64).sum(axis=1).astype(np.float32)}
    for name in list(inits):
        for prefix, v in values.items():
            if name.startswith(prefix):
                inits[name].const_value = ir.tensor(v, name=name)
    return ir.serde.serialize_model(model)


def _session(model, custom, env):
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if custom:
        kernels.register(so)
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def run_poisoned(sess, x, N, out="y"):
    b = sess.io_binding()
    b.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    y = ort.OrtValue.ortvalue_from_numpy(np.full(x.shape[:-1] + (N,), np.nan, np.float16), "cuda", 0)
    b.bind_ortvalue_output(out, y)
    sess.run_with_iobinding(b)
    return y.numpy()


def data(M, K, N, seed, with_bias, tiny_row=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, rng.choice(K, size=max(1, K // 64), replace=False)] *= 30
    if M > 2:
        x[1] = 0.0  # an all-zero token: the amax floor
        if tiny_row:
            x[2] *= 1e-6  # a tiny token: below the floor, its outputs fp16 subnormals
    x = x.astype(np.float16)
    q = rng.integers(-127, 128, size=(N, K), dtype=np.int8)
    wscale = (rng.uniform(0.5, 1.5, N) * 0.02 / np.sqrt(K) / 127).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float16) if with_bias else None
    return x, q, wscale, bias


def assert_close_to(got, want):
    """Outputs written (finite) and equal up to a code moved by one where a value rounds the other way in fp16 (fp32
    sums in another order): the largest difference under 2 % of the largest output, the mean one under 0.5 %."""
    assert np.isfinite(got).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    mean = np.abs(got - want).mean() / np.abs(want).mean()
    assert err < 0.02 and mean < 0.005, (err, mean)


CASES = [
    # (M, K, N, bias, env): paths chosen by M and the shape
    (1, 4096, 11008, False, None),                                  # fused quantization + GEMV, M = 1
    (3, 4096, 1024, True, None),                                    # fused, M = 3 (4-row kernel), bias
    (2, 11008, 4096, False, None),                                  # fused, M = 2, K = 11008
    (2, 32768, 256, False, None),                                   # 4 * K over the fused kernel's shared memory
    (1, 2048, 32000, True, None),                                   # fused M = 1, more output groups than warps
    (1, 11008, 16384, False, None),                                 # the same, 4 x 4 config, ragged last step
    (3, 4096, 50000, False, None),                                  # the same, 4-row kernel
    (1, 2048, 32000, True, {"ONNXQF_GEMV_PERSIST": "0"}),           # a warp per group of outputs
    (1, 4096, 22016, False, {"ONNXQF_PDL": "1"}),                   # as a programmatic dependent launch
    (16, 11008, 4096, False, {"ONNXQF_GEMV_MAX_M": "16"}),          # separate quantization + GEMV, M = 16
    (7, 4096, 1024, True, {"ONNXQF_GEMV_MAX_M": "16"}),             # the same, 8-row kernel
    (16, 4096, 1024, True, None),                                   # GEMM small tile at M = 16
    (100, 4096, 1032, True, None),                                  # GEMM small tile, M and N not tile multiples
    (333, 2048, 4096, False, None),                                 # GEMM large tile, ragged M
    (2048, 4096, 4096, True, None),                                 # GEMM large tile
    (200, 1024, 1024, False, {"ONNXQF_GEMM_TILE": "1"}),            # forced small tile at M > 128
    (300, 4096, 11008, True, {"ONNXQF_GEMM_TILE": "2"}),            # forced wide tile (128x256 cooperative)
    (333, 4096, 4096, True, {"ONNXQF_GEMM_TILE": "3"}),             # stream-K, ragged M, split K loops
    (528, 11008, 1032, True, {"ONNXQF_GEMM_TILE": "4"}),            # stream-K in clusters of 2, ragged N
    (40, 2048, 4096, False, {"ONNXQF_GEMM_TILE": "3"}),             # stream-K at M < one tile
    (333, 4096, 4096, True, {"ONNXQF_GEMM_TILE": "5"}),             # 256x128, clusters along M, ragged M
    (300, 4096, 1032, False, {"ONNXQF_GEMM_TILE": "6"}),            # 256x128, clusters along N, ragged N
    (600, 2048, 1032, True, {"ONNXQF_GEMM_TILE": "7"}),             # 256x128 in clusters of 2 x 2, both ragged
    (333, 2048, 1032, False, {"ONNXQF_GEMM_TILE": "8"}),            # 128x128, clusters along N, both ragged
    # the tokens on the tile's second side (y^T = w . q^T), ragged tokens and channels, a bias per channel
    (264, 4096, 4096, True, {"ONNXQF_GEMM_TILE": "9"}),             # 64x144 in clusters of 2 along the channels
    (37, 2048, 1032, True, {"ONNXQF_GEMM_TILE": "9"}),              # an odd count of channel tiles, few tokens
    (528, 4096, 1032, False, {"ONNXQF_GEMM_TILE": "10"}),           # 128x144 cooperative
    (16, 4096, 4096, True, {"ONNXQF_GEMM_TILE": "11"}),             # 128x32 stream-K: K loops split
    (20, 4096, 1032, False, {"ONNXQF_GEMM_TILE": "11"}),            # 128x32 stream-K, N not a multiple of 64
    (45, 11008, 1032, True, {"ONNXQF_GEMM_TILE": "12"}),            # 128x64 stream-K, ragged
    (130, 1024, 4096, False, {"ONNXQF_GEMM_TILE": "12"}),           # more tokens than one token tile
    (64, 32768, 256, False, None),                                  # the longest row the quantization holds in
    (8, 40000, 256, False, None),                                   # registers (512 threads); longer: a block per row
    (16, 1032, 1024, True, None),                                   # a row of 129 chunks: a ragged last warp
    (2048, 4096, 4096, True, {"ONNXQF_QUANT_REGS": "0"}),           # the block-per-row quantization kernel
    (16, 11008, 4096, False, {"ONNXQF_GEMV_MAX_M": "16", "ONNXQF_QUANT_REGS": "0"}),
    (5, 1000, 300, True, {"ONNXQF_GEMV_MAX_M": "0"}),               # K % 16 != 0: any-shape fallback
    (40, 1024, 1001, False, None),                                  # N % 8 != 0: GEMV at M > 16
    (3, 1000, 300, False, None),                                    # K % 16 != 0 at small M: fallback
]


@pytest.mark.parametrize("M,K,N,with_bias,env", CASES)
def test_against_numpy(M, K, N, with_bias, env):
    x, q, wscale, bias = data(M, K, N, seed=M * 31 + K + N, with_bias=with_bias)
    sess = session(K, N, with_bias, env, q=q, wscale=wscale, bias=bias)
    got = run_poisoned(sess, x.reshape(1, M, K), N).reshape(M, N)
    want, _ = reference(x, q, wscale, bias)
    assert not np.isnan(got.astype(np.float32)).any(), "unwritten outputs"
    g, w = got.astype(np.float32), want.astype(np.float32)
    # fp16 rounding of the result; a code can differ at an exact tie of the fp16 division (numpy rounds via float32)
    rel = np.linalg.norm(g - w) / np.linalg.norm(w)
    assert rel < 2e-3, rel
    if not with_bias:
        assert np.mean(got == want) > 0.99


def _multiprocessors() -> int | None:
    """GPU 0's multiprocessors (through PyTorch), None without it."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_properties(0).multi_processor_count


@pytest.mark.parametrize("M,K,N,env", [(1, 4096, 11008, None), (4, 11008, 4096, None), (1, 4096, 22016, None),
                                       (16, 11008, 4096, {"ONNXQF_GEMV_MAX_M": "16"}), (16, 4096, 4096, None),
                                       (128, 4096, 4096, None), (2048, 4096, 11008, None), (777, 11008, 4096, None),
                                       (2048, 4096, 4096, {"ONNXQF_GEMM_TILE": "2"}),
                                       (528, 11008, 4096, {"ONNXQF_GEMM_TILE": "3"}),  # stream-K: int32 partial
                                       (264, 4096, 11008, {"ONNXQF_GEMM_TILE": "4"}),  # sums, the same bits
                                       (2048, 4096, 4096, {"ONNXQF_GEMM_TILE": "5"}),
                                       (528, 11008, 4096, {"ONNXQF_GEMM_TILE": "6"}),
                                       (1000, 4096, 11008, {"ONNXQF_GEMM_TILE": "7"}),
                                       (2048, 4096, 4096, {"ONNXQF_GEMM_TILE": "8"}),
                                       (264, 4096, 11008, {"ONNXQF_GEMM_TILE": "9"}),  # the tokens on the
                                       (528, 11008, 4096, {"ONNXQF_GEMM_TILE": "10"}),  # second side
                                       (16, 11008, 4096, {"ONNXQF_GEMM_TILE": "11"}),
                                       (64, 4096, 4096, {"ONNXQF_GEMM_TILE": "12"}),
                                       (264, 4096, 4096, {"ONNXQF_GEMM_RULE": "1"}),  # rule 1 picks 9,
                                       (528, 4096, 4096, {"ONNXQF_GEMM_RULE": "1"}),  # 10 and 11 here
                                       (30, 4096, 4096, {"ONNXQF_GEMM_RULE": "1"}),
                                       (2048, 4096, 4096, {"ONNXQF_QUANT_PIPE": "2"}),  # quantization grid
                                       (777, 11008, 4096, {"ONNXQF_QUANT_PIPE": "1"}),  # striding over rows
                                       # the schedule: stream-K forced, its partial sums in any order; split-K;
                                       # data-parallel; swizzle and raster order
                                       (528, 4096, 4096, {"ONNXQF_GEMM_TILE": "3", "ONNXQF_GEMM_SK": "3",
                                                          "ONNXQF_GEMM_SK_ATOMIC": "1"}),
                                       (528, 11008, 4096, {"ONNXQF_GEMM_TILE": "3", "ONNXQF_GEMM_SK": "2",
                                                           "ONNXQF_GEMM_SPLITS": "3"}),
                                       (660, 4096, 11008, {"ONNXQF_GEMM_TILE": "4", "ONNXQF_GEMM_SK": "1"}),
                                       (1000, 4096, 4096, {"ONNXQF_GEMM_SWIZZLE": "4", "ONNXQF_GEMM_RASTER": "2"}),
                                       (777, 11008, 4096, {"ONNXQF_QUANT_REGS": "0"}),
                                       (2048, 4096, 4096, {"ONNXQF_GEMM_PDL": "1"}),
                                       (64, 4096, 4096, {"ONNXQF_GEMM_PDL": "0"}),  # small tile, no PDL
                                       (777, 11008, 4096, {"ONNXQF_GEMM_PDL": "1", "ONNXQF_QUANT_REGS": "0"})])
def test_bit_exact_against_standard_graph(M, K, N, env):
    """The same output as onnxqf's int8-token graph (MatMulInteger), every element, to the bit, an all-zero token
    included (zeros in both: the fp16 floor keeps 127/amax finite). Not a token of fp16-subnormal inputs: their
    outputs are fp16 subnormals, which ONNX Runtime's fp16 nodes and the op may round differently (measured: one such
    token, 4080 of 4096 outputs differ by at most 2.6e-5)."""
    if env and "ONNXQF_GEMM_RULE" in env:  # (the rule's env is read: test_gemm_options_out_of_range_are_refused)
        sms = _multiprocessors()
        assert sms is None or kernels.gemm_tile(M, N, sms, rule=int(env["ONNXQF_GEMM_RULE"])) in (9, 10, 11, 12), \
            "this case is meant to run a tile with the tokens on its second side"
    x, q, wscale, _ = data(M, K, N, seed=M + 7 * K + N, with_bias=False, tiny_row=False)
    ours = run_poisoned(session(K, N, False, env, q=q, wscale=wscale), x.reshape(1, M, K), N).reshape(M, N)
    std_sess = session(K, N, False, standard=True, q=q, wscale=wscale)
    std = run_poisoned(std_sess, x, N, out="y0")
    assert not np.isnan(ours.astype(np.float32)).any() and not np.isnan(std.astype(np.float32)).any()
    mismatches = int(np.sum(ours != std))
    assert mismatches == 0, (f"{mismatches} of {ours.size} differ, "
                             f"max {np.max(np.abs(ours.astype(np.float32) - std)):.3g}")


PARTS = [
    # (M, K, sizes, bias, rotation_walsh block, env): one op writing a linear group's outputs, at every path
    (1, 4096, (4096, 1024, 1024), False, 0, None),    # q/k/v of a GQA layer: the fused GEMV
    (3, 4096, (11008, 11008), True, 0, None),         # gate/up, fused GEMV at 3 rows, bias
    (2, 4096, (4096, 1024, 1024), False, 64, None),   # the fused GEMV after the Walsh rotation
    (64, 4096, (4096, 1024, 1024), True, 0, None),    # GEMM small tile, one per output on shared codes
    (300, 4096, (11008, 11008), False, 64, None),     # the Walsh kernel, then a GEMM per output
    (2048, 2048, (2048, 512, 512), False, 0, None),   # GEMM large tile
    (2048, 2048, (2048, 512, 512), False, 0, {"ONNXQF_GEMM_PDL": "1"}),  # each GEMM a dependent launch
    (16, 4096, (4096, 1024, 1024), False, 0, {"ONNXQF_GEMV_MAX_M": "16"}),  # separate quantization + GEMV
    (40, 1024, (500, 508), False, 0, None),           # a part of N % 8 != 0: the GEMV for every part
]


@pytest.mark.parametrize("M,K,sizes,with_bias,block,env", PARTS)
def test_output_parts_against_numpy(M, K, sizes, with_bias, block, env):
    """``output_sizes``: the op writes each consecutive part of its N channels as its own output (the group's q/k/v
    or gate/up, no Split): each equals its columns of the one-output reference; outputs poisoned first."""
    N = sum(sizes)
    x, q, wscale, bias = data(M, K, N, seed=M + K + len(sizes), with_bias=with_bias, tiny_row=False)
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(wscale, "ws")]
    ins = ["x", "wq", "ws"] + (["b"] if with_bias else [])
    if with_bias:
        inits.append(numpy_helper.from_array(bias, "b"))
    outs = [f"y{i}" for i in range(len(sizes))]
    attrs = {"output_sizes": list(sizes)}
    if block:
        attrs |= {"rotation_block": block, "rotation_walsh": 3}
    node = helper.make_node(kernels.W8A8_LINEAR, ins, outs, domain=kernels.DOMAIN, **attrs)
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", F16, ["M", K])],
                          [helper.make_tensor_value_info(o, F16, ["M", n]) for o, n in zip(outs, sizes)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)])
    m.ir_version = 9
    sess = _session(m, True, env)
    assert [o.shape[-1] for o in sess.get_outputs()] == list(sizes)  # the op's shape inference
    b = sess.io_binding()
    b.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    ys = [ort.OrtValue.ortvalue_from_numpy(np.full((M, n), np.nan, np.float16), "cuda", 0) for n in sizes]
    for o, y in zip(outs, ys):
        b.bind_ortvalue_output(o, y)
    sess.run_with_iobinding(b)
    got = np.concatenate([y.numpy() for y in ys], axis=1).astype(np.float32)
    xr = x
    if block:
        from onnxqf.lowering.cuda_kernels import KernelRotation

        xr = KernelRotation(block, None, None, 3).apply(x.astype(np.float64)).astype(np.float16)
    want = reference(xr, q, wscale, bias)[0].astype(np.float32)
    assert_close_to(got, want)  # NaN: an unwritten output


def skip_norm_reference(x, skip, gamma, eps):
    """numpy: (sum fp16, normalized rows fp16) of the op's skip_norm (kernels.h: NormSpec): s = fp16(x + skip),
    r = fp16(1 / sqrt(mean(s^2) + eps)) from a float64 mean, y = fp16(gamma * fp16(s * r))."""
    s = (x.astype(np.float32) + skip.astype(np.float32)).astype(np.float16)
    ms = np.mean(s.astype(np.float64) ** 2, axis=-1, keepdims=True)
    r = (1.0 / np.sqrt(ms + eps)).astype(np.float16)
    y = (gamma.astype(np.float32) * (s * r).astype(np.float16).astype(np.float32)).astype(np.float16)
    return s, y


NORMS = [
    # (M, K, sizes, with_sum, env): the skip_norm at each path (fused GEMV, separate quantization + GEMV, GEMM)
    (1, 4096, (4096, 1024, 1024), True, None),        # q/k/v at one token: the norm inside the one-launch GEMV
    (3, 4096, (11008, 11008), True, None),            # gate/up at 3 tokens
    (1, 4096, (32000,), False, None),                 # lm_head after the final norm: no sum output
    (16, 4096, (4096, 1024, 1024), True, {"ONNXQF_GEMV_MAX_M": "16"}),  # quantization kernel + GEMV
    (300, 2048, (2048, 512, 512), True, None),        # quantization kernel + a GEMM per output
    (2, 11008, (4096,), True, None),                  # a long row (the uncached loads)
    (1, 20480, (256,), True, None),                   # past the one-launch GEMV's shared memory: kernel + GEMV
    (40, 4096, (32000,), False, None),                # quantization kernel + GEMM, no sum output
    (300, 2048, (2048, 512, 512), True, {"ONNXQF_QUANT_REGS": "0"}),  # the block-per-row quantization kernel
    (300, 2048, (2048, 512, 512), True, {"ONNXQF_GEMM_PDL": "1"}),    # the GEMMs as dependent launches
    (600, 4096, (4096, 1024, 1024), True, {"ONNXQF_QUANT_PIPE": "2"}),  # the quantization's grid striding
    (1, 20480, (256,), True, {"ONNXQF_QUANT_REGS": "0"}),
]


@pytest.mark.parametrize("M,K,sizes,with_sum,env", NORMS)
def test_skip_norm_against_numpy_and_the_node(M, K, sizes, with_sum, env):
    """``skip_norm``: the op normalizes x + skip itself (SkipSimplifiedLayerNormalization's arithmetic, the sum of
    squares in fp32) and, with skip_norm = 2, writes the sum as its last output. The sum equals numpy's and ONNX
    Runtime's own node's to the bit; the outputs equal the numpy reference's to the bit wherever the fp32 and float64
    means round r alike (every row here, or nearly), and the node followed by the plain op to fp16 rounding."""
    N = sum(sizes)
    x, q, wscale, _ = data(M, K, N, seed=3 * M + K, with_bias=False, tiny_row=False)
    rng = np.random.default_rng(M + K)
    skip = (rng.standard_normal((M, K)) * 2).astype(np.float16)
    gamma = rng.uniform(0.5, 1.5, K).astype(np.float16)
    eps = 1e-5
    outs = [f"y{i}" for i in range(len(sizes))]
    attrs = {"skip_norm": 2 if with_sum else 1, "epsilon": eps}
    if len(sizes) > 1:
        attrs["output_sizes"] = list(sizes)
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(wscale, "ws"),
             numpy_helper.from_array(gamma, "gamma")]
    node = helper.make_node(kernels.W8A8_LINEAR, ["x", "wq", "ws", "", "", "", "", "skip", "gamma"],
                            outs + (["sum"] if with_sum else []), domain=kernels.DOMAIN, **attrs)
    ins = [helper.make_tensor_value_info("x", F16, ["M", K]), helper.make_tensor_value_info("skip", F16, ["M", K])]
    out_info = [helper.make_tensor_value_info(o, F16, ["M", n]) for o, n in zip(outs, sizes)]
    if with_sum:
        out_info.append(helper.make_tensor_value_info("sum", F16, ["M", K]))
    g = helper.make_graph([node], "t", ins, out_info, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)])
    m.ir_version = 9
    sess = _session(m, True, env)
    assert [o.shape[-1] for o in sess.get_outputs()] == list(sizes) + ([K] if with_sum else [])

    def run(session, names, shapes):
        b = session.io_binding()
        b.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        b.bind_ortvalue_input("skip", ort.OrtValue.ortvalue_from_numpy(skip, "cuda", 0))
        vals = [ort.OrtValue.ortvalue_from_numpy(np.full(sh, np.nan, np.float16), "cuda", 0) for sh in shapes]
        for name, v in zip(names, vals):
            b.bind_ortvalue_output(name, v)
        session.run_with_iobinding(b)
        return [v.numpy() for v in vals]

    got = run(sess, outs + (["sum"] if with_sum else []), [(M, n) for n in sizes] + ([(M, K)] if with_sum else []))
    y = np.concatenate(got[:len(sizes)], axis=1)
    assert not np.isnan(y.astype(np.float32)).any(), "unwritten outputs"
    s_ref, xn = skip_norm_reference(x, skip, gamma, eps)
    if with_sum:
        assert np.array_equal(got[-1], s_ref), "the sum"
    want = reference(xn, q, wscale, None)[0]
    s32 = s_ref.astype(np.float32)
    r32 = (1.0 / np.sqrt(np.mean(s32 * s32, axis=-1, dtype=np.float32) + np.float32(eps))).astype(np.float16)
    r64 = (1.0 / np.sqrt(np.mean(s_ref.astype(np.float64) ** 2, axis=-1) + eps)).astype(np.float16)
    same = r32 == r64  # rows whose r no summation order can change
    assert same.mean() > 0.9 and np.array_equal(y[same], want[same]), int(np.sum(y[same] != want[same]))

    # against ONNX Runtime's own node followed by the op without the norm
    sln = helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], ["xn", "", "", "sum"],
                           domain="com.microsoft", epsilon=eps)
    lin = helper.make_node(kernels.W8A8_LINEAR, ["xn", "wq", "ws"], outs, domain=kernels.DOMAIN,
                           **({"output_sizes": list(sizes)} if len(sizes) > 1 else {}))
    g2 = helper.make_graph([sln, lin], "t2", ins, out_info[:len(sizes)] +
                           [helper.make_tensor_value_info("sum", F16, ["M", K])], inits)
    m2 = helper.make_model(g2, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1),
                                              helper.make_opsetid("com.microsoft", 1)])
    m2.ir_version = 9
    std = run(_session(m2, True, env), outs + ["sum"], [(M, n) for n in sizes] + [(M, K)])
    assert np.array_equal(std[-1], s_ref), "ONNX Runtime's sum"
    y2 = np.concatenate(std[:len(sizes)], axis=1).astype(np.float32)
    rel = np.linalg.norm(y.astype(np.float32) - y2) / np.linalg.norm(y2)
    assert rel < 2e-2, rel


def test_skip_norm_refusals():
    """skip_norm with a rotation is refused when the session runs (one error), and Skip without skip_norm."""
    K, N = 1024, 256
    x, q, wscale, _ = data(1, K, N, seed=1, with_bias=False)
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(wscale, "ws"),
             numpy_helper.from_array(np.ones(K, np.float16), "gamma")]
    ins = [helper.make_tensor_value_info("x", F16, ["M", K]), helper.make_tensor_value_info("skip", F16, ["M", K])]
    for attrs, match in (({"skip_norm": 1, "rotation_block": 32, "rotation_walsh": 3}, "rotation"),
                         ({}, "skip_norm")):
        node = helper.make_node(kernels.W8A8_LINEAR, ["x", "wq", "ws", "", "", "", "", "skip", "gamma"], ["y"],
                                domain=kernels.DOMAIN, **attrs)
        g = helper.make_graph([node], "t", ins, [helper.make_tensor_value_info("y", F16, ["M", N])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)])
        m.ir_version = 9
        with pytest.raises(Exception, match=match):
            _session(m, True, None).run(None, {"x": x, "skip": x})


@pytest.mark.parametrize("env,match", [({"ONNXQF_GEMM_TILE": "13"}, "ONNXQF_GEMM_TILE must be a tile from 0 to 12"),
                                       ({"ONNXQF_GEMM_TILE": "-2"}, "ONNXQF_GEMM_TILE must be a tile from 0 to 12"),
                                       ({"ONNXQF_GEMM_RULE": "2"}, "ONNXQF_GEMM_RULE must be from 0 to 1"),
                                       ({"ONNXQF_GEMM_SWIZZLE": "3"}, "swizzle must be 1, 2, 4 or 8"),
                                       ({"ONNXQF_GEMM_RASTER": "3"}, "raster must be"),
                                       ({"ONNXQF_GEMM_SK": "4"}, "decomposition must be"),
                                       ({"ONNXQF_GEMM_SPLITS": "0"}, "splits must be from 1 to 64"),
                                       ({"ONNXQF_QUANT_PIPE": "33"}, "ONNXQF_QUANT_PIPE must be from 0")])
def test_gemm_options_out_of_range_are_refused(env, match):
    """The GEMM's tile and schedule options (and the quantization's grid) name what the library has, else the
    session's creation stops with one line (before, any other tile silently ran the stream-K one)."""
    K, N = 1024, 256
    _, q, wscale, _ = data(1, K, N, seed=2, with_bias=False)
    with pytest.raises(Exception, match=match):
        session(K, N, False, env, q=q, wscale=wscale)


def test_empty_tokens():
    _, q, wscale, _ = data(4, 256, 64, seed=1, with_bias=False)
    sess = session(256, 64, False, q=q, wscale=wscale)
    y = sess.run(None, {"x": np.zeros((1, 0, 256), np.float16)})[0]
    assert y.shape == (1, 0, 64)


def test_check_device():
    assert kernels.check_device() == "sm_90a"


def build_rewrites(folder: Path) -> dict[str, Path]:
    """A tiny fp16 Llama (tests/tiny.py) rewritten twice, W8A8 with the standard-op int8-token lowering and with
    onnxqf-cuda (the same rounded weights). CPU only: ``python kernels/tests/test_kernels_gpu.py DIR`` makes them
    where torch and transformers are, for a GPU machine that has neither (ONNXQF_TEST_REWRITES=DIR)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import onnxqf.lowering.cuda_kernels  # noqa: F401  (registers onnxqf-cuda)
    from onnxqf.cli import main
    try:
        from onnxqf.models.export import export_model
    except ModuleNotFoundError:  # onnxqf.models is the repository's models/ folder, mapped there by the install
        pytest.skip("onnxqf is not installed here (pip install -e .): onnxqf.models cannot be imported")

    from tiny import tiny_model

    folder.mkdir(parents=True, exist_ok=True)
    src = export_model(tiny_model("llama-gqa"), folder / "m.onnx", dtype="float16")
    ids = folder / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 100, size=(1, 1024)))
    out = {}
    for low in ("int8-token", "onnxqf-cuda"):
        out[low] = folder / f"m.{low}.onnx"
        rc = main(["rewrite", str(src), "--lowering", low, "--ep", "cuda", "--calib", str(ids), "-o", str(out[low])])
        assert rc == 0
    return out


def test_rewrite_matches_standard_graph(tmp_path):
    """`onnxqf rewrite --lowering onnxqf-cuda` gives the logits of the same rewrite with the standard-op int8-token
    lowering, to the bit, on prefill (the GEMM) and on one token per sequence (the fused small-M kernel)."""
    given = os.environ.get("ONNXQF_TEST_REWRITES")
    if given:
        paths = {low: Path(given) / f"m.{low}.onnx" for low in ("int8-token", "onnxqf-cuda")}
    else:
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
        paths = build_rewrites(tmp_path)
    sessions = {}
    for low, path in paths.items():
        so = ort.SessionOptions()
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if low == "onnxqf-cuda":
            kernels.register(so)
        sessions[low] = ort.InferenceSession(str(path), so, providers=["CUDAExecutionProvider"])
    compared, refused = [], []
    for batch, seq in ((2, 37), (4, 16), (1, 64), (4, 1), (1, 1)):
        feed = {"input_ids": np.random.default_rng(seq).integers(0, 100, size=(batch, seq)).astype(np.int64)}
        b = sessions["onnxqf-cuda"].run(None, feed)[0]
        assert np.isfinite(b.astype(np.float32)).all()
        try:
            a = sessions["int8-token"].run(None, feed)[0]
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own MatMulInteger refusing a shape is reported
            refused.append(f"{batch}x{seq}: {str(e).splitlines()[0][:160]}")
            continue
        assert a.shape == b.shape and np.array_equal(a, b), (batch, seq,
                                                             float(np.max(np.abs(a.astype(np.float32) - b))))
        compared.append((batch, seq))
    print(f"bit-exact at {compared}; the int8-token graph failed at {refused}")
    assert compared, refused

if __name__ == "__main__":
    print(build_rewrites(Path(sys.argv[1])))


ROTATED = [
    # (M, K, N): the rotation inside the op at every path (GEMV at small M, GEMM above)
    (1, 11008, 4096),   # d_ff of Llama-2-7B: 172 (dense, Williamson) x 64 (Walsh), M = 1
    (3, 4096, 4096),    # its hidden: 64 x 64, both Walsh
    (16, 4096, 1024),
    (300, 11008, 4096),  # the dense factor's one-kernel path
    (16, 11008, 4096),
    (2048, 4096, 4096),
    (37, 576, 256),     # SmolLM2's hidden: 36 (dense) x 16 (Walsh)
    (130, 2048, 512),   # hidden 2048: 64 x 32, both Walsh
    (2, 2048, 512),
    (9, 96, 64),        # one dense group
]


@pytest.mark.parametrize("M,K,N", ROTATED)
def test_rotation_inside_the_op_matches_the_standard_graph(M, K, N):
    """A linear behind an online rotation (linears.linear_model(rotate=True)): the op's fused rotation against the
    standard int8-token graph with the rotation nodes, both on CUDA: the same outputs up to a code moved by one where
    a rotated value rounds the other way in fp16; outputs poisoned first."""
    from onnxqf.runtime.linears import linear_model, parse_lowering

    rng = np.random.default_rng(M + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, rng.choice(K, size=max(1, K // 64), replace=False)] *= 30
    x = x.astype(np.float16)
    fused = linear_model(K, N, parse_lowering("onnxqf-cuda"), copies=1, dtype="float16", rotate=True)
    assert "MatMul" not in [n.op_type for n in fused.graph]
    standard = linear_model(K, N, parse_lowering("int8-token"), copies=1, dtype="float16", rotate=True)
    import onnx_ir as ir

    got = run_poisoned(_session(ir.serde.serialize_model(fused), True, None), x, N, out="y0").astype(np.float32)
    want = run_poisoned(_session(ir.serde.serialize_model(standard), False, None), x, N, out="y0").astype(np.float32)
    assert_close_to(got, want)


FACTORS = [
    # (M, a, A, b, B): each kind of factor the op takes (W: Sylvester's, as a Walsh flag; R: dense; None: identity)
    (3, 64, "W", 64, "W"),      # K = 4096 as the lowering balances it: both transforms
    (300, 64, "W", 64, "W"),    # the same under the GEMM
    (2, 32, "W", 128, None),    # o_proj's head mixing: 32 heads of 128
    (17, 16, "W", 48, "R"),     # a dense inner factor, then a transform along the columns
    (5, 12, "R", 32, "W"),      # a dense outer factor over a transform (as 11008 = 172 x 64)
    (1, 344, "R", 32, "W"),     # 11008 as Paley's 344 x 32 at one token (the GEMV)
    (4, 3, None, 64, "W"),      # a transform along the rows only
    (9, 8, "W", 8, "W"),        # the smallest: 8 x 8, the inner factor padded to 16
    # Walsh-Hadamard factors alone, K = 512 ... 16384: the register transform (inside the GEMV at M <= 4, K <= 4096)
    (1, 64, "W", 64, "W"),
    (1, 64, "W", 32, "W"),      # K = 2048: half the GEMV block's threads hold the row
    (40, 64, "W", 32, "W"),
    (2, 16, "W", 32, "W"),      # K = 512: three windows, the last overlapping
    (33, 32, "W", 16, "W"),
    (70, 128, "W", 64, "W"),    # K = 8192
    (3, 128, "W", 128, "W"),    # K = 16384: too large for the GEMV's block, the transform kernel first
    (5, 8, None, 128, "W"),     # a transform over the low bits only
    # a dense outer factor over a Walsh or identity inner one: the GEMM over all tokens
    (200, 344, "R", 32, "W"),   # 11008 as Paley's 344 x 32: the three kernels (the factor is too large for one)
    (4, 344, "R", 32, "W"),     # small M: the rotated rows by one kernel, then the one-launch GEMV
    (200, 172, "R", 64, "W"),   # 11008 at prefill: the one-kernel path, A^T in shared memory
    (16, 172, "R", 64, "W"),    # the same, fewer tokens than multiprocessors
    (4, 172, "R", 64, "W"),     # small M: the rotated rows, then the GEMV
    (150, 188, "R", 32, "W"),   # a16 = 192, the largest factor the one kernel holds (3 m-tiles per warp)
    (40, 96, "R", 128, "W"),    # the 128-wide inner factor
    (33, 40, "R", 32, None),    # the one kernel with the identity inside
    (2, 36, "R", 16, "W"),
    (64, 36, "R", 16, "W"),     # K = 576 (a8 = 40)
    (3, 40, "R", 8, None),      # the inner factor the identity
]


PATHS = {  # the op's environment per kernel path a dense factor may take
    "default": None,
    "tiles": {"ONNXQF_ROTATION_TILES": "1"},  # the per-token tensor-core kernel for every rotation
    "three": {"ONNXQF_ROT_FUSED": "0"},       # a dense outer factor: the three kernels, never the one
    "narrow": {"ONNXQF_ROT_FUSED": "2"},      # the one kernel, one group of 8 warps
    "wide": {"ONNXQF_ROT_FUSED": "3"},        # the one kernel, one group of 16 warps (8 where the inner factor is 32)
    "groups": {"ONNXQF_ROT_FUSED": "4"},      # the one kernel, two groups of 8 warps wherever they fit (b = 32, 64)
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("M,a,A,b,B", FACTORS)
def test_rotation_factor_kinds_against_numpy(M, a, A, b, B, path):
    """The op with each kind of rotation factor (dense on the tensor cores, Walsh-Hadamard as a transform, the
    identity) against numpy: the float64 rotation rounded to fp16, then the op's definition; a code may move by one
    where a rotated value rounds the other way (fp32 sums in another order). `path`: PATHS."""
    if path == "tiles":
        a16, b16 = -(-a // 16) * 16, -(-b // 16) * 16
        if 6 * a16 * b16 > 200 * 1024:
            pytest.skip("the per-token kernel cannot hold this row")
    elif path != "default" and A != "R":
        pytest.skip("no dense outer factor: one path only")
    from onnxqf.lowering.cuda_kernels import KernelRotation
    from onnxqf.maths.hadamard import hadamard_matrix, random_orthogonal

    def dense(n, seed):
        h = hadamard_matrix(n) if n in (172, 344) else None
        return h / np.sqrt(n) if h is not None else random_orthogonal(n, seed)

    K, N = a * b, 256
    a16, b16 = -(-a // 16) * 16, -(-b // 16) * 16
    at = bp = None
    if A == "R":
        at = np.zeros((a16, a16))
        at[:a, :a] = dense(a, 1).T
    if B == "R":
        bp = np.zeros((b16, b16))
        bp[:b, :b] = dense(b, 2)
    rot = KernelRotation(b, at, bp, (1 if B == "W" else 0) | (2 if A == "W" else 0))
    x, q, wscale, _ = data(M, K, N, seed=a + b, with_bias=False, tiny_row=False)
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(wscale, "ws")]
    ins = ["x", "wq", "ws", "", "", ""]
    if at is not None:
        inits.append(numpy_helper.from_array(at.astype(np.float16), "ra"))
        ins[4] = "ra"
    if bp is not None:
        inits.append(numpy_helper.from_array(bp.astype(np.float16), "rb"))
        ins[5] = "rb"
    while ins[-1] == "":
        ins.pop()
    attrs = {"rotation_block": b} | ({"rotation_walsh": rot.walsh} if rot.walsh else {})
    node = helper.make_node(kernels.W8A8_LINEAR, ins, ["y"], domain=kernels.DOMAIN, **attrs)
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", F16, ["M", K])],
                          [helper.make_tensor_value_info("y", F16, ["M", N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)])
    m.ir_version = 9
    got = run_poisoned(_session(m, True, PATHS[path]), x, N).astype(np.float32)
    ref = KernelRotation(b, None if at is None else at.astype(np.float16).astype(np.float64),
                         None if bp is None else bp.astype(np.float16).astype(np.float64), rot.walsh)
    want, _ = reference(ref.apply(x.astype(np.float64)).astype(np.float16), q, wscale, None)
    want = want.astype(np.float32)
    assert_close_to(got, want)


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("M", [5, 301])
def test_fused_rotation_variants_agree_to_the_bit(M, asym):
    """11008 = 172 x 64 (the hybrid's down_proj input) through each variant of the one kernel (two groups of 8 warps
    on alternate tokens, one group of 16, one of 8) and the three kernels: the same fp32 sums in the same order, so
    the same outputs to the bit. M = 5: one group of the last block has no token; 301: groups take 1 or 2 tokens.
    asym: with the asymmetric codes."""
    from onnxqf.maths.hadamard import hadamard_matrix

    a, b, N = 172, 64, 256
    K = a * b
    at = np.zeros((176, 176))
    at[:a, :a] = hadamard_matrix(a).T / np.sqrt(a)
    x, q, wscale, _ = data(M, K, N, seed=M, with_bias=False, tiny_row=False)
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(wscale, "ws"),
             numpy_helper.from_array(at.astype(np.float16), "ra")]
    ins, extra = ["x", "wq", "ws", "", "ra"], {}
    if asym:
        inits.append(numpy_helper.from_array(q.astype(np.int64).sum(axis=1).astype(np.float32), "wsum"))
        ins, extra = ins + ["", "", "", "", "wsum"], {"asymmetric": 1}
    node = helper.make_node(kernels.W8A8_LINEAR, ins, ["y"], domain=kernels.DOMAIN, rotation_block=b,
                            rotation_walsh=1, **extra)
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", F16, ["M", K])],
                          [helper.make_tensor_value_info("y", F16, ["M", N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)])
    m.ir_version = 9
    outs = {p: run_poisoned(_session(m, True, {"ONNXQF_ROT_FUSED": v}), x, N)
            for p, v in (("default", "1"), ("wide", "3"), ("narrow", "2"), ("three", "0"))}
    assert np.isfinite(outs["default"].astype(np.float32)).all(), "unwritten outputs"
    for p in ("wide", "narrow", "three"):
        differ = np.mean(outs[p] != outs["default"])
        assert differ == 0, f"{p}: {differ:.2%} of the outputs differ from the default's"


GLU = [
    # (M, K, rotation (a, A, b, B) or None, env): each way the op reads SwiGLU's product
    (1, 4096, None, None),                              # the one-launch GEMV, product on the way in
    (3, 11008, None, None),                             # the same, 4-row kernel
    (16, 4096, None, {"ONNXQF_GEMV_MAX_M": "16"}),      # the separate quantization + GEMV
    (300, 11008, None, None),                           # the separate quantization + GEMM
    (300, 11008, None, {"ONNXQF_QUANT_REGS": "0"}),     # the same, the block-per-row quantization kernel
    (300, 11008, None, {"ONNXQF_GEMM_PDL": "1"}),       # the same, the GEMM a dependent launch
    (700, 11008, None, {"ONNXQF_QUANT_PIPE": "2"}),     # the same, the quantization's grid striding over the rows
    (5, 1000, None, None),                              # K % 16 != 0: the any-shape fallback
    (1, 4096, (64, "W", 64, "W"), None),                # rotated: the product written first, then the rotation
    (300, 11008, (344, "R", 32, "W"), None),            # the dense factor's three kernels
    (2, 11008, (344, "R", 32, "W"), None),
    (300, 11008, (172, "R", 64, "W"), None),            # its one kernel (the product made in shared memory)
    (16, 11008, (172, "R", 64, "W"), {"ONNXQF_ROT_FUSED": "2"}),
    (300, 11008, (172, "R", 64, "W"), {"ONNXQF_ROT_FUSED": "0"}),
    (301, 11008, (172, "R", 64, "W"), {"ONNXQF_ROT_FUSED": "3"}),  # one group of 16 warps, two buffers
    (5, 11008, (172, "R", 64, "W"), None),              # two groups, one buffer each; the last block's second idle
]


@pytest.mark.parametrize("M,K,rotation,env", GLU)
def test_glu_input_equals_the_standard_nodes(M, K, rotation, env):
    """``input_glu`` = 1 (X = g, U = u): the op computes silu(g) * u itself, in the fp16 steps of ONNX Runtime's
    Sigmoid, Mul, Mul on CUDA, so its outputs equal the same op fed by those three nodes, to the bit; outputs
    poisoned first."""
    from onnxqf.maths.hadamard import hadamard_matrix

    N = 512
    rng = np.random.default_rng(M + K)
    g = (rng.standard_normal((M, K)) * 3).astype(np.float16)
    u = rng.standard_normal((M, K)).astype(np.float16)
    u[:, rng.choice(K, size=max(1, K // 64), replace=False)] *= 30
    _, q, wscale, _ = data(M, K, N, seed=K, with_bias=False)
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(wscale, "ws")]
    ins, attrs = ["", "wq", "ws", "", "", ""], {}
    if rotation is not None:
        a, A, b, B = rotation
        if A == "R":
            at = np.zeros((-(-a // 16) * 16,) * 2)
            at[:a, :a] = hadamard_matrix(a).T / np.sqrt(a)
            inits.append(numpy_helper.from_array(at.astype(np.float16), "ra"))
            ins[4] = "ra"
        attrs = {"rotation_block": b, "rotation_walsh": (1 if B == "W" else 0) | (2 if A == "W" else 0)}

    def model(fused: bool):
        nodes, i = [], list(ins)
        if fused:
            i[0] = "g"
            i += ["u"]
            extra = {"input_glu": 1}
        else:
            nodes = [helper.make_node("Sigmoid", ["g"], ["s"]), helper.make_node("Mul", ["g", "s"], ["t"]),
                     helper.make_node("Mul", ["t", "u"], ["x"])]
            i[0] = "x"
            while i[-1] == "":
                i.pop()
            extra = {}
        nodes.append(helper.make_node(kernels.W8A8_LINEAR, i, ["y"], domain=kernels.DOMAIN, **attrs, **extra))
        graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, F16, ["M", K]) for n in ("g", "u")],
                                  [helper.make_tensor_value_info("y", F16, ["M", N])], inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(kernels.DOMAIN, 1)])
        m.ir_version = 9
        return _session(m, True, env)

    def run(sess):
        b = sess.io_binding()
        b.bind_ortvalue_input("g", ort.OrtValue.ortvalue_from_numpy(g, "cuda", 0))
        b.bind_ortvalue_input("u", ort.OrtValue.ortvalue_from_numpy(u, "cuda", 0))
        y = ort.OrtValue.ortvalue_from_numpy(np.full((M, N), np.nan, np.float16), "cuda", 0)
        b.bind_ortvalue_output("y", y)
        sess.run_with_iobinding(b)
        return y.numpy()

    got, want = run(model(True)), run(model(False))
    assert np.isfinite(got.astype(np.float32)).all(), "unwritten outputs"
    differ = np.mean(got != want)
    assert differ == 0, f"{differ:.2%} of the outputs differ (max {np.abs(got.astype(np.float32) - want).max()})"


# -- the asymmetric codes (attribute asymmetric = 1: int8-token-asym's arithmetic, kernels.h) ---------------------

def asym_op(K, sizes, q, wscale, *, bias=None, attrs=None, inputs=("x",), glu=False, norm=False):
    """A model of one asymmetric W8A8Linear: ``q`` [N, K], ``wscale`` the weights' steps (not / 127), Wsum their
    per-channel sums; outputs y0.. of ``sizes``; graph inputs ``inputs`` (x, or g and u with ``glu``, or x and skip
    with ``norm``: gamma ones)."""
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(wscale, "ws"),
             numpy_helper.from_array(q.astype(np.int64).sum(axis=1).astype(np.float32), "wsum")]
    ins = [inputs[0], "wq", "ws", "", "", "", "", "", "", "wsum"]
    a = {"asymmetric": 1, **(attrs or {})}
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
        ins[3] = "b"
    if glu:
        ins[6], a["input_glu"] = inputs[1], 1
    if norm:
        inits.append(numpy_helper.from_array(np.ones(K, np.float16), "gamma"))
        ins[7], ins[8], a["skip_norm"] = inputs[1], "gamma", 1
    if len(sizes) > 1:
        a["output_sizes"] = list(sizes)
    outs = [f"y{i}" for i in range(len(sizes))]
    node = helper.make_node(kernels.W8A8_LINEAR, ins, outs, domain=kernels.DOMAIN, **a)
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info(n, F16, ["M", K]) for n in inputs],
                          [helper.make_tensor_value_info(o, F16, ["M", n]) for o, n in zip(outs, sizes)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)])
    m.ir_version = 9
    return m


def run_named(sess, feeds, sizes):
    """Outputs y0.. (poisoned with NaN first) of a run with IOBinding, concatenated along the channels."""
    b = sess.io_binding()
    M = next(iter(feeds.values())).shape[0]
    for n, v in feeds.items():
        b.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0))
    ys = [ort.OrtValue.ortvalue_from_numpy(np.full((M, n), np.nan, np.float16), "cuda", 0) for n in sizes]
    for i, y in enumerate(ys):
        b.bind_ortvalue_output(f"y{i}", y)
    sess.run_with_iobinding(b)
    return np.concatenate([y.numpy() for y in ys], axis=1)


def asym_data(M, K, N, seed):
    """Rows for the asymmetric codes (an outlier channel, an all-zero token, a tiny one under the step's floor, one
    all positive, one all negative), int8 weights, their steps."""
    x, q, wscale, _ = data(M, K, N, seed, with_bias=False, tiny_row=False)
    if M > 2:
        x[2] = (x[2].astype(np.float32) * 1e-6).astype(np.float16)  # range under 255e-4: the step's floor
    if M > 3:
        x[3] = np.abs(x[3]) + np.float16(0.25)  # all positive: zero point 0
    if M > 4:
        x[4] = -np.abs(x[4]) - np.float16(0.25)  # all negative: zero point 255 (or 256, clipped in the codes)
    return x, q, (wscale * 127).astype(np.float32)


ASYM = [
    # (M, K, N, env): every path of the asymmetric codes
    (1, 4096, 11008, None),                                  # one-launch GEMV
    (3, 4096, 4096, None),                                   # one-launch GEMV, 4-row kernel
    (1, 2048, 32000, {"ONNXQF_GEMV_CONFIG": "3"}),           # another GEMV configuration
    (16, 11008, 4096, {"ONNXQF_GEMV_MAX_M": "16"}),          # quantization kernel + GEMV
    (16, 4096, 4096, None),                                  # GEMM small tile
    (333, 2048, 4096, None),                                 # GEMM by the rule, ragged M
    (2048, 4096, 4096, None),                                # GEMM at 2048 rows
    (2048, 4096, 4096, {"ONNXQF_QUANT_PIPE": "2"}),          # the striding quantization grid
    (777, 11008, 4096, {"ONNXQF_QUANT_REGS": "0"}),          # the block-per-row quantization kernel
    (40, 1024, 1004, None),                                  # N % 8 != 0: the GEMV at M > 16 (N % 4 == 0: the
                                                             # standard graph's cuBLAS wants ldc % 4 == 0)
    (5, 1000, 300, {"ONNXQF_GEMV_MAX_M": "0"}),              # K % 16 != 0: the any-shape kernel
] + [(m, 2048, 1032, {"ONNXQF_GEMM_TILE": str(t)}) for t, m in  # each tile, ragged tokens and channels
     ((0, 333), (1, 200), (2, 300), (3, 333), (4, 528), (5, 333), (6, 300), (7, 600), (8, 333), (9, 264), (10, 528),
      (11, 20), (12, 45))]


@pytest.mark.parametrize("M,K,N,env", ASYM)
def test_asymmetric_bit_exact_against_standard_graph(M, K, N, env):
    """asymmetric = 1: the same outputs as onnxqf's int8-token-asym graph (the same weights), every element to the
    bit, at every path (an all-zero token and an all-positive one among the rows)."""
    x, q, steps = asym_data(M, K, N, seed=M + 3 * K + N)
    ours = run_named(_session(asym_op(K, (N,), q, steps), True, env), {"x": x}, (N,))
    std = run_poisoned(_session(standard_graph(K, N, q, steps, "int8-token-asym"), False, None), x, N, out="y0")
    assert np.isfinite(ours.astype(np.float32)).all() and np.isfinite(std.astype(np.float32)).all()
    mismatches = int(np.sum(ours.view(np.uint16) != std.view(np.uint16)))  # the bits (-0 is not +0)
    assert mismatches == 0, (f"{mismatches} of {ours.size} differ, "
                             f"max {np.max(np.abs(ours.astype(np.float32) - std)):.3g}")


@pytest.mark.parametrize("M", [1, 3, 300])
def test_asymmetric_glu_norm_parts_and_bias(M):
    """asymmetric with input_glu (equal to the op fed by Sigmoid / Mul / Mul, to the bit), with output_sizes (equal
    to one output's columns, to the bit), with a bias (numpy's outputs to fp16 rounding), and with skip_norm (numpy's
    norm and codes, to fp16 rounding)."""
    from onnxqf.maths.qmath import asymmetric_codes_f16, asymmetric_dequant_f32

    K, sizes = 2048, (1024, 512, 512)
    N = sum(sizes)
    x, q, steps = asym_data(M, K, N, seed=M)
    u = np.random.default_rng(M).standard_normal((M, K)).astype(np.float16)
    one = run_named(_session(asym_op(K, (N,), q, steps), True, None), {"x": x}, (N,))
    parts = run_named(_session(asym_op(K, sizes, q, steps), True, None), {"x": x}, sizes)
    assert np.array_equal(one, parts)
    glu = run_named(_session(asym_op(K, (N,), q, steps, inputs=("g", "u"), glu=True), True, None),
                    {"g": x, "u": u}, (N,))
    silu = helper.make_model(helper.make_graph(
        [helper.make_node("Sigmoid", ["g"], ["s"]), helper.make_node("Mul", ["g", "s"], ["t"]),
         helper.make_node("Mul", ["t", "u"], ["x"])], "glu",
        [helper.make_tensor_value_info(n, F16, ["M", K]) for n in ("g", "u")],
        [helper.make_tensor_value_info("x", F16, ["M", K])]), opset_imports=[helper.make_opsetid("", 18)])
    silu.ir_version = 9
    xg = _session(silu, False, None).run(None, {"g": x, "u": u})[0]
    assert np.array_equal(glu, run_named(_session(asym_op(K, (N,), q, steps), True, None), {"x": xg}, (N,)))

    def numpy_asym(rows, bias=None):
        codes, s, zp = asymmetric_codes_f16(rows)
        acc = codes.astype(np.float64) @ q.T.astype(np.float64)
        y = asymmetric_dequant_f32(acc, s, zp, q.astype(np.int64).sum(axis=1), steps)
        return (y + (0 if bias is None else bias.astype(np.float32))).astype(np.float16)

    bias = np.random.default_rng(M + 1).standard_normal(N).astype(np.float16)
    with_bias = run_named(_session(asym_op(K, (N,), q, steps, bias=bias), True, None), {"x": x}, (N,))
    assert_close_to(with_bias.astype(np.float32), numpy_asym(x, bias).astype(np.float32))
    skip = np.random.default_rng(M + 2).standard_normal((M, K)).astype(np.float16)
    normed = run_named(_session(asym_op(K, (N,), q, steps, inputs=("x", "skip"), norm=True), True, None),
                       {"x": x, "skip": skip}, (N,))
    _, y = skip_norm_reference(x, skip, np.ones(K, np.float16), 1e-5)
    assert_close_to(normed.astype(np.float32), numpy_asym(y).astype(np.float32))


ASYM_ROTATED = [
    # (M, K, N, env): the asymmetric codes behind each rotation kernel
    (1, 4096, 1024, None),                            # 64 x 64 Walsh: inside the one-launch GEMV
    (3, 4096, 1024, None),                            # the same, three rows through one block's buffers
    (300, 4096, 1024, None),                          # the register transform kernel
    (1, 11008, 512, None),                            # 172 (dense) x 64 (Walsh): the rotated rows, then the GEMV
    (300, 11008, 512, None),                          # the one dense kernel, two groups
    (5, 11008, 512, {"ONNXQF_ROT_FUSED": "3"}),       # the one dense kernel, one group of 16 warps
    (300, 11008, 512, {"ONNXQF_ROT_FUSED": "0"}),     # the three kernels (D quantized per token)
    (37, 576, 256, {"ONNXQF_ROTATION_TILES": "1"}),   # the per-token tensor-core kernel
    (9, 96, 64, None),                                # one dense group (the per-token kernel)
]


@pytest.mark.parametrize("M,K,N,env", ASYM_ROTATED)
def test_asymmetric_rotation_inside_the_op_matches_the_standard_graph(M, K, N, env):
    """The asymmetric codes behind an online rotation taken into the op, against onnxqf's int8-token-asym graph with
    the rotation nodes on CUDA: the same outputs up to a code moved by one where a rotated value rounds the other
    way in fp16; outputs poisoned first."""
    import onnx_ir as ir

    from onnxqf.runtime.linears import linear_model, parse_lowering

    rng = np.random.default_rng(M + K + 1)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, rng.choice(K, size=max(1, K // 64), replace=False)] *= 30
    x = (x + 0.5).astype(np.float16)  # off-centre: the zero points matter
    fused = linear_model(K, N, parse_lowering("onnxqf-cuda:asymmetric=true"), copies=1, dtype="float16",
                         rotate=True)
    assert "MatMul" not in [n.op_type for n in fused.graph]
    standard = linear_model(K, N, parse_lowering("int8-token-asym"), copies=1, dtype="float16", rotate=True)
    got = run_poisoned(_session(ir.serde.serialize_model(fused), True, env), x, N, out="y0").astype(np.float32)
    want = run_poisoned(_session(ir.serde.serialize_model(standard), False, None), x, N, out="y0").astype(np.float32)
    assert_close_to(got, want)


def test_asymmetric_refusals():
    """Wsum without asymmetric, or asymmetric without Wsum, fail the run in one error."""
    K, N = 1024, 256
    x, q, steps = asym_data(1, K, N, seed=3)
    no_wsum = asym_op(K, (N,), q, steps)
    del no_wsum.graph.node[0].input[9]
    with pytest.raises(Exception, match="Wsum is given exactly when"):
        _session(no_wsum, True, None).run(None, {"x": x})
    sym_with_wsum = asym_op(K, (N,), q, steps)
    del sym_with_wsum.graph.node[0].attribute[:]
    with pytest.raises(Exception, match="Wsum is given exactly when"):
        _session(sym_with_wsum, True, None).run(None, {"x": x})
