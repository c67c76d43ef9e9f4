"""The command line: bad input gives one line and a non-zero exit, and never touches the input."""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "onnxqf.cli", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def listing(d):
    return sorted(os.listdir(d))


def copy_model(src, dst_dir):
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst_dir / src.name)
    shutil.copy(str(src) + ".data", dst_dir / (src.name + ".data"))
    return dst_dir / src.name


def assert_one_line_error(rc, err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("onnxqf: error:"), err


def test_help_lists_commands():
    rc, out, _ = run_cli("--help")
    assert rc == 0
    for cmd in ("export", "rewrite", "eval", "check"):
        assert cmd in out
    rc, out, _ = run_cli("rewrite", "--help")
    assert rc == 0 and "--hybrid" in out and "--act-quant" in out


def test_not_onnx(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a model\n" * 10)
    before = digest(bad)
    rc, _, err = run_cli("rewrite", bad, "--rotate", "-o", tmp_path / "out.onnx")
    assert_one_line_error(rc, err)
    assert digest(bad) == before
    assert listing(tmp_path) == ["model.onnx"]


def test_truncated(tiny_models, tmp_path):
    src = copy_model(tiny_models["llama-gqa"], tmp_path / "in")
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    rc, _, err = run_cli("rewrite", src, "--rotate", "--quant", "none", "-o", tmp_path / "out.onnx")
    assert_one_line_error(rc, err)
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_external_data(tiny_models, tmp_path):
    src = copy_model(tiny_models["llama-gqa"], tmp_path / "in")
    data_file = src.with_name(src.name + ".data")
    data_file.write_bytes(data_file.read_bytes()[:1000])
    rc, _, err = run_cli("rewrite", src, "-o", tmp_path / "out.onnx")
    assert_one_line_error(rc, err)
    assert "truncated" in err


def test_missing_external_data(tiny_models, tmp_path):
    src = copy_model(tiny_models["llama-gqa"], tmp_path / "in")
    os.remove(str(src) + ".data")
    before = digest(src)
    rc, _, err = run_cli("rewrite", src, "--rotate", "-o", tmp_path / "out.onnx")
    assert_one_line_error(rc, err)
    assert "missing" in err
    assert digest(src) == before
    assert listing(tmp_path) == ["in"]


def test_non_llm_graph(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), path)
    rc, _, err = run_cli("rewrite", path, "--rotate", "-o", tmp_path / "out.onnx")
    assert_one_line_error(rc, err)
    assert "embedding" in err
    assert listing(tmp_path) == ["relu.onnx"]


def test_output_would_overwrite_input(tiny_models, tmp_path):
    src = copy_model(tiny_models["llama-gqa"], tmp_path / "in")
    rc, _, err = run_cli("rewrite", src, "-o", src)
    assert_one_line_error(rc, err)


@pytest.mark.parametrize("args", [
    ["--act-quant", "bogus"], ["--alpha", "2"], ["--alpha", "x"], ["--calib-windows", "0"],
])
def test_bad_options_rejected_by_parser(tiny_models, args):
    rc, _, err = run_cli("rewrite", tiny_models["llama-gqa"], *args)
    assert rc == 2 and "error" in err


@pytest.mark.parametrize("args,msg", [
    (["--hybrid", "--rotate"], "--hybrid"),
    (["--quant", "none"], "nothing to do"),
    (["--asymmetric"], "--asymmetric applies to the weight-only formats"),
    (["--rotate", "offline", "--smooth"], "--hybrid"),
])
def test_bad_option_combinations(tiny_models, tmp_path, args, msg):
    rc, _, err = run_cli("rewrite", tiny_models["llama-gqa"], *args, "-o", tmp_path / "o.onnx")
    assert_one_line_error(rc, err)
    assert msg in err


def test_rewrite_and_eval_end_to_end(tiny_models, ids_file, tmp_path):
    src = copy_model(tiny_models["llama-gqa"], tmp_path / "in")
    before = digest(src), digest(str(src) + ".data")
    out = tmp_path / "out" / "q.onnx"
    rc, stdout, err = run_cli("rewrite", src, "--hybrid", "--calib", ids_file, "--calib-seq", "128", "-q", "-o", out)
    assert rc == 0, err
    assert stdout.strip() == str(out)
    assert (digest(src), digest(str(src) + ".data")) == before
    assert sorted(os.listdir(out.parent)) == ["q.onnx", "q.onnx.data"]  # nothing partial left
    rc, stdout, err = run_cli("eval", src, out, "--tokens", ids_file, "--windows", "2", "--seq", "128", "--json")
    assert rc == 0, err
    import json

    r = json.loads(stdout)
    assert {"kl", "ppl_orig", "ppl_new", "top1", "tokens"} <= set(r)
    assert r["tokens"] == 256 and 0 <= r["kl"] < 0.01
    rc, _, _ = run_cli("eval", src, out, "--tokens", ids_file, "--windows", "2", "--seq", "128", "--json",
                       "--max-kl", "0")
    assert rc == 1


def test_check_cpu_and_unavailable_cuda(tiny_models):
    rc, out, _ = run_cli("check", tiny_models["llama-gqa"], "--ep", "cpu")
    assert rc == 0 and "OK" in out
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        rc, out, _ = run_cli("check", tiny_models["llama-gqa"], "--ep", "cuda")
        assert rc == 3 and "skipped" in out


def test_eval_rejects_out_of_vocab_ids(tiny_models, tmp_path):
    bad = tmp_path / "ids.npy"
    np.save(bad, np.array([1, 2, 100000] * 100))
    rc, _, err = run_cli("eval", tiny_models["llama-gqa"], tiny_models["llama-gqa"], "--tokens", bad, "--seq", "16")
    assert_one_line_error(rc, err)


def test_placement_baseline_counts_only_added_nodes():
    from onnxqf.runtime.placement import compare_to_baseline, format_placement

    def result(off, memcpy=()):
        return {"provider": "CUDAExecutionProvider", "onnxruntime": "x", "nodes": {}, "off_provider_ops": off,
                "memcpy": list(memcpy), "strict_session_error": "fallback disabled", "status": "fallback"}

    base = result({"CPUExecutionProvider": {"Gather": 1, "Cast": 1}})
    same = compare_to_baseline(result({"CPUExecutionProvider": {"Gather": 1, "Cast": 1}}), base)
    assert same["status"] == "ok" and same["added_off_provider_ops"] == {}
    assert "adds no node" in format_placement(same)
    more = compare_to_baseline(result({"CPUExecutionProvider": {"Gather": 1, "Cast": 2, "MatMulInteger": 3}}), base)
    assert more["status"] == "fallback"
    assert more["added_off_provider_ops"] == {"CPUExecutionProvider": {"Cast": 1, "MatMulInteger": 3}}
    assert "MatMulInteger x3" in format_placement(more)
    copies = compare_to_baseline(result({"CPUExecutionProvider": {"Gather": 1}}, memcpy=["Memcpy_1"]), base)
    assert copies["status"] == "fallback"


def test_rewrite_option_errors_come_before_any_work(tmp_path, capsys):
    """A bad --lowering or --online-rotation is one line and exit 2 before the model is even read."""
    from onnxqf.cli import main

    missing = tmp_path / "no-such-model.onnx"
    for extra, message in ((["--lowering", "nope"], "unknown lowering 'nope'"),
                           (["--lowering", "matmulnbits"], "is not a W8A8 lowering"),
                           (["--online-rotation", "fast"], "--online-rotation"),
                           (["--act-quant", "asym", "--asymmetric"], "--asymmetric applies to the weight-only")):
        assert main(["rewrite", str(missing), *extra, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
