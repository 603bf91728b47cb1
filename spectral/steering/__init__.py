"""Steering: contrast concepts, steering vectors, injection, and layer-choice strategies."""
