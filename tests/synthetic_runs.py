"""Synthetic sweep runs with the layout and result schemas of the validate and steer jobs, for
the cross-model report's tests (no model is trained or loaded).

A run holds populations: ``organism-NAME`` and ``organism-NAME?seed=N`` specs (parsed, never
trained). Per model: ``model.json``; a validate unit (``scan.parquet``, ``heads.parquet``,
``patch_examples.parquet`` with per-example metrics, ``validate.parquet``, ``params.json``); a
steer unit (``layers.parquet``, ``per_prompt.parquet`` with strategy / family / k / draw /
prompt / split / effect, ``verdicts.parquet`` with a ``key`` column).

Importance is constructed to be high exactly for gap <= POSITIVE_GAP, so every calibrated
threshold lies near 0.49 and "0.77 holds" must FAIL; each model's minimum gap is an exact power
of its parameter count, so the power-law fit recovers it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.layout import safe

POSITIVE_GAP = 0.49
"""Largest gap of an important head (and of a steerable layer's weakest head)."""
MIN_GAP = (0.3, -0.1)
"""Each model's minimum gap is MIN_GAP[0] * (parameters / 1e6) ** MIN_GAP[1]."""
SIZES = [  # name, parameters, layers, heads per layer, d_model, d_head
    ("organism-xs", 1e6, 4, 8, 64, 16), ("organism-s", 4e6, 6, 8, 128, 32),
    ("organism-m", 1.6e7, 8, 8, 256, 32), ("organism-l", 6.4e7, 10, 8, 512, 64),
]
N_EXAMPLES = 24
N_PROMPTS = 16


def write(table: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), path)


def finish(unit: Path, model: str, index: int, kind: str) -> None:
    (unit / "cell.json").write_text(json.dumps({"cell": {"model": model, "index": index, "kind": kind, "params": {}}, "seconds": 0.0}))


def spec(name: str, seed: int) -> str:
    return name if seed == 0 else f"{name}?seed={seed}"


def synthetic_gaps(layers: int, heads: int, parameters: float, seed: int) -> np.ndarray:
    """(layers, heads) gaps: stable heads in [0.55, 0.95]; in the first half of the layers head 0
    is unstable (<= 0.49, one of them exactly 0.49); head 1 of layer 0 holds the minimum gap."""
    rng = np.random.default_rng(seed)
    gap = rng.uniform(0.55, 0.95, size=(layers, heads))
    n_unstable = layers // 2
    gap[:n_unstable, 0] = np.linspace(0.35, POSITIVE_GAP, n_unstable)
    gap[0, 1] = MIN_GAP[0] * (parameters / 1e6) ** MIN_GAP[1]
    return gap


def synthetic_importance(g: np.ndarray) -> np.ndarray:
    return np.where(g <= POSITIVE_GAP, 0.8, 0.02 * (g - 0.5))


def write_validate(unit: Path, model: str, gap: np.ndarray, seed: int, importance=synthetic_importance,
                   per_example: bool = True) -> None:
    layers, heads = gap.shape
    layer, head = np.divmod(np.arange(gap.size), heads)
    g = gap.ravel()
    imp = importance(g)
    scan = {"model": [model] * g.size, "layer": layer.astype(np.int32), "head": head.astype(np.int32), "gap": g,
            "entropy": 2.0 - g, "effective_rank": np.exp(2.0 - g), "lambda1": np.ones(g.size),
            "lambda2": 1 - g, "status": ["ok"] * g.size}
    write(scan, unit / "scan.parquet")
    rng = np.random.default_rng(1000 + seed)
    clean = 2.0 + 0.3 * rng.standard_normal((g.size, N_EXAMPLES))
    corrupt = 0.3 * rng.standard_normal((g.size, N_EXAMPLES))
    patched = corrupt + imp[:, None] * (clean - corrupt) + 0.02 * rng.standard_normal((g.size, N_EXAMPLES))
    if per_example:
        lh = np.repeat(np.arange(g.size), N_EXAMPLES)
        write({"model": [model] * lh.size, "method": ["exact"] * lh.size, "direction": ["denoise"] * lh.size,
               "layer": layer[lh], "head": head[lh], "example": np.tile(np.arange(N_EXAMPLES), g.size),
               "metric_patched": patched.ravel(), "metric_clean": clean.ravel(), "metric_corrupt": corrupt.ravel()},
              unit / "patch_examples.parquet")
    measured = (patched.mean(1) - corrupt.mean(1)) / (clean.mean(1) - corrupt.mean(1))
    write({"layer": layer, "head": head, "gap": g, "importance": measured, "unstable": g <= 0.77}, unit / "heads.parquet")
    r = float(np.corrcoef(1 / g, measured)[0, 1])
    write({"key": ["importance_correlation", "restoration_ratio"],
           "name": ["pearson r(importance, 1/gap)", "restoration ratio unstable/stable at gap <= 0.77"],
           "value": [r, 3.0], "low": [r - 0.05, 2.5], "high": [min(r + 0.05, 0.999), 3.5], "p_value": [0.001, np.nan],
           "target": [0.7, 2.0], "verdict": ["PASS" if r - 0.05 > 0.7 else "INCONCLUSIVE", "PASS"]},
          unit / "validate.parquet")
    (unit / "params.json").write_text(json.dumps({"config": {"model": model}, "scan_set": "held-out", "scan_seed": 1}))


def write_steer(unit: Path, model: str, gap: np.ndarray, seed: int, baseline_effect: float = 1.5,
                legacy: bool = False) -> None:
    """Steerable layers (min gap <= 0.49) have effect 2, others 0; the spectral rule picks the
    weakest layers (effect 2), the baseline has ``baseline_effect``, the random control 1."""
    layers = gap.shape[0]
    min_gap = np.nanmin(gap, axis=1)
    steerable = min_gap <= POSITIVE_GAP
    effect = np.where(steerable, 2.0, 0.0)
    write({"layer": np.arange(layers), "min_gap": min_gap, "mean_gap": np.nanmean(gap, axis=1),
           "scale": np.ones(layers), "effect": effect, "effect_low": effect - np.where(steerable, 0.5, 0.3),
           "effect_high": effect + 0.5, "kl": np.full(layers, 0.25)}, unit / "layers.parquet")
    rng = np.random.default_rng(2000 + seed)
    k = max(1, -(-layers // 3))
    if legacy:  # the steer job before held-out splits and equal-k arms
        arms = [("baseline", "", 1, 1, baseline_effect), ("spectral", "", k, 1, 2.0), ("random", "", k, 1, 1.0),
                ("oracle", "", 1, 1, 2.0)]
    else:
        arms = [("baseline", "baseline", 1, 1, baseline_effect), ("spectral-1", "spectral", 1, 1, 2.0),
                ("random-1", "random", 1, 20, 1.0), ("spectral", "spectral", k, 1, 2.0),
                ("random", "random", k, 20, 1.0), ("oracle-1", "oracle", 1, 1, 2.0), ("oracle", "oracle", k, 1, 2.05)]
    arms += [(f"layer {l}", "layer", 1, 1, float(effect[l])) for l in range(layers)]
    split = np.where(np.arange(N_PROMPTS) % 2 == 0, "selection", "heldout")
    rows = []
    for name, family, kk, draws, mean in arms:
        for d in range(draws):
            e = mean + 0.2 * rng.standard_normal(N_PROMPTS)
            for p in range(N_PROMPTS):
                row = {"strategy": name, "prompt": p, "effect": float(e[p])}
                if not legacy:
                    row.update(family=family, k=kk, draw=d, split=str(split[p]))
                rows.append(row)
    write({c: [r[c] for r in rows] for c in rows[0]}, unit / "per_prompt.parquet")
    r = float(np.corrcoef(min_gap, effect)[0, 1])
    cols = {"name": ["improvement of spectral over baseline (mean effect)",
                     "effect lost by spectral vs the oracle's best layer (fraction)",
                     "pearson r(per-layer min gap, per-layer steering effect)"],
            "value": [0.3, 0.05, r], "low": [0.1, 0.0, r - 0.05], "high": [0.5, 0.08, r + 0.05],
            "target": [0.25, np.nan, np.nan], "verdict": ["INCONCLUSIVE", "", ""],
            "note": ["", "oracle best layer 0; spectral layers [0]; match: True", "earlier study: r = 0.61"]}
    if not legacy:
        cols["key"] = ["steering_improvement", "layer_choice", "steering_r_min_gap"]
    write(cols, unit / "verdicts.parquet")
    write({"strategy": ["baseline", "spectral"], "effect": [baseline_effect, 2.0]}, unit / "strategies.parquet")


def make_run(root: Path, sizes=SIZES, seeds=(0, 1, 2), *, steer=True, facts=True, per_example=True,
             legacy_steer=False, importance=synthetic_importance) -> Path:
    """A finished synthetic sweep run: every size x seed, a validate and (optionally) a steer unit."""
    experiments = [{"kind": "validate", "params": {}}] + ([{"kind": "steer", "params": {}}] if steer else [])
    models = [(spec(s[0], seed), s, seed) for s in sizes for seed in seeds]
    root.mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({"config": {"models": [m for m, _, _ in models],
                                                            "experiments": experiments},
                                                 "config_hash": "0" * 16, "run_id": root.name}))
    for i, (name, (_, params, layers, heads, d_model, d_head), seed) in enumerate(models):
        model_dir = root / f"model={safe(name)}"
        gap = synthetic_gaps(layers, heads, params, 17 * i + seed)
        write_validate(model_dir / "experiment=0-validate", name, gap, 17 * i + seed, importance, per_example)
        finish(model_dir / "experiment=0-validate", name, 0, "validate")
        if steer:
            write_steer(model_dir / "experiment=1-steer", name, gap, 17 * i + seed, legacy=legacy_steer)
            finish(model_dir / "experiment=1-steer", name, 1, "steer")
        if facts:
            (model_dir / "model.json").write_text(json.dumps(
                {"model": name, "family": "gpt_neox", "parameters": params, "layers": layers, "heads": heads,
                 "d_model": d_model, "d_head": d_head}))
    return root
