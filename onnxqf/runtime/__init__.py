"""ONNX Runtime: ``session`` (sessions and their options), ``target`` (what is true of one execution provider),
``placement`` (where each node runs, measured), ``bench`` (prefill and decode speed), ``kernels`` (onnxqf's own
CUDA custom-op library)."""
