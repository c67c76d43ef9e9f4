"""Errors that the CLI turns into one line and a non-zero exit."""

__all__ = ["OnnxqfError", "UnsupportedGraphError", "BadModelFileError", "GenaiFolderError",
           "ProviderUnavailableError"]


class OnnxqfError(Exception):
    """A user-facing error: bad input, unsupported graph, bad option. The message is one line."""

    exit_code = 2


class UnsupportedGraphError(OnnxqfError):
    """The graph is valid ONNX but not a decoder-only LLM we can match."""


class BadModelFileError(OnnxqfError):
    """Not ONNX, truncated, or with missing/short external data."""


class GenaiFolderError(OnnxqfError):
    """Not a usable onnxruntime-genai folder: no genai_config.json, a config that disagrees with the
    graph, or an attention op we do not handle."""


class ProviderUnavailableError(OnnxqfError):
    """The execution provider asked for is not in this onnxruntime build (exit 3, as `onnxqf check`)."""

    exit_code = 3
