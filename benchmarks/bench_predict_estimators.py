"""Can the first-order steering prediction for every layer cost <= 5 % of the per-layer search it
replaces (issue 18)? The exact prediction against the cheapest estimator there is, on organism-l.

``eigengap predict`` computes, per layer, the slope (d set score / d alpha) and the KL curvature
(mean over the neutral prompts of t^T F t, t = J v the logit tangent) exactly, by one forward-mode
pass per layer. The cheapest alternative is one forward and one backward pass for every layer at
once: a per-row coefficient alpha_l (zero) on each layer's vector, and the gradient of

    sum over evaluation rows of the set score + sum over neutral rows of u . logits

with respect to every alpha_l: the evaluation rows give each layer's slope exactly; a neutral row
gives u . t, whose square is an unbiased estimate of t^T F t when u is a random cotangent with
E[u u^T] = F = diag(p) - p p^T. Two such cotangents are measured: a token drawn from p (u = e_y - p,
the sampled Fisher) and Rademacher signs (u = eps * sqrt(p) - p * sum(eps * sqrt(p))). Reported:
the times (the per-layer search at the 0.25-nat budget as ``eigengap predict`` runs it, the exact
prediction, the one-pass estimator), the slopes' agreement, and over ``--draws`` seeds the relative
standard deviation of one draw's estimate of each layer's mean curvature (alpha* scales with its
inverse square root, so its error is about half).

Two floors say what an exact prediction can cost at best:

- forward mode: each layer's tangent must cross blocks l .. L-1 (21 block passes for 6 layers),
  and a tangent through a block costs at least the block's own products. Timed: the plain pass
  plus those 21 blocks replayed without a tangent (``floor_forward_s``);
- reverse mode: one backward pass per cotangent gives u . t for every layer at once, and tᵀFt
  needs as many cotangents as F has directions that matter. Measured with the exact tangents: the
  share of each neutral row's tᵀFt in the top-k eigen-directions of its F, and the time of the
  one-pass estimator carrying ``--rank`` cotangents per neutral row (sqrt(lambda_i) e_i: the sum
  of their squares is the curvature truncated to those k directions, exactly).

    EIGENGAP_CACHE=... .venv/bin/python -m benchmarks.bench_predict_estimators [--draws 40]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from benchmarks.common import record, timed

BUDGET = 0.25


def _one_pass(adapter, tok, concept, vectors, target, opposite, cotangent: str, seed: int, rank: int = 1):
    """(per layer the evaluation rows' slopes, per layer the neutral rows' (u . t)^2). With
    ``cotangent="eigen"`` each neutral row appears ``rank`` times, copy i carrying sqrt(lambda_i)
    e_i (the i-th eigenpair of its F): the squares, summed over copies, are tᵀFt truncated to the
    top ``rank`` directions."""
    from spectral.steering.injection import add_at
    from spectral.steering.measure import set_score
    from spectral.steering.vectors import Batch

    model = adapter.model
    n = len(concept.prompts)
    copies = {"eigen": rank, "none": 0}.get(cotangent, 1)
    batch = Batch.of(tok, list(concept.prompts) + list(concept.neutral) * copies, torch.device("cpu"), "benchmark")
    rows = torch.arange(batch.ids.shape[0])
    layers = sorted(vectors)
    alphas = {l: torch.zeros(len(rows), requires_grad=True) for l in layers}

    def make(l):
        return lambda x: add_at(x, alphas[l][:, None].to(x.dtype) * vectors[l].to(x.dtype), "all", batch.last)

    wanted = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # gradients for the coefficients only
    try:
        with adapter.trace([], edits={(l, "resid_pre"): make(l) for l in layers}):
            logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
        z = logits[rows, batch.last].double()
        logprobs = torch.log_softmax(z, -1)
        if cotangent == "none":  # the slopes alone
            u = torch.zeros_like(z[n:])
        else:
            p = logprobs[n:].detach().exp()
            g = torch.Generator().manual_seed(seed)
            if cotangent == "eigen":
                m = len(concept.neutral)
                q = p[:m]
                w, vecs = torch.linalg.eigh(torch.diag_embed(q) - q[:, :, None] * q[:, None, :])
                top = w.flip(-1)[:, :rank].clamp(min=0).sqrt()[:, :, None] * vecs.flip(-1)[:, :, :rank].transpose(1, 2)
                u = top.transpose(0, 1).reshape(rank * m, -1)  # copy i of every row, then copy i + 1
            elif cotangent == "sampled":
                y = torch.multinomial(p, 1, generator=g)
                u = torch.zeros_like(p).scatter_(1, y, 1.0) - p
            else:
                eps = torch.randint(0, 2, p.shape, generator=g).double() * 2 - 1
                u = eps * p.sqrt()
                u = u - p * u.sum(-1, keepdim=True)
        objective = set_score(logprobs[:n], target, opposite).sum() + (u * z[n:]).sum()
        grads = torch.autograd.grad(objective, [alphas[l] for l in layers])
    finally:
        for p, w in zip(model.parameters(), wanted):
            p.requires_grad_(w)
    squares = {l: (g[n:].double() ** 2).reshape(copies, -1).sum(0).numpy() for l, g in zip(layers, grads)} if copies else {}
    return {l: g[:n].double().numpy() for l, g in zip(layers, grads)}, squares


def _forward_floor(adapter, tok, concept, layers) -> None:
    """The plain pass over the neutral prompts, then blocks l .. L-1 replayed from each layer's
    residual without a tangent: what an exact forward-mode curvature computes at the least (a
    tangent through a block costs at least the block's own products). The slopes come on top
    (timed apart: the reverse pass over the evaluation prompts)."""
    from spectral.steering.vectors import Batch
    from spectral.theory.first_order import eager_attention, record_blocks, run_blocks

    batch = Batch.of(tok, list(concept.neutral), torch.device("cpu"), "benchmark")
    with torch.no_grad(), eager_attention(adapter.model):
        _, resid, kwargs = record_blocks(adapter, batch, layers)
        for l in layers:
            run_blocks(adapter, resid[l], kwargs, l)


def _projections(lin):
    """Per row, lambda_i (e_i . t)^2 over F's eigenpairs, largest lambda first, and tᵀFt."""
    from spectral.theory.first_order import fisher_quadratic

    p = lin.logprobs.exp()
    w, vecs = torch.linalg.eigh(torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    proj = w.flip(-1).clamp(min=0) * torch.einsum("nvk,nv->nk", vecs.flip(-1), lin.tangent) ** 2
    return proj, fisher_quadratic(lin.logprobs, lin.tangent)


def _eigen_shares(lins, layers, ks) -> dict:
    """Over neutral rows and layers, the share of tᵀFt in the top-k eigen-directions of F."""
    shares = {k: [] for k in ks}
    for l in layers:
        proj, total = _projections(lins[l])
        for k in ks:
            shares[k].extend((proj[:, :k].sum(-1) / total).tolist())
    return {k: {"min": round(min(v), 4), "median": round(float(np.median(v)), 4)} for k, v in shares.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="organism-l")
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--rank", type=int, default=16, help="cotangents per neutral row for the reverse-mode floor")
    args = parser.parse_args(argv)

    from jobs.steer import SteerUnit, steer_unit
    from spectral.models.adapter import HeadAdapter
    from spectral.models.loading import load_model, parse_spec
    from spectral.steering.concepts import concept_for, single_token_ids
    from spectral.steering.vectors import actadd
    from spectral.theory.first_order import first_order

    loaded = load_model(parse_spec(args.model), device=torch.device("cpu"))
    tok = loaded.tokenizer
    concept = concept_for("sentiment", loaded, scan_seed=0)
    adapter = HeadAdapter(loaded.model)
    layers = list(range(adapter.n_layers))
    vectors = {l: v.cpu() for l, v in actadd(adapter, tok, concept, layers, torch.device("cpu"), "last").items()}
    target = single_token_ids(tok, concept.target, "target", "sentiment")
    opposite = single_token_ids(tok, concept.opposite, "opposite", "sentiment")

    def search():
        return [steer_unit(loaded, SteerUnit(f"layer {l}", concept, vectors, {l: 1.0}, "all", None, BUDGET))
                for l in layers]

    def exact():
        return {l: first_order(adapter, tok, concept, l, vectors[l], "all", source="sentiment") for l in layers}

    def one_pass(kind="rademacher", seed=0):
        return _one_pass(adapter, tok, concept, vectors, target, opposite, kind, seed)

    def eigen():
        return _one_pass(adapter, tok, concept, vectors, target, opposite, "eigen", 0, args.rank)

    exact()  # warm-up
    one_pass()
    eigen()
    search_s, exact_s, pass_s, floor_s, eigen_s = [], [], [], [], []
    for _ in range(3):  # interleaved rounds
        search_s.append(timed(search)[1])
        ex, t = timed(exact)
        exact_s.append(t)
        pass_s.append(timed(one_pass)[1])
        floor_s.append(timed(lambda: _forward_floor(adapter, tok, concept, layers))[1]
                       + timed(lambda: _one_pass(adapter, tok, concept, vectors, target, opposite, "none", 0))[1])
        eigen_s.append(timed(eigen)[1])
    slopes, _ = one_pass()
    slope_err = max(float(np.max(np.abs(slopes[l] - ex[l].slope)) / np.max(np.abs(ex[l].slope))) for l in layers)
    spread = {}
    for kind in ("sampled", "rademacher"):
        draws = np.array([[one_pass(kind, s)[1][l].mean() for l in layers] for s in range(args.draws)])
        truth = np.array([ex[l].fisher_neutral.mean() for l in layers])
        spread[kind] = {"relative_sd_of_one_draw": [round(float(x), 3) for x in draws.std(0) / truth],
                        "mean_over_draws_over_exact": [round(float(x), 3) for x in draws.mean(0) / truth]}
    s, e, o, f, r = (statistics.median(x) for x in (search_s, exact_s, pass_s, floor_s, eigen_s))
    # the exact tangents of the neutral rows, for the eigen-direction shares and the truncation check
    from spectral.steering.vectors import Batch
    from spectral.theory.first_order import linearize_layers

    neutral = Batch.of(tok, list(concept.neutral), torch.device("cpu"), "benchmark")
    lins = linearize_layers(adapter, neutral, vectors)
    ks = sorted({1, 2, 4, 8, args.rank, 32, 64})
    shares = _eigen_shares(lins, layers, ks)
    truncated = eigen()[1]
    truncation_error = 0.0
    for l in layers:
        proj, total = _projections(lins[l])
        err = np.abs(truncated[l] - proj[:, :args.rank].sum(-1).numpy()) / total.numpy()
        truncation_error = max(truncation_error, float(err.max()))
    result = {"benchmark": "predict_estimators", "model": args.model, "layers": len(layers),
              "evaluation_prompts": len(concept.prompts), "neutral_prompts": len(concept.neutral),
              "kl_budget": BUDGET, "search_s": round(s, 3), "exact_first_order_s": round(e, 3),
              "one_pass_s": round(o, 3), "exact_over_search": round(e / s, 4), "one_pass_over_search": round(o / s, 4),
              "slope_max_relative_error": slope_err, "draws": args.draws, "curvature_estimators": spread,
              "exact_curvature": [round(float(ex[l].fisher_neutral.mean()), 5) for l in layers],
              "floor_forward_s": round(f, 3), "floor_forward_over_search": round(f / s, 4),
              "floor_forward_block_passes": len(layers) * (len(layers) + 1) // 2,
              "eigen_rank": args.rank, "eigen_one_pass_s": round(r, 3), "eigen_one_pass_over_search": round(r / s, 4),
              "eigen_truncation_check_max_error": truncation_error,
              "neutral_top_token_probability": [round(float(x), 3) for x in
                                                np.quantile(lins[layers[0]].logprobs.exp().max(-1).values.numpy(),
                                                            [0, 0.25, 0.5, 0.75, 1])],
              "share_of_curvature_in_top_k_directions": shares,
              "target_ratio": 0.05, "torch_threads": torch.get_num_threads()}
    print(f"{args.model}: per-layer search {s:.2f} s; exact first order {e:.2f} s ({e / s:.1%}); one forward + "
          f"backward for every layer {o:.3f} s ({o / s:.1%}); slopes agree to {slope_err:.1e}; one draw's "
          f"curvature relative SD: sampled Fisher {min(spread['sampled']['relative_sd_of_one_draw'])}-"
          f"{max(spread['sampled']['relative_sd_of_one_draw'])}, Rademacher "
          f"{min(spread['rademacher']['relative_sd_of_one_draw'])}-{max(spread['rademacher']['relative_sd_of_one_draw'])}; "
          f"exact floor (slopes by one reverse pass; plain neutral pass + {result['floor_forward_block_passes']} plain blocks) {f:.3f} s ({f / s:.1%}); "
          f"{args.rank} eigen-cotangents per neutral row {r:.3f} s ({r / s:.1%}) capturing a median "
          f"{shares[args.rank]['median']:.0%} (min {shares[args.rank]['min']:.0%}) of tᵀFt", flush=True)
    record("predict_estimators", result)
    return result


if __name__ == "__main__":
    main()
