"""Model organisms: small Pythia-architecture models trained on a synthetic language with
known circuits (IOI, induction, sentiment). ``organism_dir(name)`` gives a checkpoint
directory loadable with plain ``from_pretrained``."""

__all__ = ["SMALLEST", "SUITE", "cache_root", "organism_dir", "train_organism", "verify"]


def __getattr__(name: str):
    """The suite's names, imported on first use: training pulls in torch, transformers and
    accelerate, which reading an organism spec (``spectral.organisms.names``) must not."""
    if name in __all__:
        from spectral.organisms import suite

        return getattr(suite, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
