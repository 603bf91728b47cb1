"""The first-order steering predictions (spectral.theory.first_order, docs/THEORY.md) against
central finite differences of the real model, the KL at alpha* against the measured KL, the
Fisher-metric bound on every case, and the closed forms against plain computations."""

import numpy as np
import pytest
import torch

from spectral.errors import UsageError
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import load_model
from spectral.steering.concepts import concept_for, concept_from_dict, single_token_ids
from spectral.steering.injection import Injection
from spectral.steering.measure import kl_per_prompt, next_token_logprobs, set_score
from spectral.steering.vectors import Batch, read_residuals, steering_vectors
import spectral.theory.first_order as first_order_module
from spectral.theory.first_order import (attention_summary, first_order, first_order_layers, fisher_dual_norm,
                                         fisher_quadratic, linear_tangents, linearize, score_gradient)
from tests.conftest import TINY

# byte tokenizer: every character is one token
CONCEPT = concept_from_dict({
    "name": "letters", "pairs": [["good day", "bad night"], ["I like it", "I hate them"]],
    "prompts": ["When Mary and John went", "The quick brown fox", "It was a", "Eigen"],
    "target": ["a", "e", "i"], "opposite": ["o", "u", "y"],
    "neutral": ["The capital of France is", "Water boils at", "A triangle has three"],
})
STEP = 1e-3  # finite-difference step for a vector of the residual stream's typical norm (float64)
BUDGETS = (1e-7, 1e-6)  # small KL budgets (nats): the organism leaves the linear regime above ~1e-5
LARGE = 0.25  # the steer job's default budget: the bound is checked at alpha*(LARGE) too


@pytest.fixture(scope="module", params=sorted(TINY))
def random64(request):
    """Each family's tiny random model in float64 (finite differences need the precision)."""
    return load_model(TINY[request.param], dtype=torch.float64)


@pytest.fixture(scope="module")
def organism64(organism_cache):
    return load_model(str(organism_cache), dtype=torch.float64)


def scaled_vectors(adapter, tokenizer, concept, layers):
    """CAA vectors rescaled to the mean norm of the residual stream they are added to."""
    vectors = steering_vectors(adapter, tokenizer, concept.pairs, layers)
    batch = Batch.of(tokenizer, concept.prompts)
    norms = {}
    with torch.no_grad(), adapter.trace(["resid_pre"], lambda l, s, t: norms.__setitem__(l, t.norm(dim=-1).mean()),
                                        layers=layers):
        adapter.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
    assert all(vectors[l].norm() > 0 for l in layers)
    return {l: vectors[l] / vectors[l].norm() * norms[l] for l in layers}


def logprobs64(adapter, batch, injection=None):
    """next_token_logprobs in float64 (it rounds to float32, too coarse for KL ~ 1e-8)."""
    edits = injection.edits(batch.last) if injection is not None else {}
    with torch.no_grad(), adapter.trace([], edits=edits):
        logits = adapter.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
    return torch.log_softmax(logits[torch.arange(len(batch.last)), batch.last].double(), -1)


class Measured:
    """The real model's response to ``alpha * vector`` at ``layer``, one forward pass per alpha
    over the evaluation and neutral prompts together (float64; the unsteered pass made once)."""

    def __init__(self, adapter, tokenizer, concept, layer, vector, positions="all"):
        self.adapter, self.layer, self.vector, self.n = adapter, layer, vector, len(concept.prompts)
        self.positions = positions
        self.target = single_token_ids(tokenizer, concept.target, "target", "t")
        self.opposite = single_token_ids(tokenizer, concept.opposite, "opposite", "t")
        self.batch = Batch.of(tokenizer, concept.prompts + concept.neutral)
        self.base = logprobs64(adapter, self.batch)

    def __call__(self, alpha):
        """Per evaluation prompt: score change and own KL; per neutral prompt: KL."""
        injection = Injection({self.layer: self.vector}, {self.layer: alpha}, self.positions)
        steered = logprobs64(self.adapter, self.batch, injection)
        n = self.n
        effect = set_score(steered[:n], self.target, self.opposite) - set_score(self.base[:n], self.target, self.opposite)
        kl = kl_per_prompt(self.base, steered).numpy()
        return effect.numpy(), kl[:n], kl[n:]


def check_model(loaded, concept, layers):
    adapter = HeadAdapter(loaded.model)
    before = loaded.model.config._attn_implementation
    vectors = scaled_vectors(adapter, loaded.tokenizer, concept, layers)
    prompts = Batch.of(loaded.tokenizer, concept.prompts)  # the float64 reference is the steering measure
    torch.testing.assert_close(logprobs64(adapter, prompts).float(), next_token_logprobs(adapter, prompts))
    last = read_residuals(adapter, Batch.of(loaded.tokenizer, concept.prompts + concept.neutral), layers)
    for layer in layers:
        pred = first_order(adapter, loaded.tokenizer, concept, layer, vectors[layer])
        assert loaded.model.config._attn_implementation == before  # eager only inside the call
        measured = Measured(adapter, loaded.tokenizer, concept, layer, vectors[layer])
        # (a) the effect slope is the derivative of the real model's set score (central differences)
        fd = (measured(STEP)[0] - measured(-STEP)[0]) / (2 * STEP)
        np.testing.assert_allclose(pred.slope, fd, rtol=0.05, atol=0.05 * np.abs(fd).max())
        assert np.abs(pred.slope).max() > 1e-3  # the vector moves the score (the check is not vacuous)
        # (b) first-order KL at a small step, and the KL at alpha* for small budgets
        _, kl_prompts, kl_neutral = measured(STEP)
        np.testing.assert_allclose(0.5 * STEP ** 2 * pred.fisher_neutral, kl_neutral, rtol=0.05)
        np.testing.assert_allclose(0.5 * STEP ** 2 * pred.fisher_prompts, kl_prompts, rtol=0.05)
        for budget in BUDGETS:
            alpha = pred.alpha_star(budget)
            assert pred.predicted_kl(alpha) == pytest.approx(budget, rel=1e-12)
            effect, kl_p, kl_n = measured(alpha)
            assert kl_n.mean() == pytest.approx(budget, rel=0.05), (layer, budget)
            # (d) the bound, on every prompt: to first order, and on the real model at alpha*
            assert np.all(np.abs(effect) <= pred.bound(kl_p)), (layer, budget)
        effect, kl_p, _ = measured(pred.alpha_star(LARGE))
        assert np.all(np.abs(effect) <= pred.bound(kl_p)), (layer, LARGE)
        assert np.all(np.abs(pred.slope) <= np.sqrt(pred.fisher_prompts) * pred.dual_norm * (1 + 1e-9))
        expected = float(vectors[layer].norm() / last[layer].norm(dim=-1).mean())
        assert pred.relative_norm == pytest.approx(expected, rel=1e-6)  # read_residuals keeps float32
        check_attention(adapter, loaded.tokenizer, concept, layer, vectors[layer])


def check_attention(adapter, tokenizer, concept, layer, vector):
    """(c) the final query's attention-logit and probability tangents, every head of the injected
    layer and the next, against central differences; the probability tangent against its
    closed form a (dl - a.dl)."""
    batch = Batch.of(tokenizer, concept.prompts)
    layers = sorted({layer, min(layer + 1, adapter.n_layers - 1)})
    lin = linearize(adapter, batch, layer, vector, attention_layers=layers)
    rows = torch.arange(len(concept.prompts))

    def final_query(alpha):
        got = {}
        edits = Injection({layer: vector}, {layer: alpha}).edits(batch.last)
        with torch.no_grad(), adapter.trace(["scores", "probs"], lambda l, s, t: got.__setitem__((l, s), t[rows, :, batch.last]),
                                            layers=layers, attention_mask=batch.mask, edits=edits):
            adapter.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False)
        return got

    plus, minus = final_query(STEP), final_query(-STEP)
    for i, l in enumerate(layers):
        for site, tangent in (("scores", lin.score_tangent), ("probs", lin.prob_tangent)):
            fd = ((plus[(l, site)] - minus[(l, site)]) / (2 * STEP)).nan_to_num(0.0).double()  # -inf - -inf on masked keys
            scale = fd.abs().max()
            assert scale > 0
            torch.testing.assert_close(tangent[:, i], fd, rtol=0.05, atol=0.05 * float(scale))
    a, dl = lin.probs, lin.score_tangent
    closed = a * (dl - (a * dl).sum(-1, keepdim=True))  # the adapter's softmax runs in float32
    torch.testing.assert_close(lin.prob_tangent, closed, rtol=1e-4, atol=1e-5 * float(closed.abs().max()))
    spread, change = attention_summary(lin)
    assert spread.shape == change.shape == (len(concept.prompts), len(layers), adapter.n_heads)
    torch.testing.assert_close(change, 0.5 * lin.prob_tangent.abs().sum(-1))


def test_first_order_matches_finite_differences_on_random_models(random64):
    check_model(random64, CONCEPT, [0, 2])


def test_first_order_matches_finite_differences_on_the_organism(organism64):
    concept = concept_for("sentiment", organism64)
    small = concept_from_dict({"name": "s", "pairs": [list(p) for p in concept.pairs[:8]],
                               "prompts": list(concept.prompts[:8]), "target": list(concept.target),
                               "opposite": list(concept.opposite), "neutral": list(concept.neutral[:8])})
    check_model(organism64, small, range(HeadAdapter(organism64.model).n_layers))


def _same_prediction(many, one):
    for name in ("slope", "fisher_prompts", "fisher_neutral", "dual_norm", "logit_spread", "prob_change"):
        a, b = getattr(many, name), getattr(one, name)
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * max(1.0, float(np.abs(b).max())), err_msg=name)
    assert many.attention_layers == one.attention_layers == (one.layer,)
    assert many.relative_norm == pytest.approx(one.relative_norm, rel=1e-12)


@pytest.mark.parametrize("positions", ["all", "last", 2])
def test_every_layer_at_once_equals_one_layer_at_a_time(random64, positions):
    """first_order_layers (one plain pass, then each layer's tangent from its own block on) gives
    first_order's values for every layer: GPT-NeoX, Llama and GPT-2, every injection position."""
    adapter = HeadAdapter(random64.model)
    layers = list(range(adapter.n_layers))
    vectors = scaled_vectors(adapter, random64.tokenizer, CONCEPT, layers)
    many = first_order_layers(adapter, random64.tokenizer, CONCEPT, vectors, positions)
    assert sorted(many) == layers
    for l in layers:
        _same_prediction(many[l], first_order(adapter, random64.tokenizer, CONCEPT, l, vectors[l], positions))


def test_every_layer_at_once_on_the_organism(organism64):
    concept = concept_for("sentiment", organism64, scan_seed=0)
    adapter = HeadAdapter(organism64.model)
    layers = list(range(adapter.n_layers))
    vectors = scaled_vectors(adapter, organism64.tokenizer, concept, layers)
    many = first_order_layers(adapter, organism64.tokenizer, concept, vectors)
    for l in layers:
        _same_prediction(many[l], first_order(adapter, organism64.tokenizer, concept, l, vectors[l]))


def test_closed_form_tangents_equal_pytorchs_own(random64, monkeypatch):
    """linear_tangents (one product per Linear, LayerNorm's tangent in closed form) changes no
    value: every layer's logit and attention tangents equal those of PyTorch's own forward-mode
    formulas (the replacement switched off) on GPT-NeoX, Llama and GPT-2, in float64."""
    adapter = HeadAdapter(random64.model)
    layers = list(range(adapter.n_layers))
    vectors = scaled_vectors(adapter, random64.tokenizer, CONCEPT, layers)
    batch = Batch.of(random64.tokenizer, list(CONCEPT.prompts) + list(CONCEPT.neutral))
    ours = {l: linearize(adapter, batch, l, vectors[l], attention_layers=layers) for l in layers}
    monkeypatch.setattr(first_order_module, "_tangent_forward", lambda layer: None)
    for l in layers:
        plain = linearize(adapter, batch, l, vectors[l], attention_layers=layers)
        for name in ("logprobs", "tangent", "probs", "score_tangent", "prob_tangent", "resid_norm"):
            a, b = getattr(ours[l], name), getattr(plain, name)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * max(1.0, float(b.abs().max())), msg=name)
        assert ours[l].tangent.abs().max() > 0


def test_closed_form_tangents_restore_the_modules(neox):
    """After the block every module has its own forward back; a weight carrying a tangent (whose
    product the closed form would drop) is refused."""
    import torch.autograd.forward_ad as fwAD

    adapter = HeadAdapter(neox.model)
    replaced = [m for b in adapter.blocks for m in b.modules() if type(m) in (torch.nn.Linear, torch.nn.LayerNorm)]
    assert len(replaced) == 4 * 3 + 2 * 3  # per block: qkv, dense, two MLP projections; two norms
    with linear_tangents(adapter.blocks):
        assert all("forward" in vars(m) for m in replaced)
    assert not any("forward" in vars(m) for m in replaced)
    layer = torch.nn.Linear(4, 3)
    with fwAD.dual_level():
        dual = fwAD.make_dual(layer.weight.detach(), torch.ones(3, 4))
        del layer.weight
        layer.weight = dual
        with pytest.raises(RuntimeError, match="a weight carries a tangent"):
            with linear_tangents([layer]):
                pass
    assert "forward" not in vars(layer)


@pytest.mark.parametrize("positions", ["last", 2])
def test_injection_at_one_position(positions):
    """The tangent follows the injection's positions: the last token only, or one index."""
    loaded = load_model(TINY["gpt_neox"], dtype=torch.float64)
    adapter = HeadAdapter(loaded.model)
    vector = scaled_vectors(adapter, loaded.tokenizer, CONCEPT, [1])[1]
    pred = first_order(adapter, loaded.tokenizer, CONCEPT, 1, vector, positions=positions)
    measured = Measured(adapter, loaded.tokenizer, CONCEPT, 1, vector, positions)
    fd = (measured(STEP)[0] - measured(-STEP)[0]) / (2 * STEP)
    np.testing.assert_allclose(pred.slope, fd, rtol=0.05, atol=0.05 * np.abs(fd).max())
    everywhere = first_order(adapter, loaded.tokenizer, CONCEPT, 1, vector)
    assert np.abs(pred.slope - everywhere.slope).max() > 1e-3  # the positions matter


def test_closed_forms_equal_plain_computations():
    gen = torch.Generator().manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(3, 20, generator=gen, dtype=torch.float64), -1)
    tangent = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    target, opposite = [1, 4, 7], [2, 9]
    p = logprobs.exp()
    fisher = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, vocab, vocab)
    torch.testing.assert_close(fisher_quadratic(logprobs, tangent), torch.einsum("nv,nvw,nw->n", tangent, fisher, tangent))
    # the set score's gradient: autograd of set_score with respect to the logits
    logits = logprobs.clone().requires_grad_(True)
    set_score(torch.log_softmax(logits, -1), target, opposite).sum().backward()
    g = score_gradient(logprobs, target, opposite)
    torch.testing.assert_close(g, logits.grad)
    # g^T F^+ g with the pseudo-inverse, and the closed form sqrt(1/P(target) + 1/P(opposite))
    plain = torch.stack([g[i] @ torch.linalg.pinv(fisher[i]) @ g[i] for i in range(3)]).sqrt()
    torch.testing.assert_close(fisher_dual_norm(logprobs, g), plain)
    closed = (1 / p[:, target].sum(-1) + 1 / p[:, opposite].sum(-1)).sqrt()
    torch.testing.assert_close(fisher_dual_norm(logprobs, g), closed)
    with pytest.raises(ValueError, match="does not sum to 0"):
        fisher_dual_norm(logprobs, tangent)


def test_bad_input_is_one_line(neox):
    adapter = HeadAdapter(neox.model)
    with pytest.raises(UsageError, match=r"steering vector has shape \(3,\), expected \(64,\)"):
        first_order(adapter, neox.tokenizer, CONCEPT, 0, torch.zeros(3))
    pred = first_order(adapter, neox.tokenizer, CONCEPT, 0, torch.ones(64))
    with pytest.raises(UsageError, match="the KL budget must be positive, got 0.0"):
        pred.alpha_star(0.0)
    with pytest.raises(UsageError, match=r"layer 3 out of range \(the model has layers 0..2\)"):
        first_order(adapter, neox.tokenizer, CONCEPT, 3, torch.ones(64))
