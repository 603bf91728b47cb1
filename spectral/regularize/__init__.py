"""Spectral regularisation of training (issue 20): the training arms (``choices``: names, options,
cache entries; ``arms``: installing an arm on a model during training), the differentiable key-kernel
gap and its penalty (``penalties``), and what a trained arm shows (``measure``)."""
