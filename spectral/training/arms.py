"""The training arms of issue 20 and their options (light: no torch; job configs and the organism
suite validate with it, ``spectral.training.regularizer`` applies them during training).

Arms (``ARMS``):

- ``baseline``: the recipe as it is (the suite's organism itself, the same cache entry).
- ``sigma-reparam``: sigma-reparametrisation (Zhai et al. 2023, "Stabilizing Transformer Training
  by Preventing Attention Entropy Collapse") of every layer's query and key projections:
  ``W <- gamma x W / sigma(W)``, ``sigma`` the spectral norm from one power iteration per training
  step (``u`` a buffer, no gradient through the iteration), ``gamma`` a learnable scalar per
  matrix initialised to ``sigma(W_0)`` (exact, by an SVD) so that training starts from the
  baseline's forward pass. No options.
- ``gap-penalty``: ``weight x mean over the chosen heads of gap_penalty(key_gap(head), target,
  direction)`` added to the loss, the key-kernel gap of each chosen head over the training batch's
  real tokens (``spectral.training.penalties``). Default: every head, ``up`` toward 0.95 (a
  stabilising regulariser; the organisms' heads start near 0.9).
- ``entropy``: ``-/+ weight x`` the chosen heads' mean normalised attention entropy (entropy of a
  query's attention over its visible real keys divided by log of their count; queries with one
  visible key left out): ``up`` rewards high entropy (against attention-entropy collapse),
  ``down`` rewards sharp attention. Default: every head, ``up``, weight 0.05.
- ``controlled-instability``: the gap penalty ``down`` on a chosen set of heads, the rest free:
  those heads are held unstable (gap <= target). Default: the first half of the heads of the
  middle layer (``layers // 2``), target 0.5 (below the earlier study's 0.77), weight 10.

Heads are written ``L.H`` (layer L, head H), ``L.*`` (every head of layer L) or ``all``, comma
separated. An arm trained with its defaults is cached as ``NAME[-seedN]-ARM``; with other options
as ``NAME[-seedN]-ARM-<first 8 hex digits of the options' sha256>`` (``spectral.organisms.suite``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from spectral.errors import UsageError

BASELINE = "baseline"
ARMS = (BASELINE, "sigma-reparam", "gap-penalty", "entropy", "controlled-instability")
GAP_ARMS = ("gap-penalty", "controlled-instability")
"""Arms that penalise chosen heads' key-kernel gaps."""
DIRECTIONS = ("up", "down")
OPTIONS = {
    "sigma-reparam": (),
    "gap-penalty": ("heads", "target", "direction", "weight"),
    "entropy": ("heads", "direction", "weight"),
    "controlled-instability": ("heads", "target", "weight"),
}
"""Which options each arm takes (baseline: none)."""
DEFAULTS = {
    "gap-penalty": {"heads": "all", "target": 0.95, "direction": "up", "weight": 10.0},
    "entropy": {"heads": "all", "direction": "up", "weight": 0.05},
    "controlled-instability": {"heads": "middle-half", "target": 0.5, "direction": "down", "weight": 10.0},
}
"""Each arm's default options; ``middle-half``: the first half of the heads of layer ``layers // 2``."""


@dataclass(frozen=True)
class ArmSpec:
    """One arm with every option resolved for an organism's shape."""

    arm: str
    heads: tuple[tuple[int, int], ...] = ()
    target: float = 0.0
    """Gap arms: the target gap in (0, 1); 0 for the others."""
    direction: str = ""
    weight: float = 0.0

    @property
    def heads_text(self) -> str:
        return ",".join(f"{l}.{h}" for l, h in self.heads)

    def fields(self) -> dict:
        """The recipe's arm fields (``spectral.organisms.train.Recipe``)."""
        return {"arm": self.arm, "arm_heads": self.heads_text, "arm_target": self.target,
                "arm_direction": self.direction, "arm_weight": self.weight}

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in (("heads", self.heads_text), ("target", self.target or ""),
                                         ("direction", self.direction), ("weight", self.weight or "")) if v != ""]
        return self.arm + (f" ({', '.join(parts)})" if parts else "")

    def digest(self) -> str:
        return hashlib.sha256(repr(sorted(self.fields().items())).encode()).hexdigest()[:8]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({l for l, _ in self.heads}))


def parse_heads(text: str, n_layers: int, n_heads: int) -> tuple[tuple[int, int], ...]:
    """``'1.0,1.3'``, ``'1.*'``, ``'all'`` or ``'middle-half'`` -> sorted (layer, head) pairs; a
    UsageError naming the first bad or out-of-range head."""
    text = text.strip()
    if text == "all":
        return tuple((l, h) for l in range(n_layers) for h in range(n_heads))
    if text == "middle-half":
        return tuple((n_layers // 2, h) for h in range(max(1, n_heads // 2)))
    out: set[tuple[int, int]] = set()
    for part in (p.strip() for p in text.split(",")):
        layer, dot, head = part.partition(".")
        if not dot or not layer.isdigit() or not (head.isdigit() or head == "*"):
            raise UsageError(f"head {part!r}: write heads as L.H (layer.head), L.* or all, comma separated")
        l = int(layer)
        if l >= n_layers:
            raise UsageError(f"head {part}: layer {l} is out of range (the model has {n_layers} layers, 0-{n_layers - 1})")
        if head == "*":
            out.update((l, h) for h in range(n_heads))
            continue
        h = int(head)
        if h >= n_heads:
            raise UsageError(f"head {part}: head {h} is out of range (layer {l} has {n_heads} heads, 0-{n_heads - 1})")
        out.add((l, h))
    if not out:
        raise UsageError("no heads given")
    return tuple(sorted(out))


def resolve(arm: str, n_layers: int, n_heads: int, *, heads: str | None = None, target: float | None = None,
            direction: str | None = None, weight: float | None = None) -> ArmSpec | None:
    """The arm ``arm`` with its options (None: the default) resolved for a model of ``n_layers`` x
    ``n_heads``; None for the baseline. A UsageError names an unknown arm, an option the arm does not
    take, a head out of range, a target outside (0, 1), a direction other than up/down, a weight <= 0."""
    if arm not in ARMS:
        raise UsageError(f"unknown arm {arm!r} (known: {', '.join(ARMS)})")
    given = {k: v for k, v in (("heads", heads), ("target", target), ("direction", direction), ("weight", weight))
             if v is not None}
    if arm == BASELINE:
        if given:
            raise UsageError(f"the baseline arm takes no options (given: {', '.join(given)})")
        return None
    extra = sorted(set(given) - set(OPTIONS[arm]))
    if extra:
        raise UsageError(f"arm {arm} takes no {' or '.join(extra)} option"
                         + (f" (its options: {', '.join(OPTIONS[arm])})" if OPTIONS[arm] else ""))
    values = {**DEFAULTS.get(arm, {}), **given}
    if "target" in values and not (0 < float(values["target"]) < 1 and math.isfinite(float(values["target"]))):
        raise UsageError(f"the target gap must lie in (0, 1), got {values['target']}")
    if "direction" in values and values["direction"] not in DIRECTIONS:
        raise UsageError(f"the direction must be up or down, got {values['direction']!r}")
    if "weight" in values and not float(values["weight"]) > 0:
        raise UsageError(f"the penalty weight must be > 0, got {values['weight']}")
    return ArmSpec(arm, parse_heads(values["heads"], n_layers, n_heads) if "heads" in values else (),
                   float(values.get("target", 0.0)), str(values.get("direction", "")), float(values.get("weight", 0.0)))


def from_fields(fields: dict) -> ArmSpec | None:
    """The arm a recipe's fields describe (``ArmSpec.fields``); None when it has none."""
    arm = fields.get("arm", "")
    if not arm:
        return None
    heads = tuple(tuple(int(x) for x in p.split(".")) for p in fields.get("arm_heads", "").split(",") if p)
    return ArmSpec(arm, heads, float(fields.get("arm_target", 0.0)), fields.get("arm_direction", ""),
                   float(fields.get("arm_weight", 0.0)))


def entry_suffix(spec: ArmSpec | None, n_layers: int, n_heads: int) -> str:
    """``-ARM`` for an arm at its defaults, ``-ARM-<digest>`` otherwise, '' for the baseline."""
    if spec is None:
        return ""
    default = resolve(spec.arm, n_layers, n_heads)
    return f"-{spec.arm}" if spec == default else f"-{spec.arm}-{spec.digest()}"
