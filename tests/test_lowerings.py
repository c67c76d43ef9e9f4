"""Every registered W8A8 lowering on one-linear graphs (the lowerings' own round/emit, onnxqf.runtime.linears):
the symmetric ones compute the same products as int8 x int8, the asymmetric ones stay close to float, and the
iterative refinement of each token's scale and zero point does not do worse than min/max codes."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxqf.lowering.base import names
from onnxqf.runtime.linears import linear_model, parse_lowering

CPU_LOWERINGS = [n for n in names("int8") if not n.startswith("onnxqf-")]  # custom ops: test_cpu_kernels, GPU tests


def _outputs(model, x):
    proto = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    return np.stack(session.run(None, {session.get_inputs()[0].name: x}))


@pytest.fixture(scope="module")
def activations():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 64)).astype(np.float32)
    x[:, 5] *= 20.0  # an outlier channel, as in real LLM activations
    x[3] += 4.0  # a token whose values are far from symmetric around 0
    return x


@pytest.mark.parametrize("name", CPU_LOWERINGS)
def test_w8a8_lowering_close_to_float(name, activations):
    ref = _outputs(linear_model(64, 48, None, copies=2, seed=1), activations)
    out = _outputs(linear_model(64, 48, parse_lowering(name), copies=2, seed=1), activations)
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert 0 < err < (0.1 if name == "uint8-tensor" else 0.03), err


def test_symmetric_lowerings_are_the_same_products(activations):
    base = _outputs(linear_model(64, 48, parse_lowering("int8-token"), copies=2, seed=1), activations)
    for name in ("uint8-token", "uint8-token-ql"):
        out = _outputs(linear_model(64, 48, parse_lowering(name), copies=2, seed=1), activations)
        # uint8-token: the same int32 sums; -ql rounds x / (amax/127) instead of x * (127/amax): last-bit ties only
        np.testing.assert_allclose(out, base, rtol=0, atol=1e-5 * np.abs(base).max())


def test_iterative_refinement_is_no_worse_than_min_max(activations):
    ref = _outputs(linear_model(64, 48, None, copies=4, seed=2), activations)
    errs = {}
    for name in ("uint8-token-asym", "uint8-token-iter", "int8-token-asym", "int8-token-iter"):
        out = _outputs(linear_model(64, 48, parse_lowering(name), copies=4, seed=2), activations)
        errs[name] = float(np.mean((out - ref) ** 2))
    assert errs["uint8-token-iter"] <= errs["uint8-token-asym"] * 1.02, errs
    # the int8 storage of the same codes (code - 128, CUDA's int8 x int8) computes the same values
    assert errs["int8-token-iter"] == pytest.approx(errs["uint8-token-iter"], rel=1e-3)
    assert errs["int8-token-asym"] == pytest.approx(errs["uint8-token-asym"], rel=1e-3)


def test_float16_token_codes_are_finite_for_zero_and_tiny_tokens():
    """In float16 the per-token 127 / amax must stay finite: under a floor below 2^-9 a token with max|x| < 127/65504
    gets 127 / amax = inf, x * inf = +-inf codes (and 0 * inf = NaN for its zeros), whose int8 Cast is
    implementation-defined (CUDA saturates). Evaluated in float16 arithmetic (onnx's reference evaluator: numpy,
    each node in its own type; ONNX Runtime's CPU provider computes these float16 nodes in float32, CUDA's in
    float16). A zero token's outputs are 0, a tiny token's finite and tiny."""
    from onnx.reference import ReferenceEvaluator

    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float16)
    x[1] = 0.0
    x[2] *= np.float16(1e-4)
    model = linear_model(64, 48, parse_lowering("int8-token"), copies=1, dtype="float16", seed=1)
    with np.errstate(all="ignore"):
        out = ReferenceEvaluator(ir.serde.serialize_model(model)).run(None, {"x": x})[0]
    assert np.isfinite(out.astype(np.float32)).all()
    assert not out[1].any()
    assert 0 < np.abs(out[2]).max() < 1e-3 * np.abs(out[0]).max()


UINT8_ACTIVATIONS = [n for n in CPU_LOWERINGS if parse_lowering(n).uint8_activations]


@pytest.mark.parametrize("name", UINT8_ACTIVATIONS)
def test_uint8_weights_compute_the_same_products(name, activations):
    """``uint8_weights``: the weights stored as w + 128 (uint8) with zero point 128, which ONNX Runtime's CPU
    multiplies without the int16 saturation of its u8 x s8 kernel on AVX2 CPUs without VNNI. The symmetric ones give
    the int8 x int8 products (float rounding apart), every one stays close to float."""
    model = linear_model(64, 48, parse_lowering(f"{name}:uint8_weights=true"), copies=2, seed=1)
    inits = model.graph.initializers
    assert any(v.const_value.dtype == ir.DataType.UINT8 and ".weight_uint8" in k for k, v in inits.items())
    assert not any(".weight_int8" in k for k in inits)
    out = _outputs(model, activations)
    ref = _outputs(linear_model(64, 48, None, copies=2, seed=1), activations)
    assert np.abs(out - ref).max() / np.abs(ref).max() < (0.1 if name == "uint8-tensor" else 0.03)
    if name in ("uint8-token", "uint8-token-ql"):
        same = _outputs(linear_model(64, 48, parse_lowering("int8-token"), copies=2, seed=1), activations)
        np.testing.assert_allclose(out, same, rtol=1e-5, atol=1e-5 * np.abs(same).max())


@pytest.mark.parametrize("saturates", [False, True])
def test_cpu_target_takes_uint8_weights_where_u8s8_saturates(saturates, monkeypatch):
    """The CPU target's W8A8 lowering and ``parse_lowering`` choose uint8 weights exactly where the probe of the
    local ONNX Runtime finds the u8 x s8 saturation; ``check --ep cpu`` (node_issues) flags int8 weights there."""
    from onnxqf.lowering.base import get
    from onnxqf.options import W8A8
    from onnxqf.runtime import target

    monkeypatch.setattr(target, "u8s8_saturates", lambda: saturates)
    assert target.get_target("cpu").lowering(W8A8()).uint8_weights is saturates
    assert parse_lowering("uint8-token").uint8_weights is saturates
    assert target.get_target("cuda").lowering(W8A8()).uint8_weights is False
    assert parse_lowering("int8-token").uint8_weights is False  # int8 activations: no such choice
    int8_weights = linear_model(64, 48, get("uint8-token")(), copies=1, seed=1)
    issues = target.get_target("cpu").node_issues(int8_weights)
    assert any("saturate" in i for i in issues) is saturates
    uint8_weights = linear_model(64, 48, get("uint8-token")(uint8_weights=True), copies=1, seed=1)
    assert not any("saturate" in i for i in target.get_target("cpu").node_issues(uint8_weights))
