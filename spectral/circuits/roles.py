"""IOI roles found by intervention: backup name movers (Wang et al. 2022): heads whose
importance appears only when the name movers are ablated.

A head's importance here is what ablating every edge it sends removes from the mean logit
difference, as a fraction of m(N) - m(empty) (exact edge patching, ``spectral.circuits.edges``,
with the job's ablation). ``backup_gain`` = importance with every name mover ablated minus
importance with none; a head that is not a name mover and gains at least ``BACKUP_GAIN`` is a
backup name mover.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from spectral.circuits import edges as E

BACKUP_GAIN = 0.1
"""Fraction of the full effect m(N) - m(empty) a head's importance must gain when the name
movers are ablated (chosen once, not tuned on results)."""


def backup_gain(adapter, task, ablated: E.AblatedWrites, graph: E.Graph,
                movers: Sequence[tuple[int, int]]) -> np.ndarray:
    """(layers, heads): importance with every name mover ablated minus importance with none
    (NaN for the name movers themselves; all NaN without name movers)."""
    out = np.full((adapter.n_layers, adapter.n_heads), np.nan)
    if not movers:
        return out
    table = graph.edges()
    senders = np.array([e.sender for e in table])

    def sent_by(names) -> torch.Tensor:
        return torch.from_numpy(np.isin(senders, list(names)))

    mover_names = {f"a{l}.h{h}" for l, h in movers}
    heads = [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads) if f"a{l}.h{h}" not in mover_names]
    rows = [sent_by(()), sent_by(mover_names), torch.ones(graph.n_edges, dtype=torch.bool)]
    for l, h in heads:
        rows += [sent_by({f"a{l}.h{h}"}), sent_by(mover_names | {f"a{l}.h{h}"})]
    m = E.patched_metrics(adapter, task, ablated, torch.stack(rows), graph).numpy()
    full, movers_off, empty = m[0], m[1], m[2]
    scale = full - empty
    if abs(scale) < 1e-9:
        return out
    for i, (l, h) in enumerate(heads):
        alone, with_movers = m[3 + 2 * i], m[4 + 2 * i]
        out[l, h] = ((movers_off - with_movers) - (full - alone)) / scale
    return out
