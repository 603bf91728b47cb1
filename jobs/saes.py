"""``eigengap saes``: TopK SAEs (SAELens) on attention heads' results, measured and compared
between stable and unstable heads (issue 16).

One run, on one model:

1. the key-kernel gap of every head on the evaluation prompts (the scan's key kernel, raw keys,
   its default ridge and centring): which heads are unstable (gap <= ``--threshold``);
2. per-head SAEs on each chosen head's ``z`` and, with ``--layer-saes``, one SAE per layer on the
   concatenation of all its heads' ``z``, for every ``k`` of ``--k``, trained together from one
   shared activation stream (``spectral.saes.train``; inputs mean-centred and scale-normalised
   per head, the normalisation folded into the saved weights);
3. every SAE's metrics on held-out evaluation prompts (``spectral.saes.evaluate``), one row each
   in ``saes.parquet``;
4. stable vs unstable heads (``analysis.saes``) on this model: per metric the difference of
   medians with its bootstrap interval over heads, the permutation p and the rank correlation
   with the gap, in ``summary.md``. The population verdict (over training seeds) is the report's.

Prompts: ``--prompts`` (training) and ``--eval-prompts``; an organism needs neither: its own
generator writes fresh text (episodes of seed ``TRAIN_SEED`` for training, ``EVAL_SEED`` for
evaluation; the organisms trained on seeds 0-4, the other tools use 10,000-30,000). A
``--prompts`` file without ``--eval-prompts`` keeps its last ``EVAL_FRACTION`` of lines for
evaluation.

Also ``python -m jobs.saes ...`` (what ``ray job submit`` runs).
"""

from __future__ import annotations

import math
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from jobs.config import JobConfig, out_dir_ready
from jobs.registry import Experiment
from spectral import tables
from spectral.errors import UsageError
from spectral.kernels.metrics import UNSTABLE_GAP

RESULT_FILE = "saes.parquet"
STEERABILITY_FILE = "sae_steerability.parquet"
STEERING_FILE = "sae_steering.parquet"
RECOVERY_FILE = "sae_recovery.parquet"
TRAIN_SEED = 40_000
EVAL_SEED = 50_000
EPISODES_PER_PROMPT = 4
"""Organism prompts: this many episodes per line (about 70 tokens, inside the 96-token context)."""
EVAL_FRACTION = 0.1
VERDICT_METRICS = ("superposition_index", "l0", "fvu", "ce_score", "dead_fraction", "dense_fraction",
                   "feature_dimensionality_mean", "ev_l0_area")
"""The per-head metrics compared between stable and unstable heads (``superposition_index`` is the
verdict's; the rest are exploratory)."""
HEADS_HELP = "unstable, all, or comma-separated layer.head pairs such as 3.5,4.0"


class SaesConfig(JobConfig):
    model: str
    """Model spec: hub id, checkpoint directory, random:ARCH[?k=v&...] or organism-NAME (a causal LM)."""
    out: Path
    """Output directory (saes/ in SAELens' layout, saes.parquet, params.json, summary.md, plots)."""
    prompts: Path | None = None
    """Training prompts (plain text, one per line, or JSONL with a 'text' field); organisms: generated."""
    eval_prompts: Path | None = None
    """Held-out prompts for the gaps and metrics (default: organisms generate them; a file keeps its last tenth)."""
    heads: str = "all"
    """Which heads get an SAE: unstable (gap <= --threshold), all, or layer.head pairs such as 3.5,4.0."""
    k: list[int] = [8]
    """TopK k, one SAE per value (e.g. 1,2,4,8,16 for Pareto curves of explained variance against L0)."""
    expansion: int = Field(8, ge=1)
    """Dictionary ratio: every SAE has expansion x d_in features."""
    tokens: int = Field(2_000_000, gt=0)
    """Training tokens each SAE sees."""
    threshold: float = Field(UNSTABLE_GAP, gt=0, lt=1)
    """Gap at or below which a head counts as unstable."""
    layer_saes: bool = True
    """Also train one SAE per layer on all its heads' results concatenated (head attribution)."""
    batch_size: int = Field(32, gt=0)
    """Prompts per forward pass (activation generation and evaluation)."""
    max_tokens: int | None = Field(None, gt=0)
    """Truncate each prompt to this many tokens (default: the model's context length)."""
    sae_batch_size: int = Field(4096, gt=0)
    """Activation rows per optimiser step."""
    lr: float = Field(1e-2, gt=0)
    """Adam learning rate at the start (cosine annealing to --lr-end; docs/DESIGN.md says how it was chosen)."""
    lr_end: float = Field(1e-3, gt=0)
    """Learning rate at the end of training."""
    calibration_tokens: int = Field(8192, ge=2)
    """Rows at the stream's start for the per-head normalisation (not trained on)."""
    eval_tokens: int = Field(32_768, gt=0)
    """Held-out tokens the metrics are measured on (whole batches)."""
    splice_prompts: int = Field(64, gt=0)
    """Evaluation prompts of the CE splice score."""
    concept: str | None = None
    """Concept for the steerability analyses (sentiment, love-hate or a concept file; default: sentiment for
    organisms, none otherwise): which features predict ActAdd's effect, and steering along the concept's features."""
    steer_layer: int | None = Field(None, ge=0)
    """Layer whose ActAdd effect the features are correlated with (default: the middle layer, as eigengap steer)."""
    kl_budget: float = Field(0.25, gt=0)
    """Side-effect budget (mean KL on neutral prompts, nats) both steering arms are matched to."""
    ground_truth: bool = True
    """Organisms: measure how well the SAEs' features recover the planted IOI name and sentiment."""
    steer_features: int = Field(4, ge=1)
    """Features (chosen on the selection split) that feature-aware steering steers along."""
    seed: int = 0
    """SAE initialisation and shuffling seed; also the steering split's seed."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs ('auto': a CUDA GPU when there is one); the SAEs train on the CPU."""
    force: bool = False
    """Overwrite an existing saes.parquet (and saes/) in --out."""

    def training(self):
        from spectral.saes.train import SaeTrainingConfig

        return SaeTrainingConfig(ks=tuple(self.k), expansion=self.expansion, tokens=self.tokens,
                                 batch_size=self.sae_batch_size, lr=self.lr, lr_end=self.lr_end,
                                 calibration_tokens=self.calibration_tokens, seed=self.seed)


def parse_heads(text: str, n_layers: int, n_heads: int) -> Literal["all", "unstable"] | list[tuple[int, int]]:
    """``--heads``: "all", "unstable" or layer.head pairs, each checked against the model."""
    text = text.strip()
    if text in ("all", "unstable"):
        return text  # type: ignore[return-value]
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"L?(\d+)[.H](\d+)", part)
        if not m:
            raise UsageError(f"--heads: {part!r} is not a head ({HEADS_HELP})")
        layer, head = int(m.group(1)), int(m.group(2))
        if layer >= n_layers or head >= n_heads:
            raise UsageError(f"--heads: unknown head {part!r}: the model has {n_layers} layers x {n_heads} heads")
        pairs.append((layer, head))
    if not pairs:
        raise UsageError(f"--heads: no head given ({HEADS_HELP})")
    return sorted(set(pairs))


def token_limit(config: SaesConfig, loaded) -> int | None:
    """The tokens per prompt the stream keeps (``token_batches``' truncation)."""
    return config.max_tokens or getattr(loaded.model.config, "max_position_embeddings", None)


def organism_prompts(seed: int, n_tokens: int, tokenizer, limit: int | None) -> list[str]:
    """Fresh organism text (``EPISODES_PER_PROMPT`` episodes per line, from ``seed``) holding at
    least ``n_tokens`` tokens once each prompt is cut to ``limit`` (``token_limit``)."""
    from spectral.organisms.language import corpus

    prompts, have, part = [], 0, 0
    while have < n_tokens:
        lines = [" ".join(eps) for eps in _grouped(corpus(seed + part, 4096 * EPISODES_PER_PROMPT))]
        for line in lines:
            have += min(len(tokenizer(line, add_special_tokens=False)["input_ids"]), limit or 10 ** 9)
            prompts.append(line)
            if have >= n_tokens:
                break
        part += 1
    return prompts


def _grouped(episodes: list[str]) -> list[list[str]]:
    return [episodes[i:i + EPISODES_PER_PROMPT] for i in range(0, len(episodes), EPISODES_PER_PROMPT)]


def count_tokens(prompts, tokenizer, limit: int | None) -> int:
    return sum(min(len(tokenizer(p, add_special_tokens=False)["input_ids"]), limit or 10 ** 9) for p in prompts)


def tokens_needed(config: SaesConfig) -> int:
    """Rows the training stream must hold: the calibration rows, whole optimiser batches up to
    ``--tokens``, and one batch of slack (the shuffle buffer serves whole batches only)."""
    bs = config.sae_batch_size
    return config.calibration_tokens + -(-config.tokens // bs) * bs + bs


def run(config: SaesConfig, *, echo=print):
    """Validate everything (nothing is written before), train, measure, then write the results
    directory; the SAEs are trained into a temporary directory and moved in at the end."""
    import numpy as np

    from cluster.executors import LocalExecutor
    from jobs.scan import _versions
    from spectral.kernels.prompts import read_prompts
    from spectral.kernels.scan import ScanSettings, scan_table
    from spectral.models.adapter import HeadAdapter
    from spectral.models.loading import load_model, model_heads, parse_spec, require_causal_lm, resolve_device

    start = time.perf_counter()
    spec = parse_spec(config.model)
    out_dir_ready(config.out, RESULT_FILE, config.force)
    require_causal_lm(spec, "eigengap saes")
    organism = spec.kind == "organism"
    if config.prompts is None and not organism:
        raise UsageError(f"--prompts is required for {spec.text} (only organisms generate their own text)")
    training = config.training()
    n_layers, n_heads, _ = model_heads(spec)  # from the config alone: a bad --heads fails before loading
    chosen = parse_heads(config.heads, n_layers, n_heads)
    loaded = load_model(spec, device=resolve_device(config.device))
    adapter = HeadAdapter(loaded.model)
    d_head = adapter.d_head
    training.check(d_head)
    concept, steer_layer = _steering_setup(config, loaded, organism, n_layers)
    tok = loaded.tokenizer
    if config.prompts is not None:
        train_prompts = read_prompts(config.prompts)
        if config.eval_prompts is not None:
            eval_prompts = read_prompts(config.eval_prompts)
        else:
            n_eval = max(1, int(round(EVAL_FRACTION * len(train_prompts))))
            if len(train_prompts) - n_eval < 1:
                raise UsageError(f"--prompts {config.prompts}: too few prompts to keep a tenth for evaluation; "
                                 "give --eval-prompts")
            train_prompts, eval_prompts = train_prompts[:-n_eval], train_prompts[-n_eval:]
        need = tokens_needed(config)
        have = count_tokens(train_prompts, tok, token_limit(config, loaded))
        if have < need:
            raise UsageError(f"--prompts {config.prompts}: {have} training tokens; --tokens {config.tokens} needs "
                             f"{need} (with {config.calibration_tokens} calibration tokens and whole batches)")
    else:
        eval_prompts = (read_prompts(config.eval_prompts) if config.eval_prompts is not None else
                        organism_prompts(EVAL_SEED, config.eval_tokens, tok, token_limit(config, loaded)))
        train_prompts = None  # generated after the checks
    settings = ScanSettings(batch_size=config.batch_size, max_tokens=config.max_tokens)

    echo(f"key-kernel gaps of {n_layers * n_heads} heads on {len(eval_prompts)} evaluation prompts")
    scan = scan_table(LocalExecutor(loaded, progress=False), spec.text, eval_prompts,
                      ScanSettings(batch_size=config.batch_size, max_tokens=config.max_tokens), n_layers, n_heads,
                      adapter.n_kv_heads)
    gaps = np.full((n_layers, n_heads), np.nan)
    for layer, head, gap in zip(scan["layer"].to_pylist(), scan["head"].to_pylist(), scan["gap"].to_pylist()):
        gaps[layer, head] = np.nan if gap is None else gap
    if chosen == "all":
        heads = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    elif chosen == "unstable":
        heads = [(l, h) for l in range(n_layers) for h in range(n_heads) if gaps[l, h] <= config.threshold]
        if not heads:
            raise UsageError(f"--heads unstable: no head of {spec.text} has a gap <= {config.threshold:g} (smallest "
                             f"{np.nanmin(gaps):.3f}); use --heads all or a larger --threshold")
    else:
        heads = chosen
    if train_prompts is None:
        train_prompts = organism_prompts(TRAIN_SEED, tokens_needed(config), tok, token_limit(config, loaded))

    tmp = config.out / f".saes-{time.strftime('%Y%m%d%H%M%S')}-{id(config):x}"
    try:
        rows, result, entries = _train_and_measure(loaded, train_prompts, eval_prompts, heads, settings, training,
                                                   config, tmp, gaps, echo)
        steering = _steering(loaded, entries, concept, steer_layer, config, echo) if concept is not None else None
        recovered = _recovery(loaded, entries, echo) if organism and config.ground_truth else None
        _install(tmp, config.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = tables.from_rows(rows, tables.SAES, RESULT_FILE)
    comparison = _compare(table, spec.text, organism, spec)
    summary = _summary(table, comparison, spec.text, config)
    params = {"config": config.model_dump(mode="json"), "n_train_prompts": len(train_prompts),
              "n_eval_prompts": len(eval_prompts), "heads": [f"{l}.{h}" for l, h in heads],
              "train_tokens": result.tokens, "train_seconds": round(result.seconds, 3),
              "tokens_per_second": round(result.tokens_per_second, 1),
              "seconds": round(time.perf_counter() - start, 3), "versions": _versions()}
    if steering is not None:
        summary += "\n\n" + _steering_summary(steering, config)
    if recovered is not None:
        summary += "\n\n" + _recovery_summary(recovered)
    _write(config.out, table, comparison, params, summary, spec.text, config.threshold, steering, recovered)
    echo(summary)
    echo(f"wrote {config.out / RESULT_FILE} ({table.num_rows} SAEs; trained {result.tokens} tokens each at "
         f"{result.tokens_per_second:,.0f} tokens/s) in {params['seconds']:.1f} s")
    return table


def _train_and_measure(loaded, train_prompts, eval_prompts, heads, settings, training, config, tmp, gaps, echo):
    import numpy as np

    from spectral.saes.evaluate import SaeEntry, evaluate_saes, with_ev_l0_area
    from spectral.saes.saved import load_topk
    from spectral.saes.train import train_head_saes

    layers = sorted({l for l, _ in heads})
    echo(f"training {len(heads)} head SAEs{f' and {len(layers)} layer SAEs' if config.layer_saes else ''} "
         f"x k in {list(training.ks)} on {training.tokens:,} tokens")
    result = train_head_saes(loaded, train_prompts, training, tmp, heads=heads, layers=layers,
                             per_layer=config.layer_saes, settings=settings)
    entries, base = [], []
    for t in result.saes:
        m = re.fullmatch(r"L(\d+)(?:H(\d+))?", t.target)
        layer, head = int(m.group(1)), (int(m.group(2)) if m.group(2) is not None else None)
        entries.append(SaeEntry(t.name, t.target, layer, head, t.k, load_topk(t.path)))
        gap = gaps[layer, head] if head is not None else float(np.nanmin(gaps[layer]))
        unstable = bool(gaps[layer, head] <= config.threshold) if head is not None else \
            bool((gaps[layer] <= config.threshold).any())
        base.append({"model": config.model, "name": t.name, "target": t.target,
                     "kind": "head" if head is not None else "layer", "layer": layer,
                     "head": -1 if head is None else head, "k": t.k, "d_in": t.d_in, "d_sae": t.d_sae,
                     "gap": float(gap), "unstable": unstable, "threshold": config.threshold,
                     "train_tokens": int(result.tokens), "path": f"saes/{t.name}"})
    echo(f"measuring {len(entries)} SAEs on {config.eval_tokens:,} held-out tokens")
    measured = evaluate_saes(loaded, entries, eval_prompts, settings, eval_tokens=config.eval_tokens,
                             splice_prompts=config.splice_prompts)
    return with_ev_l0_area([{**b, **m} for b, m in zip(base, measured)]), result, entries


def _steering_setup(config: SaesConfig, loaded, organism: bool, n_layers: int):
    """(concept or None, the ActAdd layer of the correlation screen), checked before any work."""
    from spectral.steering.concepts import concept_for

    name = config.concept if config.concept is not None else ("sentiment" if organism else None)
    layer = n_layers // 2 if config.steer_layer is None else config.steer_layer
    if layer >= n_layers:
        raise UsageError(f"--steer-layer {layer} out of range (the model has layers 0..{n_layers - 1})")
    if name is None:
        return None, layer
    return concept_for(name, loaded), layer


@dataclass
class SteeringResults:
    steerability: list[dict]
    steering: list[dict]
    summary: list[dict]
    """``analysis.sae_steering.correlation_summary`` of ``steerability``."""


def _steering(loaded, entries, concept, steer_layer: int, config: SaesConfig, echo) -> SteeringResults:
    """At k = ``VERDICT_K`` (or the run's k nearest above, else its largest): the correlation
    screen of every SAE's features with ActAdd's per-prompt effect at ``steer_layer``, and
    feature-aware steering with every SAE against ActAdd at the SAE's layer, both at the budget."""
    from analysis.sae_steering import correlation_summary, steer_split, steering_rows
    from spectral.models.adapter import HeadAdapter
    from spectral.saes.steering import actadd_at_budget, feature_aware_steering, feature_steerability
    from spectral.steering.measure import Evaluator

    k, chosen = _verdict_entries(entries)
    ev = Evaluator(HeadAdapter(loaded.model), loaded.tokenizer, concept)
    echo(f"steering: correlation screen of {len(chosen)} SAEs (k = {k}) with ActAdd at layer {steer_layer}; "
         f"feature-aware steering with each, at KL {config.kl_budget:g}")
    saes = {e.name: (e.layer, e.head, e.sae) for e in chosen}
    screen = feature_steerability(loaded, saes, concept, layer=steer_layer, kl_budget=config.kl_budget, evaluator=ev)
    split = steer_split(ev.base_score, 0.5, config.seed)
    actadd = {steer_layer: screen.actadd}
    steering = []
    for e in chosen:
        if e.layer not in actadd:
            actadd[e.layer] = actadd_at_budget(ev, e.layer, config.kl_budget)
        result = feature_aware_steering(loaded, saes[e.name], concept, kl_budget=config.kl_budget, split=split,
                                        name=e.name, m=config.steer_features, evaluator=ev, actadd=actadd[e.layer])
        steering += steering_rows(result, seed=config.seed)
    return SteeringResults(screen.rows, steering, correlation_summary(screen.rows) if screen.rows else [])


def _install(tmp: Path, out: Path) -> None:
    """Move the trained SAEs into ``out/saes`` (replacing an older set only now, at the end)."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / "saes"
    if target.exists():
        shutil.rmtree(target)
    (tmp / "saes").rename(target)


def head_metrics(table, model: str, population: str, seed: int | None, k: int | None = None, importance=None):
    """``analysis.saes.HeadMetrics`` of a saes table's head SAEs at ``k`` (default: the run's
    smallest k of ``VERDICT_K`` or above, else its largest)."""
    import numpy as np

    from analysis.saes import HeadMetrics

    rows = [r for r in table.to_pylist() if r["kind"] == "head"]
    if not rows:
        return None
    ks = sorted({r["k"] for r in rows})
    if k is None:
        k = verdict_k(ks)
    rows = sorted((r for r in rows if r["k"] == k), key=lambda r: (r["layer"], r["head"]))
    metrics = {m: np.array([r[m] for r in rows], float) for m in VERDICT_METRICS}
    imp = None
    if importance is not None:
        imp = np.array([importance.get((r["layer"], r["head"]), np.nan) for r in rows], float)
    return HeadMetrics(model, population, seed, np.array([r["gap"] for r in rows], float), metrics, imp)


VERDICT_K = 8
"""The k whose head SAEs the stable vs unstable comparison reads (the issue's fixed k)."""


def verdict_k(ks) -> int:
    """The k the comparisons, steering and ground truth read: ``VERDICT_K``, else the run's
    smallest k above it, else its largest."""
    ks = sorted(ks)
    return next((x for x in ks if x >= VERDICT_K), ks[-1])


def _compare(table, model: str, organism: bool, spec):
    from analysis.saes import compare

    hm = head_metrics(table, model, spec.name if organism else model, spec.seed if organism else None)
    if hm is None or len(hm.gap) < 4:
        return None
    return compare([hm], n_resamples=500, n_permutations=2000)


def _fmt(x, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _summary(table, comparison, title: str, config: SaesConfig) -> str:
    import numpy as np

    rows = table.to_pylist()
    lines = [f"# SAEs of {title}", "",
             f"{len(rows)} TopK SAEs (expansion {config.expansion}, k in {config.k}); metrics on held-out "
             f"evaluation prompts. Unstable: key-kernel gap <= {config.threshold:g}.", "",
             "| SAE | gap | k | L0 | FVU | CE score | dead | dense | superposition | D mean |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']}{' (unstable)' if r['unstable'] else ''} | {_fmt(r['gap'])} | {r['k']} | "
                     f"{_fmt(r['l0'], 2)} | {_fmt(r['fvu'])} | {_fmt(r['ce_score'])} | {r['dead']} | {r['dense']} | "
                     f"{_fmt(r['superposition_index'], 2)} | {_fmt(r['feature_dimensionality_mean'])} |")
    lines.append("")
    if comparison is None:
        lines.append("Stable vs unstable: fewer than 4 head SAEs, no comparison.")
        return "\n".join(lines)
    lines += ["## Stable vs unstable heads (this model only; the verdict over seeds is the report's)", "",
              "| metric | threshold | unstable / stable heads | median unstable | median stable | difference [95% CI] "
              "| permutation p | Spearman with gap |", "|---|---|---|---|---|---|---|---|"]
    for r in comparison.models:
        lines.append(f"| {r['metric']} | {r['threshold_kind']} {_fmt(r['threshold'], 2)} | {r['n_unstable']} / "
                     f"{r['n_stable']} | {_fmt(r['median_unstable'])} | {_fmt(r['median_stable'])} | "
                     f"{_fmt(r['difference'])} [{_fmt(r['difference_low'])}, {_fmt(r['difference_high'])}] | "
                     f"{_fmt(r['p_permutation'], 4)} | {_fmt(r['spearman'])} |" + (f" {r['note']}" if r['note'] else ""))
    unstable = int(np.sum([r["unstable"] for r in rows if r["kind"] == "head"]))
    lines += ["", f"{unstable} of {sum(r['kind'] == 'head' for r in rows)} head SAEs are on unstable heads. "
              "Permutation p-values are per metric, uncorrected; read them together with the intervals."]
    return "\n".join(lines)


def _steering_summary(st: SteeringResults, config: SaesConfig) -> str:
    from analysis.sae_steering import DIFFERENCE
    from spectral.saes.steering import CORRECTION

    lines = ["## Features and steerability", ""]
    total = next((r for r in st.summary if r["sae"] == "all"), None)
    if total is None:
        lines.append("No live feature to correlate.")
    else:
        lines.append(f"Correlation screen: {total['n_tested']} live features tested, {total['n_significant']} "
                     f"significant ({CORRECTION}); top {total['top_feature']} (Spearman "
                     f"{_fmt(total['top_spearman'])}, adjusted p {_fmt(total['top_p_adjusted'], 4)}).")
    lines += ["", f"Feature-aware steering ({config.steer_features} features chosen on the selection split) minus "
              f"ActAdd at the SAE's layer, both at KL {config.kl_budget:g}, on the held-out prompts:", "",
              "| SAE | ActAdd effect | feature effect | difference [95% CI] | cosine with ActAdd |", "|---|---|---|---|---|"]
    by_sae: dict[str, dict] = {}
    for r in st.steering:
        by_sae.setdefault(r["sae"], {})[r["arm"]] = r
    for name, arms in by_sae.items():
        d = arms[DIFFERENCE]
        lines.append(f"| {name} | {_fmt(arms['actadd']['effect'])} | {_fmt(arms['feature']['effect'])} | "
                     f"{_fmt(d['effect'])} [{_fmt(d['effect_low'])}, {_fmt(d['effect_high'])}] | "
                     f"{_fmt(d['cosine_actadd'])} |")
    lines += ["", "One model's SAEs are not independent replicates; the verdict over training seeds is the report's."]
    return "\n".join(lines)


def _verdict_entries(entries):
    k = verdict_k({e.k for e in entries})
    return k, [e for e in entries if e.k == k]


def _recovery(loaded, entries, echo) -> list[dict]:
    """Ground truth on an organism: every SAE at the verdict's k on the planted variables
    (``spectral.saes.groundtruth``)."""
    from spectral.saes.groundtruth import recovery

    k, chosen = _verdict_entries(entries)
    echo(f"ground truth: {len(chosen)} SAEs (k = {k}) against the planted IOI name and sentiment")
    return [r.as_dict() for r in recovery(loaded, {e.name: (e.layer, e.head, e.sae) for e in chosen})]


def _recovery_summary(rows: list[dict]) -> str:
    lines = ["## Ground truth: planted variables", "",
             "Best single feature's AUROC on the evaluation prompts (chosen on the selection prompts) against the best "
             "of as many random directions chosen the same way (mean over draws).", "",
             "| SAE | variable | best feature AUROC [95%] | random AUROC | difference |", "|---|---|---|---|---|"]
    for r in rows:
        if r["scope"] != "variable":
            continue
        lines.append(f"| {r['sae']} | {r['variable']} | {_fmt(r['auroc'])} [{_fmt(r['auroc_low'])}, "
                     f"{_fmt(r['auroc_high'])}] | {_fmt(r['random_auroc'])} | {_fmt(r['difference'])} |")
    return "\n".join(lines)


def _write(out: Path, table, comparison, params, summary, title, threshold, steering=None, recovered=None) -> None:
    from analysis.render.plots import sae_density, sae_pareto, sae_stable_unstable
    from cluster.store import write_json, write_parquet, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(params, out / "params.json")
    write_text(summary + "\n", out / "summary.md")
    sae_pareto(table, out / "sae_pareto.png", title=title, threshold=threshold)
    sae_density(table, out / "sae_density.png", title=title)
    sae_stable_unstable(table, out / "sae_stable_unstable.png", title=title, metrics=VERDICT_METRICS,
                        k=verdict_k(set(table["k"].to_pylist())))
    if comparison is not None:
        write_parquet(tables.from_rows([{**r, "seed": -1 if r["seed"] is None else r["seed"]}
                                        for r in comparison.models], tables.REPORT_SAE_MODELS, "sae_models.parquet"),
                      out / "sae_models.parquet", tables.REPORT_SAE_MODELS)
    if steering is not None:
        write_parquet(tables.from_rows(steering.steerability, tables.SAE_STEERABILITY, STEERABILITY_FILE),
                      out / STEERABILITY_FILE, tables.SAE_STEERABILITY)
        write_parquet(tables.from_rows(steering.steering, tables.SAE_STEERING, STEERING_FILE),
                      out / STEERING_FILE, tables.SAE_STEERING)
    if recovered is not None:
        write_parquet(tables.from_rows(recovered, tables.SAE_RECOVERY, RECOVERY_FILE), out / RECOVERY_FILE,
                      tables.SAE_RECOVERY)
    write_parquet(table, out / RESULT_FILE, tables.SAES)  # last: its presence means the run completed


def unit_metrics(cell_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Median over head SAEs of the superposition index, L0, FVU and CE score (MLflow keys
    ``sae_median/<metric>``)."""
    import numpy as np

    from cluster.store import read_parquet

    path = cell_dir / RESULT_FILE
    if not path.is_file():
        return {}, {}
    table = read_parquet(path, tables.SAES, ["kind", "superposition_index", "l0", "fvu", "ce_score"])
    head = np.array([k == "head" for k in table["kind"].to_pylist()])
    out = {}
    for m in ("superposition_index", "l0", "fvu", "ce_score"):
        v = np.asarray(table[m].to_numpy(), float)[head]
        if np.isfinite(v).any():
            out[f"sae_median/{m}"] = float(np.nanmedian(v))
    return out, {}


def cost(params, facts) -> float:
    """Token-forwards: the training tokens once, the evaluation tokens about three times (gaps,
    metrics, splice), and the SAE training itself counted as one forward per token per 8 SAEs
    (benchmarks/bench_saes.py measures tokens per second)."""
    tokens = float(params.get("tokens") or 2_000_000)
    ks = params.get("k") or [8]
    n_saes = (facts.layers * facts.heads + facts.layers) * len(ks)
    return tokens * (1 + n_saes / 8) + 3 * float(params.get("eval_tokens") or 32_768)


def load(cell_dir: Path):
    from cluster.store import read_cell

    return read_cell(cell_dir, EXPERIMENT.tables)


EXPERIMENT = Experiment(
    kind="saes", help="TopK SAEs (SAELens) on heads' results: superposition and sparsity, stable vs unstable heads",
    config=SaesConfig, run=run, tables={RESULT_FILE: tables.SAES, STEERABILITY_FILE: tables.SAE_STEERABILITY,
                                        STEERING_FILE: tables.SAE_STEERING, RECOVERY_FILE: tables.SAE_RECOVERY,
                                        "sae_models.parquet": tables.REPORT_SAE_MODELS},
    cost=cost, metrics=unit_metrics, load=load)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["saes", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
