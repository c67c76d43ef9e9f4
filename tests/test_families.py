"""Model families (onnxqf.recognize.families) end to end, on one tiny random model per family (tests/tiny.py).

Per family: the plain export computes what transformers computes and is recognized as its family; the float
rotations are exact against the un-rewritten graph (plain export and, where the builder writes one, the
onnxruntime-genai folder); the W8A8 hybrid and int4 rewrites of the genai folder load in onnxruntime-genai and
generate; what cannot be exact (a residual rotation under Gemma 2/3's norms after the blocks, a rotation folded
through LFM2's conv gates) and what the builder cannot write are refused in one line; OLMo's LayerNorms become
RMSNorms of a centred residual stream, and what would fold under its clip_qkv is skipped with one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime_genai")

from onnxqf.cli import main  # noqa: E402

from tiny import FAMILY_MODELS, save_byte_tokenizer, tiny_model  # noqa: E402

FAMILIES = list(FAMILY_MODELS)
POST_NORMS = {"gemma2", "gemma3"}  # a residual rotation is refused, the online rotations are exact
# onnxruntime-genai 0.18's builder fails on these, or (OLMo) writes a folder that does not compute the model
NO_GENAI = {"smollm3": "position_ids", "gemma3": "rope_type", "olmo": "SimplifiedLayerNormalization",
            "seed_oss": "no Seed-OSS", "internlm3": "no InternLM3", "glm": "no GLM"}
# Gemma 2's genai folder refuses the residual rotation (--rotate): its own tests below
GENAI = [f for f in FAMILIES if f not in NO_GENAI and f != "gemma2"]
TITLES = {"gemma2": "Gemma 2 (gemma2)", "gemma3": "Gemma 3 (gemma3_text)"}
QK_NORMS = {"qwen3", "gemma3", "lfm2"}
MIXERS = {"lfm2": ["conv", "attention"]}  # a short convolution layer, then attention; other families: attention
# the weight MatMuls of one tiny model's two layers, a packed one once (a conv layer: in_proj, out_proj and the MLP)
LINEARS = {"phi3": 8, "lfm2": 12, "glm": 12}
# (packed q/k/v, packed gate/up) per family; the others store every projection apart
PACKED = {"phi3": (True, True), "glm": (False, True)}
PROMPT = [17, 42, 301, 5, 77, 250, 9, 128, 64, 3, 400, 11]
WINDOWS = np.random.default_rng(0).integers(1, 512, (2, 32))


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """name -> {"hf": HF folder, "plain": exported .onnx, "gen": genai folder}, each made on first use."""
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, what: str) -> Path:
        key = (name, what)
        if key in cache:
            return cache[key]
        root = tmp_path_factory.getbasetemp() / f"family-{name}"
        if what == "hf":
            model = tiny_model(name)
            model.config.eos_token_id = 0
            model.save_pretrained(str(root / "hf"))
            save_byte_tokenizer(root / "hf")
            cache[key] = root / "hf"
        elif what == "plain":
            from onnxqf.models.export import export_model

            cache[key] = export_model(tiny_model(name), root / "plain" / "model.onnx")
        else:
            from onnxqf.models.genai_export import export_genai

            cache[key] = export_genai(str(get(name, "hf")), root / "gen" / "model.onnx").parent
        return cache[key]

    return get


@pytest.fixture(scope="session")
def calib(tmp_path_factory) -> list[str]:
    path = tmp_path_factory.mktemp("family-calib") / "ids.npy"
    np.save(path, np.random.default_rng(1).integers(1, 512, 256))
    return ["--calib", str(path), "--calib-windows", "2", "--calib-seq", "64", "--alpha", "0.5"]


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids.astype(np.int64)})[0]


def _exact(ref: np.ndarray, new: np.ndarray) -> None:
    from onnxqf.maths.metrics import kl_divergence

    rel = np.max(np.abs(new - ref)) / np.max(np.abs(ref))
    assert rel <= 1e-4 and kl_divergence(ref, new) <= 1e-6, (rel, kl_divergence(ref, new))


@pytest.mark.parametrize("name", FAMILIES)
def test_plain_export_matches_transformers_and_names_its_family(family, name):
    import torch

    from onnxqf.graph.modelfile import load_model
    from onnxqf.recognize import recognize

    path = family(name, "plain")
    with torch.no_grad():
        ref = tiny_model(name)(input_ids=torch.from_numpy(WINDOWS)).logits.numpy()
    _exact(ref, _logits(path, WINDOWS))
    s = recognize(load_model(path))
    assert s.family.name == FAMILY_MODELS[name][0] and len(s.layers) == 2
    assert [layer.mixer for layer in s.layers] == MIXERS.get(name, ["attention"] * 2)
    layer = s.attention_layers()[0]
    assert (layer.qkv is not None, layer.gate_up is not None) == PACKED.get(name, (False, False))
    assert len(layer.post_norms()) == (2 if name in POST_NORMS else 0)
    qk = name in QK_NORMS
    assert (layer.q_norm is not None, layer.k_norm is not None) == (qk, qk)
    if qk:  # over the head size, not the hidden size
        assert layer.q_norm.scale().shape == (s.config.head_dim,)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("transform", ["--rotate", "--hybrid"])
def test_plain_rotations_exact_or_refused(family, calib, name, transform, tmp_path, capsys):
    plain = family(name, "plain")
    out = tmp_path / "out.onnx"
    capsys.readouterr()
    rc = main(["rewrite", str(plain), transform, "--quant", "none", *calib, "-o", str(out), "-q"])
    if transform == "--rotate" and name in POST_NORMS:
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and TITLES[name] in err and "residual rotation" in err, err
        assert not out.exists()
        return
    assert rc == 0
    _exact(_logits(plain, WINDOWS), _logits(out, WINDOWS))


@pytest.mark.slow
@pytest.mark.parametrize("name", GENAI)
def test_genai_folder_rotations_exact(family, calib, name, tmp_path):
    from onnxqf.analysis.evaluate import compare
    from onnxqf.genai.generate import generate

    gen = family(name, "gen")
    out = tmp_path / "rot"
    assert main(["rewrite", str(gen), "--rotate", "--quant", "none", *calib, "-o", str(out), "-q"]) == 0
    r = compare(gen, out, WINDOWS, progress=False, max_abs=True)
    assert r["kl"] <= 1e-6 and r["max_abs_diff"] <= 1e-4 * r["max_abs_logit"] and r["top1"] == 1.0, r
    assert generate(out, token_ids=PROMPT, max_new_tokens=6, quiet=True)["tokens"] == \
        generate(gen, token_ids=PROMPT, max_new_tokens=6, quiet=True)["tokens"]


@pytest.mark.parametrize("name", GENAI)
def test_genai_hybrid_w8a8_and_int4_generate(family, calib, name, tmp_path):
    from onnxqf.analysis.evaluate import compare
    from onnxqf.genai.generate import generate

    gen = family(name, "gen")
    int4 = ["--rotate"]
    for label, args in (("w8a8", ["--hybrid"]), ("int4", [*int4, "--quant", "int4"])):
        out = tmp_path / label
        assert main(["rewrite", str(gen), *args, *calib, "-o", str(out), "-q"]) == 0, label
        assert compare(gen, out, WINDOWS, progress=False)["kl"] < 0.1, label
        assert generate(out, token_ids=PROMPT, max_new_tokens=4, quiet=True)["new_tokens"] == 4, label


@pytest.mark.slow
def test_gemma2_genai_folder_recognized_and_rotation_refused(family, tmp_path, capsys):
    from onnxqf.graph.modelfile import load_model
    from onnxqf.recognize import recognize

    gen = family("gemma2", "gen")
    s = recognize(load_model(gen / "model.onnx"))
    assert all(len(layer.post_norms()) == 2 for layer in s.layers) and s.layers[0].qkv is not None and s.tied()
    capsys.readouterr()
    assert main(["rewrite", str(gen), "--rotate", "--quant", "none", "-o", str(tmp_path / "r"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "norms after its blocks" in err and "residual rotation" in err, err
    assert not (tmp_path / "r").exists()


def test_gemma2_genai_folder_calibrates_hybrid_exact_and_generates(family, calib, tmp_path):
    """Gemma 2 folders keep a sliding-window KV cache in their local layers, which ONNX Runtime refuses empty:
    eval and calibration feed a zero past of the window's length, masked out (onnxqf.genai.feeds). The folder's
    logits so fed are the plain export's (window 16 < 32 tokens: the window bites); --hybrid is exact in float;
    W8A8 --hybrid and int4 (no rotation: --rotate is refused) run and generate; the float rewrite generates the
    folder's own tokens."""
    import onnxruntime as ort

    from onnxqf.analysis.evaluate import compare
    from onnxqf.genai.feeds import graph_io, logits_function
    from onnxqf.genai.generate import generate

    gen = family("gemma2", "gen")
    io = graph_io(gen)
    assert io.min_past == {"past_key_values.0.key": 16, "past_key_values.0.value": 16}, io.min_past  # local layer 0
    session = ort.InferenceSession(str(gen / "model.onnx"), providers=["CPUExecutionProvider"])
    _exact(_logits(family("gemma2", "plain"), WINDOWS), logits_function(session, io)(WINDOWS))
    ref = generate(gen, token_ids=PROMPT, max_new_tokens=8, quiet=True)["tokens"]  # 20 tokens: past the window
    out = tmp_path / "float"
    assert main(["rewrite", str(gen), "--hybrid", "--quant", "none", *calib, "-o", str(out), "-q"]) == 0
    r = compare(gen, out, WINDOWS, progress=False, max_abs=True)
    assert r["kl"] <= 1e-6 and r["max_abs_diff"] <= 1e-4 * r["max_abs_logit"] and r["top1"] == 1.0, r
    assert generate(out, token_ids=PROMPT, max_new_tokens=8, quiet=True)["tokens"] == ref
    for label, args, bound in (("w8a8", ["--hybrid"], 0.1), ("int4", ["--quant", "int4"], 0.5)):
        out = tmp_path / label
        assert main(["rewrite", str(gen), *args, *calib, "-o", str(out), "-q"]) == 0, label
        assert compare(gen, out, WINDOWS, progress=False)["kl"] < bound, label
        assert generate(out, token_ids=PROMPT, max_new_tokens=4, quiet=True)["new_tokens"] == 4, label


@pytest.mark.parametrize("name", list(NO_GENAI))
def test_builder_families_refused_in_one_line(family, name, tmp_path, capsys):
    hf = family(name, "hf")
    capsys.readouterr()
    assert main(["export", str(hf), "--kv-cache", "-o", str(tmp_path / "g" / "model.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no --kv-cache folder" in err and NO_GENAI[name] in err, err
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("model_type, reason", [("olmo2", "norms come only after the blocks"),
                                                ("stablelm", "LayerNorm subtracts the mean"),
                                                ("mamba", "the passes need RMSNorm")])
def test_unsupported_families_refused_in_one_line(model_type, reason, tmp_path, capsys):
    from transformers import AutoConfig

    hf = tmp_path / "hf"
    AutoConfig.for_model(model_type).save_pretrained(str(hf))
    assert main(["export", str(hf), "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"architecture '{model_type}' is not supported" in err and reason in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("name", FAMILIES)
def test_plain_w8a8_hybrid_and_int4(family, calib, name, tmp_path):
    """Every family quantizes: the full hybrid W8A8, and 4-bit weights after the residual rotation (without a
    transform for Gemma 2/3: --rotate is refused there and weight-only formats take no smoothing)."""
    import json

    from onnxqf.graph.modelfile import get_metadata, load_model
    from onnxqf.maths.metrics import kl_divergence
    from onnxqf.recognize import recognize

    plain = family(name, "plain")
    ref = _logits(plain, WINDOWS)
    # every weight MatMul of every layer, a packed one (Phi-3) once
    linears = [lin.name for lin in recognize(load_model(plain)).linears(include_lm_head=False)]
    assert len(linears) == LINEARS.get(name, 14)
    int4 = [] if name in POST_NORMS else ["--rotate"]
    for label, args in (("w8a8", ["--hybrid"]), ("int4", [*int4, "--quant", "int4"])):
        out = tmp_path / f"{label}.onnx"
        assert main(["rewrite", str(plain), *args, *calib, "-o", str(out), "-q"]) == 0, label
        report = json.loads(get_metadata(load_model(out), "rewrite"))
        assert sorted(report["quantized"]) == sorted(linears), (label, report["quantized"])
        # int4 without a rotation (Gemma 2/3) keeps the tiny models' outlier channels: a looser bound
        assert kl_divergence(ref, _logits(out, WINDOWS)) < (0.1 if args[0] in ("--hybrid", "--rotate") else 0.5), label


@pytest.mark.parametrize("transform", [["--smooth"], ["--rotate", "offline"], ["--hybrid", "folded"], ["--hybrid"]])
def test_qwen3_genai_every_transform_exact(family, calib, transform, tmp_path):
    """Qwen3 folders (the builder's per-head q/k norms after a Split of the packed q/k/v): every transform."""
    from onnxqf.analysis.evaluate import compare

    gen = family("qwen3", "gen")
    out = tmp_path / "t"
    assert main(["rewrite", str(gen), *transform, "--quant", "none", *calib, "-o", str(out), "-q"]) == 0
    r = compare(gen, out, WINDOWS, progress=False, max_abs=True)
    assert r["kl"] <= 1e-6 and r["max_abs_diff"] <= 1e-4 * r["max_abs_logit"], r


@pytest.mark.parametrize("fmt", [["--quant", "int8"], ["--quant", "int8", "--act-quant", "tensor"],
                                 ["--quant", "int8w"], ["--quant", "int4", "--asymmetric"]])
def test_qwen3_genai_every_format_generates(family, calib, fmt, tmp_path):
    from onnxqf.analysis.evaluate import compare
    from onnxqf.genai.generate import generate

    gen = family("qwen3", "gen")
    out = tmp_path / "f"
    assert main(["rewrite", str(gen), "--rotate", *fmt, *calib, "-o", str(out), "-q"]) == 0
    assert compare(gen, out, WINDOWS, progress=False)["kl"] < 0.1
    assert generate(out, token_ids=PROMPT, max_new_tokens=4, quiet=True)["new_tokens"] == 4


# -- LFM2: conv layers (tests/tiny.py's lfm2: layer 0 a short convolution, layer 1 attention) ----------------------


@pytest.mark.parametrize("what", ["plain", "gen"])
@pytest.mark.parametrize("transform", [["--smooth"], ["--hybrid", "folded"], ["--rotate"], ["--hybrid"]])
def test_lfm2_every_transform_exact(family, calib, what, transform, tmp_path):
    """Every transform the LFM2 family accepts, exact in float on the plain export and the genai folder; the conv
    layer is transformed too (its out_proj input rotated online by the rotating presets, smoothed into C)."""
    import json

    from onnxqf.analysis.evaluate import compare
    from onnxqf.genai.folder import model_file
    from onnxqf.graph.modelfile import get_metadata, load_model

    src = family("lfm2", what)
    out = tmp_path / ("t.onnx" if what == "plain" else "t")
    assert main(["rewrite", str(src), *transform, "--quant", "none", *calib, "-o", str(out), "-q"]) == 0
    r = compare(src, out, WINDOWS, progress=False, max_abs=True)
    print(what, transform, "KL", r["kl"], "rel", r["max_abs_diff"] / r["max_abs_logit"])
    assert r["kl"] <= 1e-6 and r["max_abs_diff"] <= 1e-4 * r["max_abs_logit"] and r["top1"] == 1.0, r
    model = load_model(model_file(out))
    rotated = {n.name.split("/")[0] for n in model.graph if "/hadamard" in (n.name or "")}
    if transform[0] == "--rotate" or transform == ["--hybrid"]:
        assert "layers.0.out_proj" in rotated, rotated
    smoothed = json.loads(get_metadata(model, "rewrite"))["sites"]
    assert ("layers.0.o_in" in smoothed) == (transform != ["--rotate"]), smoothed  # folded into in_proj's C


@pytest.mark.parametrize("what", ["plain", "gen"])
def test_lfm2_folded_output_rotation_refused_in_one_line(family, what, tmp_path, capsys):
    src = family("lfm2", what)
    out = tmp_path / ("r.onnx" if what == "plain" else "r")
    capsys.readouterr()
    assert main(["rewrite", str(src), "--rotate", "offline", "--quant", "none", "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "LFM2 (lfm2)" in err and "--rotate offline" in err and "channel by channel" in err
    assert not out.exists()


@pytest.mark.parametrize("ep", ["cpu", "cuda"])
def test_lfm2_w8a8_both_targets(family, calib, ep, tmp_path):
    """W8A8 --hybrid lowered for each target (the CUDA lowering's standard ops also run on the CPU provider): every
    layer's linears quantized, in_proj and out_proj included."""
    import json

    from onnxqf.graph.modelfile import get_metadata, load_model
    from onnxqf.maths.metrics import kl_divergence

    plain = family("lfm2", "plain")
    out = tmp_path / "w8a8.onnx"
    assert main(["rewrite", str(plain), "--hybrid", "--ep", ep, *calib, "-o", str(out), "-q"]) == 0
    report = json.loads(get_metadata(load_model(out), "rewrite"))
    assert report["target"] == ep and {"layers.0.in_proj", "layers.0.out_proj"} <= set(report["quantized"])
    assert kl_divergence(_logits(plain, WINDOWS), _logits(out, WINDOWS)) < 0.1


def test_lfm2_genai_folder_feeds_conv_state_and_generates(family):
    """The builder's LFM2 folder: CausalConvWithState with a conv-state input per conv layer. onnxqf feeds zeros of
    [batch, channels, L - 1] (the causal padding) and gets the plain export's logits; onnxruntime-genai generates
    transformers' greedy tokens from the folder."""
    import onnxruntime as ort
    import torch

    from onnxqf.genai.feeds import graph_io, logits_function
    from onnxqf.genai.folder import read_genai
    from onnxqf.graph.modelfile import load_model
    from onnxqf.recognize import recognize

    gen = family("lfm2", "gen")
    io = graph_io(gen)
    assert io.conv_state == (("past.0.conv", "present.0.conv"),) and io.conv_shapes["past.0.conv"][:2] == (64, 2)
    assert read_genai(gen).kv_layers == (1,)
    s = recognize(load_model(gen / "model.onnx"))
    assert [layer.mixer for layer in s.layers] == ["conv", "attention"] and s.family.name == "lfm2"
    assert s.layers[0].conv.conv.op_type == "CausalConvWithState"
    session = ort.InferenceSession(str(gen / "model.onnx"), providers=["CPUExecutionProvider"])
    _exact(_logits(family("lfm2", "plain"), WINDOWS), logits_function(session, io)(WINDOWS))
    from onnxqf.genai.generate import generate

    with torch.no_grad():
        hf = tiny_model("lfm2").generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False,
                                         pad_token_id=0, eos_token_id=None)[0, len(PROMPT):].tolist()
    assert generate(gen, token_ids=PROMPT, max_new_tokens=8, quiet=True)["tokens"] == hf


# -- OLMo: LayerNorms without parameters, centred into RMSNorms; clip_qkv (tests/tiny.py's olmo, olmo-clip) -------


@pytest.mark.parametrize("name", ["olmo", "olmo-clip"])
@pytest.mark.parametrize("transform", [["--smooth"], ["--rotate"], ["--rotate", "offline"], ["--hybrid", "folded"],
                                       ["--hybrid"]])
def test_olmo_every_transform_exact(family, calib, name, transform, tmp_path, capsys):
    """Every transform on OLMo's plain export, exact in float: the residual stream is centred first and its
    LayerNorms are RMSNorms in the output (CentreResidualPass). With clip_qkv (olmo-clip) o_proj's input is neither
    smoothed nor rotated per head (one warning line); without it both are."""
    import json

    from onnxqf.graph.modelfile import get_metadata, load_model
    from onnxqf.recognize import recognize

    plain = family(name, "plain")
    assert [n.kind for n in recognize(load_model(plain)).norms()] == ["LayerNormalization"] * 5
    out = tmp_path / "t.onnx"
    capsys.readouterr()
    assert main(["rewrite", str(plain), *transform, "--quant", "none", *calib, "-o", str(out), "-q"]) == 0
    err = capsys.readouterr().err.strip()
    ref, new = _logits(plain, WINDOWS), _logits(out, WINDOWS)
    from onnxqf.maths.metrics import kl_divergence

    print(name, transform, "rel", np.max(np.abs(new - ref)) / np.max(np.abs(ref)), "KL", kl_divergence(ref, new))
    _exact(ref, new)
    model = load_model(out)
    s = recognize(model)
    assert not s.centring_norms() and {n.kind for n in s.norms()} == {"decomposed"}
    assert not any(node.op_type == "LayerNormalization" for node in model.graph)
    report = json.loads(get_metadata(model, "rewrite"))
    assert report["passes"][0]["name"] == "CentreResidualPass"
    clip = name == "olmo-clip"
    assert s.config.value_clip == clip
    assert (err.count("\n") == 0 and "clip_qkv" in err and "o_proj's input" in err) if clip else err == "", err
    if transform != ["--rotate"] and transform != ["--rotate", "offline"]:
        assert ("layers.0.o_in" in report["sites"]) != clip, report["sites"]
    if transform[0] == "--rotate" or transform == ["--hybrid"] or transform == ["--hybrid", "folded"]:
        assert report["rotations"]["head"] == ("identity" if clip else "hadamard"), report["rotations"]


def test_olmo_quantization_only_keeps_the_layernorms(family, calib, tmp_path):
    """W8A8 without a transform leaves OLMo's graph as exported (LayerNorms, weights uncentred) but for the
    quantized linears; the full hybrid beats it."""
    from onnxqf.graph.modelfile import load_model
    from onnxqf.maths.metrics import kl_divergence

    plain = family("olmo", "plain")
    ref = _logits(plain, WINDOWS)
    kls = {}
    for label, args in (("w8a8", []), ("hybrid", ["--hybrid"])):
        out = tmp_path / f"{label}.onnx"
        assert main(["rewrite", str(plain), *args, *calib, "-o", str(out), "-q"]) == 0, label
        kls[label] = kl_divergence(ref, _logits(out, WINDOWS))
        layer_norms = sum(node.op_type == "LayerNormalization" for node in load_model(out).graph)
        assert layer_norms == (5 if label == "w8a8" else 0), label
    assert kls["hybrid"] < kls["w8a8"] < 0.01, kls


def test_olmo_clip_is_what_transformers_computes_and_folds_under_it_are_refused(family, tmp_path):
    """The clamp bites on the tiny model (the logits without it differ), the export keeps it (a Clip on q, k and v),
    and a per-head value rotation or an o_in smoothing plan is refused by the passes in one line."""
    import torch

    from onnxqf.errors import OnnxqfError
    from onnxqf.graph.modelfile import load_model
    from onnxqf.maths.hadamard import rotation
    from onnxqf.passes.rotate_vo import ValueOutputRotationPass
    from onnxqf.plan import Plan
    from onnxqf.recognize import recognize

    plain = family("olmo-clip", "plain")
    model = tiny_model("olmo-clip")
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(WINDOWS)).logits.numpy()
        model.config.clip_qkv = None
        for layer in model.model.layers:
            layer.self_attn.config = model.config
        unclipped = model(input_ids=torch.from_numpy(WINDOWS)).logits.numpy()
    assert np.max(np.abs(unclipped - ref)) > 0.05 * np.max(np.abs(ref))
    _exact(ref, _logits(plain, WINDOWS))
    m = load_model(plain)
    assert sum(node.op_type == "Clip" for node in m.graph) == 6
    s = recognize(m)
    plan = Plan.build(s.config, "hybrid")
    assert "o_in" not in plan.smooth and plan.head.kind == "identity" and plan.heads.kind == "hadamard"
    with pytest.raises(Exception) as info:
        ValueOutputRotationPass(rotation(16, 0), plan.heads)(m)
    cause = info.value if isinstance(info.value, OnnxqfError) else info.value.__cause__
    assert isinstance(cause, OnnxqfError) and "clip_qkv" in str(cause) and "\n" not in str(cause)


@pytest.mark.slow
def test_olmo_builder_folder_is_not_the_model(family, tmp_path):
    """Why OLMo's --kv-cache is refused: onnxruntime-genai 0.18's builder writes OLMo's LayerNorm as an RMSNorm
    (SimplifiedLayerNormalization, no mean subtracted), so its folder's logits are far from the model's."""
    import subprocess
    import sys

    import onnx
    import onnxruntime as ort

    from onnxqf.genai.feeds import graph_io, logits_function

    hf = family("olmo", "hf")
    out = tmp_path / "gen"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p",
                    "fp32", "-e", "cpu", "-c", str(tmp_path / "cache")], check=True, capture_output=True)
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "SimplifiedLayerNormalization" in ops and "LayerNormalization" not in ops
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ref = _logits(family("olmo", "plain"), WINDOWS)
    folder = logits_function(session, graph_io(out))(WINDOWS)
    assert np.max(np.abs(folder - ref)) > 0.1 * np.max(np.abs(ref))
