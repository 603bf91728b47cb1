"""Anomaly detectors of one interface (issue 19, point 2): ``fit(benign rows)``, then ``score(rows)``,
a larger score meaning more anomalous. Every detector is fitted on benign rows only; its
threshold is set elsewhere (on held-out benign prompts).

- ``spectral`` (the spectral detector): each feature standardised robustly on the benign rows
  (median and MAD x 1.4826, a floor of 1e-6 relative to the feature's scale so that a constant
  feature cannot divide by zero), then the score is the mean of the squared standardised values:
  a prompt whose heads' spectra sit far from their benign distribution in many heads scores high.
  Robust to a few odd benign prompts; no covariance, so it works with more features than prompts.
- ``signature`` (Tran, Li and Madry 2018, "Spectral signatures in backdoor attacks"): on the
  benign rows' centred matrix, the top right singular vector v1; score ((x - mu) . v1)^2.
- ``mahalanobis``: (x - mu)^T S^+ (x - mu) with S the benign rows' covariance and S^+ its
  Moore-Penrose pseudo-inverse (``numpy.linalg.pinv``, rcond 1e-10 relative).
- ``isolation-forest``: scikit-learn's ``IsolationForest`` (200 trees, seeded), the score its
  negated ``score_samples``. scikit-learn's and not pyod's: the same algorithm without numba's
  weight (pyod's ECOD would add numba and llvmlite to the install for one detector).

``DETECTORS`` maps names to classes; ``make_detector`` builds one by name (UsageError otherwise).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from spectral.errors import UsageError

MAD_SCALE = 1.4826


class Detector(ABC):
    """``fit`` on benign rows (n, features), ``score`` rows: larger is more anomalous. A detector
    implements ``_fit`` and ``_score`` on validated float64 matrices."""

    name = "detector"
    min_rows = 2

    def fit(self, x: np.ndarray) -> Detector:
        x = self._check(x, "fit")
        if x.shape[0] < self.min_rows:
            raise UsageError(f"{self.name}: needs at least {self.min_rows} benign prompts, got {x.shape[0]}")
        self._fit(x)
        self.n_features = x.shape[1]
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        x = self._check(x, "score")
        if not hasattr(self, "n_features"):
            raise RuntimeError(f"{self.name}: score before fit")
        if x.shape[1] != self.n_features:
            raise UsageError(f"{self.name}: fitted on {self.n_features} features, scored on {x.shape[1]}")
        return self._score(x)

    def _check(self, x: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise UsageError(f"{self.name}: {what} needs a non-empty (rows, features) matrix, got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            r, c = np.argwhere(~np.isfinite(x))[0]
            raise UsageError(f"{self.name}: {what}: row {r}, feature {c} is not finite")
        return x

    @abstractmethod
    def _fit(self, x: np.ndarray) -> None: ...

    @abstractmethod
    def _score(self, x: np.ndarray) -> np.ndarray: ...


class SpectralDetector(Detector):
    name = "spectral"
    min_rows = 3

    def _fit(self, x: np.ndarray) -> None:
        self.center = np.median(x, axis=0)
        mad = MAD_SCALE * np.median(np.abs(x - self.center), axis=0)
        scale = np.maximum(np.abs(self.center), np.abs(x).max(axis=0))
        self.spread = np.maximum(mad, 1e-6 * np.where(scale > 0, scale, 1.0))

    def _score(self, x: np.ndarray) -> np.ndarray:
        return np.mean(((x - self.center) / self.spread) ** 2, axis=1)


class SignatureDetector(Detector):
    name = "signature"

    def _fit(self, x: np.ndarray) -> None:
        self.mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.direction = vt[0]

    def _score(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) @ self.direction) ** 2


class MahalanobisDetector(Detector):
    name = "mahalanobis"

    def _fit(self, x: np.ndarray) -> None:
        self.mean = x.mean(axis=0)
        self.precision = np.linalg.pinv(np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1]),
                                        rcond=1e-10, hermitian=True)

    def _score(self, x: np.ndarray) -> np.ndarray:
        c = x - self.mean
        return np.einsum("ij,jk,ik->i", c, self.precision, c)


class IsolationForestDetector(Detector):
    name = "isolation-forest"

    def __init__(self, seed: int = 0, n_estimators: int = 200):
        self.seed, self.n_estimators = seed, n_estimators

    def _fit(self, x: np.ndarray) -> None:
        from sklearn.ensemble import IsolationForest

        self.forest = IsolationForest(n_estimators=self.n_estimators, random_state=self.seed).fit(x)

    def _score(self, x: np.ndarray) -> np.ndarray:
        return -self.forest.score_samples(x)


DETECTORS: dict[str, type[Detector]] = {
    d.name: d for d in (SpectralDetector, SignatureDetector, MahalanobisDetector, IsolationForestDetector)}


def make_detector(name: str, **kwargs) -> Detector:
    if name not in DETECTORS:
        raise UsageError(f"unknown detector {name!r} (known: {', '.join(DETECTORS)})")
    return DETECTORS[name](**kwargs)
