"""onnxqf.runtime.linears (`onnxqf bench --linears`): one-linear graphs through the registered lowerings, on the CPU
at tiny shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxqf.cli import main
from onnxqf.errors import OnnxqfError
from onnxqf.runtime.linears import (
    LinearsOptions,
    bench_linears,
    format_linears,
    linear_model,
    parse_counts,
    parse_lowering,
    parse_shapes,
)


def op_types(model) -> list[str]:
    return [node.op_type for node in model.graph]


def test_parse():
    assert parse_shapes("64:96, 96:64") == ((64, 96), (96, 64))
    assert parse_counts("1,16,256") == (1, 16, 256)
    for bad in ("64", "64:x", "0:4", ""):
        with pytest.raises(OnnxqfError):
            parse_shapes(bad)
    with pytest.raises(OnnxqfError):
        parse_counts("1,0")
    assert parse_lowering("float") is None
    q = parse_lowering("matmulnbits:bits=8:block_size=16:symmetric=false")
    assert (q.bits, q.block_size, q.symmetric, q.accuracy_level) == (8, 16, False, 0)
    assert parse_lowering("matmulnbits", ep="cpu").accuracy_level == 4  # the target's, as rewrite --ep gives it
    assert parse_lowering("matmulnbits", ep="cuda").accuracy_level == 0
    assert parse_lowering("matmulnbits:accuracy_level=0", ep="cpu").accuracy_level == 0
    assert parse_lowering("int8-token").name == "int8-token"
    for bad in ("nope", "int8-token:bits=4", "matmulnbits:bits=x", "float:bits=4"):
        with pytest.raises(OnnxqfError):
            parse_lowering(bad)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_linear_model_is_the_lowerings_emission(dtype):
    float_model = linear_model(32, 48, None, copies=3, dtype=dtype)
    assert op_types(float_model) == ["MatMul"] * 3
    assert [v.name for v in float_model.graph.outputs] == ["y0", "y1", "y2"]
    w8 = linear_model(32, 48, parse_lowering("int8-token"), copies=3, dtype=dtype)
    ops = op_types(w8)
    # x quantized per copy
    assert "MatMul" not in ops and ops.count("MatMulInteger") == 3 and ops.count("ReduceMax") == 3
    nb = linear_model(32, 48, parse_lowering("matmulnbits"), copies=3, dtype=dtype)
    assert op_types(nb) == ["MatMulNBits"] * 3 and nb.graph.opset_imports["com.microsoft"] == 1
    assert [v.name for v in nb.graph.outputs] == ["y0", "y1", "y2"]
    # the same seed, the same weights whatever the lowering
    a, b = linear_model(8, 4, None, copies=2, seed=3), linear_model(8, 4, None, copies=2, seed=3)
    for name, value in a.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), b.graph.initializers[name].const_value.numpy())


def test_bench_linears_cpu():
    opts = LinearsOptions(shapes=((32, 48), (48, 32)), ms=(1, 4), copies=2, repeats=2, warmup=1,
                          lowerings=("uint8-token", "int8-token", "matmulnbits", "matmulnbits:bits=8"))
    lines = []
    r = bench_linears(opts, progress=lines.append)
    assert len(lines) == len(r["rows"]) == 10
    rows = {(row["K"], row["lowering"]): row for row in r["rows"]}
    assert [row["lowering"] for row in r["rows"][:5]] == ["float", "uint8-token", "int8-token", "matmulnbits",
                                                          "matmulnbits:bits=8"]
    for (K, spec), row in rows.items():
        assert set(row["ms"]) == {"1", "4"} and all(s["median"] > 0 and s["n"] == 2 for s in row["ms"].values())
        assert set(row["speedup"]) == {"1", "4"}
        bound = {"float": 0.0, "uint8-token": 0.03, "int8-token": 0.03, "matmulnbits": 0.3,
                 "matmulnbits:bits=8": 0.03}[spec]
        assert row["error"] <= bound, (K, spec, row["error"])
    # uint8 codes shifted by 128 with zero point 128: the same products as int8 x int8
    assert rows[(32, "uint8-token")]["error"] == pytest.approx(rows[(32, "int8-token")]["error"], rel=1e-5)
    assert rows[(32, "float")]["speedup"]["1"] == 1.0
    table = format_linears(r)
    assert "| 32 -> 48 | uint8-token | default |" in table and "x = float time / this" in table
    json.dumps(r)


def test_bench_linears_cli(capsys):
    assert main(["bench", "--linears", "16:24", "--m", "1,2", "--lowerings", "uint8-token,float", "--copies", "2",
                 "--repeats", "1", "--warmup", "0", "--dtype", "float16", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["dtype"] == "float16" and [row["lowering"] for row in r["rows"]] == ["float", "uint8-token"]
    assert main(["bench", "x.onnx", "--linears", "16:24"]) == 2
    assert "give no MODEL" in capsys.readouterr().err
    assert main(["bench", "--linears", "16:24", "--m", "0"]) == 2
    assert main(["bench"]) == 2


def test_nbits_kernel_both_rows():
    """--nbits-kernel both: MatMulNBits rows twice (default, fpa-intb), other rows once; the CUDA-only variable
    changes nothing on the CPU, so both rows compute the same product."""
    opts = LinearsOptions(shapes=((32, 64),), ms=(1,), copies=1, repeats=1, warmup=0, nbits_kernel="both",
                          lowerings=("int8-token", "matmulnbits", "matmulnbits:symmetric=false"))
    rows = bench_linears(opts)["rows"]
    assert [(r["lowering"], r["kernel"]) for r in rows] == [
        ("float", "default"), ("int8-token", "default"), ("matmulnbits", "default"), ("matmulnbits", "fpa-intb"),
        ("matmulnbits:symmetric=false", "default"), ("matmulnbits:symmetric=false", "fpa-intb")]
    assert rows[2]["error"] == rows[3]["error"] and rows[4]["error"] == rows[5]["error"]
    with pytest.raises(OnnxqfError):
        LinearsOptions(nbits_kernel="fast")
