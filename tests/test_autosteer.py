"""``eigengap autosteer`` (issue 18, point 3): the organisms' second concept, the per-prompt scaled
injection and per-prompt gaps against plain references, the job's tables on the smallest organism
(every strategy at the budget, the oracle's choice from its grid, nothing beating the oracle beyond
its interval), one-line errors, and the success-metric-5 verdict's null simulation."""

import json

import numpy as np
import pytest

from analysis import autosteer as AS
from cluster.store import read_parquet
from jobs.cli import main
from spectral import tables
from spectral.organisms.language import TASKS

BUDGET = 0.25


# ---------------------------------------------------------------------------- the names concept
def test_the_names_concept_is_balanced_and_never_names_in_its_neutral_prompts():
    from spectral.steering.concepts import FEMALE_NAMES, MALE_NAMES, organism_names

    c = organism_names(TASKS, n=32)
    assert c.name == "names" and len(c.prompts) == len(set(c.prompts)) == 32
    assert c.target == tuple(" " + n for n in FEMALE_NAMES) and c.opposite == tuple(" " + n for n in MALE_NAMES)
    assert set(FEMALE_NAMES) | set(MALE_NAMES) == set(TASKS["names"]) and not set(FEMALE_NAMES) & set(MALE_NAMES)
    for i, p in enumerate(c.prompts):  # the answer (the name mentioned once) alternates target, opposite, ...
        words = p.replace(",", " ").replace(".", " ").split()
        names = [w for w in words if w in TASKS["names"]]
        answer = next(n for n in names if names.count(n) == 1)
        assert (answer in FEMALE_NAMES) == (i % 2 == 0), p
        assert len({n in FEMALE_NAMES for n in set(names)}) == 2  # one name from each set
    for pos, neg in c.pairs:  # the same context, both names from one set
        assert [w for w in pos.split() if w.strip(",.") not in TASKS["names"]] == \
               [w for w in neg.split() if w.strip(",.") not in TASKS["names"]]
        assert all(w.strip(",.") in FEMALE_NAMES for w in pos.split() if w.strip(",.") in TASKS["names"])
        assert all(w.strip(",.") in MALE_NAMES for w in neg.split() if w.strip(",.") in TASKS["names"])
    assert not any(n in p.split() for p in c.neutral for n in ("to",))  # no IOI context: its next word is a name
    assert not set(c.scan) & set(c.prompts) and len(c.scan) == 32
    assert organism_names(TASKS, n=32) == c and organism_names(TASKS, n=32, scan_seed=1).scan != c.scan


def test_the_names_concept_refuses_other_names():
    from spectral.errors import UsageError
    from spectral.steering.concepts import organism_names

    with pytest.raises(UsageError, match="names concept does not apply"):
        organism_names({**TASKS, "names": ["Ann", "Bo", "Cy", "Di"]})


# ---------------------------------------------------------------------------- parts against references
def test_row_scaled_equals_a_plain_injection_per_row(organism):
    import torch

    from spectral.models.adapter import HeadAdapter
    from spectral.steering.autosteer import RowScaled
    from spectral.steering.injection import Injection
    from spectral.steering.measure import heldout_loss, next_token_logprobs
    from spectral.steering.vectors import Batch

    adapter = HeadAdapter(organism.model)
    texts = ["I love the apple. It is", "A dog is", "When Mary and John went to the park, John gave a ball to"]
    batch = Batch.of(organism.tokenizer, texts)
    v = torch.randn(organism.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor([0.5, 2.0, 1.25])
    for positions in ("all", "last"):
        inj = RowScaled(1, v, ((batch.last, factors),), 3.0, positions)
        got = next_token_logprobs(adapter, batch, inj)
        loss = heldout_loss(adapter, batch, inj)
        for i, text in enumerate(texts):
            one = Batch.of(organism.tokenizer, [text])
            plain = Injection({1: v}, {1: 3.0 * float(factors[i])}, positions)
            assert torch.allclose(got[i], next_token_logprobs(adapter, one, plain)[0], atol=1e-5)
            assert float(loss[i]) == pytest.approx(float(heldout_loss(adapter, one, plain)[0]), abs=1e-5)
    with pytest.raises(KeyError, match="no per-text factors"):
        next_token_logprobs(adapter, Batch.of(organism.tokenizer, texts[:2]), inj)


def test_prompt_gaps_are_each_prompts_own_scan(organism, organism_cache):
    from cluster.executors import LocalExecutor
    from spectral.kernels.scan import ScanSettings, scan_table
    from spectral.models.adapter import HeadAdapter
    from spectral.steering.autosteer import prompt_gaps
    from spectral.steering.vectors import Batch

    adapter = HeadAdapter(organism.model)
    texts = ["I love the apple. It is", "When Mary and John went to the park, John gave a ball to"]
    gaps = prompt_gaps(adapter, Batch.of(organism.tokenizer, texts), 1)
    for text, g in zip(texts, gaps):
        scan = scan_table(LocalExecutor(organism, progress=False), str(organism_cache), [text], ScanSettings(), 2,
                          adapter.n_heads, adapter.n_kv_heads).to_pylist()
        assert g == pytest.approx(min(r["gap"] for r in scan if r["layer"] == 1), rel=1e-5)  # float32 keys, padded batch


def test_slopes_are_least_squares():
    m = [-1.0, -0.5, 0.0, 0.5, 1.0]
    e = np.array([[1.0, 0.0], [1.5, 0.2], [2.0, 0.1], [2.5, -0.4], [3.0, -0.6]])
    expected = [np.polyfit(m, e[:, j], 1)[0] for j in range(2)]
    assert AS.slopes(m, e) == pytest.approx(expected)


# ---------------------------------------------------------------------------- the job
@pytest.fixture(scope="module")
def steered(organism_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("autosteer") / "out"
    assert main(["autosteer", "--model", str(organism_cache), "--out", str(out), "--prompts", "24",
                 "--random-draws", "3", "--iti-heads", "2", "--probe-prompts", "4"]) == 0
    return out


def test_the_job_writes_every_strategy_at_the_budget(steered):
    from jobs.autosteer import outside_the_grid

    rows = read_parquet(steered / "strategies.parquet", tables.AUTOSTEER_STRATEGIES).to_pylist()
    assert [r["strategy"] for r in rows] == [
        "oracle", "probe", "probe-k", "theory", "spectral", "spectral-1", "adaptive", "actadd", "caa", "mean-diff",
        "pca-diff", "iti", "random"]
    for r in rows:
        assert abs(r["kl"] - BUDGET) <= 0.03 * BUDGET, r["strategy"]  # the 3 %
        assert r["kl_relative_error"] <= 0.03
        if outside_the_grid(r, "caa").startswith("INSIDE"):  # the sanity check: within the oracle's own grid
            assert not r["beats_oracle_beyond_interval"], r["strategy"]
        assert r["n_heldout"] == 12 and r["n_selection"] == 12
        assert 0 <= r["anti_steerable"] <= 1 and np.isfinite(r["effect_low"])
    by = {r["strategy"]: r for r in rows}
    assert by["probe"]["system"] and sum(r["system"] for r in rows) == 1
    assert by["random"]["n_draws"] == 3 and by["oracle"]["vs_oracle"] == 0
    assert by["iti"]["layers"] == "" and "top 2 heads" in by["iti"]["description"]
    assert sum(json.loads(by["probe-k"]["layers"]).values()) == pytest.approx(1.0)
    layers = read_parquet(steered / "layers.parquet", tables.AUTOSTEER_LAYERS).to_pylist()
    best = max((r for r in layers if r["candidate"]), key=lambda r: r["selection_effect"])["layer"]
    assert json.loads(by["oracle"]["layers"]) == {str(best): 1.0}  # the grid's best on the selection prompts
    probe_best = max((r for r in layers if r["candidate"]), key=lambda r: r["probe_effect"])["layer"]
    assert json.loads(by["probe"]["layers"]) == {str(probe_best): 1.0}
    v = read_parquet(steered / "verdicts.parquet", tables.AUTOSTEER_VERDICTS).to_pylist()[0]
    assert v["key"] == AS.VERDICT_KEY and v["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
    assert v["value"] == pytest.approx(by["probe"]["effect"] - 0.9 * by["oracle"]["effect"], rel=1e-9, abs=1e-12)
    params = json.loads((steered / "params.json").read_text())
    assert params["budget_kl"] == BUDGET and not set(params["split"]["selection"]) & set(params["split"]["heldout"])
    text = (steered / "summary.md").read_text()
    assert "autosteer_matches_oracle" in text and "Timing:" in text and (steered / "strategies.png").is_file()
    iti = read_parquet(steered / "iti_heads.parquet", tables.AUTOSTEER_ITI)
    assert iti.num_rows == 2 * 8  # every head (8 per layer) of both layers probed


def test_the_baseline_vectors_are_the_plain_ones(steered, organism):
    """The mean-diff row steers with the mean over pairs of token-mean residual differences (a plain
    computation here) at the baseline layer, at the scale the job matched: the same effect."""
    import torch

    from spectral.models.adapter import HeadAdapter
    from spectral.steering.concepts import concept_for
    from spectral.steering.injection import Injection
    from spectral.steering.measure import Evaluator
    from spectral.steering.vectors import Batch, read_residuals

    concept = concept_for("sentiment", organism, n=24)
    adapter = HeadAdapter(organism.model)
    layer = 1
    diffs = []
    for pos, neg in concept.pairs:
        a = read_residuals(adapter, Batch.of(organism.tokenizer, [pos]), [layer], "mean")[layer][0]
        b = read_residuals(adapter, Batch.of(organism.tokenizer, [neg]), [layer], "mean")[layer][0]
        diffs.append(a - b)
    v = torch.stack(diffs).mean(0)
    rows = {r["strategy"]: r for r in read_parquet(steered / "strategies.parquet", tables.AUTOSTEER_STRATEGIES).to_pylist()}
    ev = Evaluator(adapter, organism.tokenizer, concept, "sentiment")
    params = json.loads((steered / "params.json").read_text())
    held = params["split"]["heldout"]
    m = ev.measure(Injection({layer: v}, {layer: rows["mean-diff"]["scale"]}, "all"))
    assert float(np.mean(m.kl)) == pytest.approx(rows["mean-diff"]["kl"], rel=1e-4)
    assert float(np.mean(m.effect[held])) == pytest.approx(rows["mean-diff"]["effect"], rel=1e-4)


GOOD = {"name": "c", "pairs": [["I love", "I hate"]], "prompts": ["I love the apple. It is"] * 8,
        "target": [" good"], "opposite": [" bad"], "neutral": ["A dog is"] * 8}


@pytest.mark.parametrize("concept, extra, message", [
    (None, ["--kl-budget", "0"], "--kl-budget: Input should be greater than 0"),
    (None, ["--layers", "1", "--exclude-layers", "1"], "no layers left to choose from"),
    (None, ["--layers", "5"], "--layers"),
    (None, ["--system", "oracle"], "--system: the system must be an automated strategy"),
    (None, ["--strategies", "magic"], "unknown strategy 'magic'"),
    ({**GOOD, "target": [" good bad"]}, [], "target word ' good bad' is 2 tokens, not one"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(organism_cache, tmp_path, capsys, concept, extra, message):
    out = tmp_path / "out"
    args = ["autosteer", "--model", str(organism_cache), "--out", str(out), *extra]
    if concept is not None:
        path = tmp_path / "concept.json"
        path.write_text(json.dumps(concept))
        args += ["--concept", str(path)]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not transformers' loading bar
    assert len(errors) == 1 and errors[0].startswith("eigengap autosteer: error: "), errors
    assert message in errors[0]
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------- the verdict
def _runs(rng, populations, n_seeds, true_d):
    """Per seed a strategy-row pair whose D = system - 0.9 oracle is ``true_d`` plus noise: a seed-level
    shift (the organisms differ by seed) and the mean of 32 prompts' heavy-tailed differences."""
    out = []
    for pop in populations:
        for seed in range(n_seeds):
            oracle = 5.0 + rng.normal(0, 1.0)
            d = true_d + rng.normal(0, 0.3) + rng.standard_t(3, 32).mean() * 0.5
            out.append(AS.SeedRun(pop, seed, [{"strategy": "oracle", "effect": oracle, "system": False},
                                             {"strategy": "probe", "effect": 0.9 * oracle + d, "system": True}]))
    return out


@pytest.mark.parametrize("pops, sims", [(("organism-xs:sentiment", "organism-s:sentiment", "organism-m:names"), 1500),
                                        (("organism-xs:sentiment",), 5000)])
def test_the_verdict_passes_at_most_at_its_nominal_rate_at_the_boundary(pops, sims):
    """At D = 0 (the system reaches exactly 90 % of the oracle) PASS and FAIL stay within two binomial
    SEs of the nominal one-sided 0.025 (Holm over the populations and the overall row); a true
    D = 1.0 passes in most runs."""
    rng = np.random.default_rng(0)

    def rates(d, n):
        v = [r["verdict"] for _ in range(n) for r in AS.verdicts(_runs(rng, pops, 5, d))]
        return v.count("PASS") / len(v), v.count("FAIL") / len(v)

    p_pass, p_fail = rates(0.0, sims)
    rows = len(pops) + (len(pops) > 1)
    se = np.sqrt(0.025 * 0.975 / (sims * rows))
    assert p_pass <= 0.025 + 2 * se and p_fail <= 0.025 + 2 * se, (p_pass, p_fail)
    assert rates(1.0, 200)[0] >= 0.5


def test_the_overall_row_pools_the_population_means():
    from scipy import stats

    runs = [AS.SeedRun(p, s, [{"strategy": "oracle", "effect": 10.0, "system": False},
                              {"strategy": "probe", "effect": 9.0 + d, "system": True}])
            for p, ds in (("a", [0.1, 0.3, 0.2]), ("b", [1.0, 1.4, 1.2, 1.1])) for s, d in enumerate(ds)]
    rows = {r["population"]: r for r in AS.population_rows(runs)}
    assert rows["a"]["value"] == pytest.approx(0.2) and rows["b"]["value"] == pytest.approx(1.175)
    o = rows[AS.OVERALL]
    assert o["value"] == pytest.approx((0.2 + 1.175) / 2)
    se_a, se_b = np.std([0.1, 0.3, 0.2], ddof=1) / np.sqrt(3), np.std([1.0, 1.4, 1.2, 1.1], ddof=1) / 2
    se = np.sqrt(se_a ** 2 + se_b ** 2) / 2
    df = (se_a ** 2 + se_b ** 2) ** 2 / (se_a ** 4 / 2 + se_b ** 4 / 3)
    assert o["se"] == pytest.approx(se) and o["df"] == pytest.approx(df)
    assert o["p_above"] == pytest.approx(stats.t.sf(o["value"] / se, df))
    v = AS.verdict_rows(AS.population_rows(runs))
    assert [r["population"] for r in v] == ["a", "b", AS.OVERALL] and "Holm over 3 row(s)" in v[0]["correction"]


# ---------------------------------------------------------------------------- the report's section
def _row(schema, **values):
    import pyarrow as pa

    defaults = {pa.string(): "", pa.bool_(): False, pa.int64(): 0, pa.float64(): float("nan")}
    row = {f.name: defaults.get(f.type, []) for f in schema}
    row.update(values)
    return row


def test_the_report_sections_read_the_cells(tmp_path):
    """A synthetic sweep run (2 populations x 3 seeds) with predict and autosteer cells: the system
    equals the oracle on every seed (D = 0.1 x the oracle's effect > 0: PASS per population and
    overall); the first-order prediction is the measured effect plus small noise over 6 layers
    (PASS in each population), the tables, figures and page."""
    from cluster.store import write_parquet
    from jobs import report
    from tests.synthetic_runs import SIZES, finish, make_run

    run_dir = make_run(tmp_path / "run", SIZES[:2], seeds=(0, 1, 2), steer=False)
    sweep = json.loads((run_dir / "sweep.json").read_text())
    sweep["config"]["experiments"] += [{"kind": "autosteer", "params": {}}, {"kind": "predict", "params": {}}]
    (run_dir / "sweep.json").write_text(json.dumps(sweep))
    rng = np.random.default_rng(5)
    for model_dir in sorted(run_dir.glob("model=*")):
        model = json.loads((model_dir / "model.json").read_text())["model"]
        oracle = 5.0 + rng.normal(0, 0.3)
        rows = [_row(tables.AUTOSTEER_STRATEGIES, model=model, concept="sentiment", strategy=name, family=family,
                     automated=name == "probe", system=name == "probe", layers=json.dumps({"1": 1.0}), budget=BUDGET,
                     kl=BUDGET, effect=effect, vs_oracle=effect - oracle, loss_increase=0.1, steerability=1.0,
                     anti_steerable=0.0, n_heldout=32, n_selection=32, n_draws=1)
                for name, family, effect in (("oracle", "oracle", oracle), ("probe", "probe", oracle),
                                             ("caa", "baseline", 0.5 * oracle))]
        unit = model_dir / "experiment=1-autosteer"
        write_parquet(tables.from_rows(rows, tables.AUTOSTEER_STRATEGIES, "s"), unit / "strategies.parquet",
                      tables.AUTOSTEER_STRATEGIES)
        finish(unit, model, 1, "autosteer")
        measured = rng.normal(0, 1, 6)
        predicted = measured + rng.normal(0, 0.05, 6)
        layers = [_row(tables.PREDICT, layer=l, first_order_effect=float(p), measured_effect=float(m), violations=[],
                       bound_holds=True) for l, (p, m) in enumerate(zip(predicted, measured))]
        from scipy.stats import spearmanr

        rho = float(spearmanr(predicted, measured).statistic)
        stats = [_row(tables.PREDICT_VERDICTS, key="theory_predicts_steering", value=rho, low=rho, high=rho,
                      n_layers=6, n_prompts=32)]
        unit = model_dir / "experiment=2-predict"
        write_parquet(tables.from_rows(stats, tables.PREDICT_VERDICTS, "v"), unit / "predict_verdicts.parquet",
                      tables.PREDICT_VERDICTS)
        write_parquet(tables.from_rows(layers, tables.PREDICT, "p"), unit / "predict.parquet", tables.PREDICT)
        finish(unit, model, 2, "predict")
    out = tmp_path / "report"
    report.run(run_dir, out, echo=lambda *a: None, n_resamples=60, n_permutations=200, track=False)
    facts = json.loads((out / "summary.json").read_text())["verdicts"]
    assert facts["organism-xs:sentiment/autosteer/autosteer_matches_oracle"] == "PASS"
    assert facts["overall/autosteer/autosteer_matches_oracle"] == "PASS"
    assert facts["organism-xs:sentiment/actadd/predict/theory_predicts_steering"] == "PASS"
    assert "all organisms (pooled layers):sentiment/actadd/predict/theory_predicts_steering" in facts
    summary = read_parquet(out / "autosteer_strategies.parquet", tables.REPORT_AUTOSTEER_STRATEGIES).to_pylist()
    caa = next(r for r in summary if r["strategy"] == "caa" and r["population"] == "organism-s:sentiment")
    assert caa["ratio_to_oracle"] == pytest.approx(0.5) and caa["oracle_layers"] == 1.0 and caa["n_seeds"] == 3
    assert (out / "autosteer.png").stat().st_size > 0 and (out / "predict.png").stat().st_size > 0
    page = (out / "report.html").read_text()
    assert "Steering theory and automated steering" in page and "autosteer_matches_oracle" in page
