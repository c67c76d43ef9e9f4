"""Channel-wise scaling (SmoothQuant), tuned against the plan's rotations and folded into producers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxqf.calib.calibrate import SiteStats
from onnxqf.errors import OnnxqfError
from onnxqf.graph import edit
from onnxqf.maths import fold, smoothing
from onnxqf.maths.gptq import column_chunks
from onnxqf.passes.base import RewritePass
from onnxqf.plan import Plan
from onnxqf.report import SiteChoice

__all__ = ["SmoothPass", "fold_scales"]


class SmoothPass(RewritePass):
    """``x <- x / s`` and ``B <- diag(s) B`` at each of the plan's smoothed sites.

    Rules: ``1/s`` folds into the site's producer (:class:`onnxqf.graph.structure.Site`): the norm's γ
    (attention and MLP inputs), v_proj's output columns (o_proj's input; scales tied across the
    query heads of a KV group) or a conv layer's in_proj ``C`` columns (out_proj's input), or up_proj's
    output columns (down_proj's input). Exact in float.
    With ``alpha="auto"`` each site gets the α (or no smoothing) whose W8A8 layer error, measured on
    the calibration sample *after the plan's rotation of that site*, with the readers' weights as
    they will be written (:meth:`Plan.reader_output`), is lowest; the choice and its predicted error
    go to ``report.sites``. ``requires``: statistics for every smoothed site, for γ-folded sites a norm with a
    scale, and no o_in site when v_proj's output is clamped (``ModelConfig.value_clip``).

    Attributes:
        plan: which sites to smooth and the rotations that follow; stats: calibration statistics by
        site name; alpha: a number in [0, 1] or "auto".
    """

    def __init__(self, plan: Plan, stats: dict[str, SiteStats], alpha: float | str = "auto", report=None,
                 progress: bool = False):
        super().__init__(report)
        self.progress = progress
        if alpha != "auto" and not (0.0 <= float(alpha) <= 1.0):
            raise OnnxqfError(f"--alpha must be in [0, 1] or 'auto', not {alpha}")
        self.plan, self.stats, self.alpha = plan, stats, alpha

    def requires(self, model: ir.Model) -> None:
        s = self.structure(model)
        if s.config.value_clip and "o_in" in self.plan.smooth:
            raise OnnxqfError("o_in cannot be smoothed: a Clip reads v_proj's output (clip_qkv), and a scale folded "
                              "into v_proj's columns would be clamped")
        for site in s.sites(self.plan.smooth):
            if site.name not in self.stats:
                raise OnnxqfError(f"no calibration statistics for {site.name}")
            if site.fold_norm is not None and not site.fold_norm.has_scale:
                raise OnnxqfError(f"{site.name}: the norm has no scale to fold smoothing into")

    def apply(self, model: ir.Model) -> bool:
        s = self.structure(model)
        edit.prepare_linears(model.graph, s)
        cfg = s.config
        rotations = {(kind, mixer): self.plan.site_transform(kind, cfg, mixer) for kind in self.plan.smooth
                     for mixer in {site.mixer for site in s.sites(self.plan.smooth)}}
        modified = False
        # o_in and down_in first: their scales fold into v_proj's and up_proj's columns, which the
        # attention and MLP inputs' searches must then see as written
        order = [k for k in ("o_in", "down_in", "attn_in", "mlp_in") if k in self.plan.smooth]
        from tqdm.auto import tqdm

        sites = [layer.site(kind) for layer in s.layers for kind in order]
        for site in tqdm(sites, desc="choosing α" if self.alpha == "auto" else "smoothing", unit="site",
                         disable=not self.progress):
            st = self.stats[site.name]
            B, w = self._scored_weights(site, cfg)
            choice = smoothing.choose_scales(st.sample, st.stats.absmax, B, self.alpha, site.kv_groups,
                                             rotations[site.kind, site.mixer], weight_absmax=w)
            self.report.sites[site.name] = SiteChoice(choice.alpha, choice.predicted, choice.unsmoothed)
            if choice.alpha is None:
                continue
            fold_scales(model.graph, site, choice.scales)
            modified = True
        return modified

    #: the readers' weights are read for the α search in float64 column slices of about this size
    SCORE_SLICE_BYTES = 32 << 20

    def _scored_weights(self, site, cfg) -> tuple[np.ndarray, np.ndarray]:
        """(the readers' weights as written later, side by side, at the α search's scored columns; their row
        maxima over all columns), a reader and a slice of its columns at a time: a 7B layer's gate/up
        (4096 x 22016) would be 720 MB in float64 at once."""
        sizes = [lin.shape[1] for lin in site.readers]
        cols = smoothing.scored_columns(site.readers[0].shape[0], sum(sizes))
        w = np.zeros(site.readers[0].shape[0])
        parts, offset = [], 0
        for lin, n in zip(site.readers, sizes):
            # the output-side folds of reader_output act per column, per head, or (a residual rotation) on all
            budget = 1 << 62 if lin.role in ("o_proj", "out_proj", "down_proj") else self.SCORE_SLICE_BYTES
            for sl, chunk in column_chunks(lin.stored_matrix(), budget, align=cfg.head_dim):
                M = self.plan.reader_output(lin.role, chunk, cfg, sl)
                np.maximum(w, np.abs(M).max(axis=1), out=w)
                if cols is None:
                    parts.append(M)
                else:
                    pick = cols[(cols >= offset + sl.start) & (cols < offset + sl.stop)] - offset - sl.start
                    parts.append(M[:, pick])
            offset += n
        return np.concatenate(parts, axis=1), w


def fold_scales(graph: ir.Graph, site, scale: np.ndarray) -> None:
    """Apply ``x <- x / s`` at ``site`` exactly: readers' rows times s, 1/s into the producer."""
    for lin in site.matmuls():  # each weight MatMul once (a packed q/k/v as a whole)
        edit.update_matrix(lin, lambda B: fold.scale_rows(B, scale), by="columns")
    inv = 1.0 / scale
    if site.fold_norm is not None:
        site.fold_norm.set_scale(site.fold_norm.scale() * inv)
        return
    producer = site.fold_linear
    col = smoothing.kv_scales(inv, site.kv_groups) if site.kv_groups is not None else inv
    edit.update_matrix(producer, lambda B: fold.scale_cols(B, col), by="rows")
    if producer.bias is not None:
        edit.set_bias_vector(producer, producer.bias_vector() * col)
