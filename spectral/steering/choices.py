"""The names of ``eigengap autosteer``'s strategies (``spectral.steering.autosteer`` builds them),
without torch: the job's record, its config and the analysis read them without loading a model stack."""

STRATEGIES = ("oracle", "probe", "probe-k", "theory", "spectral", "spectral-1", "adaptive",
              "actadd", "caa", "mean-diff", "pca-diff", "iti", "random")
"""Every strategy ``eigengap autosteer`` can run, in report order."""
AUTOMATED = ("probe", "probe-k", "theory", "spectral", "spectral-1", "adaptive")
"""The automated choices (``--system`` is one of them): no search on the effect beyond the selection prompts."""
BASELINES = ("actadd", "caa", "mean-diff", "pca-diff", "iti", "random")
SYSTEM = "probe"
"""The default automated choice the success-metric-5 verdict reads (fixed before any measurement)."""
MULTIPLIERS = (-1.0, -0.5, 0.0, 0.5, 1.0)
"""Multiples of each strategy's matched scale for the steerability slope (Tan et al. 2024)."""
