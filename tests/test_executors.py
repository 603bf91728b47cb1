"""Executors place models as a Ray actor's resources say: one device, or an accelerate device
map over several GPUs; the adapter's hooks keep working under accelerate's own hooks."""

import numpy as np
import pytest
import torch

from cluster import executors
from cluster.executors import resolve_load_kwargs
from spectral.errors import UsageError
from spectral.models.loading import load_model, resolve_device
from spectral.net import unreachable
from spectral.causal.patching import PatchUnit, patch_unit
from spectral.kernels.scan import ScanSettings, finalize, reduce_partials, scan_unit, shard
from spectral.causal.tasks import builtin_ioi
from tests.conftest import PROMPTS


def test_load_kwargs_follow_the_reserved_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_load_kwargs({"device": "auto"}, 0) == {"device": "cpu"}
    assert resolve_load_kwargs({"device": "cpu", "dtype": torch.float32}) == {"device": "cpu", "dtype": torch.float32}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_load_kwargs({"device": "auto"}, 1) == {"device": "cuda"}
    # an actor holding 4 GPUs spreads the model over them (accelerate "auto" device map)
    assert resolve_load_kwargs({"device": "auto"}, 4) == {"device_map": "auto"}
    assert resolve_load_kwargs({"device": "cuda"}, 2) == {"device_map": "auto"}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # fewer visible than reserved: one device
    assert resolve_load_kwargs({"device": "auto"}, 2) == {"device": "cuda"}


def test_auto_device_is_a_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"


def test_one_tcp_probe_for_the_hub_and_ray():
    import socket

    with socket.socket() as listener, socket.socket() as unused:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        live, dead = listener.getsockname()[1], unused.getsockname()[1]
        assert unreachable("127.0.0.1", live) is None
        assert unreachable("127.0.0.1", dead) == "Connection refused"
        assert executors._answers(f"127.0.0.1:{live}") and not executors._answers(f"127.0.0.1:{dead}")
        executors._reachable(f"ray://127.0.0.1:{live}")
        with pytest.raises(UsageError, match=rf"^cannot reach the Ray cluster at '127.0.0.1:{dead}' \(Connection refused\); "):
            executors._reachable(f"127.0.0.1:{dead}")
    with pytest.raises(UsageError, match="^Ray address 'nowhere' is not HOST:PORT"):
        executors._reachable("nowhere")


def test_ray_actor_receives_its_resources(monkeypatch):
    """RayExecutor hands its GPU count to the worker that resolves the placement."""
    seen = {}

    class Probe(executors.ModelWorker):
        def __init__(self, spec, load_kwargs, num_gpus=0):
            seen.update(spec=spec, load_kwargs=load_kwargs, num_gpus=num_gpus)

    ex = executors.RayExecutor(workers=1, num_cpus=2, num_gpus=3, load_kwargs={"device": "auto"})
    Probe("m", ex.load_kwargs, ex.num_gpus)
    assert seen == {"spec": "m", "load_kwargs": {"device": "auto"}, "num_gpus": 3}
    assert (ex.num_cpus, ex.num_gpus) == (2, 3)


def test_hooks_work_under_an_accelerate_device_map(organism_cache, tmp_path):
    """A model placed by an accelerate device map (here: layer 1 offloaded to disk, moved in by
    accelerate's hooks at every forward, the mechanism of multi-GPU maps) gives the same gaps
    and patching results as the plain model."""
    plain = load_model(str(organism_cache))
    base = plain.model.base_model_prefix
    device_map = {f"{base}.{n}": "cpu" for n, _ in plain.model.get_submodule(base).named_children() if n != "layers"}
    device_map.update({n: "cpu" for n, _ in plain.model.named_children() if n != base})
    device_map.update({f"{base}.layers.0": "cpu", f"{base}.layers.1": "disk"})
    mapped = load_model(str(organism_cache), device_map=device_map, offload_folder=tmp_path / "offload")
    assert any(getattr(m, "_hf_hook", None) is not None for m in mapped.model.modules())
    settings = ScanSettings()
    gaps = [finalize(reduce_partials([scan_unit(m, u) for u in shard(PROMPTS, settings, 2)]), settings)
            for m in (plain, mapped)]
    np.testing.assert_allclose(gaps[0].metrics.gap, gaps[1].metrics.gap, rtol=1e-5, atol=1e-6)
    assert np.isfinite(gaps[0].metrics.gap).all()
    examples = tuple(builtin_ioi(plain, 6, 0))
    unit = PatchUnit(examples, "exact", "denoise", (0, 1), (0, 1, 2, 3))
    rows = [patch_unit(m, unit) for m in (plain, mapped)]
    assert len(rows[0]) == len(rows[1]) == 2 * 4 * 6
    for a, b in zip(*rows):
        assert (a["layer"], a["head"], a["example"]) == (b["layer"], b["head"], b["example"])
        assert a["metric_patched"] == pytest.approx(b["metric_patched"], rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("record", ["none", "stale", "live"])
def test_ensure_ray_joins_a_live_cluster_and_never_a_stale_record(monkeypatch, record):
    """No cluster, or a `ray start` record of a cluster that is gone: a new local cluster
    (address="local"; plain ray.init would try the record and hang). A live one: joined."""
    import socket

    import ray
    from ray._private import services

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    live = f"127.0.0.1:{listener.getsockname()[1]}"
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        stale = f"127.0.0.1:{unused.getsockname()[1]}"

    def found(addr, temp_dir=None):
        if record == "none":
            raise ConnectionError("Could not find any running Ray instance")
        return stale if record == "stale" else live

    monkeypatch.setattr(services, "canonicalize_bootstrap_address", found)
    try:
        executors.ensure_ray(None)
    finally:
        listener.close()
    assert calls[0]["address"] == (live if record == "live" else "local")
