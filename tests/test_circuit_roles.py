"""Backup name movers: the importance a head gains when the name movers are ablated, checked
against separate exact-patching runs of the same ablations."""

import numpy as np
import torch

from spectral.causal.patching import task_caches
from spectral.causal.tasks import builtin_ioi
from spectral.circuits import edges as E
from spectral.circuits.roles import backup_gain


def test_backup_gain_against_separate_runs(organism):
    adapter, task, _, _ = task_caches(organism, tuple(builtin_ioi(organism, 8, 0)))
    graph = E.build_graph(adapter)
    ablated = E.AblatedWrites(adapter, task, "corrupt")
    movers = [(1, 0)]
    gain = backup_gain(adapter, task, ablated, graph, movers)
    assert gain.shape == (adapter.n_layers, adapter.n_heads)
    assert np.isnan(gain[1, 0]) and np.isfinite(np.delete(gain.ravel(), adapter.n_heads)).all()
    assert np.isnan(backup_gain(adapter, task, ablated, graph, [])).all()

    senders = [e.sender for e in graph.edges()]

    def m(names):
        drops = torch.tensor([[s in names for s in senders]])
        return float(E.patched_metrics(adapter, task, ablated, drops, graph)[0])

    full, empty, off = E.clean_metric(adapter, task), m(set(senders)), m({"a1.h0"})
    expected = ((off - m({"a1.h0", "a0.h3"})) - (full - m({"a0.h3"}))) / (full - empty)
    assert abs(gain[0, 3] - expected) < 1e-5
