"""Run every benchmark (``make bench`` / ``python -m benchmarks.run_all``) and print a summary.

Each benchmark runs in its own Python process (as ``python -m benchmarks.NAME``), so one
benchmark's memory and threads cannot touch the next one's figures; the summary is read
back from ``benchmarks/results/*.json``. docs/BENCHMARKS.md records measured figures.
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.common import RESULTS

BENCHMARKS = {"bench_scan_overhead": "scan_overhead", "bench_scan_vs_naive": "scan_vs_naive",
              "bench_scan_memory": "scan_memory", "bench_patching": "patching", "bench_sweep": "sweep",
              "bench_path_patching": "path_patching", "bench_eap": "eap"}


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def overhead_lines(overhead: dict) -> list[str]:
    return [f"scan / forward  {row['ratio']:.2f}x (target <= {overhead['target_ratio_max']}: "
            f"{verdict(row['target_met'])})  {row['model']}" for row in overhead["rows"]]


def naive_lines(naive: dict) -> list[str]:
    extra = f", naive extrapolated from {naive['naive_heads_timed']} heads" if naive["naive_extrapolated"] else ""
    return [f"scan vs naive   {naive['speedup']:.0f}x faster (target >= {naive['target_speedup_min']:.0f}x: "
            f"{verdict(naive['target_met'])}), N={naive['pooled_tokens']}, {naive['heads']} heads{extra}",
            f"gap agreement   max |difference| {naive['max_abs_gap_difference']:.1e} "
            f"(expect < 1e-6: {verdict(naive['gap_agreement_met'])})"]


def memory_lines(memory: dict) -> list[str]:
    lines = []
    for series in memory["series"]:
        lines.append(f"memory          {series['allocator']}:")
        lines += [f"                N={row['tokens']:>9,}  peak RSS {row['peak_rss_mb']:.0f} MB  "
                  f"{row['tokens_per_s']:,} tokens/s" for row in series["rows"]]
        forward = series["forward_only"]
        lines.append(f"                forward only, N={forward['tokens']:,}: peak RSS {forward['peak_rss_mb']:.0f} MB; "
                     f"scan peak at 1M minus at 62.5k: {series['peak_rss_growth_1m_vs_62k_mb']:+.1f} MB")
    return lines


def patching_lines(patching: dict) -> list[str]:
    return [f"patching        {row['speedup_vs_naive']:.1f}x vs one-head loop, {row['speedup_vs_nnsight']:.1f}x vs nnsight loop "
            f"(target >= {patching['target_speedup_min']:.0f}x: {verdict(row['target_met'])})  {row['model']}"
            for row in patching["rows"]]


def sweep_lines(sweep: dict) -> list[str]:
    p, t = sweep["patching_sweep"], sweep["tiny_sweep"]
    return [f"sweep           1 -> 2 Ray workers {p['speedup_1_to_2_workers']:.2f}x (target >= {p['target_speedup_min']}: "
            f"{verdict(p['target_met'])})",
            f"sweep           fixed overhead {t['median_overhead_s']:.1f} s (target <= {t['target_overhead_max_s']:g} s: "
            f"{verdict(t['target_met'])})"]


def summary() -> list[str]:
    """One line per figure, each with its target and whether it was met."""
    res = {name: json.loads((RESULTS / f"{name}.json").read_text()) for name in BENCHMARKS.values()}
    return (overhead_lines(res["scan_overhead"]) + naive_lines(res["scan_vs_naive"]) + memory_lines(res["scan_memory"])
            + patching_lines(res["patching"]) + sweep_lines(res["sweep"]))


def main() -> None:
    for module in BENCHMARKS:
        print(f"== benchmarks.{module}", flush=True)
        subprocess.run([sys.executable, "-m", f"benchmarks.{module}"], check=True)
    print("== summary")
    print("\n".join(summary()))


if __name__ == "__main__":
    main()
