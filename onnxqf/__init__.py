"""onnxqf: quantization-friendly LLM activations inside ONNX graphs.

Packages: ``onnxqf`` (library and CLI), ``onnxqf.passes`` (the graph passes, from the repository's
``passes/`` folder) and ``onnxqf.models`` (exporters and the built-in model registry, from
``models/``). Install the project (``pip install -e .``) to import them.
"""

__version__ = "0.1.0"
