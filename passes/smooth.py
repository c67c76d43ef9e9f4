"""Channel-wise scaling (SmoothQuant) folded into the producer of each activation.

``x <- x / s`` and ``B <- diag(s) B`` per input channel, where ``1/s`` folds into:
- the RMSNorm scale before q/k/v (``attn_in``) and before gate/up (``mlp_in``);
- v_proj's output columns for o_proj's input (``o_in``; tied across the heads of a KV group);
- up_proj's output columns for down_proj's input (``down_in``: ``act(gate) * up`` is linear in up).

Scales come from calibration statistics captured on this model state (see onnxqf.calibrate).
For the hybrid, only ``o_in`` and ``down_in`` are smoothed here (then rotated): the residual-stream
sites cannot be scaled before a folded residual rotation, because the norm's scale would act in
the rotated basis.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxqf import edit, fold, smoothing
from onnxqf.calibrate import SiteStats
from onnxqf.errors import OnnxqfError
from onnxqf.recognize import recognize
from onnxqf.hadamard import rotation
from onnxqf.passes.fold_norms import private_gamma  # noqa: E402

ALL_SITES = ("attn_in", "mlp_in", "o_in", "down_in")


class SmoothPass(ir.passes.InPlacePass):
    """Fold calibrated smoothing scales; records the alpha chosen per site in ``self.alphas``."""

    def __init__(self, stats: dict[str, SiteStats], alpha: float | str = "auto", sites=ALL_SITES,
                 search_rotation: bool = False, seed: int = 0):
        super().__init__()
        if alpha != "auto" and not (0.0 <= float(alpha) <= 1.0):
            raise OnnxqfError(f"--alpha must be in [0, 1] or 'auto', not {alpha}")
        self.stats, self.alpha, self.sites = stats, alpha, tuple(sites)
        self.search_rotation, self.seed = search_rotation, seed
        self.alphas: dict[str, float | None] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        s = recognize(model)
        edit.prepare_linears(model.graph, s)
        cfg = s.config
        groups = (cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
        rot = {}
        if self.search_rotation:  # score candidates as they will be quantized: smoothed, then rotated
            rng = np.random.default_rng(self.seed)
            rot = {"o_in": rotation(cfg.num_heads * cfg.head_dim, rng).matrix(), "down_in": rotation(cfg.intermediate, rng).matrix()}
        for layer in s.layers:
            for site in self.sites:
                key = f"layers.{layer.index}.{site}"
                if key not in self.stats:
                    raise OnnxqfError(f"no calibration statistics for {key}")
                st = self.stats[key]
                readers = {"attn_in": [layer.q, layer.k, layer.v], "mlp_in": [layer.gate, layer.up],
                           "o_in": [layer.o], "down_in": [layer.down]}[site]
                B = np.concatenate([lin.matrix() for lin in readers], axis=1)
                scale, used = smoothing.choose_scales(
                    st.sample, st.stats.absmax, B, self.alpha, groups if site == "o_in" else None, rot.get(site)
                )
                self.alphas[key] = used
                if used is None:
                    continue
                for lin in readers:
                    edit.set_weight_matrix(lin, fold.scale_rows(lin.matrix(), scale))
                inv = 1.0 / scale
                if site in ("attn_in", "mlp_in"):
                    norm = layer.attn_norm if site == "attn_in" else layer.mlp_norm
                    if norm.gamma is None:
                        raise OnnxqfError(f"layer {layer.index}: the norm has no scale to fold smoothing into")
                    private_gamma(model.graph, norm)
                    edit.write(norm.gamma, read(norm.gamma) * inv)
                else:
                    producer = layer.v if site == "o_in" else layer.up
                    col = smoothing.kv_scales(inv, groups) if site == "o_in" else inv
                    edit.set_weight_matrix(producer, fold.scale_cols(producer.matrix(), col))
                    if producer.bias is not None:
                        edit.set_bias_vector(producer, producer.bias_vector() * col)
        return ir.passes.PassResult(model, modified=True)
