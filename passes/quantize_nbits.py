"""Weight-only low-bit quantization: weight MatMuls become ``com.microsoft.MatMulNBits`` (ONNX Runtime).

Every selected ``y = x @ B`` (B an initializer ``[K, N]``) becomes::

    y = MatMulNBits(x, B_packed, scales[, zero_points]; K, N, bits, block_size[, accuracy_level])

with B quantized in blocks of ``block_size`` consecutive input rows per output column (layout in
:mod:`onnxqf.maths.nbits`: ``B_packed`` uint8 ``[N, ceil(K/block_size), block_size*bits/8]``, low bits
first; ``scales`` ``[N, n_blocks]`` in the activation's float type; symmetric by default, i.e. no
zero-point input and codes centred on ``2^(bits-1)``). Activations stay float; a bias Add after the
MatMul is kept as it is.

Rules:

- bits 4 or 8; block_size 16, 32, 64, 128 or 256; K need not be a multiple of the block size.
- Rounding: GPTQ with per-(column, block) scales where ``hessians`` holds the ``X^T X`` of the
  linear's input, keyed by the site the linear reads (``structure.site_of()[name].name``, e.g.
  ``layers.3.attn_in``); linears that read one site are rounded together. Otherwise round to nearest,
  which is byte-identical to onnxruntime's own ``MatMulNBitsQuantizer`` (RTN, same settings).
- lm_head stays float unless ``quantize_lm_head``; then it gets 8-bit weights (``lm_head_bits``),
  rounded to nearest, same block size. A tied embedding table is left untouched (float).
- ``keep_float``: fnmatch patterns on names like ``layers.3.down_proj`` or a bare role (``down_proj``).

``requires``: opset >= 13, a recognizable decoder graph, a float32/float16 weight dtype, at least one
linear to quantize. Results: ``quantized`` (names) and ``rounding`` (name -> ``gptq``/``rtn``), also
recorded in the pass's report.
"""

from __future__ import annotations

import fnmatch
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx_ir import tape as ir_tape

from onnxqf.graph import edit
from onnxqf.maths import nbits
from onnxqf.errors import OnnxqfError, UnsupportedGraphError
from onnxqf.maths.gptq import hessian_of
from onnxqf.passes.base import RewritePass
from onnxqf.recognize import recognize
from onnxqf.graph.structure import Linear, group_by_input

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
_SCALE_DTYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


class QuantizeNBitsPass(RewritePass):
    """Replace weight MatMuls by MatMulNBits (block-wise int4/int8 weights, float activations); see the module doc."""

    def __init__(self, bits: int = 4, block_size: int = 32, hessians: dict[str, np.ndarray] | None = None,
                 quantize_lm_head: bool = False, keep_float: tuple[str, ...] = (), progress: bool = False, *,
                 symmetric: bool = True, act_order: bool = False, clip_search: bool = False, damp: float = 0.01,
                 accuracy_level: int = 0, lm_head_bits: int = 8, report=None):
        super().__init__(report)
        try:
            nbits.check(bits, block_size)
            nbits.check(lm_head_bits, block_size)
        except ValueError as exc:
            raise OnnxqfError(str(exc)) from None
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise OnnxqfError(f"accuracy_level must be 0..4, not {accuracy_level}")
        self.bits, self.block_size = bits, block_size
        self.hessians = hessians or {}
        self.quantize_lm_head = quantize_lm_head
        self.keep_float = tuple(keep_float)
        self.progress = progress
        self.symmetric, self.act_order, self.clip_search, self.damp = symmetric, act_order, clip_search, damp
        self.accuracy_level = accuracy_level
        self.lm_head_bits = lm_head_bits

    @property
    def quantized(self) -> list[str]:
        """Names of the linears made MatMulNBits (kept in the report, which a caller may replace)."""
        return self.report.quantized

    @property
    def rounding(self) -> dict[str, str]:
        """Linear name -> ``gptq`` or ``rtn``."""
        return self.report.rounding

    # -- preconditions --------------------------------------------------------------------------

    def requires(self, model: ir.Model) -> None:
        if model.graph.opset_imports.get("", 0) < 13:
            raise OnnxqfError("the model's opset is below 13; re-export with opset >= 18")
        if model.graph.opset_imports.get(MS_DOMAIN, 1) != 1:
            raise OnnxqfError(f"the model imports {MS_DOMAIN} version {model.graph.opset_imports[MS_DOMAIN]}; MatMulNBits is version 1")
        structure = recognize(model)
        if structure.dtype not in _SCALE_DTYPES:
            raise OnnxqfError(f"MatMulNBits needs float32 or float16 weights, not {structure.dtype.name}")
        linears = self._select(structure)
        if not linears:
            raise UnsupportedGraphError("no weight MatMuls to quantize")
        site_of = structure.site_of()
        for lin in linears:
            site = site_of.get(lin.name)
            # (Hessians computed on demand are not asked for here: they are made for this very structure)
            H = self.hessians.get(site.name) if site is not None and isinstance(self.hessians, dict) else None
            if H is not None and H.shape != (lin.shape[0],) * 2:
                raise OnnxqfError(f"Hessian of {site.name} is {H.shape}, {lin.name} has {lin.shape[0]} inputs")

    def _select(self, structure) -> list[Linear]:
        return [lin for lin in structure.linears(include_lm_head=self.quantize_lm_head)
                if not any(fnmatch.fnmatchcase(lin.name, p) or fnmatch.fnmatchcase(lin.name, f"layers.*.{p}")
                           for p in self.keep_float)]

    # -- rewrite --------------------------------------------------------------------------------

    def apply(self, model: ir.Model) -> bool:
        from tqdm.auto import tqdm

        graph = model.graph
        structure = recognize(model)
        linears = self._select(structure)
        site_of = structure.site_of()
        scale_dtype = _SCALE_DTYPES[structure.dtype]
        for group in tqdm(group_by_input(linears), desc=f"int{self.bits} weights", unit="group", disable=not self.progress):
            site = site_of.get(group[0].name)
            is_head = group[0] is structure.lm_head
            bits = self.lm_head_bits if is_head else self.bits
            H = hessian_of(self.hessians, None if site is None or is_head else site.name)
            parts, how = self._round_group(group, H, bits, scale_dtype)
            for lin, part in zip(group, parts):
                self._replace(graph, lin, part)  # written at once (to disk under onnxqf.graph.store)
                self.quantized.append(lin.name)
                self.rounding[lin.name] = how
        graph.opset_imports.setdefault(MS_DOMAIN, 1)
        common_passes.RemoveUnusedNodesPass()(model)
        logger.info("MatMulNBits: %d linears, %d-bit block %d (%s), %d GPTQ", len(self.quantized), self.bits, self.block_size,
                    "symmetric" if self.symmetric else "asymmetric", sum(v == "gptq" for v in self.rounding.values()))
        return True

    def _round_group(self, group: list[Linear], H, bits: int, scale_dtype) -> tuple[list[nbits.BlockQuant], str]:
        """Block-wise codes per linear of a group sharing one input: GPTQ given ``H``, else RTN.

        Scales are per (block of input rows, output column) and GPTQ's error feedback runs down each
        column, so the linears are rounded one by one and in column chunks with one prepared Hessian:
        the result of rounding their concatenation, in bounded memory.
        """
        from onnxqf.maths.gptq import column_chunks, prepare

        how = "rtn" if H is None else "gptq"
        prepared = None if H is None else prepare(H, self.damp, self.act_order)  # H: an array, or a function fetching a copy
        del H
        out = []
        for lin in group:
            B = lin.stored_matrix()  # in its own dtype; float64 a column chunk at a time
            chunks = []
            for _, chunk in column_chunks(B):
                if prepared is not None:
                    chunks.append(nbits.gptq_blockwise(chunk, prepared, bits, self.block_size, symmetric=self.symmetric,
                                                       clip_search=self.clip_search, act_order=self.act_order,
                                                       damp=self.damp, scale_dtype=scale_dtype))
                else:
                    chunks.append(nbits.quantize_blockwise(chunk, bits, self.block_size, symmetric=self.symmetric,
                                                           clip_search=self.clip_search, scale_dtype=scale_dtype))
            out.append(nbits.concat_columns(chunks))
            del B
        return out, how

    def rounded(self, structure, site, H: np.ndarray) -> dict[Linear, np.ndarray]:
        """The weights this pass will write for the linears reading ``site`` given its ``X^T X``, dequantized
        (float64 [in, out] per linear; :func:`onnxqf.calib.layerwise.sequential_hessians` runs later layers on them)."""
        group = [lin for lin in self._select(structure) if lin.input is site.value and lin is not structure.lm_head]
        if not group:
            return {}
        parts, _ = self._round_group(group, H, self.bits, _SCALE_DTYPES[structure.dtype])
        return {lin: q.dequantize() for lin, q in zip(group, parts)}

    def _replace(self, graph: ir.Graph, lin: Linear, q: nbits.BlockQuant) -> None:
        K, N = q.shape
        packed, scales, zp = q.pack()
        base = lin.name or lin.node.name
        inputs = [lin.input, edit.add_initializer(graph, f"{base}.weight_q{q.bits}", packed),
                  edit.add_initializer(graph, f"{base}.weight_scales", scales)]
        if zp is not None:
            inputs.append(edit.add_initializer(graph, f"{base}.weight_zero_points", zp))
        attrs = {"K": K, "N": N, "bits": q.bits, "block_size": q.block_size}
        if self.accuracy_level:
            attrs["accuracy_level"] = self.accuracy_level
        tape = ir_tape.Tape(graph)
        y = tape.op("MatMulNBits", inputs, attrs, domain=MS_DOMAIN, name=f"{base}/matmul_nbits")
        graph.insert_before(lin.node, tape.nodes)
        old = lin.node.outputs[0]
        y.shape, y.type = old.shape, old.type
        was_output, name = old.is_graph_output(), old.name
        old.replace_all_uses_with(y, replace_graph_outputs=True)
        if was_output:  # keep the graph output's name (logits)
            old.name, y.name = f"{name}.float", name
        graph.remove(lin.node, safe=True)
