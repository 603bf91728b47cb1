"""``eigengap features``: every spectral feature and non-spectral baseline of every head
(``spectral.features``), written as features.parquet, from one forward pass per prompt batch.

Also ``python -m jobs.features ...`` (what ``ray job submit`` runs).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from jobs.config import out_dir_ready
from jobs.registry import Experiment
from jobs.scan import ScanOptions
from spectral import tables

RESULT_FILE = "features.parquet"


class FeaturesConfig(ScanOptions):
    model: str
    """Model spec: hub id, checkpoint directory, random:ARCH[?k=v&...], organism-NAME or minilm."""
    out: Path
    """Output directory (features.parquet, params.json, summary.md, kernel_gaps.png)."""
    prompts: Path
    """Prompts: plain text, one per line, or JSONL with a 'text' field."""
    force: bool = False
    """Overwrite an existing features.parquet in --out."""

    def settings(self):
        from spectral.features.extract import FeatureSettings

        return FeatureSettings(
            ridge=self.ridge, center=self.center, ridge_mode=self.ridge_mode, batch_size=self.batch_size,
            max_tokens=self.max_tokens, **self.selection())


def run(config: FeaturesConfig, *, executor=None, echo=print):
    """Validate everything, compute, then write the results directory."""
    from dataclasses import asdict

    from analysis.features_summary import kernel_summary
    from jobs.scan import _versions, check_selection
    from spectral.features.extract import features_table
    from spectral.kernels.prompts import read_prompts
    from spectral.models.loading import model_heads, parse_spec

    start = time.perf_counter()
    spec = parse_spec(config.model)
    prompts = read_prompts(config.prompts)
    out_dir_ready(config.out, RESULT_FILE, config.force)
    n_layers, n_heads, n_kv_heads = model_heads(spec)
    settings = config.settings()
    check_selection(settings, n_layers, n_heads)
    executor = executor or config.make_executor(config.load_kwargs())
    table = features_table(executor, spec.text, prompts, settings, n_layers, n_heads, n_kv_heads,
                           shard_size=config.shard_size)
    summary = kernel_summary(table, config.threshold)
    params = {"config": config.model_dump(mode="json"), "settings": asdict(settings), "n_prompts": len(prompts),
              "seconds": round(time.perf_counter() - start, 3), "versions": _versions()}
    _write(config.out, table, params, summary, spec.text, config.threshold)
    echo(summary)
    echo(f"wrote {config.out / RESULT_FILE} ({table.num_rows} heads, {table.num_columns} columns) "
         f"in {params['seconds']:.1f} s")
    return table


def _write(out: Path, table, params, summary, title, threshold) -> None:
    from analysis.render.plots import kernel_gaps
    from cluster.store import write_json, write_parquet, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(params, out / "params.json")
    write_text(summary + "\n", out / "summary.md")
    kernel_gaps(table, out / "kernel_gaps.png", title=title, threshold=threshold)
    write_parquet(table, out / RESULT_FILE, tables.FEATURES)  # last: its presence means the run completed


def unit_metrics(cell_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Per kernel, the median gap over heads (MLflow keys ``median_gap/<kernel>``)."""
    import math

    import numpy as np

    from cluster.store import read_parquet
    from spectral.features.names import FEATURE_KERNELS

    path = cell_dir / RESULT_FILE
    if not path.is_file():
        return {}, {}
    table = read_parquet(path, tables.FEATURES, [f"{k}.gap" for k in FEATURE_KERNELS])
    metrics = {}
    for k in FEATURE_KERNELS:
        gaps = np.asarray(table[f"{k}.gap"].to_numpy(), float)
        if np.isfinite(gaps).any():
            value = float(np.nanmedian(gaps))
            if math.isfinite(value):
                metrics[f"median_gap/{k}"] = value
    return metrics, {}


def cost(params, facts) -> float:
    """Token-forwards: every prompt once (256 prompts of 256 tokens when the file is not here),
    times 3 for the per-prompt decompositions (benchmarks/features.py measures the ratio)."""
    prompts = params.get("prompts")
    count = sum(1 for line in Path(prompts).read_text().splitlines() if line.strip()) \
        if prompts and Path(prompts).is_file() else 256
    return 3.0 * float(count * (params.get("max_tokens") or 256))


def load(cell_dir: Path):
    from cluster.store import read_cell

    return read_cell(cell_dir, EXPERIMENT.tables)


EXPERIMENT = Experiment(
    kind="features", help="every kernel's spectral features and non-spectral baselines of every head",
    config=FeaturesConfig, run=run, tables={RESULT_FILE: tables.FEATURES}, cost=cost, metrics=unit_metrics,
    load=load)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["features", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
