"""`onnxqf bench`: prefill and KV-cache decode on the CPU with tiny graphs, and one clear line for bad input.

Also runs scripts/gpu_bench.py (linears, online rotations, rewritten decoders) at tiny shapes on the CPU, so
the GPU run exercises no untested path.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxqf.cli import main
from onnxqf.errors import OnnxqfError
from onnxqf.runtime.bench import BenchOptions, describe, format_table, parse_past, run_bench

ROOT = Path(__file__).resolve().parents[1]
VOCAB, KV_HEADS, HEAD_DIM, LAYERS = 32, 2, 4, 2


def kv_graph(path: Path, *, positions: bool = True, broken_present: bool = False, dtype=TensorProto.FLOAT) -> Path:
    """A tiny graph in the onnxruntime-genai layout: ids (+ positions) -> x; per layer present = Concat(past, k(x)),
    attention of x over present with the attention_mask as a bias; logits = MatMul(out, W).

    The mask bias is [B, 1, 1, T_mask] against scores [B, heads, S, T_present]: a decode loop that does not feed
    each present back as the next past (or grows the mask wrongly) fails with a broadcast error.
    ``broken_present`` concatenates the past twice, so decode fails at its first step.
    """
    rng = np.random.default_rng(0)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    hidden = KV_HEADS * HEAD_DIM
    inits = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, hidden)).astype(np_dtype), "embed"),
        numpy_helper.from_array(rng.standard_normal((64, hidden)).astype(np_dtype), "pos_embed"),
        numpy_helper.from_array(rng.standard_normal((hidden, VOCAB)).astype(np_dtype), "lm_head"),
        numpy_helper.from_array(np.array([0, 0, KV_HEADS, HEAD_DIM], np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([0, 0, hidden], np.int64), "hidden_shape"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
        numpy_helper.from_array(np.array(1.0, np_dtype), "one"),
        numpy_helper.from_array(np.array(-1e4, np_dtype), "neg"),
    ]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["x0"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    if positions:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
        nodes += [helper.make_node("Gather", ["pos_embed", "position_ids"], ["xp"]),
                  helper.make_node("Add", ["x0", "xp"], ["x"])]
    else:
        nodes.append(helper.make_node("Identity", ["x0"], ["x"]))
    nodes += [
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=dtype),
        helper.make_node("Sub", ["one", "maskf"], ["inv"]),
        helper.make_node("Mul", ["inv", "neg"], ["bias2"]),
        helper.make_node("Unsqueeze", ["bias2", "axes12"], ["bias"]),
        helper.make_node("Reshape", ["x", "heads_shape"], ["xh"]),
        helper.make_node("Transpose", ["xh"], ["q"], perm=[0, 2, 1, 3]),
    ]
    outputs = [helper.make_tensor_value_info("logits", dtype, ["batch", "seq", VOCAB])]
    h = "q"
    for i in range(LAYERS):
        for kind in ("key", "value"):
            past, present = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"
            inputs.append(helper.make_tensor_value_info(past, dtype, ["batch", KV_HEADS, "past", HEAD_DIM]))
            outputs.append(helper.make_tensor_value_info(present, dtype, ["batch", KV_HEADS, "total", HEAD_DIM]))
            parts = [past, past, "q"] if broken_present else [past, "q"]
            nodes.append(helper.make_node("Concat", parts, [present], axis=2))
        nodes += [
            helper.make_node("Transpose", [f"present.{i}.key"], [f"kt{i}"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [h, f"kt{i}"], [f"s{i}"]),
            helper.make_node("Add", [f"s{i}", "bias"], [f"sb{i}"]),
            helper.make_node("Softmax", [f"sb{i}"], [f"p{i}"], axis=-1),
            helper.make_node("MatMul", [f"p{i}", f"present.{i}.value"], [f"h{i}"]),
        ]
        h = f"h{i}"
    nodes += [
        helper.make_node("Transpose", [h], ["ht"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ht", "hidden_shape"], ["hs"]),
        helper.make_node("MatMul", ["hs", "lm_head"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "tiny_kv", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def plain_graph(path: Path, output: str = "logits") -> Path:
    """input_ids -> Gather -> MatMul -> ``output``."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, 8)).astype(np.float32), "embed"),
             numpy_helper.from_array(rng.standard_normal((8, VOCAB)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["x"]),
             helper.make_node("MatMul", ["x", "w"], [output])]
    graph = helper.make_graph(nodes, "plain",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["b", "s", VOCAB])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
    return path


FAST = BenchOptions(ep="cpu", batch=2, seq=4, past=(0, 3), decode_tokens=3, repeats=2, warmup=1, progress=False)


def one_line_error(capsys, rc: int, expected_rc: int = 2) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == expected_rc, err
    assert len(lines) == 1 and lines[0].startswith("onnxqf: error:"), err
    return lines[0]


def test_describe_kv_layout(tmp_path):
    io = describe(kv_graph(tmp_path / "kv.onnx")).io
    assert io.has_cache and (io.kv_heads, io.head_dim, io.vocab) == (KV_HEADS, HEAD_DIM, VOCAB)
    assert io.cache[0] == ("past_key_values.0.key", "present.0.key") and len(io.cache) == 2 * LAYERS
    assert io.mask == "attention_mask" and io.positions == "position_ids" and io.cache_dtype == np.float32


def test_kv_decode_loop_feeds_presents(tmp_path):
    kv = kv_graph(tmp_path / "kv.onnx")
    kv_nopos = kv_graph(tmp_path / "kv_nopos.onnx", positions=False)
    r = run_bench([str(kv), str(kv_nopos)], FAST)
    assert [m["name"] for m in r["models"]] == ["kv", "kv_nopos"] and r["models"][0]["reference"]
    for row in r["models"]:
        assert row["kv_cache"] and set(row["decode"]) == {"0", "3"}
        for d in row["decode"].values():
            s = d["tokens_per_s"]
            assert s["n"] == 2 and 0 < s["min"] <= s["median"] <= s["max"]
        assert row["prefill_ms"]["median"] > 0
    assert r["models"][0]["speedup"]["prefill"] == pytest.approx(1.0)
    assert r["models"][0]["speedup"]["decode"]["3"] == pytest.approx(1.0)
    assert r["models"][1]["speedup"]["decode"]["3"] > 0
    table = format_table(r)
    assert "decode past 3 tok/s" in table and "kv (ref)" in table


def test_fixed_buffer_decode_step(tmp_path):
    """The CUDA-graph decode step binds every output to a fixed buffer of the step's shape (run here on the CPU,
    without a graph): a graph whose present is not past + 1 long is refused, and --cuda-graph needs CUDA."""
    from onnxqf.runtime.bench import measure_decode_step_graph
    from onnxqf.runtime.session import make_session

    kv = kv_graph(tmp_path / "kv.onnx")
    io = describe(kv).io
    speeds = measure_decode_step_graph(make_session(kv), io, batch=2, past=5, warmup=1, repeats=3, steps=2,
                                       device="cpu")
    assert len(speeds) == 3 and min(speeds) > 0
    broken = kv_graph(tmp_path / "broken.onnx", broken_present=True)
    with pytest.raises(Exception):
        measure_decode_step_graph(make_session(broken), describe(broken).io, batch=1, past=5, warmup=0, repeats=1,
                                  steps=1, device="cpu")
    with pytest.raises(OnnxqfError, match="--cuda-graph needs --ep cuda"):
        run_bench([str(kv)], BenchOptions(ep="cpu", cuda_graph=True, progress=False))


def test_kv_fp16_cache(tmp_path):
    kv16 = kv_graph(tmp_path / "kv16.onnx", dtype=TensorProto.FLOAT16)
    assert describe(kv16).io.cache_dtype == np.float16
    r = run_bench([str(kv16)], BenchOptions(ep="cpu", seq=3, past=(2,), decode_tokens=2, repeats=1, warmup=0,
                                            progress=False))
    assert r["models"][0]["decode"]["2"]["tokens_per_s"]["median"] > 0


def test_plain_models_and_ref(tiny_models, tmp_path, capsys):
    a, b = tiny_models["llama-gqa"], tiny_models["llama-tied"]
    kv = kv_graph(tmp_path / "kv.onnx")
    rc = main(["bench", str(b), str(kv), "--ref", str(a), "--ep", "cpu", "--seq", "8", "--past", "4",
               "--decode-tokens", "2", "--repeats", "2", "--warmup", "1", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    r = json.loads(out)
    assert [m["name"] for m in r["models"]] == ["llama-gqa", "llama-tied", "kv"]
    ref, plain, withkv = r["models"]
    assert ref["reference"] and ref["decode"] is None and ref["decode_note"] == "n/a (no KV cache)"
    assert plain["decode"] is None and plain["speedup"]["prefill"] > 0
    assert withkv["decode"]["4"]["tokens_per_s"]["median"] > 0
    assert withkv["speedup"]["decode"]["4"] is None  # the reference has no cache to compare with
    rc = main(["bench", str(a), "--ep", "cpu", "--seq", "4", "--repeats", "1", "--warmup", "0", "-q"])
    table = capsys.readouterr().out
    assert rc == 0 and "n/a (no KV cache)" in table and "| llama-gqa (ref) |" in table


def test_genai_folder(tmp_path):
    """A real onnxruntime-genai graph (GroupQueryAttention; head_dim symbolic, read from genai_config.json)."""
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("transformers")
    from onnxqf.models.genai_export import export_genai

    from tiny import save_byte_tokenizer, tiny_model

    model = tiny_model("llama-gqa")
    model.save_pretrained(str(tmp_path / "hf"))
    save_byte_tokenizer(tmp_path / "hf")
    graph = export_genai(str(tmp_path / "hf"), tmp_path / "gen" / "model.onnx")
    io = describe(graph.parent).io  # the folder works as well as its model.onnx
    assert io.has_cache and (io.kv_heads, io.head_dim) == (2, 16) and io.path == str(graph)
    r = run_bench([str(graph.parent)], BenchOptions(ep="cpu", seq=8, past=(4, 16), decode_tokens=3, repeats=2, warmup=1,
                                                    progress=False))
    assert all(r["models"][0]["decode"][p]["tokens_per_s"]["median"] > 0 for p in ("4", "16"))


def test_shared_cache_as_genai_binds_it(tmp_path, capsys):
    """A builder folder (GroupQueryAttention, genai_config.json's past_present_share_buffer true): bench binds one
    buffer per cache input as past and present, as onnxruntime-genai does. Three decode steps that way give the
    logits of three steps feeding each present back as the next past; --cache separate / auto / shared pick the
    binding, and shared is refused for a graph without GroupQueryAttention."""
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("transformers")
    from onnxqf.models.genai_export import export_genai
    from onnxqf.runtime.bench import bind_cache, measure_decode_step_graph, past_arrays, shared_cache_buffers
    from onnxqf.runtime.session import make_session, ort

    from tiny import save_byte_tokenizer, tiny_model

    model = tiny_model("llama-gqa")
    model.save_pretrained(str(tmp_path / "hf"))
    save_byte_tokenizer(tmp_path / "hf")
    folder = export_genai(str(tmp_path / "hf"), tmp_path / "gen" / "model.onnx").parent
    described = describe(folder)
    assert described.gqa and described.shares_cache
    io, rt = described.io, ort()
    session = make_session(io.path)
    rng = np.random.default_rng(1)
    past, steps = 5, 3
    start = past_arrays(io, rng, 1, past)
    tokens = rng.integers(0, 100, (steps, 1, 1)).astype(np.int64)

    def step_feeds(t):
        feeds = {io.ids: tokens[t], io.mask: np.ones((1, past + t + 1), np.int64)}
        if io.positions:
            feeds[io.positions] = np.full((1, 1), past + t, np.int64)
        return {k: rt.OrtValue.ortvalue_from_numpy(v, "cpu", 0) for k, v in feeds.items()}

    logits = {}
    for shared in (False, True):
        cur = ([rt.OrtValue.ortvalue_from_numpy(np.pad(start, ((0, 0), (0, 0), (0, steps), (0, 0))), "cpu", 0)
                for _ in io.cache] if shared else [rt.OrtValue.ortvalue_from_numpy(start, "cpu", 0) for _ in io.cache])
        out = []
        for t in range(steps):
            binding = session.io_binding()
            for k, v in step_feeds(t).items():
                binding.bind_ortvalue_input(k, v)
            binding.bind_output(io.logits, "cpu", 0)
            bind_cache(binding, io, cur, shared, "cpu")
            session.run_with_iobinding(binding)
            got = binding.get_outputs()
            out.append(got[0].numpy().copy())
            if not shared:
                cur = list(got)[1:]
        logits[shared] = np.stack(out)
    np.testing.assert_allclose(logits[True], logits[False], rtol=1e-5, atol=1e-5)
    buffers = shared_cache_buffers(rt, io, rng, 1, past, past + 2, "cpu")
    assert buffers[0].shape() == [1, io.kv_heads, past + 2, io.head_dim]
    assert not np.any(buffers[0].numpy()[:, :, past:]) and np.all(np.abs(buffers[0].numpy()[:, :, :past]) > 0)
    assert min(measure_decode_step_graph(session, io, batch=1, past=4, warmup=0, repeats=2, steps=2, device="cpu",
                                         shared=True)) > 0

    opts = {"ep": "cpu", "seq": 8, "past": (4,), "decode_tokens": 3, "repeats": 2, "warmup": 1, "progress": False}
    auto = run_bench([str(folder)], BenchOptions(**opts))
    separate = run_bench([str(folder)], BenchOptions(**opts, cache="separate"))
    assert auto["models"][0]["cache"] == "shared" and separate["models"][0]["cache"] == "separate"
    assert auto["models"][0]["decode"]["4"]["tokens_per_s"]["median"] > 0
    assert "one past/present buffer per input" in format_table(auto)
    kv = kv_graph(tmp_path / "kv.onnx")
    assert not describe(kv).gqa and run_bench([str(kv)], BenchOptions(**opts))["models"][0]["cache"] == "separate"
    capsys.readouterr()  # the export's progress
    line = one_line_error(capsys, main(["bench", str(kv), "--ep", "cpu", "--cache", "shared", "-q"]))
    assert "--cache shared needs GroupQueryAttention" in line


def test_no_logits_output(tmp_path, capsys):
    line = one_line_error(capsys, main(["bench", str(plain_graph(tmp_path / "y.onnx", output="y")), "--ep", "cpu"]))
    assert "no 'logits' output" in line


def test_bad_files(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model\n" * 10)
    assert "not a readable ONNX model" in one_line_error(capsys, main(["bench", str(bad), "--ep", "cpu"]))
    assert "no such file" in one_line_error(capsys, main(["bench", str(tmp_path / "missing.onnx"), "--ep", "cpu"]))
    # the reference is checked like the models, before anything is measured
    ok = plain_graph(tmp_path / "ok.onnx")
    assert "no such file" in one_line_error(capsys, main(["bench", str(ok), "--ref", str(tmp_path / "nope.onnx")]))
    assert "--past" in one_line_error(capsys, main(["bench", str(ok), "--past", "12,x"]))


def test_unsupported_inputs(tmp_path, capsys):
    m = onnx.load(str(kv_graph(tmp_path / "kv.onnx")))
    m.graph.output.remove(next(o for o in m.graph.output if o.name == "present.1.value"))
    onnx.save(m, str(tmp_path / "nopresent.onnx"))
    rc = main(["bench", str(tmp_path / "nopresent.onnx")])
    assert "no matching output 'present.1.value'" in one_line_error(capsys, rc)
    m = onnx.load(str(plain_graph(tmp_path / "p.onnx")))
    m.graph.input.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["b", "s"]))
    onnx.save(m, str(tmp_path / "extra.onnx"))
    assert "unsupported input 'token_type_ids'" in one_line_error(capsys, main(["bench", str(tmp_path / "extra.onnx")]))


def test_runtime_failure_is_one_line(tmp_path, capsys):
    broken = kv_graph(tmp_path / "broken.onnx", broken_present=True)
    line = one_line_error(capsys, main(["bench", str(broken), "--ep", "cpu", "--seq", "2", "--past", "3",
                                        "--decode-tokens", "2", "--repeats", "1", "--warmup", "0", "-q"]))
    assert "onnxruntime failed during decode (past 3)" in line


def test_cuda_unavailable_exit_3(tmp_path, capsys):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    line = one_line_error(capsys, main(["bench", str(plain_graph(tmp_path / "p.onnx")), "--ep", "cuda"]), expected_rc=3)
    assert "CUDAExecutionProvider is not available" in line


def test_parse_past():
    assert parse_past("128,512,2048") == (128, 512, 2048)
    assert parse_past("none") == () and parse_past("") == ()
    with pytest.raises(OnnxqfError):
        parse_past("-1")


def test_cli_subprocess_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "onnxqf.cli", "bench", str(plain_graph(tmp_path / "y.onnx", output="y"))],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("onnxqf: error:")


# -- scripts/gpu_bench.py at tiny shapes on the CPU ----------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "scripts" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_bench", None)


def test_gpu_bench_sections(gpu_bench, tmp_path):
    """Sections a (linears through the lowerings), b (online rotations) and c1 (a random Llama exported and
    rewritten through the pipeline, then `onnxqf bench`) run at tiny shapes and fill the JSON and the tables."""
    assert gpu_bench.main(["--out", str(tmp_path), "--ep", "cpu", "--tiny", "--repeats", "2",
                           "--presets", "w8a8-token,rotate-int4-b32"]) == 0
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    cfg = gpu_bench.tiny_config()
    rows = data["a_linears"]["rows"]
    assert [r["lowering"] for r in rows[:5]] == ["float", *gpu_bench.LOWERINGS]
    assert len(rows) == 5 * len(cfg.linears) and all(set(r["ms"]) == {str(m) for m in cfg.ms} for r in rows)
    assert all(r["error"] < 0.3 for r in rows)
    assert [r["rotation"].split()[0] for r in data["b_rotations"]] == ["hadamard", "hadamard", "head", "attention"]
    assert all(r["ms"][str(m)] > 0 for r in data["b_rotations"] for m in cfg.rot_ms)
    shares = data["b_shares"]
    assert len(shares) == 2 and all(0 < s["float"]["hybrid_share"] < 1 for s in shares)
    c1 = data["c1_decoders"]
    assert list(c1["rewrite_s"]) == ["fp16", "w8a8-token", "rotate-int4-b32"]
    for bench in c1["bench"].values():
        assert [r["prefill_ms"]["median"] > 0 for r in bench["models"]] == [True] * 3
    md = (tmp_path / "gpu_bench.md").read_text()
    assert "## a." in md and "## b." in md and "## c1." in md and "| rotate-int4-b32 |" in md


def test_gpu_bench_rotation_is_onnxqfs(gpu_bench):
    """The benchmarked rotation graph computes x @ kron(F_1, ..., F_r), once per copy."""
    from onnxqf.maths.hadamard import rotation
    from onnxqf.runtime.session import make_session, saved

    r = rotation(96, 0)
    with saved(gpu_bench.rotation_model(96, list(r.factors), None, copies=2)) as path:
        session = make_session(path)
    x = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float16)
    for y in session.run(None, {"x": x}):
        np.testing.assert_allclose(y.astype(np.float64), x.astype(np.float64) @ r.mixing(), atol=2e-2)


# -- MatMulNBits kernels: which nodes ONNX Runtime's CUTLASS weight-only kernels take, and bench's runs -----


def nbits_graph(path: Path, specs: list[dict]) -> Path:
    """input_ids -> Gather(float16 embed) -> one MatMulNBits per spec (bits, block, N, zp, float) -> Add -> logits."""
    K = 64
    rng = np.random.default_rng(0)
    inits, nodes, outs = [], [], []
    inits.append(numpy_helper.from_array(rng.standard_normal((VOCAB, K)).astype(np.float16), "embed"))
    nodes.append(helper.make_node("Gather", ["embed", "input_ids"], ["x"]))
    for i, spec in enumerate(specs):
        bits, block, N = spec.get("bits", 4), spec.get("block", 32), spec.get("N", 64)
        ftype = spec.get("float", np.float16)
        blocks = K // block
        codes = rng.integers(0, 255, (N, blocks, block * bits // 8), dtype=np.uint8)
        inits.append(numpy_helper.from_array(codes, f"B{i}"))
        inits.append(numpy_helper.from_array(np.full(N * blocks, 0.01, ftype), f"s{i}"))
        inputs = ["x" if ftype == np.float16 else "x32", f"B{i}", f"s{i}"]
        if spec.get("zp"):
            inits.append(numpy_helper.from_array(np.full(N * ((blocks * bits + 7) // 8), 0x88, np.uint8), f"zp{i}"))
            inputs.append(f"zp{i}")
        nodes.append(helper.make_node("MatMulNBits", inputs, [f"y{i}"], domain="com.microsoft", K=K, N=N, bits=bits,
                                      block_size=block))
        outs.append(f"y{i}")
    if any(s.get("float", np.float16) != np.float16 for s in specs):
        nodes.append(helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("Identity", [outs[0]], ["logits"]))
    graph = helper.make_graph(nodes, "nbits",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT16,
                                                             ["b", "s", specs[0].get("N", 64)])],
                              inits)
    model = helper.make_model(graph,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    onnx.save(model, str(path))
    return path


def test_fpa_intb_rules():
    from onnxqf.runtime.placement import fpa_intb_blocker

    ok = dict(bits=4, block_size=32, K=4096, N=11008, float_type="float16", zero_points=False, g_idx=False, bias=False)
    assert fpa_intb_blocker(**ok) is None
    assert fpa_intb_blocker(**dict(ok, bits=8, N=4096 + 32)) is None  # 8-bit needs N % 32 only
    assert "block 128" in fpa_intb_blocker(**dict(ok, block_size=128))
    assert "zero points" in fpa_intb_blocker(**dict(ok, zero_points=True))
    assert "float32" in fpa_intb_blocker(**dict(ok, float_type="float32"))
    assert "multiple of 64" in fpa_intb_blocker(**dict(ok, N=4096 + 32))
    assert fpa_intb_blocker(**dict(ok, g_idx=True)) == "g_idx" and fpa_intb_blocker(**dict(ok, bias=True)) == "bias"


def test_nbits_kernels_report(tmp_path):
    from onnxqf.runtime.placement import format_nbits_kernels, nbits_kernels

    path = nbits_graph(tmp_path / "m.onnx", [{}, {"bits": 8}, {"block": 64}, {"zp": True}, {"N": 96},
                                            {"float": np.float32}])
    r = nbits_kernels(onnx.load(str(path)))
    assert r["nodes"] == 6 and r["fpa_intb"] == 2
    assert r["blockers"] == {"block 64 (block 32 only)": 1, "zero points (symmetric only)": 1,
                             "N = 96 not a multiple of 64": 1, "float32 activations (float16 only)": 1}
    assert "6 nodes, 2 eligible" in format_nbits_kernels(r)
    assert format_nbits_kernels(nbits_kernels(onnx.load(str(plain_graph(tmp_path / "p.onnx"))))) is None
    assert describe(path).nbits == r


def test_nbits_kernel_runs_and_env(tmp_path, monkeypatch, capsys):
    from onnxqf.runtime.bench import kernel_runs
    from onnxqf.runtime.placement import FPA_INTB_ENV
    from onnxqf.runtime.session import nbits_kernel_env

    fp16 = describe(plain_graph(tmp_path / "p.onnx"))
    fast = describe(nbits_graph(tmp_path / "q.onnx", [{}]))
    slow = describe(nbits_graph(tmp_path / "z.onnx", [{"zp": True}]))
    ios = [fp16, fast, slow]
    assert kernel_runs(ios, "default") == [(0, "default"), (1, "default"), (2, "default")]
    assert kernel_runs(ios, "both") == [(0, "default"), (1, "default"), (1, "fpa-intb"), (2, "default")]
    assert kernel_runs(ios, "fpa-intb") == [(0, "default"), (1, "fpa-intb"), (2, "default")]
    with pytest.raises(OnnxqfError):
        kernel_runs(ios, "fast")
    import os

    monkeypatch.setenv(FPA_INTB_ENV, "0")
    with nbits_kernel_env(True):
        assert os.environ[FPA_INTB_ENV] == "1"
    assert os.environ[FPA_INTB_ENV] == "0"
    with nbits_kernel_env(False):
        assert FPA_INTB_ENV not in os.environ
    assert os.environ[FPA_INTB_ENV] == "0"
    # the CUDA kernels cannot be chosen on the CPU: one line, exit 2
    line = one_line_error(capsys, main(["bench", str(tmp_path / "q.onnx"), "--ep", "cpu", "--nbits-kernel", "both"]))
    assert "needs --ep cuda" in line


def test_check_reports_nbits_kernels(tmp_path, capsys):
    import onnxruntime

    path = nbits_graph(tmp_path / "m.onnx", [{}, {"block": 128}])
    rc = main(["check", str(path), "--ep", "cuda", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["matmulnbits"]["nodes"] == 2 and r["matmulnbits"]["fpa_intb"] == 1
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert rc == 3 and r["status"] == "unavailable"
    main(["check", str(path), "--ep", "cuda"])
    assert "2 nodes, 1 eligible" in capsys.readouterr().out


def test_cpu_threads_and_isa(tmp_path, capsys):
    """`bench --ep cpu` states the intra-op threads and the CPU's ISA, in the table's header and the JSON."""
    from onnxqf.runtime.bench import cpu_isa, physical_cores

    flags = "fpu sse2 avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_int8"
    assert cpu_isa(f"processor\t: 0\nflags\t\t: {flags}\n") == ("AMX", ["avx2", "fma", "avx512f", "avx512bw",
                                                                        "avx512_vnni", "amx_tile", "amx_int8"])
    assert cpu_isa("flags : avx2 fma avx512f avx512bw avx512_vnni\n")[0] == "AVX512-VNNI"
    assert cpu_isa("flags : avx2 fma avx512f avx512bw\n")[0] == "AVX-512"
    assert cpu_isa("flags : avx2 fma avx_vnni\n")[0] == "AVX-VNNI"
    assert cpu_isa("flags : sse2 avx2 fma\n")[0] == "AVX2"
    assert cpu_isa("flags : sse2 sse4_2 avx\n") == ("SSE only (no AVX2)", [])
    assert cpu_isa("Processor : ARMv8\nFeatures : fp asimd\n") == ("unknown", [])  # no x86 flags line
    two_cores_ht = "".join(f"physical id\t: 0\ncore id\t\t: {c}\n\n" for c in (0, 1, 0, 1))
    assert physical_cores(two_cores_ht) == 2 and physical_cores("") is None

    kv = kv_graph(tmp_path / "kv.onnx")
    rc = main(["bench", str(kv), "--ep", "cpu", "--seq", "4", "--past", "2", "--decode-tokens", "1", "--repeats", "1",
               "--warmup", "0", "--json"])
    assert rc == 0
    cpu = json.loads(capsys.readouterr().out)["cpu"]
    assert cpu["intra_op_threads"] >= 1 and cpu["threads_source"].startswith("onnxruntime default")
    assert cpu["isa"] in ("AMX", "AVX512-VNNI", "AVX-512", "AVX-VNNI", "AVX2", "SSE only (no AVX2)", "unknown")
    rc = main(["bench", str(kv), "--ep", "cpu", "--seq", "4", "--past", "2", "--decode-tokens", "1", "--repeats", "1",
               "--warmup", "0", "-q"])
    table = capsys.readouterr().out
    assert rc == 0 and f"CPU: {cpu['intra_op_threads']} intra-op threads" in table and f"ISA {cpu['isa']}" in table


def test_op_times_rules():
    """Runs are model_run events; the first is skipped; only *_kernel_time node events after it count."""
    from onnxqf.runtime.bench import op_times

    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def node(ts, op, us, suffix="_kernel_time"):
        return {"cat": "Node", "name": f"n{ts}{suffix}", "ts": ts, "dur": us, "args": {"op_name": op}}

    events = [run(0, 100), node(10, "MatMul", 90_000),  # the warm-up run: left out
              run(200, 50), node(210, "MatMul", 3_000), node(220, "Add", 1_000),
              node(230, "MatMul", 7, "_fence_before"),
              run(300, 50), node(310, "MatMul", 5_000), node(320, "Add", 1_000),
              {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 5}]
    t = op_times(events)
    assert list(t) == ["MatMul", "Add"] and t == pytest.approx({"MatMul": 4.0, "Add": 1.0})
    assert op_times(events, skip=0)["MatMul"] == pytest.approx(98 / 3)
    with pytest.raises(ValueError, match="3 runs"):
        op_times(events, skip=3)


def test_bench_op_times_on_the_cpu(tmp_path, capsys):
    """--op-times profiles each model: per prefill and per decode token, the graph's operator types."""
    kv = kv_graph(tmp_path / "kv.onnx")
    r = run_bench([str(kv)], BenchOptions(ep="cpu", batch=1, seq=4, past=(3,), decode_tokens=2, repeats=1, warmup=0,
                                          progress=False, op_times=True))
    t = r["models"][0]["op_times"]
    ops = {n.op_type for n in onnx.load(str(kv)).graph.node}  # ONNX Runtime's fusions may rename a few
    assert "Gather" in t["prefill"] and "Gather" in t["decode"] and t["decode_past"] == 3
    assert len(set(t["prefill"]) & ops) >= len(t["prefill"]) - 2
    assert sum(t["prefill"].values()) > 0 and "op times: prefill" in format_table(r)
    rc = main(["bench", str(kv), "--ep", "cuda", "--op-times", "-q"])
    assert rc in (2, 3)  # no CUDA here (3), or refused: --op-times is CPU only (2)
