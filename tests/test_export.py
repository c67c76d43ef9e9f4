"""`onnxqf export` from a Hugging Face directory; unsupported architectures fail clearly."""

import os
import subprocess
import sys

import pytest

from onnxqf.graph.modelfile import get_metadata, load_model
from onnxqf.recognize import recognize


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "onnxqf.cli", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def test_export_from_directory_without_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from tiny import tiny_model

    src = tmp_path / "hf"
    tiny_model("llama-gqa", layers=1).save_pretrained(src)
    out = tmp_path / "out" / "m.onnx"
    rc, stdout, err = run_cli("export", src, "-o", out)
    assert rc == 0, err
    assert "no tokenizer" in err  # a note, not a failure
    model = load_model(out)
    assert len(recognize(model).layers) == 1
    assert get_metadata(model, "tokenizer") is None
    assert sorted(os.listdir(out.parent)) == ["m.onnx", "m.onnx.data"]


def test_unsupported_architecture(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    rc, _, err = run_cli("export", tmp_path / "gpt2", "-o", tmp_path / "x.onnx")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "architecture 'gpt2' is not supported" in lines[0]
    assert not (tmp_path / "x.onnx").exists()


def test_missing_source(tmp_path):
    rc, _, err = run_cli("export", tmp_path / "nothing", "-o", tmp_path / "x.onnx")
    assert rc == 2 and "no such model directory" in err
