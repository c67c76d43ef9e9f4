"""onnxruntime-genai folders: reading and checking them, logits with an empty KV cache, generation.

A genai folder (written by onnxruntime-genai's model builder, e.g. through ``onnxqf export --kv-cache``)
holds ``genai_config.json``, the decoder graph it names (``model.onnx`` + ``.data``) and the tokenizer
files. Its graph has inputs ``input_ids``, ``attention_mask``, sometimes ``position_ids``, and
``past_key_values.N.key|value`` of shape [batch, kv_heads, past, head_size]; outputs ``logits`` and
``present.N.key|value``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from onnxqf.errors import BadModelFileError, GenaiFolderError, OnnxqfError

GENAI_CONFIG = "genai_config.json"
GENAI_INSTALL = "pip install 'onnxqf[genai]'"
# Fused attention ops of ONNX Runtime that a decoder graph may use. Only GroupQueryAttention (the
# model builder's choice for float32/cpu and float16/cuda) is supported by recognition and rewriting.
ATTENTION_OPS = {"GroupQueryAttention", "MultiHeadAttention", "Attention", "PagedAttention", "SparseAttention",
                 "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "PackedAttention"}
SUPPORTED_ATTENTION = "GroupQueryAttention"
_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16"}
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def require_og():
    """The onnxruntime_genai module, or one clear line saying what to install."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise OnnxqfError(f"this command needs onnxruntime-genai: {GENAI_INSTALL}") from None
    return og


@dataclass(frozen=True)
class GenaiFolder:
    directory: Path
    model_path: Path
    config: dict  # the parsed genai_config.json
    layers: int
    num_heads: int
    kv_heads: int
    head_size: int
    hidden: int | None
    vocab: int | None
    attention_op: str
    io_dtype: str  # dtype of the KV cache (and logits): float32 / float16 / bfloat16
    past_key_names: str  # e.g. "past_key_values.%d.key"
    past_value_names: str
    graph_inputs: tuple[str, ...]

    @property
    def decoder(self) -> dict:
        return self.config["model"]["decoder"]

    def past_names(self) -> list[str]:
        return [p % i for i in range(self.layers) for p in (self.past_key_names, self.past_value_names)]


def genai_dir(path: str | os.PathLike) -> Path | None:
    """The genai folder of ``path`` (a folder, or a graph file inside one), or None."""
    p = Path(path)
    d = p if p.is_dir() else p.parent
    return d if (d / GENAI_CONFIG).is_file() else None


def is_genai(path: str | os.PathLike) -> bool:
    return genai_dir(path) is not None


def model_file(path: str | os.PathLike) -> Path:
    """The .onnx file to open for ``path``: itself, or the decoder graph of a genai folder."""
    p = Path(path)
    if p.is_dir():
        return read_genai(p, check_attention=False).model_path
    return p


def read_genai(path: str | os.PathLike, *, check_attention: bool = True) -> GenaiFolder:
    """Read and check a genai folder (``DIR`` or ``DIR/model.onnx``) against its graph.

    Raises :class:`GenaiFolderError` (one line) for a folder without ``genai_config.json``, a config
    that disagrees with the graph (layers, heads, head size) and, with ``check_attention``, an
    attention op other than GroupQueryAttention.
    """
    p = Path(path)
    if not p.exists():
        raise GenaiFolderError(f"{p}: no such file or folder")
    d = p if p.is_dir() else p.parent
    cfg_path = d / GENAI_CONFIG
    if not cfg_path.is_file():
        raise GenaiFolderError(f"{d}: not an onnxruntime-genai folder (no {GENAI_CONFIG}; make one with "
                               "`onnxqf export ... --kv-cache -o DIR/model.onnx`)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GenaiFolderError(f"{cfg_path}: not valid JSON ({exc})") from None
    dec = config.get("model", {}).get("decoder") if isinstance(config, dict) and isinstance(config.get("model"), dict) else None
    if not isinstance(dec, dict):
        raise GenaiFolderError(f"{cfg_path}: no model.decoder section")
    missing = [k for k in ("filename", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_size")
               if k not in dec]
    if missing:
        raise GenaiFolderError(f"{cfg_path}: model.decoder lacks {', '.join(missing)}")
    model_path = d / str(dec["filename"])
    if p.is_file() and p.name != model_path.name:
        raise GenaiFolderError(f"{p}: {GENAI_CONFIG} in this folder names the decoder '{model_path.name}', not '{p.name}'")
    if not model_path.is_file():
        raise GenaiFolderError(f"{d}: {GENAI_CONFIG} names the decoder '{model_path.name}', which is missing")
    proto = _load_graph(model_path)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    inputs = {v.name: v for v in graph.input if v.name not in inits}
    names_in = dec.get("inputs", {}) if isinstance(dec.get("inputs"), dict) else {}
    ids_name = names_in.get("input_ids", "input_ids")
    if ids_name not in inputs:
        raise GenaiFolderError(f"{model_path}: the graph has no input '{ids_name}' (inputs_embeds-only decoders are not supported)")
    key_pat = names_in.get("past_key_names", "past_key_values.%d.key")
    value_pat = names_in.get("past_value_names", "past_key_values.%d.value")
    layers = 0
    while _fmt(key_pat, layers) in inputs:
        layers += 1
    if layers == 0:
        raise GenaiFolderError(f"{model_path}: the graph has no KV-cache inputs ('{_fmt(key_pat, 0)}')")
    n_layers, n_heads = int(dec["num_hidden_layers"]), int(dec["num_attention_heads"])
    kv_heads, head_size = int(dec["num_key_value_heads"]), int(dec["head_size"])
    if layers != n_layers:
        raise GenaiFolderError(f"{d}: {GENAI_CONFIG} says num_hidden_layers={n_layers}, the graph has {layers} "
                               f"'{_fmt(key_pat, 0)}'-style inputs")
    dtypes = set()
    for i in range(layers):
        for pat in (key_pat, value_pat):
            name = _fmt(pat, i)
            if name not in inputs:
                raise GenaiFolderError(f"{model_path}: the graph has no input '{name}'")
            tt = inputs[name].type.tensor_type
            dims = [dim.dim_value if dim.HasField("dim_value") else None for dim in tt.shape.dim]
            if len(dims) != 4:
                raise GenaiFolderError(f"{model_path}: '{name}' has rank {len(dims)}, expected [batch, kv_heads, past, head_size]")
            if dims[1] is not None and dims[1] != kv_heads:
                raise GenaiFolderError(f"{d}: {GENAI_CONFIG} says num_key_value_heads={kv_heads}, the graph's '{name}' has {dims[1]}")
            if dims[3] is not None and dims[3] != head_size:
                raise GenaiFolderError(f"{d}: {GENAI_CONFIG} says head_size={head_size}, the graph's '{name}' has {dims[3]}")
            dtypes.add(tt.elem_type)
    if len(dtypes) != 1 or next(iter(dtypes)) not in _ONNX_DTYPES:
        raise GenaiFolderError(f"{model_path}: unsupported KV-cache dtypes {sorted(dtypes)} (expected float32 or float16)")
    attn = [n for n in graph.node if n.op_type in ATTENTION_OPS]
    ops = sorted({n.op_type for n in attn})
    if not attn:
        raise GenaiFolderError(f"{model_path}: no fused attention op ({SUPPORTED_ATTENTION}) in the graph; unfused attention is not supported")
    if len(ops) > 1:
        raise GenaiFolderError(f"{model_path}: mixed attention ops {', '.join(ops)}")
    op = ops[0]
    if check_attention and op != SUPPORTED_ATTENTION:
        raise GenaiFolderError(f"{model_path}: unsupported attention op {op} (supported: {SUPPORTED_ATTENTION}, which the model "
                               "builder emits for float32 on cpu and float16 on cuda)")
    if op == SUPPORTED_ATTENTION:
        _check_gqa(attn, graph, inits, layers, n_heads, kv_heads, head_size, d)
    model_cfg = config["model"]
    return GenaiFolder(
        directory=d, model_path=model_path, config=config, layers=layers, num_heads=n_heads, kv_heads=kv_heads,
        head_size=head_size, hidden=dec.get("hidden_size"), vocab=model_cfg.get("vocab_size"), attention_op=op,
        io_dtype=_ONNX_DTYPES[next(iter(dtypes))], past_key_names=key_pat, past_value_names=value_pat,
        graph_inputs=tuple(inputs),
    )


def _fmt(pattern: str, i: int) -> str:
    try:
        return pattern % i
    except (TypeError, ValueError):
        raise GenaiFolderError(f"bad KV-cache name pattern '{pattern}' in {GENAI_CONFIG}") from None


def _load_graph(path: Path):
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise BadModelFileError(f"{path}: not a readable ONNX model ({str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__})") from None
    if not proto.graph.node:
        raise BadModelFileError(f"{path}: not an ONNX model (no graph nodes; truncated or wrong file?)")
    return proto


def _check_gqa(nodes, graph, inits, layers, n_heads, kv_heads, head_size, d) -> None:
    if len(nodes) != layers:
        raise GenaiFolderError(f"{d}: {len(nodes)} GroupQueryAttention nodes for {layers} layers")
    producers = {o: n for n in graph.node for o in n.output}
    for node in nodes:
        attrs = {a.name: a.i for a in node.attribute if a.name in ("num_heads", "kv_num_heads")}
        if attrs.get("num_heads") != n_heads or attrs.get("kv_num_heads") != kv_heads:
            raise GenaiFolderError(f"{d}: {GENAI_CONFIG} says {n_heads} heads / {kv_heads} kv heads, the graph's {node.name} has "
                                   f"{attrs.get('num_heads')} / {attrs.get('kv_num_heads')}")
        packed = len(node.input) < 3 or (node.input[1] == "" and node.input[2] == "")
        if not packed:
            continue
        width = _output_width(producers.get(node.input[0]), producers, inits)
        if width is not None and width != (n_heads + 2 * kv_heads) * head_size:
            raise GenaiFolderError(f"{d}: {GENAI_CONFIG} implies a packed q/k/v width of ({n_heads} + 2*{kv_heads}) * {head_size} = "
                                   f"{(n_heads + 2 * kv_heads) * head_size}, the graph's {node.name} gets {width}")


def _output_width(node, producers, inits) -> int | None:
    """Columns of the packed q/k/v projection feeding GroupQueryAttention, when the graph says."""
    for _ in range(3):  # MatMul, or Add(bias) after it
        if node is None:
            return None
        if node.op_type == "MatMulNBits":
            return next((a.i for a in node.attribute if a.name == "N"), None)
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            dims = list(inits[node.input[1]].dims)
            return int(dims[-1]) if len(dims) == 2 else None
        if node.op_type == "Add":
            node = producers.get(node.input[0])
            continue
        return None
    return None


# --------------------------------------------------------------------------- writing a rewritten folder


def output_path(folder: GenaiFolder, out: str | os.PathLike) -> Path:
    """The decoder path of a new genai folder for ``out`` (``NEWDIR/name.onnx`` or ``NEWDIR``), checked.

    The folder must be new, empty or an earlier genai folder (replaced as a whole), and neither the
    input folder nor one of its parents (:class:`GenaiFolderError` otherwise, before any work).
    """
    out = Path(out)
    out = (out if out.suffix == ".onnx" else out / folder.model_path.name).absolute()
    target, src = out.parent, folder.directory.resolve()
    if target.exists() and (target.resolve() == src or target.resolve() in src.parents):
        raise GenaiFolderError(f"the output folder {target} would replace the input genai folder {folder.directory}; "
                               "choose a new folder with -o NEWDIR/model.onnx")
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / GENAI_CONFIG).is_file())):
        raise GenaiFolderError(f"{target} exists and is not an onnxruntime-genai folder: choose a new or empty folder "
                               "(a genai model, its config and tokenizer files live together in one folder)")
    return out


def write_folder(folder: GenaiFolder, model, out: Path) -> Path:
    """Write ``model`` as the decoder ``out`` of a new genai folder (see :func:`output_path`), atomically.

    Every other entry of ``folder`` (``genai_config.json``, tokenizer files, ...) is copied; the
    config names ``out``'s file. The folder is built beside the target, checked with
    :func:`read_genai`, and renamed into place at the end: a failure leaves nothing behind, and the
    input folder is only read.
    """
    import shutil
    import tempfile

    from onnxqf.graph.modelfile import _all_tensors, save_model
    from onnxqf.models.genai_export import _replace_dir

    target = out.parent
    skip = {folder.model_path.name, GENAI_CONFIG}
    skip |= {e.value for t in _all_tensors(_load_graph(folder.model_path)) for e in t.external_data if e.key == "location"}
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.onnxqf-partial-", dir=target.parent) as tmp:
        built = Path(tmp) / "genai"
        built.mkdir()
        for entry in folder.directory.iterdir():
            if entry.name in skip or "onnxqf-partial-" in entry.name or entry.resolve() == target.resolve():
                continue
            if entry.is_dir():
                shutil.copytree(entry, built / entry.name)
            else:
                shutil.copy2(entry, built / entry.name)
        config = json.loads(json.dumps(folder.config))
        config["model"]["decoder"]["filename"] = out.name
        (built / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        # no onnx.checker: the builder's graphs use ONNX Runtime's SimplifiedLayerNormalization in the
        # default domain, which the checker does not know (it rejects the builder's own output)
        save_model(model, built / out.name, check=False)
        read_genai(built / out.name)  # the folder must be one we (and onnxruntime-genai) can read
        _replace_dir(built, target, Path(tmp) / "old")
    return out


# --------------------------------------------------------------------------- logits with a KV cache


def is_kv_session(session) -> bool:
    return any(i.name in ("attention_mask", "position_ids") or i.name.startswith("past_") for i in session.get_inputs())


def feed_function(session, path: str | os.PathLike | None = None,
                  kv_shape: tuple[int, int] | None = None) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """ids [batch, seq] -> the session's feed, for a plain graph (input_ids) or a KV-cache graph.

    A KV-cache graph gets ``attention_mask`` (ones), ``position_ids`` (0..seq-1) when it has that
    input, and an empty past [batch, kv_heads, 0, head_size] for every cache input, in its dtype.
    Symbolic cache dims are taken from ``kv_shape`` = (kv_heads, head_size), else from the
    ``genai_config.json`` beside ``path``.
    """
    inputs = session.get_inputs()
    if not is_kv_session(session):
        first = inputs[0].name
        return lambda ids: {first: np.asarray(ids, dtype=np.int64)}
    folder = None
    past = {}
    for i in inputs:
        if i.name in ("input_ids", "attention_mask", "position_ids"):
            continue
        shape = list(i.shape)
        if len(shape) != 4:
            raise OnnxqfError(f"{path or 'model'}: graph input '{i.name}' is not one onnxqf knows how to feed")
        if i.type not in _ORT_DTYPES:
            raise OnnxqfError(f"{path or 'model'}: KV-cache input '{i.name}' has dtype {i.type} (float32 or float16 supported)")
        if not isinstance(shape[1], int) or not isinstance(shape[3], int):
            if kv_shape is not None:
                known = kv_shape
            else:
                if folder is None:
                    if path is None or genai_dir(path) is None:
                        raise OnnxqfError(f"{path or 'model'}: cannot tell the KV-cache shape of '{i.name}' without its {GENAI_CONFIG}")
                    folder = read_genai(path, check_attention=False)
                known = (folder.kv_heads, folder.head_size)
            shape[1] = shape[1] if isinstance(shape[1], int) else known[0]
            shape[3] = shape[3] if isinstance(shape[3], int) else known[1]
        past[i.name] = (shape[1], shape[3], _ORT_DTYPES[i.type])
    names = {i.name for i in inputs}

    def feed(ids: np.ndarray) -> dict[str, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        b, s = ids.shape
        out = {"input_ids": ids}
        if "attention_mask" in names:
            out["attention_mask"] = np.ones((b, s), np.int64)
        if "position_ids" in names:
            out["position_ids"] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        for name, (heads, head, dt) in past.items():
            out[name] = np.zeros((b, heads, 0, head), dt)
        return out

    return feed


def logits_function(session, path: str | os.PathLike | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """ids [batch, seq] -> logits, for a plain graph (input_ids -> logits) or a KV-cache graph
    (fed by :func:`feed_function`: an empty past)."""
    from onnxqf.runtime.session import logits

    if not is_kv_session(session):
        return lambda ids: logits(session, ids)
    out_names = [o.name for o in session.get_outputs()]
    out = "logits" if "logits" in out_names else out_names[0]
    feed = feed_function(session, path)
    return lambda ids: session.run([out], feed(ids))[0]


# --------------------------------------------------------------------------- generation


def generate(path: str | os.PathLike, prompt: str | None = None, *, token_ids=None, max_new_tokens: int = 64,
             ep: str = "cpu", stream=None, quiet: bool = False) -> dict:
    """Greedy generation with onnxruntime-genai, streaming decoded text to ``stream`` (stdout).

    Returns the generated token ids and the prefill / decode speeds. ``token_ids`` replaces the
    prompt (no tokenizer needed).
    """
    folder = read_genai(path, check_attention=False)
    og = require_og()
    stream = sys.stdout if stream is None else stream
    config = og.Config(str(folder.directory))
    config.clear_providers()
    if ep == "cuda":
        if not og.is_cuda_available():
            raise OnnxqfError("CUDA is not available to this onnxruntime-genai build (pip install onnxruntime-genai-cuda)")
        config.append_provider("cuda")
    elif ep != "cpu":
        raise OnnxqfError(f"unknown execution provider '{ep}' (use cpu or cuda)")
    try:
        model = og.Model(config)
    except Exception as exc:
        raise OnnxqfError(f"onnxruntime-genai cannot load {folder.directory}: {str(exc).strip().splitlines()[0][:300]}") from None
    tok_stream = None
    if token_ids is None:
        if prompt is None:
            raise OnnxqfError("give a prompt")
        try:
            tokenizer = og.Tokenizer(model)
        except Exception as exc:
            raise OnnxqfError(f"onnxruntime-genai cannot load the tokenizer of {folder.directory}: {str(exc).strip()[:200]}") from None
        ids = np.asarray(tokenizer.encode(prompt), dtype=np.int32)
        tok_stream = tokenizer.create_stream()
    else:
        ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
    if ids.size == 0:
        raise OnnxqfError("the prompt is empty")
    context = int(folder.config["model"].get("context_length") or (ids.size + max_new_tokens))
    if ids.size >= context:
        raise OnnxqfError(f"the prompt has {ids.size} tokens, the model's context is {context}")
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=min(context, int(ids.size) + max_new_tokens))
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids[None, :])  # prefill: runs the prompt through the model
    t_prefill = time.perf_counter() - t0
    new: list[int] = []
    t_first = None
    t1 = time.perf_counter()
    while not gen.is_done() and len(new) < max_new_tokens:
        gen.generate_next_token()  # the first call only selects; later ones run one decode step first
        if t_first is None:
            t_first = time.perf_counter()
        token = int(gen.get_next_tokens()[0])
        new.append(token)
        if tok_stream is not None:
            stream.write(tok_stream.decode(token))
            stream.flush()
    t_end = time.perf_counter()
    if tok_stream is not None:
        stream.write("\n")
        stream.flush()
    decode_steps = max(len(new) - 1, 0)
    decode_s = (t_end - t_first) if t_first is not None else 0.0
    result = {
        "prompt_tokens": int(ids.size), "new_tokens": len(new), "tokens": new,
        "prefill_s": t_prefill + ((t_first - t1) if t_first is not None else 0.0),
        "decode_s": decode_s,
    }
    result["prefill_tok_s"] = ids.size / result["prefill_s"] if result["prefill_s"] > 0 else float("inf")
    result["decode_tok_s"] = decode_steps / decode_s if decode_s > 0 else float("nan")
    if not quiet:
        print(f"[onnxqf] prefill: {ids.size} tokens, {result['prefill_tok_s']:.1f} tokens/s; decode: {decode_steps} tokens, "
              f"{result['decode_tok_s']:.1f} tokens/s ({ep})", file=sys.stderr)
    return result
