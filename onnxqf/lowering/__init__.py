"""Lowerings: how one quantized linear (or a group sharing an input) becomes ONNX nodes.

``base`` holds the :class:`~onnxqf.lowering.base.Lowering` interface and the registry; each other module
registers its lowerings when it is imported, which this package does for the built-in ones, so that any import
of a lowering module sees them all: ``w8a8`` (int8 weights x int8 activations, per provider), ``nbits``
(MatMulNBits), ``cuda_kernels`` (onnxqf's own CUDA custom op) and ``cpu_kernels`` (its CPU op library).
"""

from onnxqf.lowering import base, cpu_kernels, cuda_kernels, nbits, w8a8  # noqa: F401  (registers the built-in lowerings)
