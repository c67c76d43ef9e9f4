"""KV-cache export through onnxruntime-genai's model builder, genai folders in eval, generate.

One tiny random llama (GQA) is saved as a Hugging Face folder with a byte-level tokenizer, exported
both ways: the genai folder (``--kv-cache``) and the plain logits-only graph. onnxruntime-genai's
greedy tokens must equal the greedy tokens of the plain graph, and eval must find KL ~ 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
og = pytest.importorskip("onnxruntime_genai")

from onnxqf.cli import main  # noqa: E402
from onnxqf.errors import GenaiFolderError, OnnxqfError  # noqa: E402
from onnxqf.genai.folder import read_genai  # noqa: E402
from onnxqf.genai.generate import generate  # noqa: E402

from tiny import save_byte_tokenizer  # noqa: E402

PROMPT = [17, 42, 301, 5, 77, 250, 9, 128, 64, 3, 400, 11]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(HF folder, genai folder, plain .onnx) of the same tiny weights."""
    from onnxqf.models.export import export_model
    from onnxqf.models.genai_export import export_genai

    from tiny import tiny_model

    tmp = tmp_path_factory.mktemp("genai")
    model = tiny_model("llama-gqa")
    model.config.eos_token_id = 0  # the tokenizer's end token; never the greedy choice in the prompts below
    hf = tmp / "hf"
    model.save_pretrained(str(hf))
    save_byte_tokenizer(hf)
    out = export_genai(str(hf), tmp / "gen" / "model.onnx")
    plain = export_model(model, tmp / "plain" / "tiny.onnx")
    return hf, out.parent, plain


def greedy_plain(path: Path, prompt: list[int], n: int) -> list[int]:
    from onnxqf.runtime.session import logits, make_session

    session = make_session(path)
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(logits(session, np.asarray([ids]))[0, -1])))
    return ids[len(prompt):]


def test_kv_cache_folder(built):
    _, gen, _ = built
    names = {p.name for p in gen.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= names
    assert not [p for p in gen.parent.iterdir() if "partial" in p.name]
    f = read_genai(gen / "model.onnx")
    assert (f.layers, f.num_heads, f.kv_heads, f.head_size) == (2, 4, 2, 16)
    assert (f.attention_op, f.io_dtype, f.vocab) == ("GroupQueryAttention", "float32", 512)
    assert read_genai(gen).model_path == gen / "model.onnx"


def test_genai_greedy_equals_plain_export(built):
    _, gen, plain = built
    n = 16
    result = generate(gen, token_ids=PROMPT, max_new_tokens=n, quiet=True)
    assert result["new_tokens"] == n and result["prompt_tokens"] == len(PROMPT)
    assert result["tokens"] == greedy_plain(plain, PROMPT, n)


def test_eval_genai_against_plain(built, tmp_path, capsys):
    _, gen, plain = built
    from onnxqf.analysis.evaluate import compare

    wins = np.random.default_rng(0).integers(1, 512, (2, 48))
    r = compare(plain, gen, wins, progress=False, max_abs=True)
    assert r["kl"] < 1e-6 and r["top1"] == 1.0
    ids = tmp_path / "ids.npy"
    np.save(ids, wins.reshape(-1))
    capsys.readouterr()
    assert main(["eval", str(gen), str(plain), "--tokens", str(ids), "--windows", "2", "--seq", "48",
                 "--json", "--max-kl", "1e-6"]) == 0
    assert json.loads(capsys.readouterr().out)["kl"] < 1e-6


def test_generate_command(built, capsys):
    _, gen, _ = built
    assert main(["generate", str(gen), "--prompt", "Hello world", "--max-new-tokens", "5"]) == 0
    err = capsys.readouterr().err
    assert "prefill: 11 tokens" in err and "decode: 4 tokens" in err and "tokens/s" in err


def test_generate_cuda_graph_needs_cuda(built, capsys):
    """``--cuda-graph`` is the CUDA provider's option: asked on the CPU, one line and exit 2, nothing generated."""
    _, gen, _ = built
    assert main(["generate", str(gen), "--prompt", "Hello", "--cuda-graph"]) == 2
    captured = capsys.readouterr()
    assert "CUDA graphs need --ep cuda" in captured.err and captured.out == ""


# --------------------------------------------------------------------------- bad input


def _copy(gen: Path, dst: Path) -> Path:
    shutil.copytree(gen, dst)
    return dst


def _edit_config(folder: Path, **decoder) -> None:
    path = folder / "genai_config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["decoder"].update(decoder)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, message", [
    (dict(num_hidden_layers=3), "num_hidden_layers=3, the graph has 2"),
    (dict(num_key_value_heads=4), "num_key_value_heads=4"),
    (dict(head_size=8), "packed q/k/v width"),
    (dict(num_attention_heads=8), "8 heads"),
    (dict(filename="other.onnx"), "'other.onnx', which is missing"),
])
def test_config_disagrees_with_graph(built, tmp_path, change, message):
    folder = _copy(built[1], tmp_path / "g")
    _edit_config(folder, **change)
    with pytest.raises(GenaiFolderError, match=message):
        read_genai(folder)


def test_no_genai_config(built, tmp_path, capsys):
    folder = _copy(built[1], tmp_path / "g")
    (folder / "genai_config.json").unlink()
    with pytest.raises(GenaiFolderError, match="no genai_config.json"):
        read_genai(folder / "model.onnx")
    assert main(["generate", str(folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not an onnxruntime-genai folder" in err
    assert main(["generate", str(built[0]), "--prompt", "x"]) == 2  # a Hugging Face folder is not one


def test_unsupported_attention_op(built, tmp_path, capsys):
    import onnx

    folder = _copy(built[1], tmp_path / "g")
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.op_type = "MultiHeadAttention"
    onnx.save(proto, str(folder / "model.onnx"))
    with pytest.raises(GenaiFolderError, match="unsupported attention op MultiHeadAttention"):
        read_genai(folder)
    assert read_genai(folder, check_attention=False).attention_op == "MultiHeadAttention"


def test_export_refusals_write_nothing(built, tmp_path, capsys):
    hf = built[0]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    assert main(["export", str(hf), "--kv-cache", "-o", str(busy / "model.onnx")]) == 2
    assert "not an onnxruntime-genai folder" in capsys.readouterr().err
    assert main(["export", str(hf), "--kv-cache", "--dtype", "float16", "--ep", "cpu",
                 "-o", str(tmp_path / "a" / "model.onnx")]) == 2
    assert main(["export", str(hf), "--ep", "cpu", "-o", str(tmp_path / "b.onnx")]) == 2  # --ep needs --kv-cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    assert [p.name for p in busy.iterdir()] == ["mine.txt"]


def test_builder_failure_leaves_nothing(built, tmp_path, monkeypatch):
    from onnxqf.models import genai_export

    def failing_builder(hf_dir, out_dir, *args, **kwargs):
        out_dir.mkdir(parents=True)
        (out_dir / "model.onnx").write_bytes(b"partial")
        raise OnnxqfError("onnxruntime-genai's model builder failed: boom")

    monkeypatch.setattr(genai_export, "_run_builder", failing_builder)
    with pytest.raises(OnnxqfError, match="model builder failed"):
        genai_export.export_genai(str(built[0]), tmp_path / "out" / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_reexport_replaces_genai_folder(built, tmp_path, monkeypatch):
    from onnxqf.models import genai_export

    target = _copy(built[1], tmp_path / "g")
    (target / "stale.txt").write_text("from an earlier export")

    def copying_builder(hf_dir, out_dir, *args, **kwargs):  # stands in for the builder (tested above)
        shutil.copytree(built[1], out_dir)

    monkeypatch.setattr(genai_export, "_run_builder", copying_builder)
    genai_export.export_genai(str(built[0]), target / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]
    assert not (target / "stale.txt").exists() and read_genai(target).layers == 2


def test_missing_onnxruntime_genai(monkeypatch, tmp_path):
    import importlib.util
    import sys

    from onnxqf.genai.folder import require_og
    from onnxqf.models.genai_export import require_builder

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime_genai" else real(name, *a))
    with pytest.raises(OnnxqfError, match=r"pip install 'onnxqf\[genai\]'"):
        require_builder()
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    with pytest.raises(OnnxqfError, match=r"pip install 'onnxqf\[genai\]'"):
        require_og()


# --------------------------------------------------------------------------- recognition of builder graphs


def test_recognize_builder_graph(built):
    from onnxqf.graph.edit import set_weight_matrix
    from onnxqf.graph.modelfile import load_model
    from onnxqf.recognize import recognize
    from onnxqf.recognize.genai import recognize_genai

    _, gen, plain = built
    g, p = recognize_genai(load_model(gen / "model.onnx")), recognize(load_model(plain))
    assert g.config == p.config and len(g.layers) == len(p.layers) == 2
    for lg, lp in zip(g.layers, p.layers):
        assert lg.q.node is lg.k.node is lg.v.node
        assert (lg.q.cols, lg.k.cols, lg.v.cols) == ((0, 64), (64, 96), (96, 128))
        for a, b in zip(lg.linears(), lp.linears()):
            assert a.role == b.role and a.shape == b.shape and np.allclose(a.matrix(), b.matrix())
        for a, b in ((lg.attn_norm, lp.attn_norm), (lg.mlp_norm, lp.mlp_norm)):
            assert np.allclose(a.gamma.const_value.numpy(), b.gamma.const_value.numpy())
        assert lg.mlp_norm.input is lg.attn_add.outputs[3]  # the Skip norm's residual sum
    assert g.final_norm.kind == "SkipSimplifiedLayerNormalization" and g.lm_head.shape == (64, 512)
    # the packed MatMul is one weight linear: quantization and prepare_linears see it once
    roles = [lin.role for lin in g.linears(include_lm_head=False)][:5]
    assert roles == ["qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    qkv = g.layers[0].qkv
    assert qkv.node is g.layers[0].q.node and qkv.cols is None and qkv.shape == (64, 128)
    assert g.site_of()["layers.0.qkv_proj"].kind == "attn_in"
    # writing one column block leaves the other blocks of the packed weight alone
    v = g.layers[0].v
    before = g.layers[0].q.matrix(), g.layers[0].k.matrix()
    set_weight_matrix(v, np.zeros(v.shape))
    assert not v.matrix().any()
    assert all(np.array_equal(a, b.matrix()) for a, b in zip(before, (g.layers[0].q, g.layers[0].k)))
    # a block of float64 values is rounded to the weight's dtype, as a whole weight would be
    B = np.random.default_rng(0).standard_normal(v.shape) / 3
    dtype = v.weight.const_value.dtype.numpy()
    set_weight_matrix(v, B)
    assert v.weight.const_value.dtype.numpy() == dtype
    assert np.array_equal(v.matrix(), B.astype(dtype).astype(np.float64))
    assert all(np.array_equal(a, b.matrix()) for a, b in zip(before, (g.layers[0].q, g.layers[0].k)))


# --------------------------------------------------------------------------- rewriting genai folders


@pytest.fixture(scope="module")
def folders(built, tmp_path_factory):
    """name -> a genai folder of that tiny model, built on first use (llama-gqa is ``built``'s)."""
    from onnxqf.models.genai_export import export_genai

    from tiny import tiny_model

    cache = {"llama-gqa": built[1]}

    def get(name: str) -> Path:
        if name not in cache:
            tmp = tmp_path_factory.mktemp(name)
            model = tiny_model(name)
            model.config.eos_token_id = 0
            model.save_pretrained(str(tmp / "hf"))
            save_byte_tokenizer(tmp / "hf")
            cache[name] = export_genai(str(tmp / "hf"), tmp / "gen" / "model.onnx").parent
        return cache[name]

    return get


def _digest(folder: Path) -> dict[str, bytes]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).digest() for p in sorted(folder.iterdir())}


def _ops(path: Path) -> dict[str, int]:
    import collections

    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _report(path: Path) -> dict:
    from onnxqf.graph.modelfile import get_metadata, load_model

    return json.loads(get_metadata(load_model(path), "rewrite"))


def _calib_ids(tmp_path: Path) -> Path:
    ids = tmp_path / "calib.npy"
    np.save(ids, np.random.default_rng(1).integers(1, 512, 256))
    return ids


@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied", "qwen2-bias"])
def test_rewrite_rotate_genai_float_exact(folders, name, tmp_path, capsys):
    """--rotate --quant none on a model builder folder: a complete folder, float-exact, same greedy tokens."""
    from onnxqf.analysis.evaluate import compare
    from onnxqf.graph.modelfile import load_model
    from onnxqf.recognize import recognize

    gen = folders(name)
    before = _digest(gen)
    out = tmp_path / "rot"
    assert main(["rewrite", str(gen / "model.onnx"), "--rotate", "--quant", "none", "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(out.absolute() / "model.onnx")
    assert _digest(gen) == before  # the input folder is only read
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json"} == {
        p.name for p in out.iterdir()}
    assert read_genai(out).layers == 2 and not [p for p in tmp_path.iterdir() if "partial" in p.name]
    s = recognize(load_model(out / "model.onnx"))
    assert s.embedding_table.is_initializer() and not s.tied()  # a Transpose-tied table is untied
    assert _ops(out / "model.onnx")["MatMul"] > _ops(gen / "model.onnx")["MatMul"]  # online rotations
    wins = np.random.default_rng(0).integers(1, 512, (2, 32))
    r = compare(gen, out, wins, progress=False, max_abs=True)
    assert r["kl"] <= 1e-6 and r["max_abs_diff"] <= 1e-3 * r["max_abs_logit"] and r["top1"] == 1.0
    n = 12
    assert generate(out, token_ids=PROMPT, max_new_tokens=n, quiet=True)["tokens"] == \
        generate(gen, token_ids=PROMPT, max_new_tokens=n, quiet=True)["tokens"]


def test_rewrite_genai_default_output(folders, tmp_path, capsys):
    gen = _copy(folders("llama-gqa"), tmp_path / "gen")
    assert main(["rewrite", str(gen), "--rotate", "--quant", "none", "-q"]) == 0
    out = tmp_path / "gen.rotate.float"
    assert capsys.readouterr().out.strip() == str(out / "model.onnx")
    assert read_genai(out).model_path == out / "model.onnx"
    # another graph name: the copied config names it
    assert main(["rewrite", str(gen), "--rotate", "--quant", "none", "-q", "-o", str(tmp_path / "r" / "rot.onnx")]) == 0
    assert read_genai(tmp_path / "r").model_path.name == "rot.onnx"
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"rot.onnx", "rot.onnx.data", "genai_config.json",
                                                           "tokenizer.json", "tokenizer_config.json"}


@pytest.mark.parametrize("quant, op, per_layer", [("int8", "MatMulIntegerToFloat", 4), ("int4", "MatMulNBits", 5)])
def test_rewrite_genai_quantizes_packed_qkv_once(folders, quant, op, per_layer, tmp_path, capsys):
    """The packed q/k/v MatMul is quantized once, GPTQ-rounded with X^T X captured through the genai
    graph; the folder loads and generates in onnxruntime-genai."""
    from onnxqf.analysis.evaluate import compare

    gen = folders("llama-tied")
    out = tmp_path / quant
    assert main(["rewrite", str(gen), "--rotate", "--quant", quant, "--calib", str(_calib_ids(tmp_path)),
                 "--calib-windows", "2", "--calib-seq", "64", "-o", str(out), "-q"]) == 0
    ops = _ops(out / "model.onnx")
    # int4: qkv, o, gate, up, down per layer; int8 (the CPU lowering): gate and up share one GEMM
    assert ops[op] == 2 * per_layer and ops["GroupQueryAttention"] == 2
    report = _report(out / "model.onnx")
    assert report["quantized"][:5] == ["layers.0.qkv_proj", "layers.0.o_proj", "layers.0.gate_proj", "layers.0.up_proj",
                                       "layers.0.down_proj"]
    assert set(report["rounding"].values()) == {"gptq"} and report["calibration"]["windows"] == 2
    r = compare(gen, out, np.random.default_rng(0).integers(1, 512, (2, 32)), progress=False)
    assert r["kl"] < 0.05 and r["top1"] > 0.7
    result = generate(out, token_ids=PROMPT, max_new_tokens=8, quiet=True)
    assert result["new_tokens"] == 8


def test_rewrite_genai_hybrid(folders, tmp_path, capsys):
    """--hybrid calibrates through the genai graph: float-exact with --quant none, and W8A8 generates."""
    from onnxqf.analysis.evaluate import compare

    gen = folders("qwen2-bias")
    calib = ["--calib", str(_calib_ids(tmp_path)), "--calib-windows", "2", "--calib-seq", "64", "--alpha", "0.5"]
    wins = np.random.default_rng(0).integers(1, 512, (2, 32))
    assert main(["rewrite", str(gen), "--hybrid", "--quant", "none", *calib, "-o", str(tmp_path / "f"), "-q"]) == 0
    report = _report(tmp_path / "f" / "model.onnx")
    assert len(report["sites"]) == 2 * 4 and all(c["alpha"] == 0.5 for c in report["sites"].values())
    r = compare(gen, tmp_path / "f", wins, progress=False, max_abs=True)
    assert r["kl"] <= 1e-6 and r["max_abs_diff"] <= 1e-3 * r["max_abs_logit"]
    assert main(["rewrite", str(gen), "--hybrid", *calib, "-o", str(tmp_path / "q"), "-q"]) == 0
    # a CPU folder: the CPU lowering (uint8 codes, MatMulIntegerToFloat); qkv, o, gate+up, down
    assert _ops(tmp_path / "q" / "model.onnx")["MatMulIntegerToFloat"] == 2 * 4
    assert compare(gen, tmp_path / "q", wins, progress=False)["kl"] < 0.05
    assert generate(tmp_path / "q", token_ids=PROMPT, max_new_tokens=4, quiet=True)["new_tokens"] == 4


def test_rewrite_genai_cpu_op_library(folders, tmp_path, capsys):
    """--lowering onnxqf-cpu on a genai folder: the CPU op library is copied into the new folder and named in its
    genai_config.json, so that onnxruntime-genai loads it and generates (its default, asymmetric codes:
    QuantizeRows and DequantizeRows); with --act-quant token the same KL as uint8-token-ql's folder."""
    from onnxqf.analysis.evaluate import compare
    from onnxqf.runtime import kernels

    if not kernels.cpu_available():
        pytest.skip("onnxqf's CPU op library is not built: bash kernels/build_cpu.sh")
    gen = folders("llama-gqa")
    wins = np.random.default_rng(0).integers(1, 512, (2, 32))
    kl = {}
    for name, args in (("onnxqf-cpu", ["--lowering", "onnxqf-cpu"]),
                       ("symmetric", ["--lowering", "onnxqf-cpu", "--act-quant", "token"]),
                       ("uint8-token-ql", ["--lowering", "uint8-token-ql"])):
        out = tmp_path / name
        assert main(["rewrite", str(gen), *args, "--weight-rounding", "rtn", "-o", str(out), "-q"]) == 0
        kl[name] = compare(gen, out, wins, progress=False)["kl"]
    out = tmp_path / "onnxqf-cpu"
    assert (out / kernels.CPU_LIBRARY).is_file()
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["session_options"]["custom_ops_library"] == kernels.CPU_LIBRARY
    assert _ops(out / "model.onnx")["QuantizeRows"] == _ops(out / "model.onnx")["DequantizeRows"] == 2 * 4
    assert kl["symmetric"] == kl["uint8-token-ql"] < 0.05 and kl["onnxqf-cpu"] < 0.05
    assert generate(out, token_ids=PROMPT, max_new_tokens=4, quiet=True)["new_tokens"] == 4


def test_capture_through_genai_graph(built):
    """Calibration feeds a genai graph an empty past and a mask: its activations equal the plain graph's."""
    from onnxqf.calib import calibrate
    from onnxqf.graph.modelfile import load_model
    from onnxqf.recognize import recognize

    _, gen, plain = built
    wins = np.random.default_rng(0).integers(1, 512, (2, 16))
    acts = []
    for path in (gen / "model.onnx", plain):
        model = load_model(path)
        values = calibrate.site_values(recognize(model))
        acts.append(list(calibrate.capture(model, values, wins, progress=False)))
    for a, b in zip(*acts):
        assert a.keys() == b.keys() and len(a) == 2 * 4
        for name in a:
            assert np.allclose(a[name], b[name], atol=1e-4), name


def test_rewrite_genai_refusals(folders, tmp_path, capsys):
    gen = _copy(folders("llama-gqa"), tmp_path / "gen")
    before = _digest(gen)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    cases = [
        (["-o", str(gen / "model.onnx")], "would replace the input genai folder"),
        (["-o", str(gen / "other.onnx")], "would replace the input genai folder"),
        (["-o", str(busy)], "not an onnxruntime-genai folder"),
        (["--keep-float", "v_proj", "--quant", "int8", "-o", str(tmp_path / "k")],
         "keep all three float with --keep-float qkv_proj"),
    ]
    for extra, message in cases:
        assert main(["rewrite", str(gen), "--rotate", "--quant", "none", "-q", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    assert _digest(gen) == before and [p.name for p in busy.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "gen"]
    # attention ops other than GroupQueryAttention are refused
    import onnx

    mha = _copy(gen, tmp_path / "mha")
    proto = onnx.load(str(mha / "model.onnx"), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.op_type = "MultiHeadAttention"
    onnx.save(proto, str(mha / "model.onnx"))
    assert main(["rewrite", str(mha), "--rotate", "--quant", "none", "-o", str(tmp_path / "m"), "-q"]) == 2
    assert "unsupported attention op MultiHeadAttention" in capsys.readouterr().err and not (tmp_path / "m").exists()
    # an already quantized folder is refused with one line
    for quant, op in (("int4", "MatMulNBits"), ("int8", "MatMulInteger")):
        assert main(["rewrite", str(gen), "--quant", quant, "--weight-rounding", "rtn", "-o", str(tmp_path / quant),
                     "-q"]) == 0
        capsys.readouterr()
        assert main(["rewrite", str(tmp_path / quant), "--rotate", "--quant", "none", "-o", str(tmp_path / "again"),
                     "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"already quantized ({op}" in err and not (tmp_path / "again").exists()


def test_pipeline_of_two_rewrites(folders, tmp_path, capsys):
    """`onnxqf pipeline W8A8 INT8W -o OUT`: one genai folder whose prompt runs through the W8A8 graph and every later
    token through the int8w one (genai's decoder-pipeline stages, one KV cache); it generates, and its decode stage is
    the second graph (negating that graph's logits changes every token after the first). Two rewrites whose caches
    are in different bases (a rotation in one only) are refused in one line, nothing written; a pipeline folder is
    not joined again, rewritten or benched; eval reads its prompt graph."""
    import onnx

    from onnxqf.genai.folder import read_genai

    gen = folders("llama-gqa")
    paths = {}
    for name, args in (("w8a8", ["--lowering", "uint8-token-ql"]), ("int8w", ["--quant", "int8w"]),
                       ("rotated", ["--rotate", "--quant", "none"])):
        paths[name] = tmp_path / name
        assert main(["rewrite", str(gen), *args, "--weight-rounding", "rtn", "-o", str(paths[name]), "-q"]) == 0
    out = tmp_path / "pipe"
    capsys.readouterr()
    assert main(["pipeline", str(paths["w8a8"]), str(paths["int8w"]), "-o", str(out)]) == 0
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["type"] == "decoder-pipeline" and "filename" not in cfg["model"]["decoder"]
    stages = [next(iter(s.items())) for s in cfg["model"]["decoder"]["pipeline"]]
    assert [(n, s["filename"], s["run_on_prompt"], s["run_on_token_gen"]) for n, s in stages] == [
        ("prefill", "prefill.onnx", True, False), ("decode", "decode.onnx", False, True)]
    assert _ops(out / "prefill.onnx")["MatMulIntegerToFloat"] > 0 and _ops(out / "decode.onnx")["MatMulNBits"] > 0
    assert read_genai(out).model_path.name == "prefill.onnx"
    toks = generate(out, token_ids=PROMPT, max_new_tokens=6, quiet=True)["tokens"]
    assert len(toks) == 6
    # the decode stage is decode.onnx: its logits negated, the first token (the prompt's) stays, the rest move
    m = onnx.load(str(out / "decode.onnx"))
    for node in m.graph.node:
        node.output[:] = ["logits_pos" if o == "logits" else o for o in node.output]
    m.graph.node.append(onnx.helper.make_node("Neg", ["logits_pos"], ["logits"]))
    onnx.save_model(m, str(out / "decode.onnx"), save_as_external_data=True, location="decode.onnx.data")
    neg = generate(out, token_ids=PROMPT, max_new_tokens=6, quiet=True)["tokens"]
    assert neg[0] == toks[0] and neg[1:] != toks[1:]
    # refusals, in one line each, nothing written
    bad = tmp_path / "bad"
    assert main(["pipeline", str(paths["w8a8"]), str(paths["rotated"]), "-o", str(bad)]) == 2
    assert "KV caches differ" in capsys.readouterr().err and not bad.exists()
    assert main(["pipeline", str(out), str(paths["int8w"]), "-o", str(bad)]) == 2 and not bad.exists()
    assert main(["rewrite", str(out), "-o", str(bad), "-q"]) == 2 and not bad.exists()
    assert main(["bench", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("pipeline folder") == 3 and all(len(line) < 400 for line in err.strip().splitlines())
