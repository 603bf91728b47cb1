"""Spectral regularisation (issue 20): what a model trained under a training arm shows
(``measure``). The arms themselves are part of organism training: ``spectral.training``."""
