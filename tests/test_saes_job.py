"""``eigengap saes`` end to end on the smallest organism: the SAELens layout, saes.parquet rows
equal to a plain recomputation from the saved weights, the stable vs unstable tables, and bad
input as one line with exit status 2 and nothing written."""

import json

import numpy as np
import pytest
import torch
from sae_lens import SAE

from cluster.store import read_parquet
from jobs.cli import main
from jobs.registry import experiment
from jobs.saes import parse_heads
from spectral.errors import UsageError
from spectral.kernels.prompts import read_prompts
from spectral.kernels.scan import ScanSettings, token_batches
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import load_model
from spectral.organisms.language import corpus
from spectral.tables import REPORT_SAE_MODELS, SAE_RECOVERY, SAE_STEERABILITY, SAE_STEERING, SAES

SMALL = ["--tokens", "4096", "--sae-batch-size", "512", "--calibration-tokens", "1024", "--splice-prompts", "6",
         "--batch-size", "16"]


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("saes") / "eval.txt"
    path.write_text("\n".join(" ".join(corpus(777 + i, 3)) for i in range(12)) + "\n")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, eval_file):
    out = tmp_path_factory.mktemp("saes") / "run"
    # every evaluation prompt is read (eval tokens above their count): the recomputation below sees the same tokens
    assert main(["saes", "--model", "organism-xs", "--out", str(out), "--k", "2,4", "--threshold", "0.9",
                 "--eval-prompts", str(eval_file), "--eval-tokens", "100000", *SMALL]) == 0
    return out


def test_the_run_writes_every_sae_and_its_files(run_dir):
    table = read_parquet(run_dir / "saes.parquet", SAES)
    rows = table.to_pylist()
    assert len(rows) == (2 * 8 + 2) * 2  # 16 head SAEs and 2 layer SAEs, at k = 2 and 4
    assert {r["name"] for r in rows} == {f"L{l}H{h}_k{k}" for l in range(2) for h in range(8) for k in (2, 4)} | \
        {f"L{l}_k{k}" for l in range(2) for k in (2, 4)}
    for r in rows:
        assert r["l0"] <= r["k"] + 1e-9 and r["explained_variance"] == pytest.approx(1 - r["fvu"])
        assert r["d_sae"] == 8 * r["d_in"] and r["train_tokens"] >= 4096
        assert np.isfinite(r["ev_l0_area"])  # two values of k per target
        assert (r["head"] == -1) == (r["kind"] == "layer")
        assert sum(r["density_histogram"]) + r["dead"] == r["d_sae"]
        assert (run_dir / r["path"] / "cfg.json").is_file()
    head_rows = [r for r in rows if r["kind"] == "head"]
    assert all(r["unstable"] == (r["gap"] <= 0.9) for r in head_rows)
    assert any(r["unstable"] for r in head_rows) and not all(r["unstable"] for r in head_rows)
    layer_rows = [r for r in rows if r["kind"] == "layer"]
    assert all(0 <= r["attribution_entropy_mean"] <= np.log(8) + 1e-9 for r in layer_rows)
    assert all(np.isnan(r["attribution_entropy_mean"]) for r in head_rows)
    for png in ("sae_pareto.png", "sae_density.png", "sae_stable_unstable.png"):
        assert (run_dir / png).stat().st_size > 0
    models = read_parquet(run_dir / "sae_models.parquet", REPORT_SAE_MODELS).to_pylist()
    assert {r["metric"] for r in models} >= {"superposition_index", "l0", "fvu", "ce_score"}
    params = json.loads((run_dir / "params.json").read_text())
    assert params["train_tokens"] >= 4096 and params["tokens_per_second"] > 0 and len(params["heads"]) == 16
    summary = (run_dir / "summary.md").read_text()
    assert "Stable vs unstable heads" in summary and "Features and steerability" in summary
    # organisms: steering on the sentiment concept and ground truth, for the SAEs at the verdict's k (here 4)
    steering = read_parquet(run_dir / "sae_steering.parquet", SAE_STEERING).to_pylist()
    assert len(steering) == 3 * 18 and {r["arm"] for r in steering} == {"actadd", "feature", "feature-actadd"}
    assert {r["sae"] for r in steering} == {r["name"] for r in rows if r["k"] == 4}
    screen = read_parquet(run_dir / "sae_steerability.parquet", SAE_STEERABILITY).to_pylist()
    assert screen and all(0 <= r["p_adjusted"] <= 1 for r in screen)
    recovery = read_parquet(run_dir / "sae_recovery.parquet", SAE_RECOVERY).to_pylist()
    variable_rows = [r for r in recovery if r["scope"] == "variable"]
    assert len(variable_rows) == 2 * 18 and {r["variable"] for r in variable_rows} == {"ioi_io", "sentiment"}
    assert all(0 <= r["auroc"] <= 1 and 0 <= r["random_auroc"] <= 1 for r in variable_rows)
    metrics, _ = experiment("saes").metrics(run_dir)
    assert set(metrics) == {f"sae_median/{m}" for m in ("superposition_index", "l0", "fvu", "ce_score")} - \
        ({"sae_median/superposition_index"} if all(np.isnan(r["superposition_index"]) for r in head_rows) else set())
    assert experiment("saes").load(run_dir).tables["saes.parquet"].num_rows == len(rows)


def test_rows_equal_a_plain_recomputation_through_sae_lens(run_dir, eval_file):
    """L0 and FVU of a head SAE and of a layer SAE, recomputed from the saved weights with
    SAELens' own loader on the evaluation prompts' z (raw units: the per-head normalisation is
    affine with one scale per head, which leaves a head SAE's FVU unchanged)."""
    rows = {r["name"]: r for r in read_parquet(run_dir / "saes.parquet", SAES).to_pylist()}
    loaded = load_model("organism-xs")
    adapter = HeadAdapter(loaded.model)
    z = {0: [], 1: []}
    for ids, mask in token_batches(loaded, read_prompts(eval_file), ScanSettings(batch_size=16)):
        out = adapter.run(ids, mask, sites=["result"])
        for layer in (0, 1):
            z[layer].append(out[(layer, "result")][mask.bool()].float())
    z = {layer: torch.cat(v) for layer, v in z.items()}  # (tokens, head, d_head)
    for name, x in (("L1H3_k4", z[1][:, 3]), ("L0_k2", z[0].flatten(1))):
        sae = SAE.load_from_disk(run_dir / "saes" / name)
        with torch.no_grad():
            f = sae.encode(x)
            recon = sae.decode(f)
        row = rows[name]
        assert row["eval_tokens"] == x.shape[0]
        assert row["l0"] == pytest.approx(float((f != 0).sum(-1).float().mean()), abs=1e-6)
        if row["kind"] == "head":
            fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
            assert row["fvu"] == pytest.approx(fvu, rel=1e-4)
        assert row["dead"] == int((f != 0).sum(0).eq(0).sum())


def test_unstable_heads_only(tmp_path):
    out = tmp_path / "u"
    assert main(["saes", "--model", "organism-xs", "--out", str(out), "--heads", "unstable", "--threshold", "0.9",
                 "--k", "2", "--no-layer-saes", "--eval-tokens", "2048", *SMALL]) == 0
    rows = read_parquet(out / "saes.parquet", SAES).to_pylist()
    assert rows and all(r["kind"] == "head" and r["gap"] <= 0.9 and r["unstable"] for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "k=0 out of range"),
    (["--k", "129"], "k=129 out of range: need 1 <= k <= dictionary size 128 (expansion 8 x d_in 16)"),
    (["--heads", "2.0"], "--heads: unknown head '2.0': the model has 2 layers x 8 heads"),
    (["--heads", "0.x"], "--heads: '0.x' is not a head"),
    (["--heads", "unstable", "--threshold", "0.01"], "--heads unstable: no head of organism-xs has a gap <= 0.01"),
    (["--model", "random:gpt2?layers=3&hidden=64&heads=4&vocab=512"], "--prompts is required"),
    (["--expansion", "0"], "--expansion"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    argv = ["saes", "--model", "organism-xs", "--out", str(out), *SMALL, *args]
    # later options win: put the tested ones last
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    # the error is the last line and the only one of ours (k and --heads unstable need the model loaded first:
    # transformers may draw its weight-loading bar above it)
    ours = [line for line in err.splitlines() if line.startswith("eigengap")]
    assert ours == [err.splitlines()[-1]] and message in ours[0] and "Traceback" not in err
    assert not out.exists()


def test_parse_heads():
    assert parse_heads("all", 2, 8) == "all" and parse_heads(" unstable ", 2, 8) == "unstable"
    assert parse_heads("1.3, L0H2,1.3", 2, 8) == [(0, 2), (1, 3)]
    with pytest.raises(UsageError, match="no head given"):
        parse_heads(",", 2, 8)
