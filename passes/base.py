"""What every onnxqf pass shares: an in-place onnx-ir pass that records itself in a RewriteReport."""

from __future__ import annotations

import logging
import time

import onnx_ir as ir

from onnxqf.graph.edit import OnlineStyle
from onnxqf.report import PassRecord, RewriteReport

__all__ = ["RewritePass", "RotationPass"]

logger = logging.getLogger("onnxqf")


class RewritePass(ir.passes.InPlacePass):
    """Subclasses implement ``apply(model) -> modified``; preconditions go in ``requires``.

    Attributes:
        report: the :class:`RewriteReport` the pass adds its record (and its results) to.
    """

    def __init__(self, report: RewriteReport | None = None):
        super().__init__()
        self.report = report if report is not None else RewriteReport()
        self._structure = None

    def apply(self, model: ir.Model) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def structure(self, model: ir.Model):
        """The model's :class:`~onnxqf.graph.structure.Structure`, recognized once per pass call: ``requires``
        and ``apply`` share it (a pass never recognizes the graph it is editing again)."""
        if self._structure is None or self._structure[0] is not model:
            from onnxqf.recognize import recognize

            self._structure = (model, recognize(model))
        return self._structure[1]

    def __call__(self, model_or_result, /) -> ir.passes.PassResult:
        try:
            return super().__call__(model_or_result)
        finally:
            self._structure = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        t = time.perf_counter()
        modified = bool(self.apply(model))
        seconds = time.perf_counter() - t
        self.report.passes.append(PassRecord(type(self).__name__, round(seconds, 2), modified))
        logger.info("%s: %s (%.1f s)", type(self).__name__, "modified" if modified else "nothing to do", seconds)
        return ir.passes.PassResult(model, modified)


class RotationPass(RewritePass):
    """A pass that applies one of the plan's rotations; ``size_of(structure)`` is the size it must have.

    Attributes:
        rotation: the :class:`onnxqf.maths.hadamard.Rotation` from the :class:`onnxqf.plan.Plan`.
        online: how online rotations are emitted (:class:`onnxqf.graph.edit.OnlineStyle`; the target's choice).
    """

    what = "rotation"

    def __init__(self, rotation, report: RewriteReport | None = None, online=None):
        super().__init__(report)
        self.rotation = rotation
        self.online = online or OnlineStyle()  # the target's choice (onnxqf.runtime.target.Target.online)

    def size_of(self, structure) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def recognize_and_check(self, model: ir.Model):
        """The model's structure, after checking that the rotation fits it."""
        from onnxqf.errors import OnnxqfError

        s = self.structure(model)
        n = self.size_of(s)
        if self.rotation.n != n:
            raise OnnxqfError(f"{self.what} of size {self.rotation.n} for a model that needs {n}")
        return s
