"""Runtime monitoring from the heads' spectra (issue 19): ``SpectralMonitor(loaded).fit(benign)``,
then ``.score(prompts)``: every detector's score per prompt, each on its own inputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spectral.errors import UsageError
from spectral.monitor.detectors import DETECTORS, Detector, make_detector
from spectral.monitor.features import PromptFeatures, prompt_features

INPUTS = {"spectral": "spectral", "isolation-forest": "spectral", "signature": "heads", "mahalanobis": "residual"}
"""What each detector reads: the spectral features, every head's output at the last token (the
spectral-signature baseline), or the final residual stream there (the Mahalanobis baseline)."""
MIN_BENIGN = 8
"""Fewer benign prompts than this cannot give a median, a MAD or a covariance worth a threshold."""


class SpectralMonitor:
    """Fit on benign prompts, score any prompts (``spectral.monitor.features`` for the inputs,
    ``spectral.monitor.detectors`` for the detectors)."""

    def __init__(self, loaded, detectors: Sequence[str] = tuple(INPUTS), *, batch_size: int = 32, seed: int = 0):
        from spectral.models.adapter import HeadAdapter

        unknown = [d for d in detectors if d not in DETECTORS]
        if unknown:
            raise UsageError(f"unknown detector {unknown[0]!r} (known: {', '.join(DETECTORS)})")
        if not detectors:
            raise UsageError("no detector given")
        self.loaded, self.adapter = loaded, HeadAdapter(loaded.model)
        self.batch_size, self.seed = batch_size, seed
        self.detectors: dict[str, Detector] = {
            d: make_detector(d, **({"seed": seed} if d == "isolation-forest" else {})) for d in detectors}
        self.names: tuple[str, ...] = ()

    def features(self, prompts: Sequence[str], source: str = "prompts") -> PromptFeatures:
        return prompt_features(self.adapter, self.loaded.tokenizer, prompts, batch_size=self.batch_size,
                               source=source)

    def fit(self, benign: Sequence[str]) -> SpectralMonitor:
        if len(benign) < MIN_BENIGN:
            raise UsageError(f"benign prompts: at least {MIN_BENIGN} are needed to fit the detectors, got {len(benign)}")
        f = self.features(benign, "benign prompts")
        self.names = f.names
        for name, detector in self.detectors.items():
            detector.fit(_inputs(f, INPUTS[name]))
        return self

    def score(self, prompts: Sequence[str] | PromptFeatures) -> dict[str, np.ndarray]:
        if not self.names:
            raise UsageError("the monitor is not fitted: call fit(benign prompts) first")
        f = prompts if isinstance(prompts, PromptFeatures) else self.features(prompts)
        return {name: d.score(_inputs(f, INPUTS[name])) for name, d in self.detectors.items()}


def _inputs(f: PromptFeatures, which: str) -> np.ndarray:
    return {"spectral": f.spectral, "heads": f.heads, "residual": f.residual}[which]


__all__ = ["INPUTS", "MIN_BENIGN", "SpectralMonitor", "DETECTORS", "make_detector", "prompt_features"]
