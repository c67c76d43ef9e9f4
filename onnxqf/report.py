"""The typed record of what `rewrite` did: filled by the passes, saved in the model's metadata."""

from __future__ import annotations

import dataclasses
import json

__all__ = ["PassRecord", "SiteChoice", "RewriteReport"]


@dataclasses.dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool


@dataclasses.dataclass
class SiteChoice:
    """The smoothing chosen for one site and the α search's layer error (relative, W8A8).

    ``predicted`` is ``||XB - Q(X')Q(B')||² / ||XB||²`` on the calibration sample with the chosen
    scales and the plan's rotation; ``unsmoothed`` the same with no smoothing (rotation only).
    """

    alpha: float | None
    predicted: float
    unsmoothed: float


@dataclasses.dataclass
class RewriteReport:
    options: str = ""
    target: str = ""
    lowering: str | None = None
    layers: int = 0
    rotations: dict[str, str] = dataclasses.field(default_factory=dict)
    calibration: dict = dataclasses.field(default_factory=dict)
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    sites: dict[str, SiteChoice] = dataclasses.field(default_factory=dict)
    quantized: list[str] = dataclasses.field(default_factory=list)
    rounding: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def alphas(self) -> dict[str, float | None]:
        return {name: c.alpha for name, c in self.sites.items()}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))
