"""Quantize the decoder's weight MatMuls with one lowering (W8A8 or MatMulNBits; :mod:`onnxqf.lowering`).

Rules:

- The linears come from recognition: every decoder linear, plus lm_head with ``quantize_lm_head``, less
  those matching a ``keep_float`` pattern (fnmatch on names like ``layers.3.down_proj`` or a bare role).
- Linears that read one activation (q/k/v, gate/up) form a group: they are rounded together with the
  site's Hessian and the lowering emits their nodes at once (a W8A8 lowering quantizes the activation once).
- Weights are rounded by the lowering: GPTQ where ``hessians`` has the X^T X of the group's site (keyed by
  site name, e.g. ``layers.3.attn_in``; an array, or a container that hands out copies), else to nearest.
  Every output column is rounded on its own (its scale and GPTQ's error feedback run down the column), so
  each linear is rounded in column chunks with one prepared Hessian: the result of rounding their
  concatenation, in bounded memory. lm_head is never given a Hessian.
- One group at a time is rounded, written (to disk while :mod:`onnxqf.graph.store` spills) and replaced,
  so that no more than one group's weights are in memory.

``requires``: opset >= 13, a float32/float16 decoder we recognize, at least one linear to quantize.
Results: ``report.quantized`` (names) and ``report.rounding`` (name -> ``gptq`` | ``rtn``).
"""

from __future__ import annotations

import fnmatch
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from onnxqf.errors import OnnxqfError, UnsupportedGraphError
from onnxqf.graph import edit
from onnxqf.graph.structure import Linear, Structure, group_by_input
from onnxqf.lowering.base import LinearGroup, Lowering
from onnxqf.lowering.nbits import SCALE_DTYPES
from onnxqf.maths.gptq import column_chunks, hessian_of
from onnxqf.passes.base import RewritePass

__all__ = ["QuantizePass", "select_linears", "matches"]

logger = logging.getLogger(__name__)


class QuantizePass(RewritePass):
    """Every selected weight MatMul becomes the nodes of ``lowering`` (see the module docstring)."""

    def __init__(self, lowering: Lowering, *, quantize_lm_head: bool = False, keep_float: tuple[str, ...] = (),
                 hessians=None, progress: bool = False, report=None, head_lowering: Lowering | None = None):
        super().__init__(report)
        self.lowering = lowering
        self.head_lowering = head_lowering
        self.quantize_lm_head = quantize_lm_head
        self.keep_float = tuple(keep_float)
        self.hessians = hessians if hessians is not None else {}
        self.progress = progress

    def requires(self, model: ir.Model) -> None:
        if model.graph.opset_imports.get("", 0) < 13:
            raise OnnxqfError("the model's opset is below 13; re-export with opset >= 18")
        for domain, version in self.lowering.domains.items():
            if domain and model.graph.opset_imports.get(domain, version) != version:
                raise OnnxqfError(f"the model imports {domain} version {model.graph.opset_imports[domain]}; "
                                  f"{self.lowering.name} needs version {version}")
        structure = self.structure(model)
        if structure.dtype not in SCALE_DTYPES:
            raise OnnxqfError(f"quantization needs float32 or float16 weights, not {structure.dtype.name}")
        linears = select_linears(structure, self.quantize_lm_head, self.keep_float)
        if not linears:
            raise UnsupportedGraphError("no weight MatMuls to quantize")
        if isinstance(self.hessians, dict):  # (containers that compute on demand make them for this structure)
            site_of = structure.site_of()
            for lin in linears:
                site = site_of.get(lin.name)
                H = self.hessians.get(site.name) if site is not None else None
                if H is not None and H.shape != (lin.shape[0],) * 2:
                    raise OnnxqfError(f"Hessian of {site.name} is {H.shape}, {lin.name} has {lin.shape[0]} inputs")

    def apply(self, model: ir.Model) -> bool:
        from tqdm.auto import tqdm

        graph = model.graph
        structure = self.structure(model)
        groups = self.groups(structure, graph)
        for group in tqdm(groups, desc=f"{self.lowering.name} weights", unit="group", disable=not self.progress):
            lowering = self.lowering_of(group)
            if getattr(lowering, "private_weights", False):
                for lin in group.linears:
                    edit.make_private(graph, lin)
            weights, how = self.round_group(structure, group)
            lowering.emit(graph, group, weights)
            for lin in group.linears:
                self.report.rounding[lin.name] = how
                self.report.quantized.append(lin.name or lin.node.name)
        for lowering in [self.lowering] + ([self.head_lowering] if self.head_lowering is not None else []):
            for domain, version in lowering.domains.items():  # the default domain: at least the lowering's opset
                graph.opset_imports[domain] = max(graph.opset_imports.get(domain, version), version)
        common_passes.RemoveUnusedNodesPass()(model)
        logger.info("%s: %d linears, %d rounded with GPTQ", self.lowering.describe(), len(self.report.quantized),
                    sum(v == "gptq" for v in self.report.rounding.values()))
        return True

    def lowering_of(self, group: LinearGroup) -> Lowering:
        """lm_head's own lowering when there is one, else the pass's."""
        return self.head_lowering if group.is_head and self.head_lowering is not None else self.lowering

    def groups(self, structure: Structure, graph: ir.Graph) -> list[LinearGroup]:
        """The selected linears grouped by the activation they read, in graph order."""
        position = {node: i for i, node in enumerate(graph)}
        out = []
        for linears in group_by_input(select_linears(structure, self.quantize_lm_head, self.keep_float)):
            first = min((lin.node for lin in linears), key=position.__getitem__)
            out.append(LinearGroup(linears, first, is_head=linears[0] is structure.lm_head))
        return out

    def round_group(self, structure: Structure, group: LinearGroup, H=None) -> tuple[list, str]:
        """(the lowering's rounded weights per linear, ``gptq`` | ``rtn``); ``H`` defaults to the site's Hessian."""
        if H is None and not group.is_head:
            site = structure.site_of().get(group.linears[0].name)
            H = hessian_of(self.hessians, None if site is None else site.name)
        if group.is_head:
            H = None
        lowering = self.lowering_of(group)
        prepared = None if H is None else lowering.prepare(H)  # H: an array, or a function fetching a copy
        del H
        out = []
        for lin in group.linears:
            B = lin.stored_matrix()  # in its own dtype; float64 a column chunk at a time
            parts = [lowering.round(chunk, prepared, group) for _, chunk in column_chunks(B)]
            out.append(lowering.concat(parts))
            del B
        return out, "rtn" if prepared is None else "gptq"

    def rounded(self, structure: Structure, site, H: np.ndarray) -> dict[Linear, np.ndarray]:
        """The weights this pass will write for the linears reading ``site`` given its ``X^T X``, dequantized
        (float64 [in, out] per linear; :func:`onnxqf.calib.layerwise.sequential_hessians` runs later layers on them)."""
        linears = [lin for lin in select_linears(structure, self.quantize_lm_head, self.keep_float)
                   if lin.input is site.value and lin is not structure.lm_head]
        if not linears:
            return {}
        group = LinearGroup(linears, linears[0].node)
        weights, _ = self.round_group(structure, group, H)
        return {lin: self.lowering.dequantize(w) for lin, w in zip(linears, weights)}


def select_linears(structure: Structure, quantize_lm_head: bool, keep_float: tuple[str, ...] = ()) -> list[Linear]:
    """The decoder's linears (by recognition), plus lm_head on request, less the keep-float ones."""
    return [lin for lin in structure.linears(include_lm_head=quantize_lm_head) if not matches(lin.name, keep_float)]


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """fnmatch-style: 'down_proj' matches every layer's down_proj, 'layers.29.*' one layer."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"layers.*.{p}") for p in patterns)
