"""The one check of a layer or head selection against a model's size."""

from __future__ import annotations

from collections.abc import Iterable

from spectral.errors import UsageError


def check_range(kind: str, chosen: Iterable[int] | None, size: int, *, option: str | None = None) -> list[int]:
    """The chosen indices, sorted and deduplicated (all of ``range(size)`` when None).

    ``kind`` is what is counted ("layer", "head"); one outside ``0..size-1`` is a UsageError,
    prefixed by the command-line ``option`` that chose it when given, e.g.
    ``--layers: layer 7 out of range (the model has layers 0..5)``.
    """
    if chosen is None:
        return list(range(size))
    chosen = sorted(set(int(i) for i in chosen))
    bad = [i for i in chosen if not 0 <= i < size]
    if bad:
        where = f"{option}: " if option else ""
        raise UsageError(f"{where}{kind} {bad[0]} out of range (the model has {kind}s 0..{size - 1})")
    return chosen
