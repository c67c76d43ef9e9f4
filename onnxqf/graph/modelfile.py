"""Loading and atomic saving of ONNX models with external data.

Loading validates what ONNX Runtime would otherwise report late and obscurely: that the file
parses, and that every external-data tensor points into a file that exists and is long enough.
Saving writes into a scratch folder beside the target and moves the files into place at the end
(:mod:`onnxqf.graph.fileio`'s convention), so that a failed or interrupted rewrite leaves no partial output.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import onnx
import onnx_ir as ir

from onnxqf.errors import BadModelFileError
from onnxqf.graph.fileio import scratch_dir

__all__ = ["EXTERNAL_THRESHOLD", "METADATA_PREFIX", "all_tensors", "data_file_name", "get_metadata", "load_model",
           "np_prod", "save_model", "set_metadata"]

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
    _check_graph(proto, path)
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
    for tensor in all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        file = base_dir / location
        if not location or os.path.isabs(location) or not _inside(file, base_dir):
            raise BadModelFileError(f"{path}: tensor '{tensor.name}' has external data at '{location}', outside the "
                                    "model's folder (refused)")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        except ValueError:
            raise BadModelFileError(f"{path}: tensor '{tensor.name}' has a malformed external-data offset "
                                    "or length") from None
        if offset < 0 or length < 0:
            raise BadModelFileError(f"{path}: tensor '{tensor.name}' has a negative external-data offset or length")
        if location not in sizes:
            if not file.is_file():
                raise BadModelFileError(
                    f"{path}: external data file '{location}' is missing (expected at {file})"
                )
            sizes[location] = file.stat().st_size
        end = offset + length
        if end > sizes[location]:
            raise BadModelFileError(
                f"{path}: external data file '{location}' is truncated "
                f"(tensor '{tensor.name}' needs {end} bytes, file has {sizes[location]})"
            )


def _check_graph(proto: onnx.ModelProto, path: Path) -> None:
    """What a mutated or hand-edited file gets wrong, found before any pass runs: a node reading a value
    that nothing defines (a missing initializer, nodes out of order), initializers of no valid type or
    whose data disagrees with their shape. (onnx.checker would also refuse the operators that ONNX
    Runtime adds to the default domain, such as the model builder's SimplifiedLayerNormalization.)"""
    from onnx import helper

    bad = _bad_text(proto)
    if bad:
        raise BadModelFileError(f"{path}: the file is damaged (a {bad} field is not valid UTF-8 text)")
    graph = proto.graph
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                raise BadModelFileError(f"{path}: node '{node.name or node.op_type}' ({node.op_type}) reads "
                                        f"'{name}', which no graph input, initializer or earlier node defines "
                                        "(missing initializer?)")
        defined.update(o for o in node.output if o)
    for out in graph.output:
        if out.name not in defined:
            raise BadModelFileError(f"{path}: graph output '{out.name}' is not computed by the graph")
    for t in graph.initializer:
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except Exception:
            raise BadModelFileError(f"{path}: initializer '{t.name}' has no valid data type ({t.data_type})") from None
        if any(d < 0 for d in t.dims):
            raise BadModelFileError(f"{path}: initializer '{t.name}' has a negative dimension {list(t.dims)}")
        need = itemsize * int(np_prod(t.dims))
        if t.data_location == onnx.TensorProto.EXTERNAL:
            length = {e.key: e.value for e in t.external_data}.get("length")
            have = None if length is None else int(length)
        elif t.HasField("raw_data") and t.data_type not in _PACKED_TYPES:
            have = len(t.raw_data)
        else:
            have = None
        if have is not None and have != need:
            raise BadModelFileError(f"{path}: initializer '{t.name}' holds {have} bytes, its shape {list(t.dims)} and "
                                    f"type need {need}")


def _bad_text(msg) -> str | None:
    """The name of the first text field (names, op types, attributes) of ``msg`` that is not valid UTF-8."""
    from google.protobuf.descriptor import FieldDescriptor

    stack = [msg]
    while stack:
        m = stack.pop()
        for field, value in m.ListFields():
            repeated = (field.is_repeated if hasattr(field, "is_repeated")
                        else field.label == FieldDescriptor.LABEL_REPEATED)
            values = value if repeated else [value]
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                stack.extend(values)
            elif field.type == FieldDescriptor.TYPE_STRING:
                for v in values:
                    try:
                        if not isinstance(v, str):
                            return field.full_name
                        v.encode("utf-8")
                    except UnicodeError:
                        return field.full_name
    return None


# sub-byte types store two values per byte: their raw size is not itemsize * count
_PACKED_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def np_prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _inside(file: Path, folder: Path) -> bool:
    try:
        return file.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        return False


def all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the file: initializers and tensor attributes (where external data may point)."""
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def save_model(model: ir.Model, path: str | os.PathLike, *, check: bool = True) -> Path:
    """Save with external data (``<name>.data`` beside it), atomically.

    The model and its data file are written to a temporary folder in the same directory and
    then moved into place (data first, then the graph), so a reader never sees a graph whose
    data file is missing, and a failure leaves nothing behind.
    """
    path = Path(path).absolute()
    data_name = data_file_name(path)
    with scratch_dir(path.parent) as tmp:
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
