"""Helpers the tests share (fixtures live in conftest.py; this is a plain module the tests import)."""

from __future__ import annotations

import numpy as np

__all__ = ["TINY_NAMES", "run_logits", "kl_per_token", "options"]

TINY_NAMES = ["llama-gqa", "llama-tied", "qwen2-bias", "llama-odd"]


def run_logits(path, ids: np.ndarray) -> np.ndarray:
    from onnxqf.runtime.session import logits, make_session

    return logits(make_session(path), ids)


def kl_per_token(ref: np.ndarray, new: np.ndarray) -> float:
    from onnxqf.maths.metrics import kl_divergence

    return kl_divergence(ref, new)


def options(transform: str = "none", quant: str = "int8", *, alpha="auto", seed: int = 0, calib: str | None = None,
            calib_windows: int = 8, calib_seq: int = 512, weight_rounding: str = "gptq", sequential: bool = False,
            target: str | None = None, quantize_lm_head: bool = False, keep_float=(), progress: bool = False,
            low_memory: bool | None = None, **quant_kw):
    """RewriteOptions from the command line's names (``quant_kw``: act_quant / block_size / asymmetric / ...)."""
    from onnxqf.options import Calibration, RewriteOptions, Transform, quant_config

    if "act_quant" in quant_kw:
        quant_kw["activations"] = quant_kw.pop("act_quant")
    calibration = Calibration(calib, calib_windows, calib_seq, weight_rounding, sequential) if calib else \
        Calibration(windows=calib_windows, seq=calib_seq, rounding=weight_rounding, sequential=sequential)
    return RewriteOptions(Transform(transform, alpha, seed), quant_config(quant, **quant_kw), calibration, target,
                          quantize_lm_head, tuple(keep_float), progress, low_memory)
