"""The kernels a scan can compute: one record per kernel, one line each in :data:`KERNELS`.

A kernel is one module in ``spectral/kernels/`` that defines a :class:`KernelSteps` (the
adapter site its forward pass captures, the statistics it streams, how they become a
``KernelResult``) plus one line here. The scan pipeline (``spectral.kernels.scan``), the
``--kernel`` choices and the ``kernel`` column learn about kernels only from this registry.

This module imports no torch: the CLI reads the records (names, whether prompts are needed)
without loading a model stack; a kernel's module is imported when a scan first needs its steps
(the way ``jobs.registry.KINDS`` names experiment modules).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from torch import Tensor

    from spectral.kernels.result import KernelResult
    from spectral.kernels.scan import ScanSettings
    from spectral.models.adapter import HeadAdapter


class Statistics(Protocol):
    """What a kernel streams over prompt batches (e.g. ``KeyStats``): additive, so shards on
    different machines reduce exactly."""

    def update(self, layer: int, captured: Tensor, mask: Tensor) -> None:
        """Add one batch: ``captured`` is the adapter site's tensor of ``layer``, ``mask``
        (batch, pos) marks real tokens."""

    def __add__(self, other: Any) -> Any:
        """The statistics of both shards together."""


@dataclass(frozen=True)
class KernelSteps:
    """How one kernel is computed (defined in the kernel's own module)."""

    site: Callable[[ScanSettings], str] | None
    """``site(settings)``: the adapter site (``keys_raw``, ``scores``...) the forward pass
    captures; None for a kernel computed from the weights alone (no prompts, one work unit)."""
    start: Callable[[HeadAdapter, ScanSettings], Any]
    """``start(adapter, settings)``: the statistics before any batch (a :class:`Statistics`);
    without a site, the complete statistics, read from the weights."""
    finalize: Callable[[Any, ScanSettings], KernelResult]
    """``finalize(statistics, settings)``: the reduced statistics as spectra and metrics."""
    keys: Callable[[ScanSettings], str]
    """``keys(settings)``: the ``keys`` column, which keys the kernel is built from (raw,
    rotated, or none)."""
    ridged: bool = False
    """Whether ``ridge_mode`` and ``center`` of the settings shape this kernel (recorded in its
    rows; otherwise the rows say "none" and False)."""


@dataclass(frozen=True)
class KernelInfo:
    """One registered kernel."""

    name: str
    """The ``--kernel`` value and the ``kernel`` column."""
    steps_at: str
    """``"module:NAME"`` of its :class:`KernelSteps`."""
    forward: bool = True
    """Whether it needs a forward pass over prompts (False: from the weights alone)."""

    def steps(self) -> KernelSteps:
        module, _, name = self.steps_at.partition(":")
        steps = getattr(importlib.import_module(module), name)
        if not isinstance(steps, KernelSteps) or (steps.site is not None) != self.forward:
            raise TypeError(f"kernel {self.name!r}: {self.steps_at} must be KernelSteps with "
                            f"{'a site' if self.forward else 'site=None'}")
        return steps


KERNELS: dict[str, KernelInfo] = {info.name: info for info in (
    KernelInfo("key", "spectral.kernels.key:KEY"),
    KernelInfo("scores", "spectral.kernels.attention:SCORES"),
    KernelInfo("probs", "spectral.kernels.attention:PROBS"),
    KernelInfo("weights", "spectral.kernels.weights:WEIGHTS", forward=False),
)}
"""Kernel name -> its record; the order is the order of ``--kernel``'s choices."""

Kernel = Literal[tuple(KERNELS)]  # type: ignore[valid-type]  # the names above, for configs and settings

KeyKind = Literal["raw", "rotated"]
"""Keys of the key kernel: before or after the rotary rotation."""
RidgeMode = Literal["absolute", "relative"]
"""Key-kernel ridge: lambda = ridge (the definitions' default), or ridge x the kernel's mean
eigenvalue (metrics invariant to the keys' scale)."""
