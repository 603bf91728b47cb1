"""Causal measurements: tasks (clean / corrupt pairs) and activation patching."""
