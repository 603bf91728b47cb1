"""Head patching: batched exact patching against the one-head-at-a-time loop, attribution,
ablations, task files, the CLI."""


import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import main
from spectral.models.adapter import HeadAdapter
from spectral.errors import UsageError
from spectral.causal.patching import ablation_source, attribution, cache_run, logit_diff, patch_layer
from spectral.causal.tasks import Example, encode, read_task_file

PAIRS = [("Mary", "John", "Kate"), ("Anna", "Paul", "Mark"), ("Lucy", "Tom", "Bob"), ("Emma", "Jim", "Sam")]


def byte_task(tokenizer):
    """IOI-shaped examples for byte-level random models (single-byte answers), with padding."""
    examples = [Example(f"When {a} and {b} met, {b} gave it to ", f"When {a} and {b} met, {c} gave it to ", a[0], b[0])
                for a, b, c in PAIRS]
    return encode(tokenizer, examples)


def loop_reference(adapter, ids, task, layer, head, source):
    """The straightforward loop: a full forward pass with one head's result replaced."""
    def edit(t):
        t = t.clone()
        t[:, :, head] = source[:, :, head]
        return t

    with torch.no_grad(), adapter.trace([], edits={(layer, "result"): edit}):
        return logit_diff(adapter.model(input_ids=ids, attention_mask=task.mask, use_cache=False).logits, task)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_batched_patching_equals_one_head_loop(tiny, direction):
    adapter = HeadAdapter(tiny.model)
    task = byte_task(tiny.tokenizer)
    clean, corrupt = cache_run(adapter, task.clean, task), cache_run(adapter, task.corrupt, task)
    base, source, ids = (corrupt, clean, task.corrupt) if direction == "denoise" else (clean, corrupt, task.clean)
    moved = 0.0
    for layer in range(adapter.n_layers):
        fast = patch_layer(adapter, base, task, layer, range(adapter.n_heads), source.results[layer])
        for head in range(adapter.n_heads):
            ref = loop_reference(adapter, ids, task, layer, head, source.results[layer])
            torch.testing.assert_close(fast[head], ref, rtol=0, atol=1e-4)
            moved = max(moved, (fast[head] - base.metric).abs().max().item())
    assert moved > 1e-4  # the patches do change the metric


def test_prefix_reuse_equals_the_full_replay(tiny):
    """Recomputing only positions from the first clean/corrupt difference on, attending to the
    cached keys and values of the prefix, gives the full replay's answer (every family)."""
    from spectral.causal.patching import first_difference

    adapter = HeadAdapter(tiny.model)
    task = byte_task(tiny.tokenizer)
    clean, corrupt = cache_run(adapter, task.clean, task), cache_run(adapter, task.corrupt, task)
    start = first_difference(task.clean, task.corrupt)
    assert 0 < start < task.clean.shape[1]
    for layer in range(adapter.n_layers):
        full = patch_layer(adapter, corrupt, task, layer, range(adapter.n_heads), clean.results[layer])
        reused = patch_layer(adapter, corrupt, task, layer, range(adapter.n_heads), clean.results[layer], start)
        torch.testing.assert_close(reused, full, rtol=0, atol=1e-4)
        for head in range(adapter.n_heads):
            ref = loop_reference(adapter, task.corrupt, task, layer, head, clean.results[layer])
            torch.testing.assert_close(reused[head], ref, rtol=0, atol=1e-4)


def test_patching_every_head_of_every_layer_restores_the_clean_run(neox):
    """Patching all heads at layer 0 changes what flows on; patching the clean results of every
    layer into the corrupt run reproduces the clean metric exactly (a consistency check)."""
    adapter = HeadAdapter(neox.model)
    task = byte_task(neox.tokenizer)
    clean, corrupt = cache_run(adapter, task.clean, task), cache_run(adapter, task.corrupt, task)
    edits = {(l, "result"): (lambda t, l=l: clean.results[l]) for l in range(adapter.n_layers)}
    # the corrupt tokens still reach the MLPs and residual, so restoration is partial, not total
    with torch.no_grad(), adapter.trace([], edits=edits):
        all_heads = logit_diff(neox.model(input_ids=task.corrupt, attention_mask=task.mask).logits, task)
    assert not torch.allclose(all_heads, corrupt.metric)
    torch.testing.assert_close(cache_run(adapter, task.clean, task).metric, clean.metric)


def test_attribution_is_the_first_order_estimate(neox):
    adapter = HeadAdapter(neox.model)
    task = byte_task(neox.tokenizer)
    clean, corrupt = cache_run(adapter, task.clean, task), cache_run(adapter, task.corrupt, task)
    est = attribution(adapter, clean, corrupt, task, task.corrupt)  # (layer, head, n)
    # check against a finite difference along the clean - corrupt direction at a small step
    layer, head, eps = 1, 2, 1e-3
    diff = clean.results[layer][:, :, head] - corrupt.results[layer][:, :, head]

    def edit(t):
        t = t.clone()
        t[:, :, head] += eps * diff
        return t

    with torch.no_grad(), adapter.trace([], edits={(layer, "result"): edit}):
        stepped = logit_diff(neox.model(input_ids=task.corrupt, attention_mask=task.mask).logits, task)
    torch.testing.assert_close(est[layer, head], (stepped - corrupt.metric) / eps, rtol=2e-2, atol=2e-3)


def test_ablation_sources(neox):
    adapter = HeadAdapter(neox.model)
    task = byte_task(neox.tokenizer)
    clean = cache_run(adapter, task.clean, task)
    zero = ablation_source("ablate-zero", clean, task, 1)
    assert torch.count_nonzero(zero) == 0
    mean = ablation_source("ablate-mean", clean, task, 1)
    real = task.mask.bool()
    torch.testing.assert_close(mean[0, 0], clean.results[1][real].mean(0))
    resampled = ablation_source("resample", clean, task, 1)
    for i in range(len(task)):  # every example takes another example's value
        assert not torch.equal(resampled[i], clean.results[1][i])
        assert any(torch.equal(resampled[i], clean.results[1][j]) for j in range(len(task)))


def test_task_file_errors(tmp_path, neox):
    path = tmp_path / "task.jsonl"
    path.write_text('{"clean": "ab", "corrupt": "cd", "answer": "x", "distractor": "y"}\n{"clean": 1}\n')
    with pytest.raises(UsageError, match="task.jsonl:2: missing string field 'clean'"):
        read_task_file(path)
    with pytest.raises(UsageError, match="t:1: clean and corrupt differ in length"):
        encode(neox.tokenizer, [Example("abc", "ab", "x", "y")], source="t")
    with pytest.raises(UsageError, match="t:2: answer 'xy' is 2 tokens, not one"):
        encode(neox.tokenizer, [Example("ab", "cd", "x", "y"), Example("ab", "cd", "xy", "y")], source="t")


def test_patch_cli_on_an_organism(organism_cache, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["patch", "--model", "organism-xs", "--task", "ioi", "--n-examples", "16", "--out", str(out)]) == 0
    heads = pq.read_table(out / "patch.parquet")
    per_example = pq.read_table(out / "patch_examples.parquet")
    assert heads.num_rows == 2 * 8 and per_example.num_rows == 2 * 8 * 16
    for col in ("model", "method", "direction", "layer", "head", "metric_clean", "metric_corrupt",
                "metric_patched", "restoration"):
        assert col in heads.column_names
    row = heads.to_pylist()[0]
    assert row["restoration"] == pytest.approx(
        (row["metric_patched"] - row["metric_corrupt"]) / (row["metric_clean"] - row["metric_corrupt"]))
    assert max(heads["restoration"].to_pylist()) > 0.2  # some head carries the IOI answer


def test_ground_truth_ioi_circuit_is_small_and_necessary(organism):
    """On the organism the IOI heads are known to matter: a few top-restoration heads restore
    >= 80 % of the clean logit difference together, and mean-ablating them removes >= 80 %."""
    from spectral.causal.patching import minimal_circuit
    from spectral.causal.tasks import builtin_ioi

    adapter = HeadAdapter(organism.model)
    task = encode(organism.tokenizer, builtin_ioi(organism, 48, seed=3))
    clean, corrupt = cache_run(adapter, task.clean, task), cache_run(adapter, task.corrupt, task)
    assert clean.metric.mean() > 2.0 and abs(corrupt.metric.mean()) < 1.0  # ABC removes the answer's edge
    scores = {}
    for layer in range(adapter.n_layers):
        patched = patch_layer(adapter, corrupt, task, layer, range(adapter.n_heads), clean.results[layer]).mean(1)
        for head in range(adapter.n_heads):
            scores[(layer, head)] = patched[head].item()
    ranking = sorted(scores, key=scores.get, reverse=True)
    circuit = minimal_circuit(adapter, task, clean, corrupt, ranking, target=0.8)
    assert circuit is not None
    assert len(circuit.heads) <= 3, circuit  # measured: 2 heads (L0H0, L1H1) on organism-xs
    assert circuit.restoration >= 0.8 and circuit.removed >= 0.8
