"""onnxruntime-genai folders: reading and checking them, writing a rewritten one.

A genai folder (written by onnxruntime-genai's model builder, e.g. through ``onnxqf export --kv-cache``)
holds ``genai_config.json``, the decoder graph it names (``model.onnx`` + ``.data``) and the tokenizer
files. Its graph has inputs ``input_ids``, ``attention_mask``, sometimes ``position_ids``, and
``past_key_values.N.key|value`` of shape [batch, kv_heads, past, head_size]; outputs ``logits`` and
``present.N.key|value``.

Feeding such a graph is :mod:`onnxqf.genai.feeds`; generating text with onnxruntime-genai is
:mod:`onnxqf.genai.generate`. This module imports neither ONNX Runtime nor onnxqf's runtime.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from onnxqf.errors import BadModelFileError, GenaiFolderError, OnnxqfError
from onnxqf.graph.graphio import GraphIO

__all__ = ["ATTENTION_OPS", "GENAI_CONFIG", "GENAI_INSTALL", "IO_DTYPES", "PIPELINE_TYPE", "SUPPORTED_ATTENTION",
           "GenaiFolder", "genai_config", "genai_dir", "is_genai", "load_graph", "model_file", "output_path",
           "read_genai", "is_pipeline", "require_og", "stage_files", "write_folder"]

GENAI_CONFIG = "genai_config.json"
GENAI_INSTALL = "pip install 'onnxqf[genai]'"
# Fused attention ops of ONNX Runtime that a decoder graph may use. Only GroupQueryAttention (the
# model builder's choice for float32/cpu and float16/cuda) is supported by recognition and rewriting.
ATTENTION_OPS = {"GroupQueryAttention", "MultiHeadAttention", "Attention", "PagedAttention", "SparseAttention",
                 "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "PackedAttention"}
SUPPORTED_ATTENTION = "GroupQueryAttention"
#: KV-cache (and logits) dtypes of the folders read_genai accepts
IO_DTYPES = ("float32", "float16", "bfloat16")


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
    kv_layers: tuple[int, ...] = ()  # the layers with a KV cache (all but LFM2's conv layers)

    @property
    def decoder(self) -> dict:
        return self.config["model"]["decoder"]

    def past_names(self) -> list[str]:
        return [p % i for i in self.kv_layers for p in (self.past_key_names, self.past_value_names)]


#: the model type of a prefill / decode pipeline folder (:mod:`onnxqf.genai.pipeline`)
PIPELINE_TYPE = "decoder-pipeline"


def stage_files(config: dict) -> list[tuple[str, dict]] | None:
    """A pipeline config's stages as (filename, stage) in order, or None for an ordinary decoder config."""
    model = config.get("model", {}) if isinstance(config, dict) else {}
    pipeline = model.get("decoder", {}).get("pipeline") if isinstance(model, dict) else None
    if model.get("type") != PIPELINE_TYPE or not isinstance(pipeline, list):
        return None
    stages = []
    for entry in pipeline:
        for _name, stage in (entry.items() if isinstance(entry, dict) else []):
            if isinstance(stage, dict) and "filename" in stage:
                stages.append((str(stage["filename"]), stage))
    return stages


def genai_config(path: str | os.PathLike) -> dict | None:
    """The parsed genai_config.json of ``path``'s folder (a folder, or a file in one); None where there is none or it
    cannot be read (:func:`read_genai` says what is wrong with it)."""
    d = genai_dir(path)
    if d is None:
        return None
    try:
        config = json.loads((d / GENAI_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def is_pipeline(path: str | os.PathLike) -> bool:
    """``path`` (a folder or a file in one) is a prefill / decode pipeline folder (:func:`stage_files`)."""
    config = genai_config(path)
    return config is not None and stage_files(config) is not None


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
    model_cfg = config.get("model") if isinstance(config, dict) else None
    dec = model_cfg.get("decoder") if isinstance(model_cfg, dict) else None
    if not isinstance(dec, dict):
        raise GenaiFolderError(f"{cfg_path}: no model.decoder section")
    stages = stage_files(config)
    if stages:  # a prefill / decode pipeline (onnxqf.genai.pipeline): read as its prompt stage's graph
        dec = dict(dec, filename=next((f for f, st in stages if st.get("run_on_prompt", True)), stages[0][0]))
    missing = [k for k in ("filename", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_size")
               if k not in dec]
    if missing:
        raise GenaiFolderError(f"{cfg_path}: model.decoder lacks {', '.join(missing)}")
    model_path = d / str(dec["filename"])
    if p.is_file() and p.name != model_path.name:
        raise GenaiFolderError(f"{p}: {GENAI_CONFIG} in this folder names the decoder '{model_path.name}', "
                               f"not '{p.name}'")
    if not model_path.is_file():
        raise GenaiFolderError(f"{d}: {GENAI_CONFIG} names the decoder '{model_path.name}', which is missing")
    proto = load_graph(model_path)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    try:
        io = GraphIO.from_proto(proto, path=str(model_path))
    except GenaiFolderError:
        raise
    except OnnxqfError as exc:  # cache inputs that disagree with each other
        raise GenaiFolderError(str(exc)) from None
    inputs = set(io.inputs)
    names_in = dec.get("inputs", {}) if isinstance(dec.get("inputs"), dict) else {}
    ids_name = names_in.get("input_ids", "input_ids")
    if ids_name not in inputs:
        raise GenaiFolderError(f"{model_path}: the graph has no input '{ids_name}' "
                               "(inputs_embeds-only decoders are not supported)")
    key_pat = names_in.get("past_key_names", "past_key_values.%d.key")
    value_pat = names_in.get("past_value_names", "past_key_values.%d.value")
    n_layers, n_heads = int(dec["num_hidden_layers"]), int(dec["num_attention_heads"])
    kv_heads, head_size = int(dec["num_key_value_heads"]), int(dec["head_size"])
    kv_layers, conv_layers = _layer_kinds(dec, names_in, n_layers, cfg_path)
    if not conv_layers:  # every layer has a KV cache: count them in the graph
        layers = 0
        while _fmt(key_pat, layers) in inputs:
            layers += 1
        if layers == 0:
            raise GenaiFolderError(f"{model_path}: the graph has no KV-cache inputs ('{_fmt(key_pat, 0)}')")
        if layers != n_layers:
            raise GenaiFolderError(f"{d}: {GENAI_CONFIG} says num_hidden_layers={n_layers}, the graph has {layers} "
                                   f"'{_fmt(key_pat, 0)}'-style inputs")
        kv_layers = tuple(range(layers))
    layers = n_layers
    cache = {past for past, _ in io.cache}
    for i in kv_layers:
        for pat in (key_pat, value_pat):
            name = _fmt(pat, i)
            if name not in inputs:
                raise GenaiFolderError(f"{model_path}: the graph has no input '{name}'")
            if name not in cache:
                raise GenaiFolderError(f"{model_path}: the KV-cache input '{name}' is not named past_* (onnxqf feeds "
                                       "those as the cache)")
    states = {past for past, _ in io.conv_state}
    for i in conv_layers:
        name = _fmt(names_in["past_conv_names"], i)
        if name not in states:
            raise GenaiFolderError(f"{model_path}: the graph has no conv-state input '{name}' "
                                   f"([batch, channels, width], named past.N.conv) for conv layer {i}")
    name = _fmt(key_pat, kv_layers[0])
    if io.cache_rank != 4:
        raise GenaiFolderError(f"{model_path}: '{name}' has rank {io.cache_rank}, "
                               "expected [batch, kv_heads, past, head_size]")
    if io.kv_heads is not None and io.kv_heads != kv_heads:
        raise GenaiFolderError(f"{d}: {GENAI_CONFIG} says num_key_value_heads={kv_heads}, "
                               f"the graph's '{name}' has {io.kv_heads}")
    if io.head_dim is not None and io.head_dim != head_size:
        raise GenaiFolderError(f"{d}: {GENAI_CONFIG} says head_size={head_size}, "
                               f"the graph's '{name}' has {io.head_dim}")
    io_dtype = None if io.cache_dtype is None else io.cache_dtype.name
    if io_dtype not in IO_DTYPES:
        raise GenaiFolderError(f"{model_path}: unsupported KV-cache dtype {io_dtype} (expected float32 or float16)")
    attn = [n for n in graph.node if n.op_type in ATTENTION_OPS]
    ops = sorted({n.op_type for n in attn})
    if not attn:
        raise GenaiFolderError(f"{model_path}: no fused attention op ({SUPPORTED_ATTENTION}) in the graph; "
                               "unfused attention is not supported")
    if len(ops) > 1:
        raise GenaiFolderError(f"{model_path}: mixed attention ops {', '.join(ops)}")
    op = ops[0]
    if check_attention and op != SUPPORTED_ATTENTION:
        raise GenaiFolderError(f"{model_path}: unsupported attention op {op} (supported: {SUPPORTED_ATTENTION}, "
                               "which the model builder emits for float32 on cpu and float16 on cuda)")
    if op == SUPPORTED_ATTENTION:
        _check_gqa(attn, graph, inits, len(kv_layers), n_heads, kv_heads, head_size, d)
    model_cfg = config["model"]
    return GenaiFolder(
        directory=d, model_path=model_path, config=config, layers=layers, num_heads=n_heads, kv_heads=kv_heads,
        head_size=head_size, hidden=dec.get("hidden_size"), vocab=model_cfg.get("vocab_size"), attention_op=op,
        io_dtype=io_dtype, past_key_names=key_pat, past_value_names=value_pat,
        graph_inputs=io.inputs, kv_layers=tuple(kv_layers),
    )


def _layer_kinds(dec: dict, names_in: dict, n_layers: int, cfg_path: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(layers with a KV cache, conv layers) from the decoder's ``layer_types`` when it names conv layers (LFM2,
    with ``past_conv_names``); ((), ()) for a decoder of attention layers only."""
    types = dec.get("layer_types")
    if not isinstance(types, list) or "conv" not in types:
        return (), ()
    if len(types) != n_layers or "past_conv_names" not in names_in:
        raise GenaiFolderError(f"{cfg_path}: layer_types names conv layers but does not list num_hidden_layers="
                               f"{n_layers} layers with inputs.past_conv_names")
    kv = tuple(i for i, t in enumerate(types) if t != "conv")
    if not kv:
        raise GenaiFolderError(f"{cfg_path}: no attention layer (layer_types are all conv)")
    return kv, tuple(i for i, t in enumerate(types) if t == "conv")


def _fmt(pattern: str, i: int) -> str:
    try:
        return pattern % i
    except (TypeError, ValueError):
        raise GenaiFolderError(f"bad KV-cache name pattern '{pattern}' in {GENAI_CONFIG}") from None


def load_graph(path: Path):
    """The graph of ``path`` without its external data; BadModelFileError (one line) when it is not ONNX."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BadModelFileError(f"{path}: not a readable ONNX model ({why})") from None
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
            raise GenaiFolderError(f"{d}: {GENAI_CONFIG} says {n_heads} heads / {kv_heads} kv heads, the graph's "
                                   f"{node.name} has {attrs.get('num_heads')} / {attrs.get('kv_num_heads')}")
        packed = len(node.input) < 3 or (node.input[1] == "" and node.input[2] == "")
        if not packed:
            continue
        width = _output_width(producers.get(node.input[0]), producers, inits)
        if width is not None and width != (n_heads + 2 * kv_heads) * head_size:
            raise GenaiFolderError(f"{d}: {GENAI_CONFIG} implies a packed q/k/v width of "
                                   f"({n_heads} + 2*{kv_heads}) * {head_size} = "
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


def write_folder(folder: GenaiFolder, model, out: Path, custom_ops_library: Path | None = None) -> Path:
    """Write ``model`` as the decoder ``out`` of a new genai folder (see :func:`output_path`), atomically.

    Every other entry of ``folder`` (``genai_config.json``, tokenizer files, ...) is copied; the
    config names ``out``'s file. ``custom_ops_library``: a custom-op library the graph needs (onnxqf's CUDA
    kernels), copied into the folder and named in the decoder's ``session_options.custom_ops_library``
    (onnxruntime-genai loads it from there; the path must lie inside the folder). The folder is built
    beside the target, checked with :func:`read_genai`, and renamed into place at the end: a failure
    leaves nothing behind, and the input folder is only read.
    """
    import shutil

    from onnxqf.graph.fileio import atomic_dir, is_partial
    from onnxqf.graph.modelfile import all_tensors, save_model

    target = out.parent
    skip = {folder.model_path.name, GENAI_CONFIG}
    skip |= {e.value for t in all_tensors(load_graph(folder.model_path)) for e in t.external_data
             if e.key == "location"}
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as built:
        for entry in folder.directory.iterdir():
            if entry.name in skip or is_partial(entry.name) or entry.resolve() == target.resolve():
                continue
            if entry.is_dir():
                shutil.copytree(entry, built / entry.name)
            else:
                shutil.copy2(entry, built / entry.name)
        config = json.loads(json.dumps(folder.config))
        config["model"]["decoder"]["filename"] = out.name
        if custom_ops_library is not None:
            shutil.copy2(custom_ops_library, built / custom_ops_library.name)
            config["model"]["decoder"].setdefault("session_options", {})["custom_ops_library"] = custom_ops_library.name
        (built / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        # no onnx.checker: the builder's graphs use ONNX Runtime's SimplifiedLayerNormalization in the
        # default domain, which the checker does not know (it rejects the builder's own output)
        save_model(model, built / out.name, check=False)
        read_genai(built / out.name)  # the folder must be one we (and onnxruntime-genai) can read
    return out
