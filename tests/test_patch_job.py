"""The patch and validate jobs: Ray equals local, attribution agreement, bad input, verdicts,
and an independent cross-check of exact patching with nnsight."""

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import main
from spectral.models.adapter import HeadAdapter
from spectral.errors import UsageError
from spectral.causal.patching import cache_run, logit_diff, patch_layer
from spectral.causal.tasks import builtin_ioi, encode
from tests.conftest import TINY

NEOX = TINY["gpt_neox"]


def write_task(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"clean": "When Mary and John met, John gave it to ", "corrupt": "When Mary and John met, Kate gave it to ",
        "answer": "M", "distractor": "J"}


def test_ray_head_parallel_patching_equals_local(organism_cache, tmp_path, ray_cluster):
    """Units of two heads spread over two actors give the same tables as one local process."""
    common = ["patch", "--model", str(organism_cache), "--task", "ioi", "--n-examples", "12", "--heads-per-unit", "2"]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    assert main([*common, "--out", str(tmp_path / "ray"), "--executor", "ray", "--workers", "2"]) == 0
    for name in ("patch.parquet", "patch_examples.parquet"):
        local, remote = pq.read_table(tmp_path / "local" / name), pq.read_table(tmp_path / "ray" / name)
        assert local.num_rows == remote.num_rows > 0
        assert local.equals(remote), name


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_data_parallel_units_equal_one_unit_per_layer(organism_cache, tmp_path, ray_cluster, method):
    """Chunks of 5 examples (the last one shorter), run locally and on two Ray actors, give the
    per-example rows (same example numbers) and the per-head restorations of the default units."""
    common = ["patch", "--model", str(organism_cache), "--task", "ioi", "--n-examples", "12", "--method", method]
    assert main([*common, "--out", str(tmp_path / "layers")]) == 0
    assert main([*common, "--out", str(tmp_path / "chunks"), "--examples-per-unit", "5"]) == 0
    assert main([*common, "--out", str(tmp_path / "ray"), "--examples-per-unit", "5", "--executor", "ray"]) == 0
    keys = ["layer", "head", "example"]
    want = pq.read_table(tmp_path / "layers" / "patch_examples.parquet").sort_by([(k, "ascending") for k in keys])
    assert sorted(set(want["example"].to_pylist())) == list(range(12))
    for run in ("chunks", "ray"):
        got = pq.read_table(tmp_path / run / "patch_examples.parquet").sort_by([(k, "ascending") for k in keys])
        assert got.select(keys).equals(want.select(keys))
        for column in ("metric_clean", "metric_corrupt", "metric_patched"):
            np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(pq.read_table(tmp_path / run / "patch.parquet")["restoration"].to_numpy(),
                                   pq.read_table(tmp_path / "layers" / "patch.parquet")["restoration"].to_numpy(),
                                   rtol=1e-4, atol=1e-4)


def test_attribution_run_reports_its_agreement_with_exact(organism_cache, tmp_path, capsys):
    exact_out, attr_out = tmp_path / "exact", tmp_path / "attr"
    common = ["patch", "--model", str(organism_cache), "--task", "ioi", "--n-examples", "16"]
    assert main([*common, "--out", str(exact_out)]) == 0
    assert main([*common, "--out", str(attr_out), "--method", "attribution"]) == 0
    assert "Spearman rho" in capsys.readouterr().out
    exact = pq.read_table(exact_out / "patch.parquet").to_pylist()
    attr = pq.read_table(attr_out / "patch.parquet")
    np.testing.assert_allclose(attr["restoration_exact"].to_numpy(), [r["restoration"] for r in exact], rtol=1e-9)
    from scipy.stats import spearmanr

    rho = json.loads((attr_out / "params.json").read_text())["spearman_attribution_vs_exact"]
    assert rho == pytest.approx(spearmanr(attr["restoration"].to_numpy(), attr["restoration_exact"].to_numpy()).statistic)
    assert rho > 0.5  # on the organism the gradient estimate ranks the heads much like exact patching


@pytest.mark.parametrize("rows, extra, message", [
    (["{not json"], [], "task.jsonl:1: not valid JSON"),
    ([GOOD, {**GOOD, "answer": "Ma"}], [], "task.jsonl:2: answer 'Ma' is 2 tokens, not one"),
    ([{**GOOD, "corrupt": GOOD["corrupt"] + "x"}], [], "task.jsonl:1: clean and corrupt differ in length"),
    ([], [], "is empty"),
    ([GOOD], ["--heads", "0,4"], "--heads: head 4 out of range (the model has heads 0..3)"),
    ([GOOD], ["--layers", "3"], "--layers: layer 3 out of range (the model has layers 0..2)"),
    ([GOOD], ["--method", "ablate-mean", "--examples-per-unit", "2"], "works with exact patching and attribution only"),
])
def test_patch_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, rows, extra, message):
    task = write_task(tmp_path / "task.jsonl", rows)
    out = tmp_path / "out"
    assert main(["patch", "--model", NEOX, "--task", str(task), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_validate_reports_verdicts_on_an_organism(organism_cache, tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["validate", "--model", str(organism_cache), "--n-examples", "16", "--out", str(out)]) == 0
    for name in ("scan.parquet", "patch.parquet", "patch_examples.parquet", "heads.parquet", "validate.parquet",
                 "report.md", "gap_heatmap.png", "gap_vs_importance.png", "gap_importance_heatmaps.png"):
        assert (out / name).stat().st_size > 0, name
    stats = {r["key"]: r for r in pq.read_table(out / "validate.parquet").to_pylist()}
    r = stats["importance_correlation"]
    assert r["name"] == "pearson r(importance, 1/gap)"
    assert r["target"] == 0.7 and r["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
    assert r["low"] <= r["value"] <= r["high"] and 0 <= r["p_value"] <= 1
    assert stats["restoration_ratio"]["target"] == 2.0
    assert stats["restoration_ratio"]["name"] == "restoration ratio unstable/stable at gap <= 0.77"
    heads = pq.read_table(out / "heads.parquet")
    assert heads.num_rows == 2 * 8 and np.all(heads["gap"].to_numpy() > 0)
    params = json.loads((out / "params.json").read_text())
    assert params["scan_set"] == "held-out" and params["scan_seed"] == 1
    report = (out / "report.md").read_text()
    assert "Weakest link" in report
    size = int(re.search(r"Circuit: the (\d+) most important head\(s\)", report).group(1))
    assert 1 <= size <= 3  # measured: 2 heads (L0H0, L1H1) on organism-xs
    # the table heads.restoration is the per-head restoration of the patch table
    patch = pq.read_table(out / "patch.parquet")
    np.testing.assert_allclose(heads["restoration"].to_numpy(), patch["restoration"].to_numpy(), rtol=1e-6)


def nnsight_patch(model, task, layer, head, d_head):
    """Independent implementation: nnsight edits the input of the attention output projection
    (the concatenated head results) of one head, one head per trace."""
    import nnsight  # a test dependency (pyproject extra "test")
    wrapped = nnsight.NNsight(model)
    dense = lambda m: m.gpt_neox.layers[layer].attention.dense  # noqa: E731
    with torch.no_grad():
        with wrapped.trace(task.clean, attention_mask=task.mask, use_cache=False):
            clean_in = dense(wrapped).input.save()
        with wrapped.trace(task.corrupt, attention_mask=task.mask, use_cache=False):
            sl = slice(head * d_head, (head + 1) * d_head)
            dense(wrapped).input[:, :, sl] = clean_in[:, :, sl]
            logits = wrapped.output.logits.save()
    return logit_diff(logits, task)


def test_exact_patching_equals_nnsight(organism):
    adapter = HeadAdapter(organism.model)
    task = encode(organism.tokenizer, builtin_ioi(organism, 8, seed=5))
    clean, corrupt = cache_run(adapter, task.clean, task), cache_run(adapter, task.corrupt, task)
    d_head = organism.model.config.hidden_size // adapter.n_heads
    for layer in range(adapter.n_layers):
        ours = patch_layer(adapter, corrupt, task, layer, range(adapter.n_heads), clean.results[layer])
        for head in range(adapter.n_heads):
            theirs = nnsight_patch(organism.model, task, layer, head, d_head)
            torch.testing.assert_close(ours[head], theirs, rtol=0, atol=1e-4)


def test_validate_scans_held_out_prompts_by_default(organism, tmp_path):
    from jobs.patch import PatchConfig
    from jobs.validate import ValidateConfig, scan_note, scan_split

    config = ValidateConfig(model="organism-xs", out=tmp_path, n_examples=32, n_scan=40)
    patch_config = PatchConfig(model="organism-xs", task="ioi", out=tmp_path, n_examples=32, seed=0)
    examples, texts = scan_split(config, patch_config, organism)
    assert len(examples) == 32 and len(texts) == 40 and len(set(texts)) == 40
    assert not {e.clean for e in examples} & set(texts)  # disjoint from the patched prompts
    assert "held out" in scan_note(config, len(texts), len(examples))
    again = scan_split(config, patch_config, organism)[1]
    assert again == texts  # seeded: the same held-out sample every time
    inside = ValidateConfig(model="organism-xs", out=tmp_path, n_examples=32, scan_set="in-sample")
    examples_in, texts_in = scan_split(inside, patch_config, organism)
    assert texts_in == [e.clean for e in examples_in]
    assert "IN-SAMPLE" in scan_note(inside, len(texts_in), len(examples_in))


def test_validate_splits_a_task_file_into_scan_and_patch_sets(organism, tmp_path):
    from jobs.patch import PatchConfig
    from jobs.validate import ValidateConfig, scan_split
    from spectral.causal.tasks import builtin_ioi

    task = tmp_path / "task.jsonl"
    rows = builtin_ioi(organism, 20, seed=3)
    task.write_text("".join(json.dumps({"clean": e.clean, "corrupt": e.corrupt, "answer": e.answer,
                                        "distractor": e.distractor}) + "\n" for e in rows))
    config = ValidateConfig(model="organism-xs", task=str(task), out=tmp_path)
    examples, texts = scan_split(config, PatchConfig(model="organism-xs", task=str(task), out=tmp_path), organism)
    assert len(examples) == 10 and len(texts) == 10
    assert not {e.clean for e in examples} & set(texts)
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(task.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(UsageError, match="too few to split"):
        scan_split(ValidateConfig(model="organism-xs", task=str(tiny), out=tmp_path),
                   PatchConfig(model="organism-xs", task=str(tiny), out=tmp_path), organism)
