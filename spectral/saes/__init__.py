"""Sparse autoencoders on attention-head results: training, activations and metrics."""
