"""Synthetic sweep runs with the layout and result schemas of the validate and steer jobs, for
the cross-model report's tests (no model is trained or loaded).

A run holds populations: ``organism-NAME`` and ``organism-NAME?seed=N`` specs (parsed, never
trained). Per model: ``model.json``; a validate cell and a steer cell holding every table their
jobs write, each checked against its schema (``spectral.tables``) when written. The columns the
report reads carry the constructed values; the others hold placeholders (``conforming``).

Importance is constructed to be high exactly for gap <= POSITIVE_GAP, so every calibrated
threshold lies near 0.49 and "0.77 holds" must FAIL; each model's minimum gap is an exact power
of its parameter count, so the power-law fit recovers it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from cluster.layout import safe
from cluster.store import write_parquet
from spectral import tables

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


PLACEHOLDER = {pa.float64(): float("nan"), pa.int64(): 0, pa.int32(): 0, pa.string(): "", pa.bool_(): False}


def conforming(columns: dict, schema: pa.Schema) -> pa.Table:
    """A table of ``schema``: ``columns`` as given, every other column of the schema filled with a
    placeholder (NaN, 0, '' or False) that the report does not read."""
    n = len(next(iter(columns.values())))
    full = {f.name: columns[f.name] if f.name in columns else [PLACEHOLDER[f.type]] * n for f in schema}
    return pa.table({k: pa.array(list(v) if not isinstance(v, np.ndarray) else v, f.type)
                     for (k, v), f in zip(full.items(), schema)})


def write(columns: dict, path: Path, schema: pa.Schema) -> None:
    write_parquet(conforming(columns, schema), path, schema)


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


def write_validate(unit: Path, model: str, gap: np.ndarray, seed: int, importance=synthetic_importance) -> None:
    layers, heads = gap.shape
    layer, head = np.divmod(np.arange(gap.size), heads)
    g = gap.ravel()
    imp = importance(g)
    scan = {"model": [model] * g.size, "layer": layer.astype(np.int32), "head": head.astype(np.int32),
            "kv_head": head.astype(np.int32), "gap": g, "entropy": 2.0 - g, "effective_rank": np.exp(2.0 - g),
            "lambda1": np.ones(g.size), "lambda2": 1 - g, "status": ["ok"] * g.size}
    write(scan, unit / "scan.parquet", tables.SCAN)
    rng = np.random.default_rng(1000 + seed)
    clean = 2.0 + 0.3 * rng.standard_normal((g.size, N_EXAMPLES))
    corrupt = 0.3 * rng.standard_normal((g.size, N_EXAMPLES))
    patched = corrupt + imp[:, None] * (clean - corrupt) + 0.02 * rng.standard_normal((g.size, N_EXAMPLES))
    lh = np.repeat(np.arange(g.size), N_EXAMPLES)
    write({"model": [model] * lh.size, "method": ["exact"] * lh.size, "direction": ["denoise"] * lh.size,
           "layer": layer[lh], "head": head[lh], "example": np.tile(np.arange(N_EXAMPLES), g.size),
           "metric_patched": patched.ravel(), "metric_clean": clean.ravel(), "metric_corrupt": corrupt.ravel()},
          unit / "patch_examples.parquet", tables.PATCH_EXAMPLES)
    measured = (patched.mean(1) - corrupt.mean(1)) / (clean.mean(1) - corrupt.mean(1))
    write({"model": [model] * g.size, "method": ["exact"] * g.size, "direction": ["denoise"] * g.size, "layer": layer,
           "head": head, "n_examples": [N_EXAMPLES] * g.size, "restoration": measured,
           "restoration_exact": [None] * g.size}, unit / "patch.parquet", tables.PATCH)
    write({"layer": layer, "head": head, "gap": g, "restoration": measured, "unstable": g <= 0.77},
          unit / "heads.parquet", tables.VALIDATE_HEADS)
    r = float(np.corrcoef(1 / g, measured)[0, 1])
    write({"key": ["importance_correlation", "restoration_ratio"],
           "name": ["pearson r(importance, 1/gap)", "restoration ratio unstable/stable at gap <= 0.77"],
           "value": [r, 3.0], "low": [r - 0.05, 2.5], "high": [min(r + 0.05, 0.999), 3.5], "p_value": [0.001, np.nan],
           "target": [0.7, 2.0], "verdict": ["PASS" if r - 0.05 > 0.7 else "INCONCLUSIVE", "PASS"]},
          unit / "validate.parquet", tables.VALIDATE)
    (unit / "params.json").write_text(json.dumps({"config": {"model": model}, "scan_set": "held-out", "scan_seed": 1}))


def write_steer(unit: Path, model: str, gap: np.ndarray, seed: int, baseline_effect: float = 1.5) -> None:
    """Steerable layers (min gap <= 0.49) have effect 2, others 0; the spectral rule picks the
    weakest layers (effect 2), the baseline has ``baseline_effect``, the random control 1."""
    layers, heads = gap.shape
    layer, head = np.divmod(np.arange(gap.size), heads)
    write({"model": [model] * gap.size, "layer": layer.astype(np.int32), "head": head.astype(np.int32),
           "kv_head": head.astype(np.int32), "gap": gap.ravel(), "entropy": 2.0 - gap.ravel(),
           "status": ["ok"] * gap.size, "scan_set": ["held-out"] * gap.size}, unit / "scan.parquet", tables.STEER_SCAN)
    min_gap = np.nanmin(gap, axis=1)
    steerable = min_gap <= POSITIVE_GAP
    effect = np.where(steerable, 2.0, 0.0)
    write({"layer": np.arange(layers), "min_gap": min_gap, "mean_gap": np.nanmean(gap, axis=1),
           "scale": np.ones(layers), "effect": effect, "effect_low": effect - np.where(steerable, 0.5, 0.3),
           "effect_high": effect + 0.5, "kl": np.full(layers, 0.25)}, unit / "layers.parquet", tables.STEER_LAYERS)
    write({"layer": np.arange(layers), "coefficient": np.ones(layers), "effect": effect}, unit / "grid.parquet",
          tables.STEER_GRID)
    rng = np.random.default_rng(2000 + seed)
    k = max(1, -(-layers // 3))
    arms = [("baseline", "baseline", 1, 1, baseline_effect), ("spectral-1", "spectral", 1, 1, 2.0),
            ("random-1", "random", 1, 20, 1.0), ("spectral", "spectral", k, 1, 2.0),
            ("random", "random", k, 20, 1.0), ("oracle-1", "oracle", 1, 1, 2.0), ("oracle", "oracle", k, 1, 2.05)]
    arms += [(f"layer {l}", "layer", 1, 1, float(effect[l])) for l in range(layers)]
    split = np.where(np.arange(N_PROMPTS) % 2 == 0, "selection", "heldout")
    rows = []
    for name, family, kk, draws, mean in arms:
        for d in range(draws):
            e = mean + 0.2 * rng.standard_normal(N_PROMPTS)
            rows += [{"strategy": name, "family": family, "k": kk, "draw": d, "prompt": p, "split": str(split[p]),
                      "effect": float(e[p])} for p in range(N_PROMPTS)]
    write({c: [r[c] for r in rows] for c in rows[0]}, unit / "per_prompt.parquet", tables.STEER_PER_PROMPT)
    r = float(np.corrcoef(min_gap, effect)[0, 1])
    write({"key": ["steering_improvement", "layer_choice", "steering_r_min_gap"],
           "name": ["improvement of spectral over baseline (mean effect)",
                    "effect lost by spectral vs the oracle's best layer (fraction)",
                    "pearson r(per-layer min gap, per-layer steering effect)"],
           "value": [0.3, 0.05, r], "low": [0.1, 0.0, r - 0.05], "high": [0.5, 0.08, r + 0.05],
           "target": [0.25, np.nan, np.nan], "verdict": ["INCONCLUSIVE", "", ""],
           "note": ["", "oracle best layer 0; spectral layers [0]; match: True", "earlier study: r = 0.61"]},
          unit / "verdicts.parquet", tables.STEER_VERDICTS)
    write({"strategy": ["baseline", "spectral"], "family": ["baseline", "spectral"], "k": [1, k],
           "effect": [baseline_effect, 2.0]}, unit / "strategies.parquet", tables.STEER_STRATEGIES)


def write_features(unit: Path, model: str, gap: np.ndarray, seed: int) -> None:
    """A features cell: every kernel's gap is the head's gap plus kernel-specific noise (key_raw:
    none, so it predicts importance exactly), its other metrics simple functions of the gap;
    the baselines are noise, independent of importance."""
    from spectral.features.names import FEATURE_KERNELS, FEATURE_METRICS, baseline_features

    layers, heads = gap.shape
    layer, head = np.divmod(np.arange(gap.size), heads)
    g = gap.ravel()
    rng = np.random.default_rng(3000 + seed)
    cols: dict = {"model": [model] * g.size, "layer": layer.astype(np.int32), "head": head.astype(np.int32),
                  "kv_head": head.astype(np.int32), "n_prompts": [N_PROMPTS] * g.size, "ridge": [0.01] * g.size,
                  "ridge_mode": ["absolute"] * g.size, "center": [True] * g.size}
    for i, kernel in enumerate(FEATURE_KERNELS):
        kg = np.clip(g + (0.0 if kernel == "key_raw" else 0.05 * (1 + i % 3)) * rng.standard_normal(g.size), 0.01, 0.99)
        for metric in FEATURE_METRICS:
            cols[f"{kernel}.{metric}"] = kg if metric == "gap" else (1 - kg if metric == "instability" else
                                                                       rng.uniform(0.1, 2.0, g.size))
        cols[f"{kernel}.status"] = ["ok"] * g.size
    for name in baseline_features():
        cols[name] = rng.uniform(0.5, 1.5, g.size)
    write(cols, unit / "features.parquet", tables.FEATURES)
    (unit / "params.json").write_text(json.dumps({"config": {"model": model}, "n_prompts": N_PROMPTS}))


SAE_SUPERPOSITION = (2.0, 1.0)
"""Synthetic SAE cells: superposition index of unstable (gap <= 0.77) / stable heads, plus noise."""
SAE_STEERING_DIFFERENCE = 0.5
"""Synthetic SAE cells: feature-aware steering minus ActAdd, per SAE, plus noise."""


def write_saes(unit: Path, model: str, gap: np.ndarray, seed: int) -> None:
    """A saes cell: per head an SAE at k = 8 whose superposition index is SAE_SUPERPOSITION[0]
    on unstable heads (gap <= 0.77) and [1] on the rest, plus noise (so "unstable heads show
    more superposition" must PASS); per layer a steering row whose feature - ActAdd difference is
    SAE_STEERING_DIFFERENCE plus noise (PASS); per layer a recovery row with the best feature
    0.1 above random (PASS)."""
    layers, heads = gap.shape
    rng = np.random.default_rng(4000 + seed)
    layer, head = np.divmod(np.arange(gap.size), heads)
    g = gap.ravel()
    unstable = g <= 0.77
    n = g.size
    write({"model": [model] * n, "name": [f"L{l}H{h}_k8" for l, h in zip(layer, head)],
           "target": [f"L{l}H{h}" for l, h in zip(layer, head)], "kind": ["head"] * n, "layer": layer, "head": head,
           "k": [8] * n, "d_in": [16] * n, "d_sae": [128] * n, "gap": g, "unstable": unstable,
           "threshold": [0.77] * n, "superposition_index": np.where(unstable, *SAE_SUPERPOSITION) + 0.2 * rng.standard_normal(n),
           "l0": rng.uniform(7, 8, n), "fvu": rng.uniform(0.01, 0.1, n), "ce_score": rng.uniform(0.8, 1.0, n),
           "dead_fraction": rng.uniform(0, 0.3, n), "dense_fraction": rng.uniform(0, 0.1, n),
           "feature_dimensionality_mean": rng.uniform(0.1, 0.3, n), "ev_l0_area": rng.uniform(0.8, 0.95, n),
           "density_histogram": [[0] * 20] * n}, unit / "saes.parquet", tables.SAES)
    rows = []
    for l in range(layers):
        d = SAE_STEERING_DIFFERENCE + 0.1 * rng.standard_normal()
        for arm, effect in (("actadd", 1.0), ("feature", 1.0 + d), ("feature-actadd", d)):
            rows.append({"model": model, "sae": f"L{l}_k8", "layer": l, "head": -1, "arm": arm, "effect": effect,
                         "kl_budget": 0.25, "n_prompts": 16, "n_selection": 16})
    write({k: [r[k] for r in rows] for k in rows[0]}, unit / "sae_steering.parquet", tables.SAE_STEERING)
    rec = []
    for l in range(layers):
        for variable in ("ioi_io", "sentiment"):
            a = 0.8 + 0.05 * rng.standard_normal()
            rec.append({"model": model, "sae": f"L{l}_k8", "kind": "layer", "layer": l, "head": -1, "k": 8,
                        "variable": variable, "scope": "variable", "auroc_selection": a + 0.01, "auroc": a,
                        "auroc_low": a - 0.05, "auroc_high": a + 0.05, "random_auroc": a - 0.1, "random_sd": 0.01,
                        "difference": 0.1, "feature": 0, "sign": 1})
    write({k: [r[k] for r in rec] for k in rec[0]}, unit / "sae_recovery.parquet", tables.SAE_RECOVERY)
    (unit / "params.json").write_text(json.dumps({"config": {"model": model}}))


def make_run(root: Path, sizes=SIZES, seeds=(0, 1, 2), *, steer=True, facts=True,
             importance=synthetic_importance, features=False, saes=False) -> Path:
    """A finished synthetic sweep run: every size x seed, a validate and (optionally) a steer, a
    features and a saes unit."""
    experiments = [{"kind": "validate", "params": {}}] + ([{"kind": "steer", "params": {}}] if steer else []) \
        + ([{"kind": "features", "params": {}}] if features else []) + ([{"kind": "saes", "params": {}}] if saes else [])
    models = [(spec(s[0], seed), s, seed) for s in sizes for seed in seeds]
    root.mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({"config": {"name": root.name, "models": [m for m, _, _ in models],
                                                            "experiments": experiments},
                                                 "config_hash": "0" * 16, "run_id": root.name}))
    for i, (name, (_, params, layers, heads, d_model, d_head), seed) in enumerate(models):
        model_dir = root / f"model={safe(name)}"
        gap = synthetic_gaps(layers, heads, params, 17 * i + seed)
        write_validate(model_dir / "experiment=0-validate", name, gap, 17 * i + seed, importance)
        finish(model_dir / "experiment=0-validate", name, 0, "validate")
        if steer:
            write_steer(model_dir / "experiment=1-steer", name, gap, 17 * i + seed)
            finish(model_dir / "experiment=1-steer", name, 1, "steer")
        if features:
            index = 2 if steer else 1
            write_features(model_dir / f"experiment={index}-features", name, gap, 17 * i + seed)
            finish(model_dir / f"experiment={index}-features", name, index, "features")
        if saes:
            index = 1 + steer + features
            write_saes(model_dir / f"experiment={index}-saes", name, gap, 17 * i + seed)
            finish(model_dir / f"experiment={index}-saes", name, index, "saes")
        if facts:
            (model_dir / "model.json").write_text(json.dumps(
                {"model": name, "family": "gpt_neox", "parameters": params, "layers": layers, "heads": heads,
                 "d_model": d_model, "d_head": d_head}))
    return root
