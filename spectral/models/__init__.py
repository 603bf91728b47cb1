"""Model access: specs, loading, tokenizers, the per-family layout and the head adapter."""
