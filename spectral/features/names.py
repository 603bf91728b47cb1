"""The names of the feature table's columns (``features.parquet``, one row per head).

A spectral feature is ``"<kernel>.<metric>"``: a metric of :data:`FEATURE_METRICS` of one
kernel of :data:`FEATURE_KERNELS`; ``"<kernel>.status"`` says why a kernel's values are NaN
(``ok``, ``rank_deficient``, ``too_few_tokens``, ``non_finite``). A baseline feature is
``"baseline.<name>"`` (:data:`BASELINES`), a quantity of the head that is not a spectrum.
This module imports no torch: the analysis and the CLI read the names without a model stack.
"""

from __future__ import annotations

from spectral.kernels.metrics import METRICS

FEATURE_KERNELS: dict[str, str] = {
    "key_raw": "key Gram (1/d_head) Kc Kc^T + ridge I over every real token, keys before the rotary rotation",
    "key_rotated": "the same over keys after the rotary rotation (= key_raw for unrotated families)",
    "query": "the same Gram over queries before the rotary rotation",
    "scores": "singular values of each prompt's T x T pre-softmax scores (masked entries 0), metrics averaged over prompts",
    "probs": "singular values of each prompt's T x T attention probabilities, metrics averaged over prompts",
    "key_raw_nobos": "key_raw without each prompt's first token (attention-sink / BOS keys can dominate lambda1)",
    "key_rotated_nobos": "key_rotated without each prompt's first token",
    "query_nobos": "query without each prompt's first token",
    "scores_nobos": "scores without the first token's row and column (T-1 x T-1)",
    "probs_nobos": "probs without the first token's row and column (T-1 x T-1; rows no longer sum to 1)",
    "qk": "singular values of W_Q W_K^T (d_model x d_model, rank <= d_head), from the weights",
    "ov": "singular values of W_V W_O (d_model x d_model, rank <= d_head), from the weights",
}
"""Kernel of a feature -> what it is (the table's schema documentation)."""

SCALE_METRICS = ("lambda1", "lambda2")
"""Metrics of ``spectral.kernels.metrics.METRICS`` that are not features: the kernel's scale,
not its shape (the baselines' norms carry scale)."""

FEATURE_METRICS: dict[str, str] = {
    name: " ".join((fn.__doc__ or name).split()) for name, fn in METRICS.items() if name not in SCALE_METRICS}
"""Metric of a feature -> its definition (the metric's docstring) over the kernel's values
l1 >= l2 >= ... (eigenvalues of the Gram kernels, ridge included; singular values of the
others): every metric of the registry but the scale ones, so a metric added there is a feature
here."""

BASELINES: dict[str, str] = {
    "output_norm": "mean over real tokens of ||z_h W_O^h||, the head's write into the residual stream",
    "attention_entropy": "mean over real query positions of the entropy of the head's attention row",
    "first_token_attention": "mean over real query positions of the attention paid to the first token",
    "wq_norm": "Frobenius norm of the head's W_Q",
    "wk_norm": "Frobenius norm of the head's W_K",
    "wv_norm": "Frobenius norm of the head's W_V",
    "wo_norm": "Frobenius norm of the head's W_O",
}
"""Non-spectral baselines -> what they are."""

BASELINE_PREFIX = "baseline"


def spectral_features() -> list[str]:
    """Every spectral feature column, kernel-major."""
    return [f"{k}.{m}" for k in FEATURE_KERNELS for m in FEATURE_METRICS]


def baseline_features() -> list[str]:
    """Every baseline feature column."""
    return [f"{BASELINE_PREFIX}.{b}" for b in BASELINES]


def status_columns() -> list[str]:
    return [f"{k}.status" for k in FEATURE_KERNELS]


def all_features() -> list[str]:
    return spectral_features() + baseline_features()


def is_spectral(name: str) -> bool:
    return name in set(spectral_features())


def check_feature(name: str) -> str:
    """``name`` if it is a feature column; a UsageError naming the known kernels, metrics and
    baselines otherwise."""
    from spectral.errors import UsageError

    if name in set(all_features()):
        return name
    raise UsageError(f"unknown feature {name!r} (spectral: <kernel>.<metric> with kernel in "
                     f"{', '.join(FEATURE_KERNELS)} and metric in {', '.join(FEATURE_METRICS)}; "
                     f"baselines: {', '.join(baseline_features())})")
