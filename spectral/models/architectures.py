"""Hyperparameters of the target architectures, shipped so random-weight twins build offline.

Figures are those of ``shared/research/DEFINITIONS.md`` ("Target models") plus the public
configs of the same checkpoints (positions, norms, rotary settings). A random model built
from one of these has the exact shapes of the real checkpoint; only the weights are random.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Family = Literal["gpt_neox", "llama", "gpt2"]


@dataclass(frozen=True)
class Architecture:
    """Shape of one decoder-only transformer."""

    name: str
    """Short name, used after ``random:`` in a model spec."""
    family: Family
    """Adapter family: which Hugging Face model class builds it."""
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


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("pythia-410m", "gpt_neox", layers=24, heads=16, hidden=1024,
                     intermediate=4096, vocab=50304, rotary_pct=0.25),
        Architecture("pythia-1b", "gpt_neox", layers=16, heads=8, hidden=2048,
                     intermediate=8192, vocab=50304, rotary_pct=0.25),
        Architecture("pythia-2.8b", "gpt_neox", layers=32, heads=32, hidden=2560,
                     intermediate=10240, vocab=50304, rotary_pct=0.25),
        Architecture("llama-2-7b", "llama", layers=32, heads=32, hidden=4096,
                     intermediate=11008, vocab=32000, max_positions=4096),
        Architecture("gpt2", "gpt2", layers=12, heads=12, hidden=768,
                     intermediate=3072, vocab=50257, max_positions=1024),
    )
}
