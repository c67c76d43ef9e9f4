"""Loading and atomic saving of ONNX models with external data.

Loading validates what ONNX Runtime would otherwise report late and obscurely: that the file
parses, and that every external-data tensor points into a file that exists and is long enough.
Saving writes into a temporary folder beside the target and moves the files into place at the
end, so that a failed or interrupted rewrite leaves no partial output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import onnx
import onnx_ir as ir

from onnxqf.errors import BadModelFileError

# Everything above this many bytes goes to the external data file. Small constants (shapes,
# scalars) stay inline so the graph stays readable with Netron.
EXTERNAL_THRESHOLD = 1024
METADATA_PREFIX = "onnxqf."


def data_file_name(model_path: str | os.PathLike) -> str:
    return Path(model_path).name + ".data"


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model into onnx-ir, checking the file and its external data first."""
    path = Path(path)
    if not path.exists():
        raise BadModelFileError(f"{path}: no such file")
    if path.is_dir():
        raise BadModelFileError(f"{path}: is a directory, expected an .onnx file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise BadModelFileError(f"{path}: not a readable ONNX model ({_short(exc)})") from None
    if not proto.graph.node:
        raise BadModelFileError(f"{path}: not an ONNX model (no graph nodes; truncated or wrong file?)")
    _check_external_data(proto, path.parent, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise BadModelFileError(f"{path}: cannot read the ONNX graph ({_short(exc)})") from None
    _set_base_dir(model, path.parent)
    return model


def _set_base_dir(model: ir.Model, base_dir: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = str(base_dir)


def _check_external_data(proto: onnx.ModelProto, base_dir: Path, path: Path) -> None:
    sizes: dict[str, int] = {}
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        file = base_dir / location
        if location not in sizes:
            if not file.is_file():
                raise BadModelFileError(
                    f"{path}: external data file '{location}' is missing (expected at {file})"
                )
            sizes[location] = file.stat().st_size
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > sizes[location]:
            raise BadModelFileError(
                f"{path}: external data file '{location}' is truncated "
                f"(tensor '{tensor.name}' needs {end} bytes, file has {sizes[location]})"
            )


def _all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


@contextlib.contextmanager
def atomic_output_dir(target_dir: Path) -> Iterator[Path]:
    """A temporary folder beside ``target_dir``'s files; removed on failure."""
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".onnxqf-partial-", dir=target_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(model: ir.Model, path: str | os.PathLike, *, check: bool = True) -> Path:
    """Save with external data (``<name>.data`` beside it), atomically.

    The model and its data file are written to a temporary folder in the same directory and
    then moved into place (data first, then the graph), so a reader never sees a graph whose
    data file is missing, and a failure leaves nothing behind.
    """
    path = Path(path).absolute()
    data_name = data_file_name(path)
    with atomic_output_dir(path.parent) as tmp:
        tmp_model = tmp / path.name
        ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=EXTERNAL_THRESHOLD)
        if check:
            try:
                onnx.checker.check_model(str(tmp_model), full_check=True)
            except Exception as exc:
                raise BadModelFileError(f"internal error: the written model fails onnx.checker: {_short(exc)}") from exc
        if (tmp / data_name).exists():
            os.replace(tmp / data_name, path.parent / data_name)
        elif (path.parent / data_name).exists():
            os.remove(path.parent / data_name)
        os.replace(tmp_model, path)
    # ir.save restores the in-memory tensors afterwards: the model still reads its weights from
    # where they were loaded (or from memory), never from the file just written.
    return path


def get_metadata(model: ir.Model, key: str) -> str | None:
    return model.metadata_props.get(METADATA_PREFIX + key)


def set_metadata(model: ir.Model, key: str, value: str) -> None:
    model.metadata_props[METADATA_PREFIX + key] = value
