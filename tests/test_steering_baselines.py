"""Baseline steering methods (issue 18, point 3) against plain computations: the mean difference
against a loop over pairs of plain forward passes, the PCA-of-differences direction against
numpy's SVD with the sign rule, the random direction's norm and seed, the ITI probes' held-out
accuracy, direction and sigma recomputed with scikit-learn and numpy from z read by a plain
hook, and the ITI shift against a forward pass edited by hand (only the chosen heads move)."""

from dataclasses import replace
from operator import attrgetter

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from spectral.errors import UsageError
from spectral.models.adapter import HeadAdapter
from spectral.steering import baselines as B
from spectral.steering.concepts import concept_for
from spectral.steering.injection import Injection
from spectral.steering.measure import Evaluator, next_token_logprobs
from spectral.steering.strategies import match_budget
from spectral.steering.vectors import Batch, actadd, caa

N_PAIRS = 12  # of the organism's 32: enough for a 3-pair held-out split, fast on 2 busy cores


@pytest.fixture(scope="module")
def setup(organism):
    adapter = HeadAdapter(organism.model)
    concept = concept_for("sentiment", organism)
    return organism, adapter, replace(concept, pairs=concept.pairs[:N_PAIRS])


def plain_state(loaded, text, layer):
    """resid_pre of ``layer`` at the last token of one unpadded prompt, from hidden_states."""
    ids = torch.tensor([loaded.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return loaded.model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, -1]


def out_proj(adapter, layer):
    return attrgetter(adapter.family.out_proj)(adapter.attentions[layer])


def plain_z(adapter, ids, layer, mask=None):
    """Input of ``layer``'s output projection as (batch, pos, head, d_head) (``plain_zs``)."""
    return plain_zs(adapter, ids, [layer], mask)[layer]


def plain_zs(adapter, ids, layers, mask=None):
    """Inputs of ``layers``' output projections, each (batch, pos, head, d_head), by plain hooks
    registered now (inside an adapter trace they run after the adapter's edits)."""
    seen = {}
    handles = [out_proj(adapter, l).register_forward_pre_hook(
        lambda m, args, l=l: seen.__setitem__(l, args[0].clone())) for l in layers]
    try:
        with torch.no_grad():
            adapter.model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {l: seen[l].unflatten(-1, (adapter.n_heads, adapter.d_head)) for l in layers}


# ------------------------------------------------------------------ mean and PCA of differences
def test_mean_difference_is_the_loop_over_pairs_and_equals_caa(setup):
    loaded, adapter, concept = setup
    vectors = B.mean_difference_vectors(adapter, loaded.tokenizer, concept, range(adapter.n_layers))
    for layer in range(adapter.n_layers):
        total = torch.zeros(adapter.d_model)
        for pos, neg in concept.pairs:
            total += plain_state(loaded, pos, layer) - plain_state(loaded, neg, layer)
        torch.testing.assert_close(vectors[layer], total / len(concept.pairs), rtol=1e-5, atol=1e-5)
    for layer, v in caa(adapter, loaded.tokenizer, concept, range(adapter.n_layers)).items():
        torch.testing.assert_close(vectors[layer], v, rtol=0, atol=0)


def reference_pca(diffs: np.ndarray, centre: bool) -> np.ndarray:
    """numpy SVD of the (centred) differences, then the sign rule written out: more pairs with a
    positive projection; on a tie, a positive mean projection."""
    x = diffs - diffs.mean(0) if centre else diffs
    v = np.linalg.svd(x)[2][0]
    proj = diffs @ v
    votes = sum(1 if p > 0 else -1 if p < 0 else 0 for p in proj)
    if votes < 0 or (votes == 0 and proj.mean() < 0):
        v = -v
    return v


@pytest.mark.parametrize("centre", [True, False])
def test_pca_direction_is_numpys_svd_with_the_sign_rule(setup, centre):
    loaded, adapter, concept = setup
    layers = range(adapter.n_layers)
    vectors = B.pca_difference_vectors(adapter, loaded.tokenizer, concept, layers, centre=centre)
    c = B.contrast_residuals(adapter, loaded.tokenizer, concept.pairs, layers)
    for layer in layers:
        diffs = (c.positive[layer] - c.negative[layer]).double().numpy()
        expected = reference_pca(diffs, centre)
        assert float(vectors[layer].norm()) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(vectors[layer].double().numpy(), expected, atol=1e-5)
        assert (diffs @ expected > 0).sum() >= (diffs @ expected < 0).sum()  # more pairs point along it
        # swapping the classes flips the direction
        swapped = B.pca_difference(c.negative[layer], c.positive[layer], centre)
        torch.testing.assert_close(swapped, -vectors[layer], rtol=0, atol=1e-6)


def test_pca_sign_rule_on_stated_cases():
    # one pair each way: a tie of votes; the mean projection (3 - 1) / 2 > 0 picks +e1
    pos = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    neg = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(B.pca_difference(pos, neg, centre=False), torch.tensor([1.0, 0.0]))
    # three pairs: two small positive differences along e2 outvote one large negative one
    pos = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, -5.0]])
    torch.testing.assert_close(B.pca_difference(pos, torch.zeros(3, 2), centre=False), torch.tensor([0.0, 1.0]))
    # centred (repeng): differences (1, 0), (3, 0) centre to (-1, 0), (1, 0): +e1, both pairs positive
    pos = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    torch.testing.assert_close(B.pca_difference(pos, torch.zeros(2, 2)), torch.tensor([1.0, 0.0]))


def test_pca_refuses_degenerate_differences():
    with pytest.raises(UsageError, match="at least 2 contrast pairs"):
        B.pca_difference(torch.ones(1, 4), torch.zeros(1, 4))
    with pytest.raises(UsageError, match="all equal"):
        B.pca_difference(torch.ones(3, 4), torch.zeros(3, 4))
    with pytest.raises(UsageError, match="all equal"):
        B.pca_difference(torch.ones(3, 4), torch.ones(3, 4), centre=False)


# ------------------------------------------------------------------ random direction
def test_random_direction_has_the_actadd_norm_and_is_reproducible_by_seed(setup):
    loaded, adapter, concept = setup
    layers = range(adapter.n_layers)
    reference = actadd(adapter, loaded.tokenizer, concept, layers)
    a = B.random_direction_vectors(adapter, loaded.tokenizer, concept, layers, seed=3)
    b = B.random_direction_vectors(adapter, loaded.tokenizer, concept, layers, seed=3)
    c = B.random_direction_vectors(adapter, loaded.tokenizer, concept, layers, seed=4)
    for layer in layers:
        assert float(a[layer].norm()) == pytest.approx(float(reference[layer].norm()), rel=1e-6)
        torch.testing.assert_close(a[layer], b[layer], rtol=0, atol=0)
        assert abs(float(torch.nn.functional.cosine_similarity(a[layer], c[layer], dim=0))) < 0.5
        g = np.random.default_rng([3, layer]).standard_normal(adapter.d_model)
        expected = g / np.linalg.norm(g) * float(reference[layer].double().norm())
        np.testing.assert_allclose(a[layer].double().numpy(), expected, rtol=1e-6)


# ------------------------------------------------------------------ ITI
def test_split_pairs_holds_out_whole_pairs():
    train, held = B.split_pairs(12, 0.2, seed=0)
    order = np.random.default_rng(0).permutation(12)
    assert held == sorted(order[:2].tolist()) and train == sorted(order[2:].tolist())
    assert len(B.split_pairs(2, 0.9)[1]) == 1  # at least one pair left to train on
    with pytest.raises(UsageError, match="at least 2 contrast pairs"):
        B.split_pairs(1)
    with pytest.raises(UsageError, match="held-out fraction"):
        B.split_pairs(10, 1.0)


@pytest.fixture(scope="module")
def plain_pair_z(setup):
    """z at the last token of each pair's prompts, one unpadded forward pass per prompt:
    {(pair, label): {layer: (head, d_head)}}, label 1 for the positive prompt."""
    loaded, adapter, concept = setup
    z = {}
    for i, (pos, neg) in enumerate(concept.pairs):
        for label, text in ((1, pos), (0, neg)):
            ids = torch.tensor([loaded.tokenizer(text, add_special_tokens=False)["input_ids"]])
            zs = plain_zs(adapter, ids, range(adapter.n_layers))
            z[i, label] = {l: t[0, -1].double().numpy() for l, t in zs.items()}
    return z


@pytest.mark.parametrize("direction", ["mass-mean", "probe"])
def test_iti_probes_recomputed_with_sklearn_on_plainly_read_z(setup, plain_pair_z, direction):
    loaded, adapter, concept = setup
    z = plain_pair_z
    probes = B.fit_iti(adapter, loaded.tokenizer, concept, direction=direction, heldout_fraction=0.25, seed=1)
    train, held = B.split_pairs(len(concept.pairs), 0.25, seed=1)
    assert (probes.train_pairs, probes.heldout_pairs) == (tuple(train), tuple(held)) and len(held) == 3
    assert [(p.layer, p.head) for p in probes.probes] == [(l, h) for l in range(adapter.n_layers)
                                                          for h in range(adapter.n_heads)]
    for p in probes.probes:
        def data(idx):
            x = np.array([z[i, label][p.layer][p.head] for label in (1, 0) for i in idx])
            return x, np.array([label for label in (1, 0) for _ in idx])
        x_tr, y_tr = data(train)
        x_out, y_out = data(held)
        probe = LogisticRegression(max_iter=1000, random_state=1).fit(x_tr, y_tr)
        assert p.heldout_accuracy == pytest.approx(np.mean(probe.predict(x_out) == y_out), abs=1e-12)
        assert p.train_accuracy == pytest.approx(np.mean(probe.predict(x_tr) == y_tr), abs=1e-12)
        p1 = probe.predict_proba(x_out)[:, list(probe.classes_).index(1)]
        nll = -np.mean(y_out * np.log(p1) + (1 - y_out) * np.log(1 - p1))
        assert p.heldout_log_loss == pytest.approx(nll, rel=1e-4)  # z read batched vs one by one (float32)
        d = probe.coef_[0] if direction == "probe" else x_tr[:len(train)].mean(0) - x_tr[len(train):].mean(0)
        d = d / np.linalg.norm(d)
        np.testing.assert_allclose(p.direction.double().numpy(), d, atol=2e-4)
        proj = x_tr @ d
        assert p.sigma == pytest.approx(np.sqrt(np.mean((proj - proj.mean()) ** 2)), rel=1e-3)
    # top-K: held-out accuracy descending, ties by held-out log loss, training accuracy, (layer, head)
    ranked = sorted(probes.probes, key=lambda p: (-p.heldout_accuracy, p.heldout_log_loss, -p.train_accuracy,
                                                  p.layer, p.head))
    assert probes.top(3) == ranked[:3]
    with pytest.raises(UsageError, match="top-K heads must be 1..16"):
        probes.top(17)


def test_iti_shift_is_alpha_sigma_direction_on_the_chosen_heads_only(setup):
    loaded, adapter, concept = setup
    probes = B.fit_iti(adapter, loaded.tokenizer, concept, heldout_fraction=0.25)
    alpha, k = 2.5, 3
    injection = probes.injection(k, alpha)
    chosen = {(p.layer, p.head): alpha * p.sigma * p.direction for p in probes.top(k)}
    assert set(injection.shifts) == set(chosen)
    batch = Batch.of(loaded.tokenizer, list(concept.prompts[:4]))
    layers = range(adapter.n_layers)
    base_all = plain_zs(adapter, batch.ids, layers, batch.mask)
    with adapter.trace([], edits=injection.edits(batch.last)):
        steered_all = plain_zs(adapter, batch.ids, layers, batch.mask)
    for layer in layers:
        base, steered = base_all[layer], steered_all[layer]
        upstream = any(l < layer for l, _ in chosen)
        for head in range(adapter.n_heads):
            if (layer, head) in chosen:
                if not upstream:
                    torch.testing.assert_close(steered[:, :, head], base[:, :, head] + chosen[layer, head],
                                               rtol=1e-5, atol=1e-5)
            elif not upstream:
                torch.testing.assert_close(steered[:, :, head], base[:, :, head], rtol=0, atol=0)
    # the adapter's own read of the edited layer's result site sees its input, unchanged
    first = min(l for l, _ in chosen)
    seen = {}
    with adapter.trace(["result"], lambda l, s, t: seen.__setitem__(l, t.clone()), layers=[first],
                       edits=injection.edits(batch.last)):
        with torch.no_grad():
            adapter.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    torch.testing.assert_close(seen[first], plain_z(adapter, batch.ids, first, batch.mask), rtol=0, atol=0)
    # the logits equal a forward pass with the shift added by hand at the output projections
    handles = []
    for layer in {l for l, _ in chosen}:
        def hand(m, args, layer=layer):
            z = args[0].unflatten(-1, (adapter.n_heads, adapter.d_head)).clone()
            for (l, h), s in chosen.items():
                if l == layer:
                    z[:, :, h] += s
            return (z.flatten(-2), *args[1:])
        handles.append(out_proj(adapter, layer).register_forward_pre_hook(hand))
    try:
        by_hand = next_token_logprobs(adapter, batch)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(next_token_logprobs(adapter, batch, injection), by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(next_token_logprobs(adapter, batch, injection.scaled(0.0)),
                               next_token_logprobs(adapter, batch), rtol=0, atol=0)


def test_iti_last_position_shifts_only_each_prompts_last_token(tiny):
    adapter = HeadAdapter(tiny.model)
    batch = Batch.of(tiny.tokenizer, ["When Mary and John went", "The quick brown fox jumps over"])
    shift = torch.randn(adapter.d_head, generator=torch.Generator().manual_seed(0))
    injection = B.HeadInjection({(1, 2): shift}, 1.5, positions="last")
    base = plain_z(adapter, batch.ids, 1, batch.mask)
    with adapter.trace([], edits=injection.edits(batch.last)):
        steered = plain_z(adapter, batch.ids, 1, batch.mask)
    expected = base.clone()
    for row, last in enumerate(batch.last.tolist()):
        expected[row, last, 2] += 1.5 * shift
    torch.testing.assert_close(steered, expected, rtol=1e-6, atol=1e-6)


def test_baselines_match_a_kl_budget(setup):
    loaded, adapter, concept = setup
    small = replace(concept, prompts=concept.prompts[:8], neutral=concept.neutral[:8], heldout=())
    ev = Evaluator(adapter, loaded.tokenizer, small, "sentiment")
    budget, layer = 0.1, adapter.n_layers - 1
    pca = B.pca_difference_vectors(adapter, loaded.tokenizer, concept, [layer])
    _, kl = match_budget(lambda s: ev.kl(Injection(pca, {layer: s})), budget)
    assert abs(kl - budget) <= 0.02 * budget
    heads = B.fit_iti(adapter, loaded.tokenizer, concept).injection(2)
    _, kl = match_budget(lambda s: ev.kl(heads.scaled(s)), budget)
    assert abs(kl - budget) <= 0.02 * budget


def test_iti_bad_input_is_one_usage_error(setup):
    loaded, adapter, concept = setup
    with pytest.raises(UsageError, match="ITI direction: expected one of mass-mean, probe"):
        B.fit_iti(adapter, loaded.tokenizer, concept, direction="mean")
    with pytest.raises(UsageError, match="layer 9 out of range"):
        B.fit_iti(adapter, loaded.tokenizer, concept, layers=[9])
    with pytest.raises(UsageError, match="not finite"):
        B.HeadInjection({}, float("nan"))
