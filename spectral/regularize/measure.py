"""What one trained arm shows (issue 20, point 2), measured on inputs fixed for every arm and seed
(``Probes`` of ``spectral.dynamics.training`` with seed ``PROBE_SEED``; steering and patching prompts
drawn with their own fixed seeds), so that arms differ only by their weights.

Every text is cut to the organism's training context (``training_context``: 48 tokens; positions
beyond it were never trained, and a 4-episode prompt averages 72 tokens), and the scan and
held-out texts have ``EPISODES`` (2) episodes each. Per model:

- **spectra**: the key scan (``spectral.kernels.scan``: key kernel, raw keys, centred, ridge 1e-2
  absolute) of ``n_prompts`` held-out organism prompts, every head's gap and other metrics;
- **task quality**: the ICL score (``spectral.dynamics.training.icl_score``, organism form: the loss
  of the 5th span token in the third copy of ``"Repeat: r | r | r."`` minus that in the first
  copy; negative = learns in context), the repeat accuracy on ``[r; r]`` rows, the in-format
  induction accuracy and the IOI accuracy (``spectral.organisms.evaluate``), and the held-out loss
  (mean next-token cross-entropy over ``n_prompts`` organism texts drawn with ``HELDOUT_SEED``);
- **few-shot learning**: on the ICL score's sequences, top-1 accuracy and mean loss of span tokens
  2..10 of copy ``k + 1`` after ``k`` = 0, 1, 2 copies seen (``few_shot``; k = 0 is the first
  copy: no example, chance about 1/48), and the few-shot gain ``1 - loss_k / loss_0``: the
  fraction of the no-context loss of the same tokens that k examples remove (0: nothing learnt
  from the context, 1: perfect copying). The gain, unlike the k-shot loss or the ICL score, does
  not improve when a model merely predicts the tokens better without context;
- **head importance**: exact activation patching (denoising: each head's clean output patched into
  the corrupted run, ``spectral.causal.patching``) on ``n_ioi`` IOI examples of the organism's
  tasks.json: the restoration ``(M_patched - M_corrupt) / (M_clean - M_corrupt)`` of the mean
  logit difference per head;
- **steerability per layer**: the CAA sentiment vector at every layer matched to the KL budget
  (``spectral.steering.autosteer.layer_search``, 2 % tolerance) and its mean effect (change of
  log P(positive set) - log P(negative set) at the next token) over the concept's evaluation
  prompts; a layer the budget is out of reach for is NaN with its reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from spectral.dynamics.training import COPIES, POSITION, SPAN, Probes, make_probes, measure, organism_probe_prompts, token_losses
from spectral.kernels.scan import ScanSettings
from spectral.models.loading import LoadedModel

HELDOUT_SEED = 70_000
"""Seed of the held-out loss texts (training used seeds 0-4, other tools 10,000-60,000)."""
PATCH_SEED = 71_000
STEER_SEED = 72_000
EPISODES = 2
"""Episodes per scan prompt and held-out text (the 48 scan prompts: 14-62 tokens, mean 36, before the cut)."""
FEW_SHOT_K = tuple(range(COPIES))
"""Copies seen before the one read: the sequences hold ``COPIES`` (3) copies."""


@dataclass(frozen=True)
class Settings:
    n_prompts: int = 48
    """Key-scan prompts and held-out loss texts."""
    n_sequences: int = 128
    """ICL / few-shot sequences and repeated-token rows."""
    n_induction: int = 100
    n_ioi_per_template: int = 20
    n_ioi: int = 48
    """IOI examples for the patching."""
    n_steer: int = 32
    """Sentiment evaluation prompts (and as many neutral ones) for steering."""
    kl_budget: float = 0.25
    batch_size: int = 32
    version: int = 2
    """Bumped when what is measured changes (a part file of another version is measured again)."""


@dataclass
class ArmMeasures:
    """Everything measured on one trained model."""

    model: dict
    """Model-level numbers (quality, ICL, few-shot, held-out loss)."""
    scan: pa.Table
    importance: dict[tuple[int, int], float]
    steering: dict[int, dict]
    """layer -> {effect, kl, scale, note}."""
    extra: dict = field(default_factory=dict)


def few_shot(loaded: LoadedModel, probes: Probes, batch_size: int = 32) -> dict[str, float]:
    """Top-1 accuracy and mean loss of span tokens 2..SPAN of copy k + 1, k in ``FEW_SHOT_K``."""
    losses, hits = token_losses(loaded, probes.icl.tokens, batch_size=batch_size)  # column j: token j + 2 (1-based)
    first = probes.icl.early - POSITION + 1  # 1-based position of the span's first token in copy 1
    stride = (probes.icl.late - probes.icl.early) // (COPIES - 1)  # a copy and its separator
    out = {}
    for k in FEW_SHOT_K:
        start = first + k * stride
        cols = [start + j - 2 for j in range(1, SPAN)]  # span tokens 2..SPAN, as columns
        out[f"few_shot_accuracy_{k}"] = float(hits[:, cols].mean())
        out[f"few_shot_loss_{k}"] = float(losses[:, cols].mean())
    for k in FEW_SHOT_K[1:]:
        out[f"few_shot_gain_{k}"] = 1.0 - out[f"few_shot_loss_{k}"] / out["few_shot_loss_0"]
    return out


def training_context(loaded: LoadedModel) -> int:
    """The context the organism was trained on (its recipe.json), else the model's maximum."""
    from spectral.models.loading import checkpoint_path

    path = checkpoint_path(loaded)
    if path is not None and (path / "recipe.json").is_file():
        return int(json.loads((path / "recipe.json").read_text())["recipe"]["context"])
    return int(loaded.model.config.max_position_embeddings)


@torch.no_grad()
def heldout_loss(loaded: LoadedModel, texts: list[str], context: int, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy over the real tokens of ``texts``, each cut to ``context``
    tokens (nats/token)."""
    tok, model = loaded.tokenizer, loaded.model
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                  max_length=context).to(device)
        logits = model(**enc, use_cache=False).logits[:, :-1].float()
        target = enc.input_ids[:, 1:]
        real = enc.attention_mask[:, 1:].bool()
        nll = -torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]
        total += float(nll[real].double().sum())
        count += int(real.sum())
    return total / count


def importance(loaded: LoadedModel, n: int, seed: int = PATCH_SEED) -> dict[tuple[int, int], float]:
    """Per head, the exact denoising restoration of the mean IOI logit difference."""
    from spectral.causal.patching import PatchUnit, patch_unit, restoration
    from spectral.causal.tasks import builtin_ioi
    from spectral.models.adapter import HeadAdapter

    adapter = HeadAdapter(loaded.model)
    unit = PatchUnit(tuple(builtin_ioi(loaded, n=n, seed=seed)), "exact", "denoise", tuple(range(adapter.n_layers)),
                     tuple(range(adapter.n_heads)))
    cells: dict[tuple[int, int], list[dict]] = {}
    for r in patch_unit(loaded, unit):
        cells.setdefault((r["layer"], r["head"]), []).append(r)
    out = {}
    for key, rows in cells.items():
        clean, corrupt, patched = (float(np.mean([r[k] for r in rows])) for k in
                                   ("metric_clean", "metric_corrupt", "metric_patched"))
        out[key] = float(restoration(patched, clean, corrupt)) if clean != corrupt else float("nan")
    return out


def steerability(loaded: LoadedModel, settings: Settings) -> dict[int, dict]:
    """Per layer the CAA sentiment vector's mean effect at the KL budget (module docstring)."""
    from spectral.models.adapter import HeadAdapter
    from spectral.steering.autosteer import layer_search
    from spectral.steering.concepts import concept_for
    from spectral.steering.measure import Evaluator
    from spectral.steering.vectors import caa

    adapter = HeadAdapter(loaded.model)
    concept = concept_for("sentiment", loaded, scan_seed=STEER_SEED, n=settings.n_steer)
    ev = Evaluator(adapter, loaded.tokenizer, concept, "sentiment")
    device = loaded.model.get_input_embeddings().weight.device
    vectors = caa(adapter, loaded.tokenizer, concept, list(range(adapter.n_layers)), device)
    search = layer_search(ev, vectors, settings.kl_budget, "all")
    out = {}
    for l in range(adapter.n_layers):
        if l in search.effect:
            out[l] = {"effect": float(np.mean(search.effect[l])), "kl": float(search.kl[l]),
                      "scale": float(search.scale[l]), "note": ""}
        else:
            out[l] = {"effect": float("nan"), "kl": float("nan"), "scale": float("nan"),
                      "note": search.dropped.get(l, "not measured")}
    return out


def measure_arm(loaded: LoadedModel, tasks: dict, model: str, settings: Settings = Settings()) -> ArmMeasures:
    """Every measure of the module on one trained organism (``tasks``: its tasks.json)."""
    context = training_context(loaded)
    prompts = organism_probe_prompts(settings.n_prompts, episodes_per_prompt=EPISODES)
    probes = make_probes(loaded, tasks, prompts, n_sequences=settings.n_sequences, n_induction=settings.n_induction,
                         n_ioi_per_template=settings.n_ioi_per_template)
    m = measure(loaded, probes, ScanSettings(max_tokens=context), model, batch_size=settings.batch_size)
    texts = list(organism_probe_prompts(settings.n_prompts, seed=HELDOUT_SEED, episodes_per_prompt=EPISODES))
    row = {"icl_score": m.icl.score, "icl_loss_early": m.icl.loss_early, "icl_loss_late": m.icl.loss_late,
           "repeat_accuracy": m.repeat_accuracy, "induction_accuracy": m.induction_accuracy,
           "ioi_accuracy": m.ioi_accuracy, "heldout_loss": heldout_loss(loaded, texts, context, settings.batch_size),
           **few_shot(loaded, probes, settings.batch_size)}
    return ArmMeasures(row, m.scan, importance(loaded, settings.n_ioi), steerability(loaded, settings))
