"""Edge-level circuits (spectral.circuits.edges): the graph, EAP against a float64 finite
difference, exact edge patching against a plainly written layer-by-layer reference, the
faithfulness endpoints, CPR/CMD, and EAP / EAP-IG agreement with exact patching on organism-xs."""

import copy
import math

import pytest
import torch

from spectral.causal.patching import cache_run
from spectral.causal.tasks import builtin_ioi, encode
from spectral.circuits.edges import (
    AblatedWrites, agreement_subset, areas, build_graph, clean_metric, eap_scores, edge_agreement, exact_edge_scores,
    faithfulness_curve, patched_metrics, resample_order, top_edges,
)
from spectral.circuits.split import head_writes, receiver_deltas
from spectral.errors import UsageError
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import load_model
from tests.conftest import TINY
from tests.test_patching import byte_task


@pytest.fixture(scope="module", params=["gpt_neox", "gpt2"])
def small(request):
    return load_model(TINY[request.param])


# ------------------------------------------------------------------ plain references
def plain_run(adapter, ids, mask, deltas):
    """One forward pass with static receiver deltas: every sender's write (input, heads, MLPs, in
    graph order), each (batch, pos, d_model), and the logits. Written without edges.py."""
    writes, results = [], {}
    mlp_out = {}
    hooks = [b.mlp.register_forward_hook(lambda m, a, o, l=l: mlp_out.__setitem__(l, o))
             for l, b in enumerate(adapter.blocks)]
    try:
        keep = lambda layer, site, t: results.__setitem__((layer, site), t.detach().clone())  # noqa: E731
        with adapter.trace(["result", "resid_pre"], keep), receiver_deltas(adapter, deltas):
            logits = adapter.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    writes.append(results[(0, "resid_pre")])
    for l in range(adapter.n_layers):
        per_head = head_writes(adapter, l, results[(l, "result")])  # (batch, pos, head, d_model)
        writes += [per_head[:, :, h] for h in range(adapter.n_heads)] + [mlp_out[l].detach()]
    return writes, logits


def metric(logits, task):
    rows = torch.arange(len(task))
    final = logits[rows, task.last]
    return (final[rows, task.answer] - final[rows, task.distractor]).mean()


def plain_deltas(adapter, graph, dropped, ablated, current):
    """Static deltas from a list of dropped edges, one edge at a time."""
    batch, pos, d = current[0].shape
    deltas = {}
    for edge in dropped:
        s = graph.senders.index(edge.sender)
        change = ablated[s] - current[s]
        if edge.input == "logits":
            key = (adapter.n_layers, "logits")
            deltas[key] = deltas.get(key, torch.zeros(batch, pos, d, dtype=change.dtype)) + change
        elif edge.input == "mlp":
            key = (int(edge.receiver[1:]), "mlp")
            deltas[key] = deltas.get(key, torch.zeros(batch, pos, d, dtype=change.dtype)) + change
        else:
            layer, head = (int(x) for x in edge.receiver[1:].split(".h"))
            key = (layer, edge.input)
            deltas.setdefault(key, torch.zeros(batch, pos, adapter.n_heads, d, dtype=change.dtype))
            deltas[key][:, :, head] += change
    return deltas


# ------------------------------------------------------------------ the graph
def test_graph_edges_follow_the_residual_stream(tiny):
    adapter = HeadAdapter(tiny.model)
    graph = build_graph(adapter)
    n_layers, n_heads, kv = adapter.n_layers, adapter.n_heads, adapter.n_kv_heads
    parallel = tiny.model.config.model_type == "gpt_neox" and tiny.model.config.use_parallel_residual
    expected = sum((1 + l * (n_heads + 1)) * (n_heads + 2 * kv + 1) + (0 if parallel else n_heads)
                   for l in range(n_layers)) + 1 + n_layers * (n_heads + 1)
    assert graph.n_edges == expected == len(graph.edges())
    edges = {(e.sender, e.receiver, e.input) for e in graph.edges()}
    assert (("a1.h2", "m1", "mlp") in edges) == (not parallel)  # a head feeds its own layer's MLP only when sequential
    assert ("m0", "logits", "logits") in edges and ("input", "m0", "mlp") in edges
    assert ("a1.h0", "a1.h1", "q") not in edges and ("m1", "a1.h0", "q") not in edges
    for number, e in enumerate(graph.edges()[::17]):
        assert graph.index(e.sender, e.receiver, e.input) == number * 17
    with pytest.raises(UsageError):
        graph.index("a2.h0", "a1.h0", "q")


# ------------------------------------------------------------------ EAP
EDGES = [("input", "a1.h0", "q"), ("a0.h2", "a2.h1", "k"), ("a1.h3", "m2", "mlp"), ("m1", "logits", "logits")]


def test_eap_equals_a_float64_finite_difference(small):
    """EAP's score of an edge is d m / d t of m with t (a_s - w_s) added to the receiver input,
    at t = 0 in the clean run: checked on 4 edges against a central difference in float64."""
    model = copy.deepcopy(small.model).double()
    adapter = HeadAdapter(model)
    task = byte_task(small.tokenizer)
    graph = build_graph(adapter)
    scores = eap_scores(adapter, task, "corrupt", batch_size=3)
    with torch.no_grad():
        clean, _ = plain_run(adapter, task.clean, task.mask, {})
        corrupt, _ = plain_run(adapter, task.corrupt, task.mask, {})
    eps, checked = 1e-4, 0
    for sender, receiver, kind in EDGES:
        edge = next(e for e in graph.edges() if (e.sender, e.receiver, e.input) == (sender, receiver, kind))
        values = []
        for t in (eps, -eps):
            deltas = plain_deltas(adapter, graph, [edge], [a * t for a in corrupt], [w * t for w in clean])
            with torch.no_grad():
                _, logits = plain_run(adapter, task.clean, task.mask, deltas)
            values.append(float(metric(logits, task)))
        reference = (values[0] - values[1]) / (2 * eps)
        got = float(scores.scores[graph.index(sender, receiver, kind)])
        assert abs(reference) > 1e-9
        assert got == pytest.approx(reference, rel=1e-4)
        checked += 1
    assert checked == len(EDGES)
    assert scores.metric_clean == pytest.approx(float(metric(plain_run(adapter, task.clean, task.mask, {})[1], task)))


def test_eap_ig_with_one_step_is_eap_and_differs_with_more(neox):
    adapter = HeadAdapter(neox.model)
    task = byte_task(neox.tokenizer)
    eap = eap_scores(adapter, task)
    torch.testing.assert_close(eap_scores(adapter, task, steps=1).scores, eap.scores, rtol=0, atol=0)
    ig = eap_scores(adapter, task, steps=4)
    assert ig.method == "eap-ig" and ig.steps == 4
    assert not torch.allclose(ig.scores, eap.scores)


# ------------------------------------------------------------------ exact patching
def test_exact_patching_equals_a_layer_by_layer_reference(small):
    """A circuit run (a random half of the edges ablated, senders passing on their changed
    writes) equals the plain fixed point: n_layers + 1 passes with static deltas, each computed
    edge by edge from the previous pass's writes."""
    adapter = HeadAdapter(small.model)
    task = byte_task(small.tokenizer)
    graph = build_graph(adapter)
    gen = torch.Generator().manual_seed(1)
    drops = torch.rand(2, graph.n_edges, generator=gen) < 0.5
    ablated = AblatedWrites(adapter, task, "corrupt")
    fast = patched_metrics(adapter, task, ablated, drops, graph, batch_size=3, copies=2)  # 2 batches, copies
    with torch.no_grad():
        a, _ = plain_run(adapter, task.corrupt, task.mask, {})
        for row in range(2):
            dropped = [e for e, d in zip(graph.edges(), drops[row].tolist()) if d]
            current, _ = plain_run(adapter, task.clean, task.mask, {})
            for _ in range(adapter.n_layers + 1):
                current, logits = plain_run(adapter, task.clean, task.mask,
                                            plain_deltas(adapter, graph, dropped, a, current))
            assert float(fast[row]) == pytest.approx(float(metric(logits, task)), abs=1e-4)


def test_every_edge_kept_is_the_clean_run_and_none_the_corrupt_run(tiny):
    """f = 1 for the circuit of all edges and f = 0 for the empty one, measured (not by definition):
    all kept equals the unmodified clean run, all ablated (corrupt) equals the corrupt run."""
    adapter = HeadAdapter(tiny.model)
    task = byte_task(tiny.tokenizer)
    graph = build_graph(adapter)
    drops = torch.zeros(2, graph.n_edges, dtype=torch.bool)
    drops[1] = True
    m = patched_metrics(adapter, task, AblatedWrites(adapter, task, "corrupt"), drops, graph)
    assert float(m[0]) == pytest.approx(clean_metric(adapter, task), abs=1e-5)
    assert float(m[0]) == pytest.approx(float(cache_run(adapter, task.clean, task).metric.mean()), abs=1e-5)
    assert float(m[1]) == pytest.approx(float(cache_run(adapter, task.corrupt, task).metric.mean()), abs=1e-4)


def test_single_edge_exact_scores_batch_like_one_at_a_time(neox):
    adapter = HeadAdapter(neox.model)
    task = byte_task(neox.tokenizer)
    graph = build_graph(adapter)
    ablated = AblatedWrites(adapter, task, "corrupt")
    edges = [0, 7, 40, graph.n_edges - 1]
    batched = exact_edge_scores(adapter, task, ablated, edges, graph, batch_size=4, copies=4)
    one = torch.stack([exact_edge_scores(adapter, task, ablated, [e], graph, batch_size=1, copies=1)[0] for e in edges])
    torch.testing.assert_close(batched, one, rtol=0, atol=1e-5)
    assert batched.abs().max() > 1e-5


def test_faithfulness_curve_endpoints_and_areas(neox):
    adapter = HeadAdapter(neox.model)
    task = byte_task(neox.tokenizer)
    scores = eap_scores(adapter, task)
    n = scores.graph.n_edges
    curve = faithfulness_curve(adapter, task, scores, [0, 10, n])
    assert curve.faithfulness[0] == pytest.approx(0.0, abs=1e-4)
    assert curve.faithfulness[2] == pytest.approx(1.0, abs=1e-4)
    assert curve.ablation == "corrupt" and all(math.isfinite(f) for f in curve.faithfulness)
    assert areas([n // 2], [0.5], n) == pytest.approx((0.5, 0.5))  # f = x: CPR = CMD = 1/2
    assert areas([], [], n) == pytest.approx((0.5, 0.5))
    assert areas([1], [1.0], 2) == pytest.approx((0.75, 0.25))


def test_mean_and_resample_ablations(neox):
    adapter = HeadAdapter(neox.model)
    task = byte_task(neox.tokenizer)
    mean = AblatedWrites(adapter, task, "mean")
    writes, _ = plain_run(adapter, task.clean, task.mask, {})
    w = torch.stack(writes)  # (senders, n, pos, d)
    mask = task.mask.bool()
    for p in (0, task.clean.shape[1] - 1):
        torch.testing.assert_close(mean.mean[:, p], w[:, mask[:, p], p].mean(1), rtol=0, atol=1e-5)
    order = resample_order(task, seed=3)
    assert (order != torch.arange(len(task))).all()
    assert (task.mask.sum(1)[order] == task.mask.sum(1)).all()
    resample = AblatedWrites(adapter, task, "resample", seed=3)
    torch.testing.assert_close(resample.rows(torch.arange(len(task))), w[:, order], rtol=0, atol=1e-5)
    for ablation in ("mean", "resample"):
        s = eap_scores(adapter, task, ablation)
        assert torch.isfinite(s.scores).all() and s.ablation == ablation


def test_bad_input_is_a_usage_error(neox):
    adapter = HeadAdapter(neox.model)
    task = byte_task(neox.tokenizer)
    with pytest.raises(UsageError, match="unknown ablation"):
        AblatedWrites(adapter, task, "zero")
    with pytest.raises(UsageError, match="out of range"):
        top_edges(torch.zeros(5), 6)
    with pytest.raises(UsageError, match="steps"):
        eap_scores(adapter, task, steps=0)
    single = encode(neox.tokenizer, task.examples[:1])
    with pytest.raises(UsageError, match="only one example"):
        resample_order(single)


# ------------------------------------------------------------------ organism-xs, IOI
def test_eap_and_eap_ig_agree_with_exact_patching_on_organism_ioi(organism):
    adapter = HeadAdapter(organism.model)
    task = encode(organism.tokenizer, builtin_ioi(organism, n=16, seed=0))
    eap = eap_scores(adapter, task, "corrupt", batch_size=16)
    ig = eap_scores(adapter, task, "corrupt", steps=5, batch_size=16)
    subset = agreement_subset(eap.scores, top=50, random=50, seed=0)  # the top 50 by |EAP| and 50 others
    agreement = edge_agreement(adapter, task, [eap, ig], subset.tolist(), batch_size=16, copies=16)
    curve = faithfulness_curve(adapter, task, ig, [5, 20, 50, 100], batch_size=16, copies=8)
    print(f"\norganism-xs IOI, {eap.graph.n_edges} edges, corrupt ablation: Spearman with exact single-edge "
          f"patching on {len(subset)} edges (top 50 by |EAP| + 50 random): "
          f"EAP {agreement.spearman['eap']:.3f}, EAP-IG(5) {agreement.spearman['eap-ig']:.3f}; "
          f"EAP-IG circuits f{dict(zip(curve.sizes, [round(f, 3) for f in curve.faithfulness]))} "
          f"CPR {curve.cpr:.3f} CMD {curve.cmd:.3f}")
    assert len(agreement.edges) == len(set(agreement.edges)) == 100
    assert all(math.isfinite(r) for r in agreement.spearman.values())
    assert math.isfinite(curve.cpr) and math.isfinite(curve.cmd)
