"""Runtime monitoring from the heads' spectra (issue 19): ``SpectralMonitor(loaded).fit(benign)``,
then ``.score(prompts)``: every detector's score per prompt, each on its own inputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spectral.errors import UsageError
from spectral.monitor.detectors import DETECTORS, Detector, make_detector
from spectral.monitor.features import ATTENTION_METRICS, KEY_METRICS, PromptFeatures, prompt_features

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


    def score_generation(self, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 8):
        """The streaming monitor: generate (greedy, KV cache) and score every step from the spectra
        ``spectral.dynamics.generation`` streams (each step's context key kernels, rank-one updated,
        and its query's attention). Step s describes the context prompt + s generated tokens, so its
        scores equal ``score`` of that prefix. The detectors reading spectral features only
        (``spectral``, ``isolation-forest``): the activation baselines are not streamed. Returns the
        ``Generation`` and {detector: (prompts x steps) array, NaN after a prompt's end}."""
        from spectral.dynamics.generation import GenerationSettings, generate_trajectories

        if not self.names:
            raise UsageError("the monitor is not fitted: call fit(benign prompts) first")
        streamed = [d for d in self.detectors if INPUTS[d] == "spectral"]
        if not streamed:
            raise UsageError("no detector reads the spectral features: nothing to stream")
        gen = generate_trajectories(self.loaded, prompts, GenerationSettings(
            max_new_tokens=max_new_tokens, batch_size=batch_size, stop_at_eos=False))
        t = gen.trajectories.to_pydict()
        group = self.adapter.n_heads // self.adapter.n_kv_heads
        col = {n: i for i, n in enumerate(self.names)}
        x = np.full((len(prompts), max_new_tokens, len(self.names)), np.nan)
        for i in range(len(t["prompt"])):
            p, s, l, h, k = t["prompt"][i], t["step"][i], t["layer"][i], t["head"][i], t["kv_head"][i]
            if h == k * group:
                for m in KEY_METRICS:
                    x[p, s, col[f"L{l}.H{k}.{m}"]] = t[m][i]
            for m in ATTENTION_METRICS:
                x[p, s, col[f"L{l}.H{h}.{m}"]] = t[m][i]
        flat = x.reshape(-1, len(self.names))
        done = np.all(np.isfinite(flat), axis=1)
        scores = {}
        for d in streamed:
            out = np.full(flat.shape[0], np.nan)
            out[done] = self.detectors[d].score(flat[done])
            scores[d] = out.reshape(len(prompts), max_new_tokens)
        return gen, scores


def _inputs(f: PromptFeatures, which: str) -> np.ndarray:
    return {"spectral": f.spectral, "heads": f.heads, "residual": f.residual}[which]


__all__ = ["INPUTS", "MIN_BENIGN", "SpectralMonitor", "DETECTORS", "make_detector", "prompt_features"]
