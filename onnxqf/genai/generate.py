"""Text from an onnxruntime-genai folder: greedy generation with onnxruntime-genai, streamed, with its speeds.

onnxruntime-genai feeds the graph itself (mask, positions, the growing KV cache); the folder is read and
checked first (:func:`onnxqf.genai.folder.read_genai`), so a folder it cannot use fails in one line.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from onnxqf.errors import OnnxqfError
from onnxqf.genai.folder import read_genai, require_og

__all__ = ["generate"]


def generate(path: str | os.PathLike, prompt: str | None = None, *, token_ids=None, max_new_tokens: int = 64,
             ep: str = "cpu", stream=None, quiet: bool = False, cuda_graph: bool = False) -> dict:
    """Greedy generation with onnxruntime-genai, streaming decoded text to ``stream`` (stdout).

    Returns the generated token ids and the prefill / decode speeds. ``token_ids`` replaces the
    prompt (no tokenizer needed). ``cuda_graph`` (``ep="cuda"``): onnxruntime-genai captures the decode step as a
    CUDA graph and replays it (the CUDA provider's ``enable_cuda_graph``; the folder's cache must be one buffer per
    layer, as the model builder writes it).
    """
    if cuda_graph and ep != "cuda":
        raise OnnxqfError("CUDA graphs need --ep cuda")
    folder = read_genai(path, check_attention=False)
    og = require_og()
    stream = sys.stdout if stream is None else stream
    config = og.Config(str(folder.directory))
    config.clear_providers()
    if ep == "cuda":
        if not og.is_cuda_available():
            raise OnnxqfError("CUDA is not available to this onnxruntime-genai build "
                              "(pip install onnxruntime-genai-cuda)")
        config.append_provider("cuda")
        if cuda_graph:
            config.set_provider_option("cuda", "enable_cuda_graph", "1")
    elif ep != "cpu":
        raise OnnxqfError(f"unknown execution provider '{ep}' (use cpu or cuda)")
    try:
        model = og.Model(config)
    except Exception as exc:
        why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise OnnxqfError(f"onnxruntime-genai cannot load {folder.directory}: {why}") from None
    tok_stream = None
    if token_ids is None:
        if prompt is None:
            raise OnnxqfError("give a prompt")
        try:
            tokenizer = og.Tokenizer(model)
        except Exception as exc:
            raise OnnxqfError(f"onnxruntime-genai cannot load the tokenizer of {folder.directory}: "
                              f"{str(exc).strip()[:200]}") from None
        ids = np.asarray(tokenizer.encode(prompt), dtype=np.int32)
        tok_stream = tokenizer.create_stream()
    else:
        ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
    if ids.size == 0:
        raise OnnxqfError("the prompt is empty")
    context = int(folder.config["model"].get("context_length") or (ids.size + max_new_tokens))
    if ids.size >= context:
        raise OnnxqfError(f"the prompt has {ids.size} tokens, the model's context is {context}")
    # onnxruntime-genai sizes the KV cache by max_length, and a sliding-window cache (Gemma 2's local layers) must
    # hold the whole window: ONNX Runtime refuses a smaller one. The loop below stops after max_new_tokens anyway.
    window = int((folder.config["model"].get("decoder", {}).get("sliding_window") or {}).get("window_size") or 0)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=min(context, max(int(ids.size) + max_new_tokens, window)))
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
        print(f"[onnxqf] prefill: {ids.size} tokens, {result['prefill_tok_s']:.1f} tokens/s; "
              f"decode: {decode_steps} tokens, {result['decode_tok_s']:.1f} tokens/s ({ep})", file=sys.stderr)
    return result
