"""Kernels of every head, their spectra and metrics, and the streamed scan pipeline."""
