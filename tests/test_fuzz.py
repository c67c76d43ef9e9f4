"""Malformed models: every case ends in one clear line and exit 2 (or, for a harmless byte change, a
normal rewrite), never a traceback; the input is untouched and no partial output is left.

Cases: random byte changes and truncations of the graph file, and hand-made defects: missing or
mistyped initializers, shapes that disagree, external data that is missing, short or points outside
the model's folder, and an operator other than MatMul where a linear is expected.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxqf.cli import main

N_BYTE_CASES = 24


def _copy(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    shutil.copy(src, dst)
    data = src.with_name(src.name + ".data")
    if data.exists():
        shutil.copy(data, folder / data.name)
    return dst


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _rewrite(model: Path, out: Path, capsys) -> tuple[int, str]:
    before = _digest(model.parent)
    rc = main(["rewrite", str(model), "--weight-rounding", "rtn", "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert _digest(model.parent) == before, "the input was modified"
    return rc, err


def _refused(rc: int, err: str, out: Path, *fragments: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("onnxqf: error:"), err
    for f in fragments:
        assert f in lines[0], lines[0]
    assert not out.exists() and not out.with_name(out.name + ".data").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".onnxqf-partial-")]


@pytest.mark.parametrize("seed", range(N_BYTE_CASES))
def test_random_byte_changes(tiny_models, tmp_path, capsys, seed):
    """Bytes of the graph file changed at random places, or the file cut short."""
    model = _copy(tiny_models["llama-gqa"], tmp_path / "in")
    raw = bytearray(model.read_bytes())
    rng = np.random.default_rng(seed)
    if seed % 4 == 3:
        raw = raw[: int(rng.integers(1, len(raw)))]
    else:
        for pos in rng.integers(0, len(raw), size=1 + seed % 3):
            raw[pos] = int(rng.integers(0, 256))
    model.write_bytes(bytes(raw))
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    rc, err = _rewrite(model, out, capsys)
    if rc == 0:  # a change that left a valid model (a name, a doc string): the output must be usable
        onnx.checker.check_model(str(out), full_check=True)
    else:
        _refused(rc, err, out)


def _edit(tiny_models, tmp_path, fn) -> Path:
    model = _copy(tiny_models["llama-gqa"], tmp_path / "in")
    proto = onnx.load(str(model), load_external_data=False)
    fn(proto)
    onnx.save(proto, str(model))
    return model


def _linears(proto: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.TensorProto]]:
    """(MatMul, its weight initializer) in graph order: q, k, v, o, gate, up, down of layer 0, then layer 1."""
    inits = {t.name: t for t in proto.graph.initializer}
    return [(n, inits[n.input[1]]) for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def _weight(proto: onnx.ModelProto, k: int) -> onnx.TensorProto:
    return _linears(proto)[k][1]


def _drop_weight(p):
    p.graph.initializer.remove(_weight(p, 13))


def _bad_dtype(p):
    _weight(p, 0).data_type = 99


def _int_weight(p):
    _weight(p, 5).data_type = onnx.TensorProto.INT32


def _transposed_dims(p):
    t = _weight(p, 4)
    t.dims[:] = list(reversed(t.dims))


def _short_dims(p):
    t = _weight(p, 4)
    t.dims[0] -= 1


def _external(location: str | None = None, offset: str | None = None, length_delta: int = 0):
    def edit(p):
        t = _weight(p, 3)
        for e in t.external_data:
            if location is not None and e.key == "location":
                e.value = location
            if offset is not None and e.key == "offset":
                e.value = offset
            if length_delta and e.key == "length":
                e.value = str(int(e.value) + length_delta)
    return edit


def _gemm_for_down(p):
    node = _linears(p)[13][0]
    node.op_type = "Gemm"  # 3-D input: not a linear onnxqf matches


def _undefined_input(p):
    node = next(n for n in p.graph.node if n.op_type == "MatMul")
    node.input[0] = "no_such_value"


CASES = {
    "missing initializer": (_drop_weight, ("reads", "missing initializer")),
    "invalid data type": (_bad_dtype, ("no valid data type",)),
    "integer weight": (_int_weight, ()),
    "dims disagree with the data": (_short_dims, ("bytes",)),
    "transposed weight shape": (_transposed_dims, ()),
    "external data outside the folder": (_external(location="../outside.data"), ("outside the model's folder",)),
    "external data at an absolute path": (_external(location="/etc/passwd"), ("outside the model's folder",)),
    "external data negative offset": (_external(offset="-8"), ("negative",)),
    "external data beyond the file": (_external(offset="999999999"), ("truncated",)),
    "external length disagrees with the shape": (_external(length_delta=-4), ("bytes",)),
    "Gemm where a linear is expected": (_gemm_for_down, ()),
    "a node reads an undefined value": (_undefined_input, ("no_such_value",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_models(tiny_models, tmp_path, capsys, case):
    fn, fragments = CASES[case]
    model = _edit(tiny_models, tmp_path, fn)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    rc, err = _rewrite(model, out, capsys)
    _refused(rc, err, out, *fragments)


def test_missing_and_short_external_data(tiny_models, tmp_path, capsys):
    model = _copy(tiny_models["llama-gqa"], tmp_path / "in")
    data = model.with_name(model.name + ".data")
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    data.write_bytes(data.read_bytes()[:1000])
    rc, err = _rewrite(model, out, capsys)
    _refused(rc, err, out, "truncated")
    data.unlink()
    rc, err = _rewrite(model, out, capsys)
    _refused(rc, err, out, "missing")


def test_killed_rewrite_leaves_no_output_and_is_cleaned_next_time(tiny_models, tmp_path):
    """A rewrite killed outright (SIGKILL, no chance to clean up) leaves the input untouched and no
    output; its partial folder, if any, is removed by the next save into the same folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from onnxqf.graph.fileio import PARTIAL_PREFIX
    from onnxqf.graph.modelfile import load_model, save_model

    model = _copy(tiny_models["llama-gqa"], tmp_path / "in")
    before = _digest(model.parent)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    # a stale partial folder of a process that no longer exists
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out.parent / f"{PARTIAL_PREFIX}{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / "model.onnx.data").write_bytes(b"x" * 100)
    live = out.parent / f"{PARTIAL_PREFIX}{os.getppid()}-def"  # a process that is still running: kept
    live.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "onnxqf.cli", "rewrite", str(model), "--hybrid",
                             "--calib-windows", "2", "--calib-seq", "64", "-o", str(out), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _digest(model.parent) == before
    assert not out.exists() and not out.with_name(out.name + ".data").exists()
    save_model(load_model(model), out)
    assert out.exists() and not stale.exists() and live.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(PARTIAL_PREFIX)] == [live.name]



def test_terminated_low_memory_rewrite_removes_its_scratch(tiny_models, ids_file, tmp_path):
    """SIGTERM (kill, a CI timeout) unwinds the rewrite: exit 143, the input untouched, neither output nor
    the scratch folder of rewritten weights left behind. The signal is sent by the process to itself
    while the quantization pass runs (after the scratch folder exists), so the test does not depend on
    timing."""
    import subprocess
    import sys
    import textwrap

    model = _copy(tiny_models["llama-gqa"], tmp_path / "in")
    before = _digest(model.parent)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from onnxqf.passes.quantize import QuantizePass
        from onnxqf.graph.fileio import PARTIAL_PREFIX

        def apply(self, model):
            scratch = [p for p in Path({str(out.parent)!r}).iterdir() if p.name.startswith(PARTIAL_PREFIX)]
            print("scratch folders:", len(scratch), file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt the pass")

        QuantizePass.apply = apply
        from onnxqf.cli import main
        sys.exit(main(["rewrite", {str(model)!r}, "--hybrid", "--low-memory", "--calib", {str(ids_file)!r},
                       "--calib-windows", "2", "--calib-seq", "32", "-o", {str(out)!r}, "-q"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr
    assert "scratch folders: 1" in proc.stderr and "onnxqf: terminated" in proc.stderr
    assert _digest(model.parent) == before
    assert list(out.parent.iterdir()) == []
