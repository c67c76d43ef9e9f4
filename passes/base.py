"""What every onnxqf pass shares: an in-place onnx-ir pass that records itself in a RewriteReport."""

from __future__ import annotations

import logging
import time

import onnx_ir as ir

from onnxqf.report import PassRecord, RewriteReport

logger = logging.getLogger("onnxqf")


class RewritePass(ir.passes.InPlacePass):
    """Subclasses implement ``apply(model) -> modified``; preconditions go in ``requires``.

    Attributes:
        report: the :class:`RewriteReport` the pass adds its record (and its results) to.
    """

    def __init__(self, report: RewriteReport | None = None):
        super().__init__()
        self.report = report if report is not None else RewriteReport()

    def apply(self, model: ir.Model) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        t = time.perf_counter()
        modified = bool(self.apply(model))
        seconds = time.perf_counter() - t
        self.report.passes.append(PassRecord(type(self).__name__, round(seconds, 2), modified))
        logger.info("%s: %s (%.1f s)", type(self).__name__, "modified" if modified else "nothing to do", seconds)
        return ir.passes.PassResult(model, modified)
