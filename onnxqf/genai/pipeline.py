"""One onnxruntime-genai folder from two rewrites of one model: a graph for the prompt, another for decoding.

ONNX Runtime's CPU kernels are fastest for different weight formats at the two phases: ``MatMulIntegerToFloat``
(W8A8, per-token codes) on a prompt of hundreds of tokens, ``MatMulNBits`` with int8 compute at one token (per
linear, 8-bit MatMulNBits runs 1.4-1.8x faster than MatMulIntegerToFloat there on the Xeon of docs/benchmarks.md h;
end to end the two-graph folder decodes 1.2x faster than W8A8 on the development machine, ~3 % on that Xeon, where
both are at the memory bound). A graph cannot
switch kernels by the number of tokens cheaply, but onnxruntime-genai can: its ``decoder-pipeline`` model type runs
each stage of ``model.decoder.pipeline`` on the prompt, on generated tokens or both (``run_on_prompt``,
``run_on_token_gen``), with the KV cache, the attention mask and the logits handed between stages by name. Here two
stages, each a whole decoder: ``prefill.onnx`` (the prompt) and ``decode.onnx`` (every later token); both read and
write the same KV cache, so the two graphs must compute it in one basis. :func:`join` checks that by running both on
a few tokens (a rotation applied by one rewrite and not the other moves the cache into another basis; quantization
noise does not). The price: two copies of the weights on disk and in memory.

Rules of :func:`join`: both folders are onnxruntime-genai folders of one model (the same decoder inputs and
outputs, layers, heads, head size, KV names and dtype), neither is a pipeline already; their present key and value
caches on the check prompt agree to within ``max_cache_error`` (relative Frobenius error per layer); the new folder
holds the prompt folder's other files (config, tokenizer, custom-op library) and the decode folder's library if
it has one; it is written beside its place and renamed into it (nothing is left on failure; the inputs are only
read).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from onnxqf.errors import GenaiFolderError
from onnxqf.genai.folder import (
    GENAI_CONFIG,
    PIPELINE_TYPE,
    GenaiFolder,
    is_pipeline,
    load_graph,
    output_path,
    read_genai,
)

__all__ = ["PREFILL", "DECODE", "cache_error", "join"]

PREFILL = "prefill.onnx"
DECODE = "decode.onnx"
#: the check prompt's length (tokens) and the largest relative error allowed between the two graphs' caches: two
#: quantizations of one basis measured 0.02-0.03 (tiny model) and 0.26 (a random 8-layer Llama, W8A8 against int8w);
#: caches in other bases 1.5 (a rotation in one only) and 7.6 (the hybrid's calibrated smoothing in one only)
CHECK_TOKENS = 8
MAX_CACHE_ERROR = 0.5


def _shape(folder: GenaiFolder) -> tuple:
    return (folder.layers, folder.num_heads, folder.kv_heads, folder.head_size, folder.io_dtype,
            folder.past_key_names, folder.past_value_names, folder.kv_layers)


def _io(path: Path) -> tuple[list[str], list[str]]:
    proto = load_graph(path)
    inits = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits], [o.name for o in proto.graph.output]


def cache_error(prefill: GenaiFolder, decode: GenaiFolder, tokens: int = CHECK_TOKENS) -> float:
    """The largest relative error (Frobenius, per layer, keys and values) between the present caches the two
    folders' graphs compute for one prompt of ``tokens`` token ids (an empty past)."""
    from onnxqf.genai.feeds import feed_function, graph_io
    from onnxqf.runtime.session import make_session

    ids = np.random.default_rng(0).integers(1, max(2, min(int(prefill.vocab or 256), 1000)), (1, tokens))
    outs = []
    for folder in (prefill, decode):
        session = make_session(folder.model_path)
        names = [o.name for o in session.get_outputs()]
        values = session.run(None, feed_function(graph_io(folder.model_path))(ids))
        outs.append(dict(zip(names, values)))
    worst = 0.0
    for name, a in outs[0].items():
        if name not in outs[1] or not name.startswith("present"):
            continue
        a, b = a.astype(np.float64), outs[1][name].astype(np.float64)
        worst = max(worst, float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)))
    return worst


def join(prefill_dir: str | Path, decode_dir: str | Path, out: str | Path, *,
         max_cache_error: float = MAX_CACHE_ERROR) -> Path:
    """Write the pipeline folder ``out`` (``NEWDIR`` or ``NEWDIR/x.onnx``, as a rewrite's ``-o``; module docstring) of
    ``prefill_dir``'s graph for prompts and ``decode_dir``'s for generated tokens; returns the folder.
    :class:`GenaiFolderError` (one line) for what the rules refuse, before anything is written."""
    from onnxqf.graph.fileio import atomic_dir, is_partial
    from onnxqf.graph.modelfile import all_tensors, load_model, save_model

    folders = []
    for d in (prefill_dir, decode_dir):
        if is_pipeline(d):
            raise GenaiFolderError(f"{d}: already a prefill / decode pipeline folder; join two ordinary genai folders")
        folders.append(read_genai(d))
    # the rules of a rewrite's output folder (new, empty or a genai folder; not an input's), NEWDIR or NEWDIR/x.onnx
    out = [output_path(f, out) for f in folders][0].parent
    pre, dec = folders
    if _shape(pre) != _shape(dec):
        raise GenaiFolderError(f"{pre.directory} and {dec.directory} are not one model: layers, heads, head size or "
                               "KV cache differ")
    io = _io(pre.model_path)
    if io != _io(dec.model_path):
        raise GenaiFolderError(f"{pre.model_path} and {dec.model_path} have other inputs or outputs; the stages "
                               "must read and write the same names")
    err = cache_error(pre, dec)
    if not err <= max_cache_error:
        raise GenaiFolderError(f"the two graphs' KV caches differ by {err:.2f} (relative; at most {max_cache_error} "
                               "allowed): rewrite both with the same transform and seed (a rotation in one only "
                               "puts the cache in another basis)")
    libraries = []
    for f in (pre, dec):
        lib = (f.decoder.get("session_options") or {}).get("custom_ops_library")
        if lib and (f.directory / lib).is_file() and lib not in [p.name for p in libraries]:
            libraries.append(f.directory / lib)
    if len(libraries) > 1:  # (a genai decoder names one library; onnxqf's CPU and CUDA ones never meet here)
        raise GenaiFolderError("the two folders name different custom-op libraries")
    skip = {pre.model_path.name, GENAI_CONFIG} | {e.value for t in all_tensors(load_graph(pre.model_path))
                                                  for e in t.external_data if e.key == "location"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as built:
        for entry in pre.directory.iterdir():
            if entry.name in skip or is_partial(entry.name) or entry.resolve() == out:
                continue
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, built / entry.name)
        for lib in libraries:
            shutil.copy2(lib, built / lib.name)
        for f, name in ((pre, PREFILL), (dec, DECODE)):
            save_model(load_model(f.model_path), built / name, check=False)
        config = json.loads(json.dumps(pre.config))
        config["model"]["type"] = PIPELINE_TYPE
        decoder = config["model"]["decoder"]
        decoder.pop("filename", None)
        if libraries:
            decoder.setdefault("session_options", {})["custom_ops_library"] = libraries[0].name
        inputs, outputs = io
        decoder["pipeline"] = [
            {"prefill": {"filename": PREFILL, "inputs": inputs, "outputs": outputs,
                         "run_on_prompt": True, "run_on_token_gen": False}},
            {"decode": {"filename": DECODE, "inputs": inputs, "outputs": outputs,
                        "run_on_prompt": False, "run_on_token_gen": True}},
        ]
        (built / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        read_genai(built)  # the new folder reads back (its prompt graph checked against the config)
    return out
