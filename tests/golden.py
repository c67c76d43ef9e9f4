"""Golden logits: the rewritten tiny models' outputs as the code gave them before the restructure of issue 17.

Each case is an ``onnxqf rewrite`` command line (a stable interface) on a tiny random model exported with a
fixed seed; the logits of its output on fixed ids are compared with the values stored in
``tests/data/golden_logits.json`` (tests/test_golden.py). Regenerate (only when a change of numbers is
intended, and say so in the commit) with::

    python tests/golden.py tests/data/golden_logits.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
#: (case name, tiny model, rewrite arguments): one per transform and format, fast (RTN or 2 short windows)
CASES = [
    ("w8a8-token", "llama-gqa", ["--weight-rounding", "rtn"]),
    ("w8a8-gptq", "qwen2-bias", []),
    ("smooth-w8a8", "llama-gqa", ["--smooth", "--alpha", "0.5", "--weight-rounding", "rtn"]),
    ("hybrid-w8a8", "llama-gqa", ["--hybrid"]),
    ("hybrid-folded-w8a8", "llama-tied", ["--hybrid", "folded", "--weight-rounding", "rtn"]),
    ("rotate-float", "llama-odd", ["--rotate", "--quant", "none"]),
    ("rotate-int4", "qwen2-bias", ["--rotate", "--quant", "int4", "--block-size", "16"]),
    ("int8w-asym", "llama-gqa", ["--quant", "int8w", "--asymmetric", "--block-size", "16", "--weight-rounding", "rtn"]),
]
#: what is stored of each case's logits [1, 24, 512]: every 4th position, the first 64 vocabulary entries
POSITIONS, VOCAB = slice(0, 24, 4), slice(0, 64)


def ids() -> np.ndarray:
    from importlib import resources

    data = resources.files("onnxqf").joinpath("data/calib.txt").read_bytes()
    return np.frombuffer(data, np.uint8).astype(np.int64)


def run_case(model_name: str, args: list[str], work: Path, extra: tuple[str, ...] = ()) -> np.ndarray:
    """The rewritten model's logits on 24 fixed tokens (exported, rewritten through the CLI, run by ONNX Runtime)."""
    import onnxruntime as ort

    sys.path.insert(0, str(HERE))
    from onnxqf.cli import main
    from onnxqf.models.export import export_model

    from tiny import tiny_model

    work.mkdir(parents=True, exist_ok=True)
    src = work / f"{model_name}.onnx"
    if not src.exists():
        export_model(tiny_model(model_name), src)
    calib = work / "ids.npy"
    np.save(calib, ids())
    out = work / f"{model_name}.{abs(hash(tuple(args)))}.onnx"
    argv = ["rewrite", str(src), *args, *extra, "--calib", str(calib), "--calib-windows", "2", "--calib-seq", "64",
            "-q", "-o", str(out)]
    assert main(argv) == 0, argv
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = ids()[1000:1024][None]
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def main(path: str) -> None:
    import tempfile

    golden = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, args in CASES:
            logits = run_case(model, args, Path(tmp))
            golden[name] = {"model": model, "args": args, "scale": float(np.abs(logits).max()),
                            "logits": np.round(logits[0, POSITIONS, VOCAB], 6).tolist()}
            print(name, golden[name]["scale"])
    Path(path).write_text(json.dumps(golden) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
