"""The differentiable gap of issue 20: equal to the scan's gap on the same keys, its gradient equal
to finite differences, and the penalty's hinge."""

import math

import numpy as np
import pytest
import torch

from spectral.errors import UsageError
from spectral.kernels.key import KeyStats, key_kernel_spectra
from spectral.training.penalties import gap_penalty, key_gap


def test_key_gap_is_the_scans_gap():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 11, 16, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, 16, dtype=torch.float64)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 7:] = False
    stats = KeyStats.zeros(1, 1, 16)
    stats.update(0, keys[:, :, None, :], mask)  # (batch, pos, head, d_head)
    expected = key_kernel_spectra(stats).metrics["gap"][0, 0]
    assert float(key_gap(keys, mask)) == pytest.approx(expected, rel=1e-10)


def test_the_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    keys = (torch.randn(20, 8, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3.0, 8, dtype=torch.float64))
    keys.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda k: key_gap(k), (keys,), eps=1e-6, atol=1e-7, rtol=1e-5)
    # a gradient step on the penalty moves the gap the requested way
    for direction, sign in (("up", 1), ("down", -1)):
        k = keys.detach().clone().requires_grad_(True)
        before = float(key_gap(k))
        target = before + 0.2 * sign
        loss = gap_penalty(key_gap(k), target, direction)
        loss.backward()
        with torch.no_grad():
            after = float(key_gap(k - 0.05 * k.grad))
        assert (after - before) * sign > 0, (direction, before, after)


def test_the_penalty_is_a_one_sided_squared_hinge():
    gap = torch.tensor([0.2, 0.5, 0.9])
    assert gap_penalty(gap, 0.5, "up").tolist() == pytest.approx([0.09, 0.0, 0.0])
    assert gap_penalty(gap, 0.5, "down").tolist() == pytest.approx([0.0, 0.0, 0.16])
    for target in (0.0, 1.0, 1.5):
        with pytest.raises(UsageError, match="target gap must lie in"):
            gap_penalty(gap, target, "up")
    with pytest.raises(UsageError, match="'up' or 'down'"):
        gap_penalty(gap, 0.5, "sideways")
    with pytest.raises(UsageError, match="at least 2 keys"):
        key_gap(torch.randn(1, 4))
    assert np.isfinite(float(key_gap(torch.randn(5, 4))))


# ---------------------------------------------------------------------------- training arms
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from analysis import regularize as R  # noqa: E402
from spectral.organisms.suite import arm_spec, entry_name, recipe_of  # noqa: E402
from spectral.organisms.train import model_config, train  # noqa: E402
from spectral.organisms.vocab import word_tokenizer  # noqa: E402
from spectral.training.regularizer import (  # noqa: E402
    Regularizer, SigmaReparamQK, attention_probs, capture, normalized_entropy)
from spectral.training.arms import ARMS, parse_heads, resolve  # noqa: E402


def _fresh_model(seed: int = 2):
    from transformers import GPTNeoXForCausalLM

    recipe = recipe_of("organism-xs", seed)
    tok = word_tokenizer("")
    torch.manual_seed(recipe.seed)
    return GPTNeoXForCausalLM(model_config(recipe, 8 * -(-len(tok) // 8), tok)), tok


def _padded(vocab: int, width: int, seed: int, ends: tuple[int, ...]):
    """Random ids (one row per entry of ``ends``) and a right-padding mask: row i real up to ends[i]."""
    ids = torch.randint(0, vocab, (len(ends), width), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(width)[None, :] < torch.tensor(ends)[:, None]).long()
    return ids, mask


def test_sigma_reparam_starts_from_the_baseline_forward_pass():
    model, tok = _fresh_model()
    ids = torch.randint(0, len(tok), (4, 20), generator=torch.Generator().manual_seed(0))
    model.train()  # the training forward pass: one power iteration per call
    with torch.no_grad():
        base = model(input_ids=ids).logits
        reg = Regularizer(model, arm_spec("organism-xs", "sigma-reparam"))
        first = model(input_ids=ids).logits
    assert float((first - base).abs().max()) < 1e-6
    assert parametrize.is_parametrized(model.gpt_neox.layers[0].attention.query_key_value, "weight")
    gammas = reg.no_decay()
    assert len(gammas) == 2 * 2 and all(p.requires_grad for p in gammas)  # q and k of each of 2 layers
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad) for p in gammas)
    reg.finish()
    assert not parametrize.is_parametrized(model.gpt_neox.layers[0].attention.query_key_value)
    with torch.no_grad():
        assert float((model(input_ids=ids).logits - first).abs().max()) < 1e-5


def test_sigma_reparam_against_a_plain_spectral_norm():
    """With gamma 1, the power iteration converges to the exact spectral norm: the q and k blocks of
    the parametrized weight then have spectral norm 1 and the v block is untouched."""
    g = torch.Generator().manual_seed(3)
    heads, d_head, d_model = 4, 8, 32
    w = torch.randn(3 * heads * d_head, d_model, generator=g, dtype=torch.float64)
    p = SigmaReparamQK(w, heads, d_head).double()
    with torch.no_grad():
        p.gamma_q.fill_(1.0)
        p.gamma_k.fill_(1.0)
        p.u_q.copy_(torch.randn(heads * d_head, generator=g, dtype=torch.float64))  # start away from the answer
        p.u_k.copy_(torch.randn(heads * d_head, generator=g, dtype=torch.float64))
        p.train()
        for _ in range(200):
            out = p(w)
    blocks = out.view(heads, 3, d_head, d_model)
    plain = w.view(heads, 3, d_head, d_model)
    for i in (0, 1):
        m = blocks[:, i].reshape(-1, d_model)
        assert float(torch.linalg.matrix_norm(m, ord=2)) == pytest.approx(1.0, abs=1e-8)
        ref = plain[:, i].reshape(-1, d_model)
        assert torch.allclose(m, ref / torch.linalg.matrix_norm(ref, ord=2), atol=1e-10)
    assert torch.equal(blocks[:, 2], plain[:, 2])


def test_normalized_entropy_against_a_plain_loop():
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    scores = torch.randn(2, 5, 5, generator=g).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    values = []
    for b in range(2):
        for q in range(5):
            n = int(mask[b, :q + 1].sum())
            if mask[b, q] and n >= 2:
                p = probs[b, q, :q + 1][mask[b, :q + 1]]
                values.append(float(-(p * p.log()).sum()) / math.log(n))
    assert float(normalized_entropy(probs, mask)) == pytest.approx(float(np.mean(values)), rel=1e-6)


def test_the_arms_hooks_see_what_the_scans_adapter_sees():
    """Keys and attention probabilities read by the training arms' own hooks (this package sits below
    spectral.models) equal HeadAdapter's keys_raw and probs, padding included."""
    from spectral.models.adapter import HeadAdapter

    model, tok = _fresh_model(3)
    model.eval()
    ids, mask = _padded(len(tok), 12, seed=1, ends=(12, 9, 5))
    adapter = HeadAdapter(model)
    want: dict = {}
    with torch.no_grad(), adapter.trace(["keys_raw", "probs"], lambda l, s, t: want.__setitem__((l, s), t),
                                        attention_mask=mask):
        model(input_ids=ids, attention_mask=mask)
    attns = [layer.attention for layer in model.gpt_neox.layers]
    with torch.no_grad(), capture(attns, (0, 1), adapter.n_heads, adapter.d_head) as seen:
        model(input_ids=ids, attention_mask=mask)
    for l in (0, 1):
        q, k, cos_sin = seen[l]
        assert torch.equal(k, want[(l, "keys_raw")])
        probs = attention_probs(q, k, cos_sin, attns[l].scaling, mask.bool())
        assert torch.allclose(probs, want[(l, "probs")], atol=1e-6)


def _plain_probs(q, k, cos_sin, scaling, mask):
    """The attention probabilities as the entropy arm first computed them (every op spelled out)."""
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    q, k = apply_rotary_pos_emb(q, k, *cos_sin, unsqueeze_dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scaling
    t = q.shape[1]
    blocked = torch.ones(t, t, dtype=torch.bool).triu(1)[None, None] | ~mask[:, None, None, :]
    return torch.softmax(scores.float().masked_fill(blocked, float("-inf")), dim=-1).nan_to_num(0.0)


def _plain_entropy(probs, mask):
    """One head's normalised entropy as the entropy arm first computed it."""
    p = probs.float()
    h = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
    visible = torch.cumsum(mask.long(), dim=1)
    ok = mask & (visible >= 2)
    return (h[ok] / torch.log(visible[ok].float())).mean()


def test_the_arms_losses_equal_the_per_head_reference_bit_for_bit():
    """The arms read each layer's keys / attention once and slice heads after, skip the no-op NaN
    clean-up and negate after the sum (fast); the loss and every gradient equal the plain per-head
    computation as the arms first did it (each head sliced first) exactly, so the arms train the
    same bits as before."""
    model, tok = _fresh_model(4)
    model.train()
    ids, mask = _padded(len(tok), 16, seed=2, ends=(16, 11, 16, 6))
    labels = ids.masked_fill(mask == 0, -100)
    attns = [layer.attention for layer in model.gpt_neox.layers]
    for arm in ("gap-penalty", "controlled-instability", "entropy"):
        spec = arm_spec("organism-xs", arm)
        reg = Regularizer(model, spec)
        model.zero_grad()
        loss, extra = reg.forward(ids, mask, labels)
        (loss + extra).backward()
        fast = extra.detach().clone(), [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        with capture(attns, spec.layers, reg.n_heads, reg.d_head) as seen:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        m = mask.bool()
        if arm == "entropy":
            probs = {l: _plain_probs(*seen[l], attns[l].scaling, m) for l in seen}
            plain = spec.weight * -torch.stack([_plain_entropy(probs[l][:, h], m) for l, h in spec.heads]).mean()
        else:
            gaps = [key_gap(seen[l][1][:, :, h], m) for l, h in spec.heads]
            plain = spec.weight * torch.stack([gap_penalty(g, spec.target, spec.direction) for g in gaps]).mean()
        plain = plain.to(loss.dtype)
        (loss + plain).backward()
        assert torch.equal(fast[0], plain.detach()), arm
        assert all(torch.equal(a, p.grad) for a, p in zip(fast[1], model.parameters())), arm


def test_the_training_set_is_built_once_per_seed():
    """A process training several arms of one seed builds their common training set once; it is
    the same set a fresh build gives, and another seed gets its own."""
    from spectral.organisms.train import _build_training_data, training_data

    tok = word_tokenizer("")
    a = recipe_of("organism-xs", 1, steps=6)
    arm = recipe_of("organism-xs", 1, arm=arm_spec("organism-xs", "entropy"), steps=6)
    first = training_data(a, tok)
    assert training_data(arm, tok) is first
    fresh = _build_training_data(a, tok)
    assert all(torch.equal(x, y) for x, y in zip(first.tensors, fresh.tensors))
    other = training_data(recipe_of("organism-xs", 2, steps=6), tok)
    assert other is not first and not torch.equal(other.tensors[0], first.tensors[0])


def _gap_of(path: Path, heads) -> float:
    from spectral.dynamics.training import key_scan, organism_probe_prompts
    from spectral.kernels.scan import ScanSettings
    from spectral.models.loading import load_model

    scan = key_scan(load_model(str(path)), organism_probe_prompts(24), ScanSettings(), "m").to_pylist()
    return float(np.mean([r["gap"] for r in scan if (r["layer"], r["head"]) in set(heads)]))


def test_a_short_run_moves_the_targeted_heads_gap_the_requested_way(tmp_path):
    """40 steps from seed 5: the gap penalty pushes its heads' gaps the way it is told, measured by the
    scan on held-out prompts against the baseline trained from the same seed."""
    base = tmp_path / "baseline"
    train(recipe_of("organism-xs", 5, steps=40), base, progress=False)
    for arm, options, sign in (("controlled-instability", {"heads": "1.0,1.1"}, -1),
                               ("gap-penalty", {"heads": "1.2,1.3", "target": 0.99}, 1)):
        spec = arm_spec("organism-xs", arm, **options)
        out = tmp_path / arm
        report = train(recipe_of("organism-xs", 5, arm=spec, steps=40), out, progress=False)
        assert report["arm"] == spec.describe() and np.isfinite(report["final_arm_loss"])
        moved = _gap_of(out, spec.heads) - _gap_of(base, spec.heads)
        assert moved * sign > 0.05, (arm, moved)


def test_arms_are_deterministic_for_a_seed(tmp_path):
    for arm in ("sigma-reparam", "entropy", "controlled-instability"):
        recipe = recipe_of("organism-xs", 1, arm=arm_spec("organism-xs", arm), steps=8)
        a, b = tmp_path / f"{arm}-a", tmp_path / f"{arm}-b"
        train(recipe, a, progress=False)
        train(recipe, b, progress=False)
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), arm
        assert not any("parametrizations" in k or "gamma" in k for k in wa)  # a plain GPT-NeoX checkpoint


def test_arm_options_and_cache_entries():
    assert resolve("baseline", 2, 8) is None
    ci = resolve("controlled-instability", 2, 8)
    assert ci.heads == ((1, 0), (1, 1), (1, 2), (1, 3)) and ci.target == 0.5 and ci.direction == "down"
    assert parse_heads("0.*,1.3", 2, 8) == tuple((0, h) for h in range(8)) + ((1, 3),)
    assert entry_name(recipe_of("organism-xs", 2, arm=ci)) == "organism-xs-seed2-controlled-instability"
    other = resolve("controlled-instability", 2, 8, heads="0.1")
    assert entry_name(recipe_of("organism-xs", 0, arm=other)) == f"organism-xs-controlled-instability-{other.digest()}"
    assert entry_name(recipe_of("organism-xs", 0, steps=40)) == "organism-xs-steps40"
    assert recipe_of("organism-xs").as_dict() == recipe_of("organism-xs", arm=None).as_dict()
    assert "arm" not in recipe_of("organism-xs").as_dict()  # the suite's cached organisms keep matching
    assert set(ARMS) == {"baseline", "sigma-reparam", "gap-penalty", "entropy", "controlled-instability"}


@pytest.mark.parametrize("args, message", [
    (["regularize", "--arms", "baseline,dropout"], "unknown arm 'dropout'"),
    (["regularize", "--unstable-heads", "2.0"], "layer 2 is out of range"),
    (["regularize", "--unstable-heads", "1.8"], "head 8 is out of range"),
    (["regularize", "--gap-target", "1.0"], "the target gap must lie in (0, 1)"),
    (["regularize", "--unstable-target", "0"], "the target gap must lie in (0, 1)"),
    (["organisms", "train", "organism-xs", "--arm", "dropout"], "unknown arm 'dropout'"),
    (["organisms", "train", "organism-xs", "--arm", "gap-penalty", "--arm-heads", "3.1"], "layer 3 is out of range"),
    (["organisms", "train", "organism-xs", "--arm", "gap-penalty", "--arm-target", "-0.2"], "must lie in (0, 1)"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    out = tmp_path / "out"
    full = [*args, "--out", str(out)] if args[0] == "regularize" else args
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *full], capture_output=True, text=True,
                          env={**__import__("os").environ, "EIGENGAP_CACHE": str(tmp_path / "cache")})
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------- the analysis
def _run(arm, seed, gaps, model=None, effects=(1.0, 2.0), restoration=None, direction="down", targeted=((1, 0),)):
    heads = [{"layer": l, "head": h, "gap": g, "restoration": (restoration or {}).get((l, h), 0.1 * (l * 2 + h))}
             for (l, h), g in gaps.items()]
    layers = [{"layer": l, "effect": e} for l, e in enumerate(effects)]
    m = {k: 0.0 for k in R.MODEL_MEASURES} | (model or {})
    return R.ArmRun("organism-xs", arm, seed, direction if arm != "baseline" else "",
                    targeted if arm != "baseline" else (), m, heads, layers)


def test_contrasts_and_verdicts_on_a_known_answer():
    heads = [(0, 0), (0, 1), (1, 0), (1, 1)]
    runs = []
    for seed, (shift, gain) in enumerate(((0.30, 0.01), (0.40, 0.03), (0.35, 0.02))):
        runs.append(_run("baseline", seed, dict(zip(heads, (0.9, 0.8, 0.9, 0.7))), {"few_shot_gain_1": 0.5},
                         effects=(1.0, 2.0)))
        runs.append(_run("controlled-instability", seed, dict(zip(heads, (0.9, 0.8, 0.9 - shift, 0.7))),
                         {"few_shot_gain_1": 0.5 + gain}, effects=(1.0, 2.0 + 10 * gain)))
    contrasts = {c["measure"]: c for c in R.contrast_rows(runs)}
    assert contrasts["gap_targeted"]["value"] == pytest.approx(-0.35)
    se = np.std([-0.30, -0.40, -0.35], ddof=1) / math.sqrt(3)
    assert contrasts["gap_targeted"]["high"] == pytest.approx(-0.35 + 4.302652729911275 * se)
    assert contrasts["gap_rest"]["value"] == pytest.approx(0.0)
    assert contrasts["fraction_unstable"]["value"] == pytest.approx(np.mean([0.25, 0.25, 0.25]))  # 0.9-s <= 0.77 each
    assert contrasts["steer_effect_layer_1"]["value"] == pytest.approx(0.2)
    verdicts = {(v["key"], v["layer"]): v for v in R.verdict_rows(runs)}
    assert verdicts[(R.MANIPULATION, -1)]["value"] == pytest.approx(0.35)  # pushed down: D = -(arm - baseline)
    assert verdicts[(R.MANIPULATION, -1)]["verdict"] == "PASS"
    assert verdicts[(R.FEW_SHOT, -1)]["value"] == pytest.approx(0.02)
    assert verdicts[(R.STEERABLE, 1)]["value"] == pytest.approx(0.2)
    assert (R.STEERABLE, 0) not in verdicts  # only layers holding targeted heads
    assert all(v["p_pass_holm"] == pytest.approx(v["p_pass"]) for v in verdicts.values())  # one row per family


def test_importance_rank_of_the_targeted_heads():
    heads = {(0, 0): 0.9, (0, 1): 0.9, (1, 0): 0.9, (1, 1): 0.9}
    run = _run("controlled-instability", 0, heads, restoration={(0, 0): 0.5, (0, 1): 0.1, (1, 0): 0.9, (1, 1): 0.0},
               targeted=((1, 0), (1, 1)))
    s = R.head_summary(run, run.targeted)
    assert s["importance_rank_targeted"] == pytest.approx((1 + 4) / 2)
    assert s["restoration_targeted"] == pytest.approx(0.45)
    every = R.head_summary(run, ())
    assert np.isnan(every["importance_rank_targeted"])  # every head chosen: the mean rank says nothing


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_null_simulation_the_verdicts_pass_at_most_at_their_nominal_level(n_seeds):
    """Arm and baseline drawn from the same distribution (a seed-level shift of the gaps shared by
    both, as seeds are): in every family the rate of simulations with any PASS (or any FAIL) stays
    within 2 binomial SEs of the nominal 2.5 % (Holm across the family's rows: two gap arms, up to
    four (arm, layer) rows)."""
    rng = np.random.default_rng(11)
    n_sim = 1500
    heads = [(l, h) for l in range(2) for h in range(4)]
    counts = {k: {"PASS": 0, "FAIL": 0, "rows": 0} for k in R.VERDICT_KEYS}
    for _ in range(n_sim):
        runs = []
        for seed in range(n_seeds):
            level = rng.normal(0.85, 0.05)
            for arm, targeted, direction in (("baseline", (), ""), ("controlled-instability", ((0, 0), (1, 0)), "down"),
                                             ("gap-penalty", tuple(heads), "down")):
                gaps = {h: float(np.clip(level + rng.normal(0, 0.05), 0, 1)) for h in heads}
                model = {"few_shot_gain_1": 0.9 + rng.normal(0, 0.02)}
                effects = tuple(2.0 + rng.normal(0, 0.5, 2))
                r = _run(arm, seed, gaps, model, effects, direction=direction, targeted=targeted)
                runs.append(r)
        verdicts = R.verdict_rows(runs)
        for key, c in counts.items():  # family-wise: a simulation counts once when any row of the family says so
            mine = [v["verdict"] for v in verdicts if v["key"] == key]
            c["rows"] += len(mine)
            for word in ("PASS", "FAIL"):
                c[word] += word in mine
    for key, c in counts.items():
        assert c["rows"] > 0
        bound = 0.025 + 2 * math.sqrt(0.025 * 0.975 / n_sim)
        assert c["PASS"] / n_sim <= bound, (key, c)
        assert c["FAIL"] / n_sim <= bound, (key, c)


# ---------------------------------------------------------------------------- the job, end to end
def test_seeds_trained_at_mixed_thread_counts_are_named():
    from jobs.regularize import mixed_threads

    def part(seed, arm, threads):
        return {"seed": seed, "arm": arm, "training": {} if threads is None else {"train_threads": threads}}

    parts = [part(0, "baseline", 2), part(0, "entropy", 1), part(1, "baseline", 1), part(1, "entropy", 1),
             part(2, "baseline", None), part(2, "entropy", 2)]
    assert mixed_threads(parts) == {0: {"baseline": 2, "entropy": 1}}


def test_regularize_job_pilot_resumes_and_reports(organism_cache, tmp_path):
    """A 30-step pilot of three arms on two seeds: the tables, the contrasts recomputed by hand from the
    heads table, a rerun that reuses every model's measurements, and the report's section."""
    from jobs.cli import main

    out = tmp_path / "run"
    args = ["regularize", "--organism", "xs", "--seeds", "0,1", "--steps", "30", "--arms",
            "baseline,controlled-instability,sigma-reparam", "--n-prompts", "16", "--n-sequences", "32",
            "--n-ioi", "16", "--n-steer", "16", "--out", str(out)]
    assert main(args) == 0
    models = pq.read_table(out / "regularize_models.parquet").to_pylist()
    assert sorted((m["arm"], m["seed"]) for m in models) == sorted(
        (a, s) for a in ("baseline", "controlled-instability", "sigma-reparam") for s in (0, 1))
    assert {m["entry"] for m in models if m["arm"] == "controlled-instability"} == {
        "organism-xs-steps30-controlled-instability", "organism-xs-seed1-steps30-controlled-instability"}
    from spectral.organisms.suite import cache_root

    for m in models:  # each part keeps the thread count its model was trained with (its cache entry's)
        report = json.loads((cache_root() / m["entry"] / "recipe.json").read_text())["training"]
        part = json.loads((out / "parts" / f"{m['entry']}.json").read_text())
        assert part["training"]["train_threads"] == report["environment"]["threads"] >= 1
    heads = pq.read_table(out / "regularize_heads.parquet").to_pylist()
    assert len(heads) == 6 * 16 and {h["head"] for h in heads if h["targeted"]} == {0, 1, 2, 3}
    # the contrast of the targeted heads' gap, by hand from the heads table
    def mean_gap(arm, seed):
        return np.mean([h["gap"] for h in heads if h["arm"] == arm and h["seed"] == seed and h["layer"] == 1
                        and h["head"] < 4])
    d = [mean_gap("controlled-instability", s) - mean_gap("baseline", s) for s in (0, 1)]
    contrasts = {(c["arm"], c["measure"]): c for c in pq.read_table(out / "regularize_contrasts.parquet").to_pylist()}
    assert contrasts[("controlled-instability", "gap_targeted")]["value"] == pytest.approx(np.mean(d))
    assert d[0] < 0 and d[1] < 0  # held down, even in 30 steps
    verdicts = pq.read_table(out / "regularize_verdicts.parquet").to_pylist()
    assert {v["key"] for v in verdicts} == set(R.VERDICT_KEYS)
    assert all(v["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE") and v["rule"] for v in verdicts)
    layers = pq.read_table(out / "regularize_layers.parquet").to_pylist()
    assert len(layers) == 6 * 2 and all(np.isfinite(r["effect"]) or r["note"] for r in layers)
    assert (out / "regularize_gaps.png").is_file() and "## Verdicts" in (out / "summary.md").read_text()
    params = json.loads((out / "params.json").read_text())
    assert params["seeds"] == [0, 1]

    # a second run reuses every part and gives the same verdicts
    lines = []
    from jobs.config import validate
    from jobs.regularize import RegularizeConfig, run

    config = validate(RegularizeConfig, {"organism": "xs", "seeds": "0,1", "steps": 30, "out": out, "force": True,
                                         "arms": "baseline,controlled-instability,sigma-reparam", "n_prompts": 16,
                                         "n_sequences": 32, "n_ioi": 16, "n_steer": 16})
    run(config, echo=lines.append)
    assert sum("measurements reused" in str(x) for x in lines) == 6
    again = pq.read_table(out / "regularize_verdicts.parquet").to_pylist()
    assert [v["value"] for v in again] == pytest.approx([v["value"] for v in verdicts], nan_ok=True)

    # the report's section reads the cell
    from types import SimpleNamespace

    from jobs.regularize_section import analyse
    from jobs.report import load_cell

    data = SimpleNamespace(cells=[(SimpleNamespace(kind="regularize", model="organism-xs"), out)])
    section = analyse(data, load_cell)
    assert [v["value"] for v in section.verdicts] == pytest.approx([v["value"] for v in verdicts], nan_ok=True)
    assert len(section.models) == 6
