"""Lowerings: how one quantized linear (or a group sharing an input) becomes ONNX nodes."""
