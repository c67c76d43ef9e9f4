"""One plan for every transform: which sites are smoothed and every rotation, drawn once from one seed.

The smoothing pass tunes its scales against :meth:`Plan.site_transform` — the exact rotation that
the rotation passes will apply to that site — and the rotation passes apply the rotations this
plan holds. What the α search measures is therefore what the written graph computes.

Rotations (all orthogonal, ``Q = diag(signs) · kron(factors)``):

- ``residual`` (hidden): folded into every weight around the residual stream (``--rotate``, and
  the ``folded`` hybrid).
- ``norm_out`` (hidden): the full hybrid's online Hadamard after each attention/MLP norm; its signs
  and the smoothing scales fold into the norm's γ, its transpose into q/k/v and gate/up.
- ``down`` (d_ff): online before every down_proj; signs fold into up_proj.
- ``head`` (head_dim): folded into v_proj's output columns per head; ``heads`` (num_heads): an
  online head mixing before o_proj, without signs (they could not fold into shared KV heads).
- ``conv_out`` (hidden, only for models with conv layers, LFM2): online before every conv layer's out_proj;
  its signs fold into in_proj's ``C`` columns (the gate ``C·`` is per channel), nothing else folds there.
  Drawn after the others, so that a model without conv layers gets the same rotations as before.

Clamped values (``ModelConfig.value_clip``, OLMo's ``clip_qkv``): a Clip reads v_proj's output, and neither a
smoothing scale nor ``head`` folds into v_proj's columns under it (``clip(v / s) ≠ clip(v) / s``). For such a
model the plan does not smooth ``o_in`` and ``head`` is the identity (kind ``identity``, drawn all the same so
that the other rotations are those of the same seed); the head mixing ``heads`` runs after the attention and
stays. The residual and norm-output rotations and the other sites' smoothing leave q/k/v's outputs unchanged, so
the clamps see what they saw.

``rotate-offline`` keeps only the rotations that fold into initializers (residual, and the per-head
value rotation, undone in o_proj's rows): no node is added, so a weight-only model runs as fast as
an unrotated one; down_proj's input and the head mixing are not rotated (and a conv layer's out_proj input
cannot be: the LFM2 family refuses the preset).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxqf.errors import OnnxqfError
from onnxqf.graph.structure import MIXERS, SITE_KINDS, ModelConfig
from onnxqf.maths import fold
from onnxqf.maths.hadamard import Rotation, rotation

__all__ = ["MAX_DENSE_ONLINE", "PRESETS", "OFFLINE_ONLY", "Plan", "identity"]

#: the largest dense (non-Hadamard) factor an online rotation may carry; larger ones are not applied
MAX_DENSE_ONLINE = 256

#: transform presets: name -> (smoothed site kinds, residual rotation, online norm-output rotation)
PRESETS = {
    "none": ((), False, False),
    "smooth": (SITE_KINDS, False, False),
    "rotate": ((), True, False),
    # only what folds into the weights: residual rotation and the per-head value rotation, no node added
    "rotate-offline": ((), True, False),
    # the paper's hybrid at every linear input: smooth, then rotate (online after the norms)
    "hybrid": (SITE_KINDS, False, True),
    # the earlier two-site hybrid: residual rotation folded, so only o_proj/down_proj inputs smooth
    "hybrid-folded": (("o_in", "down_in"), True, False),
}


def identity(n: int) -> Rotation:
    """The n×n identity as a :class:`Rotation` (kind ``identity``): a rotation the plan holds but does not apply."""
    return Rotation(signs=np.ones(n), factors=[np.eye(n)], kind="identity")


#: presets whose rotations all fold into initializers (no online rotation node in the graph)
OFFLINE_ONLY = frozenset({"rotate-offline"})


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    seed: int
    smooth: tuple[str, ...] = ()
    residual: Rotation | None = None
    norm_out: Rotation | None = None
    down: Rotation | None = None
    head: Rotation | None = None
    heads: Rotation | None = None
    conv_out: Rotation | None = None

    @property
    def rotates(self) -> bool:
        return self.head is not None

    @classmethod
    def build(cls, config: ModelConfig, preset: str, seed: int = 0) -> "Plan":
        """Draw every rotation of ``preset`` from one generator seeded with ``seed``."""
        if preset not in PRESETS:
            raise OnnxqfError(f"unknown transform preset '{preset}' (one of {', '.join(PRESETS)})")
        smooth, residual, norm_out = PRESETS[preset]
        rotate = residual or norm_out
        rng = np.random.default_rng(seed)
        # drawn in a fixed order, each only when used, so a plan is a function of (config, preset, seed)
        r_res = rotation(config.hidden, rng) if residual else None
        r_norm = rotation(config.hidden, rng) if norm_out else None
        r_down = rotation(config.intermediate, rng) if rotate else None
        if (r_down is not None and r_down.kind != "hadamard"
                and max(f.shape[0] for f in r_down.factors) > MAX_DENSE_ONLINE):
            r_down = None  # no Hadamard construction and a dense factor too costly to run online
        r_head = rotation(config.head_dim, rng) if rotate else None
        r_heads = rotation(config.num_heads, rng) if rotate else None
        r_conv = rotation(config.hidden, rng) if rotate and config.conv_layers else None
        if preset in OFFLINE_ONLY:  # drawn as for "rotate" (same residual and head rotations), the online ones dropped
            r_down = r_heads = r_conv = None
        if config.value_clip:  # nothing folds into v_proj's columns under the clamp
            smooth = tuple(k for k in smooth if k != "o_in")
            r_head = None if r_head is None else identity(config.head_dim)
        return cls(seed, tuple(smooth), r_res, r_norm, r_down, r_head, r_heads, r_conv)

    def skipped(self, config: ModelConfig, preset: str) -> str | None:
        """One line saying what ``preset`` does not apply to this model and why, or None (clamped values)."""
        if not config.value_clip or preset == "none":
            return None
        return ("q/k/v are clamped (clip_qkv): o_proj's input is neither smoothed nor rotated per head, since both "
                "would fold into v_proj's columns under the clamp and not be exact; the head mixing stays")

    def heads_mixing(self, num_heads: int | None = None) -> np.ndarray:
        """The online head mixing R_nh (no signs), num_heads x num_heads; the identity without one."""
        if self.heads is None:
            return np.eye(num_heads or 1)
        return self.heads.mixing() if self.heads.n > 1 else np.eye(1)

    def site_transform(self, kind: str, config: ModelConfig, mixer: str = "attention") -> fold.KronRotation | None:
        """The rotation applied to a site's (smoothed) activation in the written graph, as Kronecker stages
        (applied in O(n · Σ factors)), or None. ``mixer``: the layer's (:data:`~onnxqf.graph.structure.MIXERS`):
        a conv layer's o_in gets ``conv_out``."""
        if kind not in SITE_KINDS or mixer not in MIXERS:
            raise ValueError((kind, mixer))
        if kind in ("attn_in", "mlp_in"):
            r = self.norm_out or self.residual
            return None if r is None else fold.KronRotation([(r.signs, r.factors)])
        if not self.rotates:
            return None
        if kind == "down_in":
            return None if self.down is None else fold.KronRotation([(self.down.signs, self.down.factors)])
        if mixer == "conv":
            return None if self.conv_out is None else fold.KronRotation([(self.conv_out.signs, self.conv_out.factors)])
        # o_in: (I ⊗ R_dh)(R_nh ⊗ I), R_dh = diag(signs) kron(factors) per head
        nh, dh = config.num_heads, config.head_dim
        return fold.KronRotation([(np.tile(self.head.signs, nh), [np.eye(nh), *self.head.factors]),
                                  (None, [self.heads_mixing(nh), np.eye(dh)])])

    def site_rotation(self, kind: str, config: ModelConfig, mixer: str = "attention") -> np.ndarray | None:
        """:meth:`site_transform` as a dense matrix."""
        t = self.site_transform(kind, config, mixer)
        return None if t is None else t.matrix()

    def reader_output(self, role: str, B: np.ndarray, config: ModelConfig, cols: slice | None = None) -> np.ndarray:
        """A reader's weight with the output-side folds that later rotations will apply to it.

        v_proj's columns get the per-head rotation, up_proj's the down rotation's signs, a conv layer's
        in_proj's ``C`` columns the ``conv_out`` signs, and o_proj's, out_proj's and down_proj's the residual
        rotation: per-output-channel quantization sees these, so the α search scores a site's readers as they
        will be written. ``cols``: ``B`` holds only these columns of the weight (whole heads for v_proj; o_proj,
        out_proj and down_proj must be whole).
        """
        if role == "v_proj" and self.rotates:
            B = fold.headwise_output(B, self.head.matrix(), config.head_dim)
        elif role == "up_proj" and self.down is not None:
            B = fold.scale_cols(B, self.down.signs if cols is None else self.down.signs[cols])
        elif role == "in_proj" and self.conv_out is not None:
            h = config.hidden
            signs = np.concatenate([np.ones(h), self.conv_out.signs, np.ones(h)])  # columns [B | C | x]
            B = fold.scale_cols(B, signs if cols is None else signs[cols])
        elif role in ("o_proj", "out_proj", "down_proj") and self.residual is not None:
            B = fold.rotate_output(B, self.residual.matrix())
        return B

    def describe(self) -> dict[str, str]:
        """Rotation kinds by name, for reports."""
        names = ("residual", "norm_out", "down", "head", "heads", "conv_out")
        return {n: getattr(self, n).kind for n in names if getattr(self, n) is not None}
