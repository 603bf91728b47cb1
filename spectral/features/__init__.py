"""Per-head features beyond the key-kernel gap (research plan 2.3): the spectra of every kernel
of a head (keys raw and rotated, queries, pre-softmax scores, attention probabilities, the
W_Q W_K^T and W_V W_O weight products; each with and without the first token), many metrics of
each, and non-spectral baselines, from one forward pass. ``names`` holds the feature names (no
torch); ``extract`` computes them."""
