"""Bounded-memory rewriting: every tensor a pass writes goes to disk at once and is read back lazily.

A rewrite touches every weight of the model several times (fold the norms, rotate, smooth, round).
Held in memory, the rewritten weights of a 7B model are the whole model. With a :class:`TensorStore`
active (:func:`spilling`), :func:`onnxqf.graph.edit.write` and :func:`onnxqf.graph.edit.add_initializer` put each
array above a size threshold into a file of its own in a scratch folder and give the initializer an
``ir.ExternalTensor`` that points at it: nothing of it stays in memory. Reads (:func:`onnxqf.graph.structure.read`)
copy a tensor out of its memory map and unmap it again (:func:`release`), so the input model's pages
do not pile up in the process either. A weight rewritten again drops its previous file, so the
scratch folder holds about one model's worth of data at any time; saving copies the files into the
output's data file (``copy_file_range``, no user-space buffer).

Peak memory is then what one step needs: one linear's weight in float64 plus what the step computes
on it, one layer's ONNX Runtime session during calibration (:mod:`onnxqf.calib.layerwise`), and one
layer's Hessians for GPTQ. docs/benchmarks.md §e has the figures for Llama-2-7B-shaped models.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx_ir as ir

from onnxqf.graph.fileio import scratch_dir

__all__ = ["SPILL_THRESHOLD", "TensorStore", "active", "discard", "make_tensor", "park", "release", "replaced",
           "spilling", "to_numpy", "trim_heap", "unpark"]

#: arrays smaller than this stay in memory (shapes, scales, rotation factors)
SPILL_THRESHOLD = 1 << 20

_active: "TensorStore | None" = None


class TensorStore:
    """Files of rewritten tensors in ``folder`` (one file per tensor), removed with the folder on :meth:`close`."""

    def __init__(self, folder: str | os.PathLike, threshold: int = SPILL_THRESHOLD):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.threshold = threshold
        self._ids = itertools.count()
        self._files: dict[int, tuple[ir.ExternalTensor, Path]] = {}  # id(tensor) -> (tensor, its file)
        self.written = 0  # bytes written over the whole rewrite

    def wants(self, array: np.ndarray) -> bool:
        return array.nbytes >= self.threshold

    def put(self, array: np.ndarray, name: str | None, dtype: ir.DataType | None = None) -> ir.ExternalTensor:
        """Write ``array`` (already in its storage dtype) to a new file; the tensor that reads it back."""
        array = np.ascontiguousarray(array)
        dtype = dtype or ir.DataType.from_numpy(array.dtype)
        file = self.folder / f"t{next(self._ids):06d}.bin"
        tmp = ir.tensor(array, dtype=dtype, name=name)
        with open(file, "wb") as f:
            tmp.tofile(f)
        length = file.stat().st_size
        tensor = ir.ExternalTensor(file.name, 0, length, dtype, shape=ir.Shape(array.shape), name=name,
                                   base_dir=str(self.folder))
        self._files[id(tensor)] = (tensor, file)
        self.written += length
        return tensor

    def discard(self, tensor) -> bool:
        """Forget a tensor written here that nothing reads any more (its file is deleted); False if not ours."""
        entry = self._files.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            return False
        del self._files[id(tensor)]
        release(tensor)
        with contextlib.suppress(FileNotFoundError):
            entry[1].unlink()
        return True

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def active() -> TensorStore | None:
    return _active


@contextlib.contextmanager
def spilling(parent: str | os.PathLike | None = None, threshold: int = SPILL_THRESHOLD) -> Iterator[TensorStore]:
    """Make a store in a new scratch folder under ``parent`` the active one for the block.

    The folder is a scratch folder of :mod:`onnxqf.graph.fileio` (``parent`` None: the system's temporary
    folder): removed when the block ends however it ends, and by a later write into ``parent`` if this
    process is killed (:func:`onnxqf.graph.fileio.remove_stale_partials`). Tensors that still point into the store
    when the block ends must have been saved before: the folder is removed.
    """
    global _active
    with scratch_dir(parent, "tensors") as folder:
        store, previous = TensorStore(folder, threshold), _active
        _active = store
        try:
            yield store
        finally:
            _active = previous
            store.close()


def make_tensor(array: np.ndarray, dtype: ir.DataType, name: str | None):
    """An initializer's tensor for ``array`` (in ``dtype``): on disk when a store is active and it is large."""
    arr = np.asarray(array).astype(dtype.numpy(), copy=False)
    store = _active
    if store is not None and store.wants(arr):
        return store.put(arr, name, dtype)
    return ir.tensor(np.ascontiguousarray(arr), dtype=dtype, name=name)


def replaced(old) -> None:
    """``old`` was an initializer's tensor and has just been replaced: free what it held."""
    if not (_active is not None and old is not None and _active.discard(old)):
        release(old)


def release(tensor) -> None:
    """Unmap an external tensor's file (it maps it again when read); anything else is left as it is."""
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # a view of the map is still alive somewhere: keep it
            tensor.release()


def to_numpy(tensor, dtype=None, *, copy: bool = False) -> np.ndarray:
    """The tensor's data as an array (``dtype``: converted). An external tensor's is always a copy, and its
    memory map is released; an in-memory tensor's is its own array unless ``copy`` or a conversion."""
    if isinstance(tensor, ir.ExternalTensor):
        out = np.array(tensor.numpy(), dtype=dtype, copy=True)
        release(tensor)
        return out
    return np.array(tensor.numpy(), dtype=dtype, copy=True) if copy else np.asarray(tensor.numpy(), dtype=dtype)


def park(array: np.ndarray):
    """Keep an array aside until it is needed (:func:`unpark`): in a file of the active store if there is one
    and it is large (a layer's GPTQ Hessians, its calibration samples), else as it is."""
    store = _active
    if store is None or not store.wants(array):
        return array
    return store.put(array, None)


def unpark(parked) -> np.ndarray:
    """A fresh copy of a parked array (read from its file in one go, no memory map)."""
    if isinstance(parked, np.ndarray):
        return parked.copy()
    return np.fromfile(parked.path, dtype=parked.dtype.numpy()).reshape(parked.shape.numpy())


def discard(parked) -> None:
    """Forget a parked array (its file is deleted)."""
    if _active is not None and not isinstance(parked, np.ndarray):
        _active.discard(parked)


def trim_heap() -> None:
    """Give memory that was freed (an ONNX Runtime session's) back to the system (glibc's malloc_trim),
    so that the process's resident size follows what it holds; a no-op elsewhere."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
