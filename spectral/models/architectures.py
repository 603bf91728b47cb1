"""The shape of a transformer: what a ``random:`` twin is built from.

The shipped architectures are declared by their family modules (``spectral.models.families``;
``ARCHITECTURES`` there is the view of all of them). Their figures are those of
``shared/research/DEFINITIONS.md`` ("Target models") plus the public configs of the same
checkpoints (positions, norms, rotary settings): a random model built from one has the exact
shapes of the real checkpoint; only the weights are random.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Architecture:
    """Shape of one transformer (decoder, or encoder for the BERT family)."""

    name: str
    """Short name, used after ``random:`` in a model spec."""
    family: str
    """Name of its model family (a key of ``spectral.models.families.FAMILIES``)."""
    layers: int
    heads: int
    """Query heads per layer."""
    hidden: int
    """d_model."""
    intermediate: int
    """MLP width."""
    vocab: int
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None means one per query head."""
    max_positions: int = 2048
    rotary_pct: float = 1.0
    """Fraction of d_head that is rotated (GPT-NeoX ``rotary_pct``)."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def d_head(self) -> int:
        return self.hidden // self.heads

    def scaled(self, **overrides: int | float) -> "Architecture":
        """A copy with some fields replaced; the MLP keeps its width ratio unless given."""
        if "hidden" in overrides and "intermediate" not in overrides:
            ratio = self.intermediate / self.hidden
            overrides["intermediate"] = int(round(overrides["hidden"] * ratio))
        return replace(self, **overrides)

