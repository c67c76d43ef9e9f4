"""onnxqf: quantization-friendly LLM activations inside ONNX graphs.

The graph passes live in the repository's ``passes/`` folder and the exporters in ``models/``;
installed, they are ``onnxqf.passes`` and ``onnxqf.models``. Run from a source checkout without
installing (e.g. ``python -m onnxqf.cli`` on a GPU machine), the two folders are found beside
this package.
"""

import os as _os

__version__ = "0.1.0"

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(_os.path.join(_root, "passes", "__init__.py")):
    if _root not in __path__:
        __path__.append(_root)
