"""Executors run work units against a loaded model: in-process, or on Ray actors.

The job code is the same for both: ``executor.map(spec, fn, units)`` calls
``fn(loaded_model, unit)`` for every unit and returns the results in unit order. A Ray
worker loads the model once in ``__init__`` and serves many units; a failed unit raises
(it is never turned into a made-up value), system failures are retried by Ray. A user error
(``UsageError``) raised inside a worker reaches the caller as the same one-line UsageError.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from spectral.errors import UsageError
from spectral.models.loading import LoadedModel, load_model, resolve_device
from spectral.net import unreachable

LOOPBACK = "127.0.0.1"


def resolve_load_kwargs(load_kwargs: dict | None, num_gpus: float = 1) -> dict:
    """``load_model`` arguments for this process: ``device='auto'`` becomes a CUDA GPU when there
    is one; with more than one GPU reserved (and visible) the model is spread over them by an
    accelerate device map, so a model larger than one GPU still fits one actor."""
    import torch

    kwargs = dict(load_kwargs or {})
    device = resolve_device(kwargs.pop("device", None))
    if str(device).startswith("cuda") and num_gpus > 1 and torch.cuda.device_count() > 1:
        kwargs.setdefault("device_map", "auto")
    elif "device_map" not in kwargs:
        kwargs["device"] = device
    return kwargs


class LocalExecutor:
    """Runs units one after another in this process; loads the model once (or reuses one)."""

    def __init__(self, loaded: LoadedModel | None = None, load_kwargs: dict | None = None, progress: bool = True):
        self.loaded = loaded
        self.load_kwargs = load_kwargs or {}
        self.progress = progress

    def model(self, spec: str) -> LoadedModel:
        if self.loaded is None or self.loaded.spec.text != spec:
            self.loaded = load_model(spec, **resolve_load_kwargs(self.load_kwargs))
        return self.loaded

    def start(self, spec: str) -> None:
        """Nothing to start ahead: the model is loaded (or reused) at the first map."""

    def reuse(self, loaded: LoadedModel) -> None:
        """Serve units with a model the caller has loaded already."""
        if self.loaded is None:
            self.loaded = loaded

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def map(self, spec, fn, units, *, desc="units"):
        loaded = self.model(spec)
        return [fn(loaded, unit) for unit in tqdm(units, desc=desc, unit="unit", disable=not self.progress)]


@dataclass(frozen=True)
class Refused:
    """What a worker returns instead of a result when the unit (or loading the model) raised a
    UsageError: its one-line message, raised again as a UsageError on the driver. (An exception
    crossing Ray arrives wrapped in a RayTaskError whose text is the worker's traceback.)"""

    message: str


class ModelWorker:
    """Ray actor body: holds one loaded model, applies job functions to work units."""

    def __init__(self, spec: str, load_kwargs: dict, num_gpus: float = 0):
        self.refused: Refused | None = None
        try:
            self.loaded = load_model(spec, **resolve_load_kwargs(load_kwargs, num_gpus))
        except UsageError as err:  # reported with the first unit: an actor that fails here only dies
            self.refused = Refused(str(err))

    def apply(self, fn: Callable[[LoadedModel, Any], Any], index: int, unit: Any) -> tuple[int, Any]:
        if self.refused is not None:
            return index, self.refused
        try:
            return index, fn(self.loaded, unit)
        except UsageError as err:
            return index, Refused(str(err))


def ensure_ray(address: str | None = None) -> None:
    """Connect to the Ray cluster at ``address`` (or RAY_ADDRESS, or the running local one that
    ``ray start`` recorded); start a local one bound to 127.0.0.1 when none is running.

    An explicit address that does not answer fails in seconds with one line (Ray itself retries
    for minutes); a cluster on 127.0.0.1 is joined on the loopback address it listens on.
    """
    import ray

    given = address or os.environ.get("RAY_ADDRESS") or None
    given = None if given == "auto" else given
    if given:
        _reachable(given)  # also when this process is connected already: a wrong address is an error
    if ray.is_initialized():
        return
    quiet = dict(logging_level="ERROR", log_to_driver=False)
    if given and given.startswith("ray://"):  # Ray Client: a remote cluster's proxy
        ray.init(address=given, **quiet)
        return
    if given:
        target = given
    else:
        from ray._private.services import canonicalize_bootstrap_address

        try:
            target = canonicalize_bootstrap_address("auto")  # the cluster `ray start` recorded, if any
        except ConnectionError:  # none running
            target = None
        if target is not None and not _answers(target):
            target = None  # a stale record of a stopped cluster
    if target is None:  # "local": a new cluster, never the stale one a `ray start` record points to
        _loopback_only()
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, **quiet)
        return
    if target.rsplit(":", 1)[0] in (LOOPBACK, "localhost"):
        _loopback_only()
    ray.init(address=target, **quiet)


def _answers(target: str, timeout: float = 3.0) -> bool:
    host, _, port = target.rpartition(":")
    return port.isdigit() and unreachable(host, int(port), timeout) is None


def _reachable(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, naming the address, when nothing answers there (Ray itself retries
    for minutes)."""
    target = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"Ray address {address!r} is not HOST:PORT (or ray://HOST:PORT)")
    why = unreachable(host, int(port), timeout)
    if why is not None:
        raise UsageError(f"cannot reach the Ray cluster at {address!r} ({why}); "
                         "start one with `ray start --head` or leave the address out for a local one")


def _loopback_only() -> None:
    """Make a new local Ray cluster listen on 127.0.0.1 only.

    On Linux Ray resolves 127.0.0.1 to the machine's routable address unless multi-node
    clustering is off; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 turns it off (the raylet and
    workers inherit it), and the constant read by this driver is set to match.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


class RayExecutor:
    """Spreads units over ``workers`` actors, each holding one loaded model."""

    def __init__(self, workers: int = 2, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0,
                 load_kwargs: dict | None = None, progress: bool = True, max_restarts: int = 2):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers, self.address = workers, address
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.load_kwargs = load_kwargs or {}
        self.progress = progress
        self.max_restarts = max_restarts
        self._spec: str | None = None
        self._actors: list = []
        self._held = False

    def start(self, spec: str) -> None:
        """Create the actors now: they import and load the model while the caller prepares the
        work. Inside ``with executor:`` they serve every map until the block ends; otherwise
        each map closes them when it is done."""
        if self._actors and self._spec == spec:
            return
        self.close()
        import ray

        ensure_ray(self.address)
        actor_cls = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=self.max_restarts,
                               max_task_retries=self.max_restarts)(ModelWorker)
        self._spec = spec
        self._actors = [actor_cls.remote(spec, self.load_kwargs, self.num_gpus) for _ in range(self.workers)]

    def reuse(self, loaded: LoadedModel) -> None:
        """Actors load their own copies; a model in the driver is not shipped to them."""

    def close(self) -> None:
        if self._actors:
            import ray

            for actor in self._actors:
                ray.kill(actor)
        self._spec, self._actors = None, []

    def __enter__(self):
        self._held = True
        return self

    def __exit__(self, *exc) -> None:
        self._held = False
        self.close()

    def map(self, spec, fn, units, *, desc="units"):
        import ray

        if not units:
            return []
        self.start(spec)
        try:
            return self._run(ray, self._actors[:len(units)], fn, units, desc)
        finally:
            if not self._held:
                self.close()

    def _run(self, ray, actors, fn, units, desc):
        fn_ref = ray.put(fn)
        results: list[Any] = [None] * len(units)
        pending: dict[Any, Any] = {}
        queue = list(enumerate(units))
        idle = list(actors)
        with tqdm(total=len(units), desc=desc, unit="unit", disable=not self.progress) as bar:
            while queue or pending:
                while idle and queue:
                    actor = idle.pop()
                    index, unit = queue.pop(0)
                    pending[actor.apply.remote(fn_ref, index, unit)] = actor
                done, _ = ray.wait(list(pending), num_returns=1)
                actor = pending.pop(done[0])
                index, value = ray.get(done[0])
                if isinstance(value, Refused):
                    raise UsageError(value.message)
                results[index] = value
                idle.append(actor)
                bar.update(1)
        return results
