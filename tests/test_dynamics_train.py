"""``eigengap dynamics train`` on the real organism-xs trained with 30 checkpoints (seeds 0 and 1):
in-context learning and induction accuracy rise from chance within the run, the job's gaps are a
direct scan's, the tables hold their schemas, the ICL score matches a plain per-prefix reference,
and bad input is one line, exit status 2, nothing written."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from cluster.store import read_parquet
from jobs import dynamics_train as job
from jobs.cli import main as cli_main
from spectral import tables
from spectral.dynamics import training
from spectral.errors import UsageError
from spectral.models.loading import load_model

SEEDS = (0, 1)
SMALL = ["--n-prompts", "4", "--n-sequences", "32", "--n-induction", "30", "--n-ioi-per-template", "5"]
"""Probe sizes that keep the run to about a second per checkpoint on one CPU thread."""


@pytest.fixture(scope="module")
def checkpointed0(organism_cache):
    """organism-xs with 30 training checkpoints (seed 0), trained once into the test cache (about
    a minute; kept between sessions with EIGENGAP_TEST_CACHE)."""
    from spectral.organisms import suite

    return suite.train_organism("organism-xs", 0, checkpoints=30, progress=False)


@pytest.fixture(scope="module")
def checkpointed(checkpointed0):
    """Seeds 0 and 1 of organism-xs with 30 training checkpoints."""
    from spectral.organisms import suite

    return {0: checkpointed0, 1: suite.train_organism("organism-xs", 1, checkpoints=30, progress=False)}


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(checkpointed, one_thread, tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamics") / "run"
    assert cli_main(["dynamics", "train", "--model", "organism-xs", "--seeds", "0,1", "--out", str(out), *SMALL]) == 0
    return out


def test_tables_hold_their_schemas(run_dir):
    data = job.load(run_dir)  # every table read against its schema
    checkpoints = data.table(job.CHECKPOINTS_FILE).to_pylist()
    assert len(checkpoints) == 2 * 30 and {r["seed"] for r in checkpoints} == set(SEEDS)
    assert data.table(job.HEADS_FILE).num_rows == 2 * 30 * 16  # organism-xs: 2 layers x 8 heads
    assert {r["icl_form"] for r in checkpoints} == {"organism"}
    assert {(r["early_token"], r["late_token"]) for r in checkpoints} == {(7, 31)}
    verdicts = data.table(job.RESULT_FILE).to_pylist()
    verdict, beyond = [r for r in verdicts if not r["exploratory"]]
    assert verdict["key"] == "spectral_changes_precede_icl" and verdict["population"] == "organism-xs"
    assert verdict["n_seeds"] == 2 and verdict["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
    assert beyond["key"] == "spectral_changes_precede_icl_beyond_loss" and beyond["metric"] == "gap"
    assert beyond["n_seeds"] == 2 and beyond["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
    (control,) = [r for r in verdicts if r["key"] == "control_loss_lag"]
    assert control["metric"] == "train_loss" and control["verdict"] == "" and control["k"] == 2
    changepoints = data.table(job.CHANGEPOINTS_FILE).to_pylist()
    assert sum(r["series"] == "icl_score" for r in changepoints) == 2
    assert sum(r["series"] == "gap" for r in changepoints) == 2 * 16
    for name in ("summary.md", "params.json", "prompts.txt", "dynamics_icl.png", "dynamics_gaps.png"):
        assert (run_dir / name).stat().st_size > 0
    summary = (run_dir / "summary.md").read_text()
    assert "Rule: spectral_changes_precede_icl:" in summary
    assert "Rule: spectral_changes_precede_icl_beyond_loss:" in summary
    assert "Late gap change-points (exploratory, no verdict)" in summary
    assert "| train_loss change-point (step) |" in summary
    models = [m for m in data.table(job.MODELS_FILE).to_pylist() if m["metric"] == "gap"]
    for m in models:  # the difference to the loss is the median lag minus the loss's lag
        assert m["median_minus_loss"] == pytest.approx(m["median_lag"] - m["loss_lag"], abs=1e-9)
    metrics, params = job.unit_metrics(run_dir)
    assert params["verdict/spectral_changes_precede_icl"] == verdict["verdict"]
    assert params["verdict/spectral_changes_precede_icl_beyond_loss"] == beyond["verdict"]
    assert metrics["icl_score_final/seed_1"] < -3


def test_icl_and_induction_rise_from_chance_within_the_run(run_dir):
    """Measured on these organisms: ICL score about +0.02 at step 1 and -3.9 at step 1,840; in-format
    induction accuracy about 0.005 (chance about 1/48) to 1.00; IOI accuracy 0.5 (chance) to 1.00.
    The ICL score's first change-point falls inside the run (neither at its first nor last checkpoint)."""
    data = job.load(run_dir)
    rows = data.table(job.CHECKPOINTS_FILE).to_pylist()
    changes = {r["seed"]: r for r in data.table(job.CHANGEPOINTS_FILE).to_pylist() if r["series"] == "icl_score"}
    for seed in SEEDS:
        mine = sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["step"])
        first, last = mine[0], mine[-1]
        assert (first["step"], last["step"]) == (1, 1840)
        assert abs(first["icl_score"]) < 0.3 and last["icl_score"] < -3.0
        assert first["induction_accuracy"] < 0.05 and last["induction_accuracy"] >= 0.95
        assert abs(first["ioi_accuracy"] - 0.5) < 0.1 and last["ioi_accuracy"] >= 0.9
        assert 0 < first["train_loss"] - last["train_loss"]
        assert 1 < changes[seed]["first_step"] < 1840 and changes[seed]["n_changes"] >= 1


def test_gap_equals_a_direct_scan_of_the_checkpoint(run_dir, tmp_path):
    heads = job.load(run_dir).table(job.HEADS_FILE).to_pylist()
    row = next(r for r in heads if r["seed"] == 1 and r["step"] == 300)
    path = row["checkpoint"]
    out = tmp_path / "scan"
    # the job cuts the scan's prompts to the organism's training context (48 tokens, its recipe)
    runs = json.loads((run_dir / "params.json").read_text())["runs"]
    assert [r["scan_max_tokens"] for r in runs] == [48, 48]
    assert cli_main(["scan", "--model", path, "--prompts", str(run_dir / "prompts.txt"), "--out", str(out),
                     "--max-tokens", "48"]) == 0
    direct = {(r["layer"], r["head"]): r for r in read_parquet(out / "scan.parquet", tables.SCAN).to_pylist()}
    mine = [r for r in heads if r["checkpoint"] == path]
    assert len(mine) == 16
    for r in mine:
        d = direct[(r["layer"], r["head"])]
        assert r["gap"] == pytest.approx(d["gap"], rel=1e-9, abs=1e-12)
        assert r["effective_rank"] == pytest.approx(d["effective_rank"], rel=1e-9)
        assert r["n_tokens"] == d["n_tokens"] <= 48 * r["n_prompts"]


def plain_token_loss(loaded, row: torch.Tensor, k: int) -> float:
    """-log p(x_k | x_<k) from a forward pass on the prefix alone (1-based k)."""
    logits = loaded.model(input_ids=row[None, :k - 1]).logits[0, -1].double()
    return float(-torch.log_softmax(logits, -1)[row[k - 1]])


def test_icl_score_against_a_plain_reference(checkpointed0, one_thread):
    path = training_checkpoint(checkpointed0, 1096)
    loaded = load_model(str(path))
    tasks = json.loads((path / "tasks.json").read_text())
    probes = training.make_probes(loaded, tasks, ["a"], n_sequences=6)
    seqs = probes.icl
    text = loaded.tokenizer.decode(seqs.tokens[0])
    span = text.removeprefix("Repeat:").removesuffix(".").split("|")
    assert len(span) == 3 and len({s.strip() for s in span}) == 1 and len(span[0].split()) == training.SPAN
    assert seqs.tokens[0, seqs.early - 1] == seqs.tokens[0, seqs.late - 1]  # the same syllable, first and third copy
    early = np.mean([plain_token_loss(loaded, r, seqs.early) for r in seqs.tokens])
    late = np.mean([plain_token_loss(loaded, r, seqs.late) for r in seqs.tokens])
    got = training.icl_score(loaded, seqs, batch_size=4)
    assert got.loss_early == pytest.approx(early, abs=1e-5) and got.loss_late == pytest.approx(late, abs=1e-5)
    assert got.score == pytest.approx(late - early, abs=1e-5)
    rep = probes.repeated[:6]
    t = rep.shape[1] // 2
    hits = [int(loaded.model(input_ids=r[None, :k - 1]).logits[0, -1].argmax()) == int(r[k - 1])
            for r in rep for k in range(t + 2, 2 * t + 1)]
    assert training.repeat_accuracy(loaded, rep, batch_size=4) == pytest.approx(np.mean(hits))


def test_olsson_positions_scale_with_the_context():
    assert training.icl_positions(512) == (50, 500)
    assert training.icl_positions(2048) == (200, 2000)
    assert training.icl_positions(96) == (9, 94)
    seqs = training.olsson_sequences(range(3, 5000), 4, 2048, seed=1)
    assert seqs.tokens.shape == (4, 2048) and torch.equal(seqs.tokens[:, :1024], seqs.tokens[:, 1024:])


def training_checkpoint(entry, step: int):
    return entry / "checkpoints" / f"step-{step}"


# ---------------------------------------------------------------------------- bad input
def run_bad(capsys, tmp_path, *args) -> str:
    out = tmp_path / "out"
    assert cli_main(["dynamics", "train", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not out.exists(), "nothing is written on bad input"
    assert len(err) == 1 and err[0].startswith("eigengap dynamics: error:"), err
    return err[0]


def test_checkpoint_directory_with_missing_steps(checkpointed0, capsys, tmp_path):
    src = checkpointed0 / "checkpoints"
    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["steps"] = [e for e in manifest["steps"] if e["step"] != 8]
    (broken / "checkpoints" / "manifest.json").write_text(json.dumps(manifest))
    for e in manifest["steps"]:
        os.symlink(src / e["path"], broken / "checkpoints" / e["path"])
    assert "checkpoint step 8 of" in run_bad(capsys, tmp_path, "--model", str(broken))


def test_models_without_checkpoints(checkpointed0, capsys, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(checkpointed0, plain, ignore=shutil.ignore_patterns("checkpoints"))
    assert "has no training checkpoints" in run_bad(capsys, tmp_path, "--model", str(plain))
    assert "has no training checkpoints" in run_bad(capsys, tmp_path, "--model", "random:pythia-410m?layers=2")
    assert "--revisions step1000" in run_bad(capsys, tmp_path, "--model", "EleutherAI/pythia-70m")


@pytest.mark.parametrize("args, phrase", [
    (["--model", "organism-xs", "--seeds", "0,x"], "--seeds: seeds must look like 0-4 or 0,3,7"),
    (["--model", "organism-xs", "--checkpoints", "5000"], "checkpoints=5000: must be 0 (none) or between 2"),
    (["--model", "organism-xs", "--revisions", "step1,step2,step3,step4,step5,step6"], "--revisions applies to hub"),
    (["--model", "EleutherAI/pythia-70m", "--revisions", "step1000,main"], "revision 'main' is not of the form stepN"),
    (["--model", "EleutherAI/pythia-70m", "--revisions", "step2000,step1000"], "strictly increasing"),
    (["--model", "EleutherAI/pythia-70m", "--revisions", "step1,step2"], "2 revisions; change-points need at least 6"),
    (["--model", "EleutherAI/pythia-70m", "--seeds", "0,1", "--revisions", "step1,step2,step3,step4,step5,step6"],
     "--seeds applies to organisms"),
])
def test_bad_values_are_one_line(capsys, tmp_path, args, phrase):
    assert phrase in run_bad(capsys, tmp_path, *args)


def test_hub_revisions_parse_into_points(tmp_path):
    """The hub path (not runnable here: no hub) as far as it goes without loading: each revision
    a checkpoint loaded by name at its step, training loss unknown (NaN)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    config = job.DynamicsTrainConfig(model="EleutherAI/pythia-160m", out=tmp_path / "o", prompts=prompts,
                                     revisions="step0,step1000,step2000,step4000,step8000,step143000")
    (r,) = job.plan_runs(config, train=False)
    assert (r.population, r.seed) == ("EleutherAI/pythia-160m", None)
    assert [(p.revision, p.step, p.source) for p in r.points][:2] == [("step0", 0, "EleutherAI/pythia-160m"),
                                                                     ("step1000", 1000, "EleutherAI/pythia-160m")]
    assert all(math.isnan(p.train_loss) for p in r.points)
    with pytest.raises(UsageError, match="--prompts is required"):
        job.plan_runs(config.model_copy(update={"prompts": None}), train=False)
    with pytest.raises(UsageError, match="applies to hub models only"):
        load_model("random:pythia-410m?layers=2", revision="step1000")
