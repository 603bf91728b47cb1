"""Feature extraction time vs today's key-kernel scan (target: every feature of organism-l in at
most 3x the key scan's time on the same prompts), and every feature of the shipped MiniLM
(all-MiniLM-L6-v2, 6 layers x 12 heads) on 256 sentences (target: under a minute on the
2-core CPU).

Organism-l (seed 0, trained or read from EIGENGAP_CACHE) on the 256 held-out prompts of
``eigengap organisms prompts`` (seed 20,000, 3 episodes each). The scan is ``scan_unit`` with
the key kernel (raw keys; all layers and heads) on one unit holding every prompt; the features
are ``feature_unit`` on the same unit (one forward pass capturing keys raw and rotated,
queries, scores, probabilities and head results; 10 prompt kernels and Gram kernels plus the
weight kernels and baselines) followed by ``finalize``. After one warm-up each, the two are
timed in alternation (3 rounds) so background load falls on both; the figures are medians.
MiniLM: the whole ``features_table`` on 256 sentences (the demo prompts, cycled), median of 3.

Also the floor (``svd_floor``): the per-prompt kernels' decompositions alone, on matrices of
the exact shapes, through the fastest routine available here, as a multiple of the key scan.

    .venv/bin/python -m benchmarks.bench_features
"""

from __future__ import annotations

import statistics

from benchmarks.common import interleaved_times, prompts, record, timed

N_PROMPTS = 256
BATCH_SIZE = 8
REPEATS = 3
TARGET_RATIO_MAX = 3.0
MINILM = "minilm"
MINILM_TARGET_S = 60.0


def organism(spec: str = "organism-l") -> dict:
    from jobs.organisms import corpus
    from spectral.features.extract import FeatureSettings, FeatureUnit, feature_unit, finalize
    from spectral.kernels.scan import ScanSettings, ScanUnit, scan_unit
    from spectral.models.loading import load_model

    loaded = load_model(spec)
    texts = corpus(20_000, N_PROMPTS * 3)
    lines = tuple(" ".join(texts[i:i + 3]) for i in range(0, len(texts), 3))
    scan = ScanUnit(0, lines, ScanSettings(kernel="key", keys="raw", batch_size=BATCH_SIZE))
    fsettings = FeatureSettings(batch_size=BATCH_SIZE)
    feats = FeatureUnit(0, lines, fsettings)
    scan_unit(loaded, ScanUnit(0, lines[:16], scan.settings))
    finalize(feature_unit(loaded, FeatureUnit(0, lines[:16], fsettings)), fsettings)
    runs = interleaved_times({"scan": lambda: scan_unit(loaded, scan),
                              "features": lambda: finalize(feature_unit(loaded, feats), fsettings)}, REPEATS)
    t_scan, t_feat = statistics.median(runs["scan"]), statistics.median(runs["features"])
    return {"model": spec, "prompts": len(lines), "batch_size": BATCH_SIZE,
            "scan_s_runs": [round(t, 3) for t in runs["scan"]], "features_s_runs": [round(t, 3) for t in runs["features"]],
            "scan_s": round(t_scan, 3), "features_s": round(t_feat, 3), "ratio": round(t_feat / t_scan, 3),
            "target_met": t_feat / t_scan <= TARGET_RATIO_MAX}


def svd_floor(spec: str = "organism-l") -> dict:
    """The least time the per-prompt kernels' decompositions alone can take here: the exact
    matrix shapes the features' run decomposes (per batch of the sorted prompts, per layer, 4
    kernels: scores and probs with and without the first token; (prompts, heads, T, T) padded to
    the batch's longest), filled with random lower-triangular matrices, through each routine
    available (numpy's LAPACK SVD as used; numpy and torch symmetric eigensolvers of M M^T, which
    give the squared singular values with less accuracy); the fastest is the floor."""
    import numpy as np
    import torch

    from jobs.organisms import corpus
    from spectral.kernels.scan import ScanSettings, token_batches
    from spectral.models.adapter import HeadAdapter
    from spectral.models.loading import load_model

    loaded = load_model(spec)
    adapter = HeadAdapter(loaded.model)
    texts = corpus(20_000, N_PROMPTS * 3)
    lines = tuple(" ".join(texts[i:i + 3]) for i in range(0, len(texts), 3))
    rng = np.random.default_rng(0)
    shapes = []
    for _, mask in token_batches(loaded, lines, ScanSettings(batch_size=BATCH_SIZE)):
        n = mask.sum(1)
        for variant in (0, 1):  # with / without the first token
            shapes += [(mask.shape[0], adapter.n_heads, int(n.max()) - variant)] * (2 * adapter.n_layers)
    mats = [np.tril(rng.standard_normal((b, h, t, t))) for b, h, t in shapes]
    routines = {
        "numpy_svd": lambda m: np.linalg.svd(m, compute_uv=False),
        "numpy_eigvalsh_mmt": lambda m: np.linalg.eigvalsh(m @ m.swapaxes(-1, -2)),
        "torch_eigvalsh_mmt_float64": lambda m: torch.linalg.eigvalsh((lambda t: t @ t.mT)(torch.from_numpy(m))),
        "torch_eigvalsh_mmt_float32": lambda m: torch.linalg.eigvalsh((lambda t: t @ t.mT)(torch.from_numpy(m).float())),
    }
    seconds = {}
    for name, fn in routines.items():
        fn(mats[0])
        seconds[name] = round(min(timed(lambda: [fn(m) for m in mats])[1] for _ in range(2)), 3)
    n = sum(b * h for b, h, _ in shapes)
    return {"matrices": n, "mean_t": round(float(np.mean([t for _, _, t in shapes])), 1), "seconds": seconds,
            "floor_s": min(seconds.values()), "floor_routine": min(seconds, key=seconds.get)}


def minilm() -> dict:
    from cluster.executors import LocalExecutor
    from spectral.features.extract import FeatureSettings, features_table
    from spectral.models.adapter import HeadAdapter
    from spectral.models.loading import load_model

    loaded, load_s = timed(lambda: load_model(MINILM))
    adapter = HeadAdapter(loaded.model)
    texts = prompts(N_PROMPTS)
    ex = LocalExecutor(loaded, progress=False)
    run = lambda: features_table(ex, loaded.spec.text, texts, FeatureSettings(batch_size=BATCH_SIZE),  # noqa: E731
                                 adapter.n_layers, adapter.n_heads, adapter.n_kv_heads)
    seconds = [timed(run)[1] for _ in range(REPEATS)]
    t = statistics.median(seconds)
    return {"model": MINILM, "sentences": len(texts), "load_s": round(load_s, 3),
            "features_s_runs": [round(s, 3) for s in seconds], "features_s": round(t, 3),
            "target_s": MINILM_TARGET_S, "target_met": t < MINILM_TARGET_S}


def main() -> dict:
    org = organism()
    print(f"organism-l: key scan {org['scan_s']:.2f}s, all features {org['features_s']:.2f}s, "
          f"ratio {org['ratio']:.2f} (target <= {TARGET_RATIO_MAX}: {'met' if org['target_met'] else 'MISSED'})",
          flush=True)
    floor = svd_floor()
    org["svd_floor"] = floor
    org["floor_ratio"] = round(floor["floor_s"] / org["scan_s"], 3)
    print(f"organism-l: the per-prompt decompositions alone take at least {floor['floor_s']:.2f}s "
          f"({floor['matrices']} matrices, {floor['floor_routine']}) = {org['floor_ratio']:.2f}x the key scan", flush=True)
    mini = minilm()
    print(f"MiniLM: all features of 256 sentences {mini['features_s']:.2f}s (target < {MINILM_TARGET_S:.0f}s: "
          f"{'met' if mini['target_met'] else 'MISSED'})", flush=True)
    result = {"benchmark": "features", "target_ratio_max": TARGET_RATIO_MAX, "repeats": REPEATS,
              "organism": org, "minilm": mini}
    record("features", result)
    return result


if __name__ == "__main__":
    main()
