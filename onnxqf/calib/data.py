"""Text and token windows for calibration and evaluation."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np

from onnxqf.errors import OnnxqfError
from onnxqf.graph.modelfile import get_metadata

__all__ = ["BUILTIN_CALIB", "load_tokenizer", "load_tokens", "windows", "token_windows"]

BUILTIN_CALIB = "builtin"


def load_tokenizer(model_path: str | os.PathLike, model=None, tokenizer: str | None = None):
    """The tokenizer given, or the one our exporter saved beside the model, or None."""
    directory = None
    if tokenizer:
        directory = Path(tokenizer)
    elif model is not None and get_metadata(model, "tokenizer"):
        directory = Path(model_path).parent / get_metadata(model, "tokenizer")
    if directory is None:
        return None
    if not directory.is_dir():
        raise OnnxqfError(f"tokenizer folder {directory} not found (pass --tokenizer DIR)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise OnnxqfError("reading text needs transformers: pip install 'onnxqf[export]' "
                          "(or give token ids as .npy)") from None
    return AutoTokenizer.from_pretrained(str(directory))


def load_tokens(source: str | os.PathLike, tokenizer, vocab: int | None = None) -> np.ndarray:
    """1-D int64 token ids from a .npy file, a text file, or the built-in calibration text."""
    if str(source) == BUILTIN_CALIB:
        text = resources.files("onnxqf").joinpath("data/calib.txt").read_text(encoding="utf-8")
        return _tokenize(text, tokenizer, "the built-in calibration text")
    path = Path(source)
    if not path.is_file():
        raise OnnxqfError(f"{path}: no such file")
    if path.suffix == ".npy":
        try:
            ids = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise OnnxqfError(f"{path}: not a readable .npy file ({exc})") from None
        if not np.issubdtype(ids.dtype, np.integer):
            raise OnnxqfError(f"{path}: token ids must be integers, found {ids.dtype}")
        ids = ids.reshape(-1).astype(np.int64)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise OnnxqfError(f"{path}: not UTF-8 text (give token ids as .npy instead)") from None
        ids = _tokenize(text, tokenizer, str(path))
    if vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise OnnxqfError(f"{path}: token ids outside the model's vocabulary [0, {vocab})")
    return ids


def _tokenize(text: str, tokenizer, what: str) -> np.ndarray:
    if tokenizer is None:
        raise OnnxqfError(f"{what}: the model has no tokenizer beside it; pass --tokenizer DIR or token ids as .npy")
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def windows(ids: np.ndarray, n: int, length: int, *, what: str = "text") -> np.ndarray:
    """The first ``n`` non-overlapping windows of ``length`` tokens, [n, length]."""
    if n < 1 or length < 2:
        raise OnnxqfError("need at least 1 window of at least 2 tokens")
    available = ids.size // length
    if available == 0:
        raise OnnxqfError(f"{what}: {ids.size} tokens, fewer than one window of {length}")
    if available < n:
        n = available
    return ids[: n * length].reshape(n, length)


def token_windows(source: str | os.PathLike, model_path: str | os.PathLike, model, n: int, length: int, *,
                  tokenizer: str | None = None, vocab: int | None = None) -> np.ndarray:
    """[n, length] token windows of a text file (tokenized with the model's tokenizer) or a .npy."""
    tok = None if str(source).endswith(".npy") else load_tokenizer(model_path, model, tokenizer)
    return windows(load_tokens(source, tok, vocab), n, length, what=str(source))
