"""Export with a KV cache: a complete onnxruntime-genai folder, made by onnxruntime-genai's model builder.

We do not write a KV-cache exporter: ``onnxruntime_genai.models.builder`` is the maintained tool that
writes the graphs ONNX Runtime apps generate with (fused q/k/v, ``SkipSimplifiedLayerNormalization``,
``GroupQueryAttention`` with rotary, ``past_key_values.N.key|value`` inputs, ``genai_config.json`` and
the tokenizer files). This module prepares its input and makes its output atomic:

* a Hugging Face model directory goes to the builder as it is;
* the built-in ``smollm2`` and ``.gguf`` files are loaded with transformers (dequantized to float32),
  their GGUF quantizer cleared so ``save_pretrained`` accepts them, and saved with the tokenizer into
  a temporary checkpoint the builder reads (DESIGN.md §8);
* the builder writes into a scratch folder beside the target (:mod:`onnxqf.graph.fileio`), which is
  checked (``read_genai``) and renamed into place at the end; a failure leaves nothing behind.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

from onnxqf.errors import OnnxqfError
from onnxqf.graph.fileio import replace_dir, scratch_dir

__all__ = ["GENAI_INSTALL", "BUILDER_TARGETS", "DEFAULT_EP", "TOKENIZER_FILES", "require_builder", "export_genai",
           "builder_input"]

GENAI_INSTALL = "pip install 'onnxqf[genai]'"
# (dtype, execution provider) pairs for which the builder emits GroupQueryAttention with a packed
# q/k/v MatMul (checked with onnxruntime-genai 0.18): float16 for the CPU gives MultiHeadAttention
# with separate q/k/v, and float32 for CUDA an "Attention" graph that does not load.
BUILDER_TARGETS = {("float32", "cpu"): "fp32", ("float16", "cuda"): "fp16"}
DEFAULT_EP = {"float32": "cpu", "float16": "cuda"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _log(msg: str) -> None:
    print(f"[onnxqf] {msg}", file=sys.stderr, flush=True)


def require_builder() -> None:
    """One clear line when onnxruntime-genai (or what its builder imports) is missing."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise OnnxqfError(f"--kv-cache needs onnxruntime-genai and its model builder: {GENAI_INSTALL}")
    for name in ("torch", "transformers"):
        if importlib.util.find_spec(name) is None:
            raise OnnxqfError(f"--kv-cache needs {name} for the model builder: pip install 'onnxqf[export,genai]'")


def export_genai(source: str, out: str | os.PathLike, *, dtype: str = "float32", ep: str | None = None,
                 verbose: bool = False) -> Path:
    """Write a complete onnxruntime-genai folder for ``source`` into ``out``'s folder; returns ``out``.

    ``out`` names the graph file (``DIR/model.onnx``); its folder must be new, empty, or an earlier
    genai folder (replaced as a whole, atomically).
    """
    from onnxqf.genai.folder import read_genai

    out = Path(out).absolute()
    if out.suffix != ".onnx":
        raise OnnxqfError(f"{out}: the output name must end in .onnx (DIR/model.onnx)")
    if dtype not in DEFAULT_EP:
        raise OnnxqfError(f"--dtype must be float32 or float16, not {dtype}")
    ep = ep or DEFAULT_EP[dtype]
    precision = BUILDER_TARGETS.get((dtype, ep))
    if precision is None:
        raise OnnxqfError(f"--dtype {dtype} --ep {ep}: the model builder emits GroupQueryAttention graphs only for "
                          "float32 with --ep cpu and float16 with --ep cuda (both also run on the CPU)")
    require_builder()
    target = out.parent
    _check_target(target, source)
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with scratch_dir(target.parent) as tmp:
        hf_dir = builder_input(source, tmp / "hf")
        built = tmp / "genai"
        _run_builder(hf_dir, built, precision, ep, cache=tmp / "cache", filename=out.name, verbose=verbose)
        folder = read_genai(built / out.name)  # the builder's output must be a folder we can use
        replace_dir(built, target, tmp / "old")
    _log(f"genai folder written in {time.time() - t0:.0f} s: {target} ({folder.layers} layers, "
         f"{folder.attention_op}, {folder.io_dtype}, target {ep})")
    return out


def _check_target(target: Path, source: str) -> None:
    if target.exists():
        if not target.is_dir():
            raise OnnxqfError(f"{target} exists and is not a folder")
        if any(target.iterdir()) and not (target / "genai_config.json").is_file():
            raise OnnxqfError(f"{target} exists and is not an onnxruntime-genai folder: choose a new or empty folder "
                              "(the genai model, config and tokenizer files live together in one folder)")
    src = Path(source)
    if src.exists():
        src, tgt = src.resolve(), target.resolve()
        if src == tgt or tgt in src.parents:
            raise OnnxqfError(f"the output folder {target} would replace the input {source}; choose another -o")


def builder_input(source: str, tmp_hf: Path) -> Path:
    """A Hugging Face checkpoint folder the builder can read (with tokenizer files)."""
    from onnxqf.models.export import check_architecture, load_hf
    from onnxqf.models.registry import DEFAULT_MODEL

    path = Path(source)
    if source != DEFAULT_MODEL and path.is_dir():
        if not (path / "config.json").is_file():
            raise OnnxqfError(f"{source}: not a Hugging Face model directory (no config.json)")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(path))
        except Exception as exc:
            raise OnnxqfError(f"{source}: cannot read the model config ({str(exc).splitlines()[0][:200]})") from None
        check_architecture(config, genai=True)
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise OnnxqfError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); the model builder needs "
                              "the tokenizer")
        return path
    model, tokenizer = load_hf(source)  # 'smollm2' or a .gguf file (errors for anything else)
    if tokenizer is None:
        raise OnnxqfError(f"{source}: no tokenizer could be read; the model builder needs one")
    _save_plain_checkpoint(model, tokenizer, tmp_hf)
    return tmp_hf


def _save_plain_checkpoint(model, tokenizer, directory: Path) -> None:
    """save_pretrained a GGUF-loaded model: its weights are already dequantized, so dropping the GGUF
    quantizer and quantization_config (which make save_pretrained refuse) writes a float checkpoint."""
    _log(f"saving a float32 checkpoint for the model builder ({directory.name}/)")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                pass
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    try:
        model.save_pretrained(str(directory))
        tokenizer.save_pretrained(str(directory))
    except Exception as exc:
        first = str(exc).splitlines()[0][:200]
        raise OnnxqfError(f"cannot save a plain checkpoint for the model builder: {first}") from None


def _run_builder(hf_dir: Path, out_dir: Path, precision: str, ep: str, *, cache: Path, filename: str,
                 verbose: bool) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
           "-p", precision, "-e", ep, "-c", str(cache), "--extra_options", "hf_token=false"]
    if filename != "model.onnx":
        cmd.append(f"filename={filename}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    _log(f"running onnxruntime-genai's model builder ({precision}, {ep})")
    t = time.time()
    proc = subprocess.run(cmd, env=env, stdout=None if verbose else subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = [ln.strip() for ln in (proc.stdout or "").splitlines() if ln.strip()]
        last = tail[-1][:300] if tail else f"exit status {proc.returncode}"
        raise OnnxqfError(f"onnxruntime-genai's model builder failed: {last}")
    if not (out_dir / "genai_config.json").is_file():
        raise OnnxqfError("onnxruntime-genai's model builder wrote no genai_config.json")
    _log(f"model builder done in {time.time() - t:.0f} s")
