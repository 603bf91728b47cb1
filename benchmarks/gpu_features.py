"""The features on a CUDA GPU (status: a first run on a lent H100, 2026-11-26, printed nothing
before its time ran out - no figure exists yet; the steps now print as they go) (run on the lent GPU machine; needs no pydantic, Ray or MLflow):

1. ``singular_values`` on the GPU (torch's CUDA SVD) equals numpy's LAPACK on the same float64
   matrices (per-prompt T x T kernels), and ``PromptSpectra`` fed the same captured scores on
   the GPU and on the CPU gives the same metrics (the only device-specific code path).
2. Every feature of a random Pythia-410M-shaped twin computed on the GPU vs on the CPU (same
   weights, same prompts; the forward passes differ in float32 rounding: the figure is the
   largest relative difference over heads and features, TF32 off).
3. Time of all features vs the key-kernel scan on the GPU (same prompts, medians of 3).

    python3 -m benchmarks.gpu_features   # writes $OUT/gpu_features.json when OUT is set
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
import torch

from spectral.features.extract import FeatureSettings, FeatureUnit, feature_unit, finalize
from spectral.features.names import all_features
from spectral.kernels.attention import PromptSpectra, singular_values
from spectral.kernels.scan import ScanSettings, ScanUnit, scan_unit
from spectral.models.loading import load_model

MODEL = os.environ.get("GPU_FEATURES_MODEL", "random:pythia-410m")
DEVICE = os.environ.get("GPU_FEATURES_DEVICE", "cuda")  # "cpu" only to dry-run the script
N_PROMPTS, N_WORDS = int(os.environ.get("GPU_FEATURES_PROMPTS", 256)), 32
N_COMPARE = 8
"""Prompts of the GPU-vs-CPU comparison (the CPU side is the slow one)."""


def prompts(n: int) -> tuple[str, ...]:
    words = "the of and a to in is was for on that with as by at from his her they".split()
    rng = np.random.default_rng(0)
    return tuple(" ".join(rng.choice(words, size=N_WORDS)) for _ in range(n))


def features(loaded, texts):
    s = FeatureSettings(batch_size=16)
    return finalize(feature_unit(loaded, FeatureUnit(0, texts, s)), s)


def columns(result) -> dict[str, np.ndarray]:
    out = {f"{k}.{m}": np.asarray(r.metrics[m]) for k, r in result.kernels.items() for m in r.metrics.as_dict()}
    out.update({f"baseline.{k}": v for k, v in result.baselines.items()})
    return {k: v for k, v in out.items() if k in set(all_features())}


def main() -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report: dict = {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (dry run)",
                    "torch": torch.__version__}
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    print("1. svd", flush=True)
    gen = torch.Generator().manual_seed(0)
    mats = torch.randn(64, 16, 40, 40, generator=gen, dtype=torch.float64).tril()
    cpu_sv, gpu_sv = singular_values(mats), singular_values(mats.to(DEVICE))
    report["svd_max_rel_diff"] = float(np.max(np.abs(cpu_sv - gpu_sv) / np.maximum(cpu_sv[..., :1], 1e-300)))
    mask = torch.ones(64, 40, dtype=torch.bool)
    mask[::3, 30:] = False
    a, b = PromptSpectra(1, 16), PromptSpectra(1, 16)
    scores = mats.float().masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    a.update(0, scores, mask)
    b.update(0, scores.to(DEVICE), mask.to(DEVICE))
    ra, rb = a.result(), b.result()
    report["prompt_spectra_max_rel_diff"] = max(
        float(np.nanmax(np.abs(ra.metrics[m] - rb.metrics[m]) / np.abs(ra.metrics[m]))) for m in ra.metrics.as_dict()
        if np.isfinite(ra.metrics[m]).all())
    print("2. gpu vs cpu features", flush=True)
    texts = prompts(N_PROMPTS)
    gpu = load_model(MODEL, device=DEVICE)
    cpu = load_model(MODEL, device="cpu")
    small = texts[:N_COMPARE]
    fg, fc = columns(features(gpu, small)), columns(features(cpu, small))
    diffs = {}
    for name in fg:
        x, y = fg[name], fc[name]
        ok = np.isfinite(x) & np.isfinite(y)
        diffs[name] = float(np.max(np.abs(x[ok] - y[ok]) / np.maximum(np.abs(y[ok]), 1e-12))) if ok.any() else 0.0
    worst = sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    report["gpu_vs_cpu_features_prompts"] = len(small)
    report["gpu_vs_cpu_max_rel_diff_by_feature_top5"] = worst
    report["gpu_vs_cpu_median_rel_diff"] = float(np.median(list(diffs.values())))
    report["gpu_vs_cpu_gap_max_rel_diff"] = max(v for k, v in diffs.items() if k.endswith(".gap"))
    print("3. timing", flush=True)
    scan = ScanUnit(0, texts, ScanSettings(kernel="key", keys="raw", batch_size=16))
    scan_unit(gpu, ScanUnit(0, texts[:32], scan.settings))
    features(gpu, texts[:32])
    t_scan, t_feat = [], []
    for _ in range(3):
        sync(); s = time.perf_counter(); scan_unit(gpu, scan); sync()
        t_scan.append(time.perf_counter() - s)
        s = time.perf_counter(); features(gpu, texts); sync()
        t_feat.append(time.perf_counter() - s)
    report.update(model=MODEL, prompts=N_PROMPTS,
                  tokens_per_prompt=float(np.mean([len(gpu.tokenizer(t)["input_ids"]) for t in texts])), scan_s_runs=t_scan, features_s_runs=t_feat,
                  scan_s=statistics.median(t_scan), features_s=statistics.median(t_feat),
                  ratio=statistics.median(t_feat) / statistics.median(t_scan))
    print(json.dumps(report, indent=2))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_features.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
