"""Shared fixtures: tiny exported models (made once per session) and token ids of real text.

The text is onnxqf's own built-in calibration text (English prose shipped in the package), read as
bytes: the tiny models have a 512-token vocabulary. So every test runs the same on a fresh clone;
the WikiText data in ../shared is for the benchmark scripts only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_NAMES


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_models(tiny_dir) -> dict[str, Path]:
    """The tiny random models exported by onnxqf (float32), by name."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from onnxqf.models.export import export_model

    from tiny import tiny_model

    out = {}
    for name in TINY_NAMES:
        out[name] = export_model(tiny_model(name), tiny_dir / f"{name}.onnx")
    return out


@pytest.fixture(scope="session")
def tiny_fp16(tiny_dir) -> Path:
    pytest.importorskip("torch")
    from onnxqf.models.export import export_model

    from tiny import tiny_model

    return export_model(tiny_model("llama-gqa"), tiny_dir / "llama-gqa-fp16.onnx", dtype="float16")


@pytest.fixture(scope="session")
def text_ids() -> np.ndarray:
    """Real English text (the built-in calibration text, ~16k bytes) as byte-level token ids."""
    from importlib import resources

    data = resources.files("onnxqf").joinpath("data/calib.txt").read_bytes()
    return np.frombuffer(data, np.uint8).astype(np.int64)


@pytest.fixture(scope="session")
def ids_file(tiny_dir, text_ids) -> Path:
    path = tiny_dir / "ids.npy"
    np.save(path, text_ids)
    return path
