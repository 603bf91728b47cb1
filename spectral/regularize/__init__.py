"""Spectral regularisation of training (issue 20): differentiable spectral quantities and the
penalties built on them. Only the gap penalty's parts exist so far (``penalties``)."""
