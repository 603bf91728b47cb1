"""Model organisms: small Pythia-architecture models trained on a synthetic language with
known circuits (IOI, induction, sentiment). ``organism_dir(name)`` gives a checkpoint
directory loadable with plain ``from_pretrained``."""

from spectral.organisms.suite import SMALLEST, SUITE, cache_root, organism_dir, train_organism, verify

__all__ = ["SMALLEST", "SUITE", "cache_root", "organism_dir", "train_organism", "verify"]
