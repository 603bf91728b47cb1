"""Ground truth on the organisms (issue 16, point 5): do SAE features recover planted variables?

**Variables.** Probe prompts come from the organism's own task generators (``tasks.json``, read
as ``spectral.organisms.evaluate`` reads it), drawn with ``seed`` (default ``GROUNDTRUTH_SEED``
= 40,000: not an organism's training seed, which is its recipe's 0..N, nor evaluate's 10,000,
nor steering's held-out 30,000 + i):

- ``ioi_io``, "the indirect object is name n": IOI prompts ending "... gave a drink to"
  (``ioi_example``), every name the IO of ``n_prompts // len(names)`` prompts (examples whose
  IO has its quota already are skipped); one row per name, that name against the rest.
- ``sentiment``: ``sentiment_context`` prompts ("I love the apple. It is"), half positive,
  half negative; one row, positive against negative.

**Position.** The final token of each prompt: where the model predicts the IO name or the
sentiment word (``evaluate`` scores both tasks there), so where a head that moves the variable
(a name mover, a sentiment head) writes it. That token is the same for every class ("to";
"is" / "feels" in both polarities), so a feature separates classes only through what the
heads moved there, never through the token's own identity.

**Score.** The activations are ``sae.encode(sae.normalise(z))`` of the head's result ``z``
(a layer SAE: all heads' ``z`` concatenated in head order). The prompts are split once per
variable into a selection part (``selection_fraction``) and an evaluation part, each class
split in that proportion (seeded). On the selection part every feature's AUROC for the class
is taken (Mann-Whitney U / (n+ n-), ties counted half: ``auroc_matrix``); the feature with the
largest ``max(AUROC, 1 - AUROC)`` is chosen (ties: the lowest index) with its sign (-1 when
``1 - AUROC`` won: a feature silent for the class identifies it too). Reported: the evaluation
AUROC of ``sign x activation``, which the selection never saw (below 0.5 when the choice does
not carry over), with a 95 % percentile bootstrap interval over evaluation prompts, resampled
within each class, the choice held fixed.

**Random baseline.** ``d_sae`` random unit directions (isotropic Gaussian, normalised) in the
SAE's normalised input space take the features' place: same split, same best-of choice on the
selection part, scored on the evaluation part; ``random_draws`` seeded draws, reported as
mean, SD and 2.5 / 97.5 % quantiles over draws. A direction's activation is the plain
projection ``x_n . u``, not its ReLU: a ReLU ties every negative projection at 0 and can only
lose ranking information, and with the sign choice the projection covers both ``ReLU(u.x)``
and ``ReLU(-u.x)``. The baseline is the stronger one, so "features beat random" is the harder
claim; it gets as many candidates as the SAE has features, so both choices are best-of-``d_sae``.

**Rows.** Per SAE and variable, one ``scope="class"`` row per class (IOI: each name; sentiment:
"positive") and one ``scope="variable"`` row holding the mean over the class rows (the
bootstrap resamples the same evaluation prompts for every class; the baseline averages each
draw over classes first). ``analysis.sae_groundtruth`` takes its verdict from the variable rows.
Columns: ``spectral.tables.SAE_RECOVERY``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor

from spectral.errors import UsageError
from spectral.kernels.scan import input_device
from spectral.models.adapter import HeadAdapter
from spectral.models.families import family_of
from spectral.models.loading import LoadedModel, checkpoint_path
from spectral.organisms.evaluate import load_tasks
from spectral.organisms.language import ioi_example, sentiment_context
from spectral.saes.metrics import TopKSAE
from spectral.tokens import right_padded

GROUNDTRUTH_SEED = 40_000
N_PROMPTS = 512
"""Probe prompts per variable (IOI: rounded down to a multiple of the number of names)."""
RANDOM_DRAWS = 20
N_BOOTSTRAP = 1000
CONFIDENCE = 0.95
VARIABLES = ("ioi_io", "sentiment")
SCOPES = ("class", "variable")

SaeSpec = tuple[int, int | None, TopKSAE]
"""(layer, head or None for a layer SAE over all heads' z in head order, the SAE)."""


# ------------------------------------------------------------------------------------ probes
@dataclass(frozen=True)
class Probe:
    """One planted variable: its prompts and each prompt's class."""

    variable: str
    prompts: tuple[str, ...]
    labels: np.ndarray
    """(n,) class index of each prompt."""
    classes: tuple[str, ...]
    scored: tuple[int, ...]
    """Classes with a one-vs-rest row."""

    def onehot(self) -> np.ndarray:
        """(n, len(scored)) bool: prompt i belongs to scored class j."""
        return self.labels[:, None] == np.asarray(self.scored)[None, :]


def ioi_probe(tasks: dict, n_prompts: int, rng: random.Random) -> Probe:
    names = list(tasks["names"])
    per = n_prompts // len(names)
    if per < 2:
        raise UsageError(f"SAE ground truth: n_prompts={n_prompts} gives fewer than 2 IOI prompts per name "
                         f"({len(names)} names); need at least {2 * len(names)}")
    prompts, labels, left = [], [], dict.fromkeys(names, per)
    while len(prompts) < per * len(names):
        ex = ioi_example(rng, tasks=tasks)
        io = ex.answer.strip()
        if left[io]:
            left[io] -= 1
            prompts.append(ex.clean)
            labels.append(names.index(io))
    return Probe("ioi_io", tuple(prompts), np.array(labels), tuple(names), tuple(range(len(names))))


def sentiment_probe(tasks: dict, n_prompts: int, rng: random.Random) -> Probe:
    per = n_prompts // 2
    if per < 2:
        raise UsageError(f"SAE ground truth: n_prompts={n_prompts} gives fewer than 2 sentiment prompts per polarity")
    prompts = [sentiment_context(rng, polarity, tasks) for polarity in ("negative", "positive") for _ in range(per)]
    return Probe("sentiment", tuple(prompts), np.repeat([0, 1], per), ("negative", "positive"), (1,))


def probes(tasks: dict, n_prompts: int = N_PROMPTS, seed: int = GROUNDTRUTH_SEED) -> list[Probe]:
    """Every variable's probe, in ``VARIABLES`` order, each from its own seeded generator."""
    return [ioi_probe(tasks, n_prompts, random.Random(seed)),
            sentiment_probe(tasks, n_prompts, random.Random(seed + 1))]


def organism_tasks(loaded: LoadedModel) -> dict:
    """The organism's ``tasks.json``; a UsageError for a model without one."""
    path = checkpoint_path(loaded)
    if path is None or not (path / "tasks.json").is_file():
        raise UsageError(f"SAE ground truth needs a model organism (a checkpoint with tasks.json); "
                         f"{loaded.spec.text} has none")
    return load_tasks(path)


# ------------------------------------------------------------------------------------- split
@dataclass(frozen=True)
class Split:
    selection: np.ndarray
    """Indices of the prompts the feature is chosen on."""
    evaluation: np.ndarray
    """Indices of the prompts it is scored on."""


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> Split:
    """Each class's prompts shuffled (seeded) and cut at ``round(fraction x count)``; a
    UsageError unless every class has a prompt in both parts."""
    if not 0 < fraction < 1:
        raise UsageError(f"SAE ground truth: selection_fraction must lie strictly between 0 and 1, got {fraction}")
    rng = np.random.default_rng([seed, 1])
    sel, ev = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = int(round(fraction * idx.size))
        if not 0 < cut < idx.size:
            raise UsageError(f"SAE ground truth: too few prompts for a split: class {c} has {idx.size}, "
                             f"selection_fraction {fraction} leaves a part empty")
        sel.append(idx[:cut])
        ev.append(idx[cut:])
    return Split(np.sort(np.concatenate(sel)), np.sort(np.concatenate(ev)))


# ------------------------------------------------------------------------------------- AUROC
def auroc_matrix(scores: Float[np.ndarray, "n f"], onehot: np.ndarray) -> Float[np.ndarray, "c f"]:
    """AUROC of every score column for every class column of ``onehot`` (n, c): Mann-Whitney
    U / (n+ n-) from average ranks (ties count half), as ``sklearn.metrics.roc_auc_score``."""
    ranks = stats.rankdata(scores, axis=0)  # (n, f)
    y = onehot.astype(float)
    pos = y.sum(0)
    u = y.T @ ranks - (pos * (pos + 1) / 2)[:, None]  # (c, f)
    return u / (pos * (len(y) - pos))[:, None]


def paired_auroc(scores: Float[np.ndarray, "... n c"], onehot: np.ndarray) -> Float[np.ndarray, "... c"]:
    """AUROC of score column j for class column j (batched over leading axes)."""
    ranks = stats.rankdata(scores, axis=-2)
    y = onehot.astype(float)
    pos = y.sum(-2)
    return ((ranks * y).sum(-2) - pos * (pos + 1) / 2) / (pos * (y.shape[-2] - pos))


@dataclass(frozen=True)
class Choice:
    """The best candidate per class, chosen on the selection part, scored on the evaluation part."""

    index: np.ndarray
    sign: np.ndarray
    selection: np.ndarray
    """(c,) max(AUROC, 1 - AUROC) of the chosen candidate on the selection part."""
    evaluation: np.ndarray
    """(c,) AUROC of sign x candidate on the evaluation part."""
    flat: np.ndarray
    """(c,) bool: every candidate constant on the selection part (the choice is index 0)."""


def choose(candidates: Float[np.ndarray, "n f"], onehot: np.ndarray, split: Split) -> Choice:
    auc = auroc_matrix(candidates[split.selection], onehot[split.selection])  # (c, f)
    strength = np.maximum(auc, 1 - auc)
    index = strength.argmax(1)
    rows = np.arange(len(index))
    sign = np.where(auc[rows, index] >= 0.5, 1, -1)
    scored = candidates[split.evaluation][:, index] * sign  # (n_eval, c)
    flat = np.ptp(candidates[split.selection], axis=0)[index] == 0
    return Choice(index, sign, strength[rows, index], paired_auroc(scored, onehot[split.evaluation]), flat)


def random_directions(d_in: int, d_sae: int, seed: int, draw: int) -> Float[np.ndarray, "d_in d_sae"]:
    """``d_sae`` unit directions, isotropic, from a generator seeded by (seed, draw)."""
    u = np.random.default_rng([seed, 2, draw]).standard_normal((d_in, d_sae))
    return u / np.linalg.norm(u, axis=0, keepdims=True)


def bootstrap(scored: Float[np.ndarray, "n c"], onehot: np.ndarray, labels: np.ndarray, seed: int,
              n_resamples: int) -> Float[np.ndarray, "b c"]:
    """Per resample (evaluation prompts drawn with replacement within each class), the AUROC of
    each class's chosen scores."""
    rng = np.random.default_rng([seed, 3])
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), (n_resamples, int((labels == c).sum())))
                          for c in np.unique(labels)], axis=1)  # (b, n)
    return paired_auroc(scored[idx], onehot[idx])


# --------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class RecoveryRow:
    """One SAE on one planted variable (``scope="variable"``) or one of its classes ("class")."""

    model: str
    sae: str
    kind: str
    """"head" or "layer"."""
    layer: int
    head: int
    """-1 for a layer SAE (all heads' z concatenated in head order), as in ``saes.parquet``."""
    d_in: int
    d_sae: int
    k: int
    variable: str
    scope: str
    positive_class: str
    """The class against the rest ("" on a variable row)."""
    n_classes: int
    """Class rows averaged (1 on a class row)."""
    n_selection: int
    n_evaluation: int
    n_positive_selection: int
    n_positive_evaluation: int
    """The class's prompts in each part (a variable row: the smallest class's)."""
    feature: int | None
    sign: int | None
    """The chosen feature and its sign (None on a variable row: each class has its own)."""
    auroc_selection: float
    auroc: float
    auroc_low: float
    auroc_high: float
    random_auroc_selection: float
    random_auroc: float
    random_sd: float
    random_low: float
    random_high: float
    difference: float
    """auroc - random_auroc (evaluation part)."""
    random_draws: int
    prompt_seed: int
    note: str

    def as_dict(self) -> dict:
        return asdict(self)


def _interval(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return float(lo), float(hi)


def _random_summary(evals: np.ndarray, selections: np.ndarray) -> dict:
    """Baseline columns from per-draw values (draws,)."""
    lo, hi = _interval(evals)
    return dict(random_auroc_selection=float(selections.mean()), random_auroc=float(evals.mean()),
                random_sd=float(evals.std(ddof=1)) if evals.size > 1 else float("nan"), random_low=lo, random_high=hi)


def recover(sae: TopKSAE, z: Float[Tensor, "n d_in"], probe: Probe, split: Split, *, model: str, name: str,
            layer: int, head: int | None, random_draws: int = RANDOM_DRAWS, seed: int = GROUNDTRUTH_SEED,
            n_bootstrap: int = N_BOOTSTRAP) -> list[RecoveryRow]:
    """The class rows and the variable row of one SAE on one probe (``z``: the SAE's raw input
    at the probe's prompts' final positions, in the probe's order)."""
    sae = sae.to("cpu")
    x_n = sae.normalise(z.float().cpu())
    features = sae.encode(x_n).double().numpy()
    x = x_n.double().numpy()
    y = probe.onehot()
    best = choose(features, y, split)
    rand = [choose(x @ random_directions(sae.d_in, sae.d_sae, seed, d), y, split) for d in range(random_draws)]
    r_eval = np.stack([c.evaluation for c in rand])  # (draws, c)
    r_sel = np.stack([c.selection for c in rand])
    scored = features[split.evaluation][:, best.index] * best.sign
    boot = bootstrap(scored, y[split.evaluation], probe.labels[split.evaluation], seed, n_bootstrap)  # (b, c)
    n_pos_sel, n_pos_eval = y[split.selection].sum(0), y[split.evaluation].sum(0)
    base = dict(model=model, sae=name, kind="layer" if head is None else "head", layer=int(layer),
                head=-1 if head is None else int(head), d_in=sae.d_in,
                d_sae=sae.d_sae, k=int(sae.k), variable=probe.variable, n_selection=len(split.selection),
                n_evaluation=len(split.evaluation), random_draws=random_draws, prompt_seed=seed)
    notes = ["no feature varies on the selection prompts" if f else "" for f in best.flat]
    rows = []
    for j, c in enumerate(probe.scored):
        lo, hi = _interval(boot[:, j])
        rows.append(RecoveryRow(
            **base, scope="class", positive_class=probe.classes[c], n_classes=1,
            n_positive_selection=int(n_pos_sel[j]), n_positive_evaluation=int(n_pos_eval[j]),
            feature=int(best.index[j]), sign=int(best.sign[j]), auroc_selection=float(best.selection[j]),
            auroc=float(best.evaluation[j]), auroc_low=lo, auroc_high=hi, **_random_summary(r_eval[:, j], r_sel[:, j]),
            difference=float(best.evaluation[j] - r_eval[:, j].mean()), note=notes[j]))
    lo, hi = _interval(boot.mean(1))
    mean = float(best.evaluation.mean())
    flat = int(best.flat.sum())
    rows.append(RecoveryRow(
        **base, scope="variable", positive_class="", n_classes=len(probe.scored),
        n_positive_selection=int(n_pos_sel.min()), n_positive_evaluation=int(n_pos_eval.min()), feature=None,
        sign=None, auroc_selection=float(best.selection.mean()), auroc=mean, auroc_low=lo, auroc_high=hi,
        **_random_summary(r_eval.mean(1), r_sel.mean(1)), difference=mean - float(r_eval.mean()),
        note=f"{flat} of {len(probe.scored)} classes without a varying feature" if flat else ""))
    return rows


# ---------------------------------------------------------------------------------- the model
@torch.no_grad()
def final_z(loaded: LoadedModel, prompts: Sequence[str], layers: Sequence[int],
            batch_size: int = 64) -> dict[int, Float[Tensor, "n head d_head"]]:
    """Every head's result at each prompt's final token, for every layer of ``layers``: one
    forward pass per batch reads them all."""
    adapter = HeadAdapter(loaded.model)
    device = input_device(loaded.model)
    special = family_of(loaded.model).special_tokens
    encoded = [loaded.tokenizer(p, add_special_tokens=special)["input_ids"] for p in prompts]
    out: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(encoded), batch_size):
        ids, mask = right_padded(loaded.tokenizer, encoded[start:start + batch_size], device)
        rows, last = torch.arange(len(ids), device=device), mask.sum(1) - 1

        def keep(layer: int, site: str, z: Tensor) -> None:  # z: (batch, pos, head, d_head)
            out[layer].append(z[rows, last].float().cpu())

        with adapter.trace(["result"], keep, layers=layers, attention_mask=mask):
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return {layer: torch.cat(parts) for layer, parts in out.items()}


def check_saes(adapter: HeadAdapter, saes: Mapping[str, SaeSpec]) -> None:
    """A UsageError for an empty mapping, an unknown layer or head, or an SAE whose input width
    is not the head's (``d_head``) or the layer's (``heads x d_head``)."""
    if not saes:
        raise UsageError("SAE ground truth: no SAEs given")
    for name, (layer, head, sae) in saes.items():
        adapter.check_layers([layer])
        if head is not None:
            adapter.check_heads([head])
        width = adapter.d_head if head is not None else adapter.n_heads * adapter.d_head
        if sae.d_in != width:
            raise UsageError(f"SAE {name!r} reads d_in={sae.d_in}; "
                             f"{'head' if head is not None else 'layer'} input at layer {layer} has {width}")


def recovery(loaded: LoadedModel, saes: Mapping[str, SaeSpec], *, n_prompts: int = N_PROMPTS,
             seed: int = GROUNDTRUTH_SEED, selection_fraction: float = 0.5, random_draws: int = RANDOM_DRAWS,
             n_bootstrap: int = N_BOOTSTRAP, batch_size: int = 64) -> list[RecoveryRow]:
    """Every SAE of ``saes`` (name -> (layer, head or None, SAE)) on every planted variable of
    the organism ``loaded``: class rows and a variable row each (module docstring)."""
    adapter = HeadAdapter(loaded.model)
    adapter.require_causal_lm("SAE ground truth (read where the next token is predicted)")
    check_saes(adapter, saes)
    if random_draws < 1 or n_bootstrap < 1:
        raise UsageError(f"SAE ground truth: random_draws and n_bootstrap must be >= 1, got {random_draws}, "
                         f"{n_bootstrap}")
    found = probes(organism_tasks(loaded), n_prompts, seed)
    splits = [stratified_split(p.labels, selection_fraction, seed) for p in found]
    z = final_z(loaded, [t for p in found for t in p.prompts], sorted({s[0] for s in saes.values()}), batch_size)
    rows, start = [], 0
    for probe, split in zip(found, splits):
        part = slice(start, start + len(probe.prompts))
        start += len(probe.prompts)
        for name, (layer, head, sae) in saes.items():
            zl = z[layer][part]  # (n, head, d_head)
            x = zl[:, head] if head is not None else zl.flatten(1)  # (n, d_in)
            rows += recover(sae, x, probe, split, model=loaded.spec.text, name=name, layer=layer, head=head,
                            random_draws=random_draws, seed=seed, n_bootstrap=n_bootstrap)
    return rows
