"""``eigengap validate``: scan and patch the same model on the same prompts, then test
whether small gaps mark causally important heads (research plan 1.1), with verdicts.

Also ``python -m jobs.validate ...``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from analysis.plots import gap_heatmap, gap_importance_heatmaps, gap_importance_scatter
from analysis.validation import validate
from cluster.store import write_json, write_parquet, write_text
from jobs.config import ExecutorOptions, add_arguments, out_dir_ready, parse_config
from jobs.patch import PatchConfig, examples_for, tables, units_for
from spectral.loading import load_model, model_shape, parse_spec
from spectral.metrics import UNSTABLE_GAP
from spectral.patching import patch_unit
from spectral.scan import ScanSettings, finalize, reduce_partials, result_table, scan_unit, shard
from spectral.tasks import encode

RESULT_FILE = "validate.parquet"


class ValidateConfig(ExecutorOptions):
    model: str
    """Model spec: hub id, checkpoint directory, random:ARCH[?k=v&...] or organism-NAME."""
    task: str = "ioi"
    """A JSONL task file, or 'ioi' for the built-in IOI task."""
    out: Path
    """Output directory."""
    n_examples: int = Field(64, gt=0)
    """Examples of the built-in IOI task."""
    keys: Literal["raw", "rotated"] = "raw"
    """Keys of the key kernel."""
    ridge: float = Field(1e-2, gt=0)
    """Ridge of the key kernel."""
    threshold: float = Field(UNSTABLE_GAP, gt=0, lt=1)
    """Gap at or below which a head counts as unstable."""
    seed: int = 0
    """Seed of the built-in task and of the resampling."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs."""
    force: bool = False
    """Overwrite existing results in --out."""


def run(config: ValidateConfig, *, echo=print):
    start = time.perf_counter()
    spec = parse_spec(config.model)
    out_dir_ready(config.out, RESULT_FILE, config.force)
    n_layers, n_heads = model_shape(spec)
    device = "cuda" if config.device == "auto" and torch.cuda.is_available() else ("cpu" if config.device == "auto" else config.device)
    with config.make_executor({"device": config.device}) as executor:  # one set of actors for both passes
        executor.start(spec.text)
        probe = load_model(spec, device=device)
        executor.reuse(probe)
        patch_config = PatchConfig(model=config.model, task=config.task, out=config.out, n_examples=config.n_examples,
                                   seed=config.seed)
        examples = examples_for(patch_config, probe)
        encode(probe.tokenizer, examples, source=config.task)
        settings = ScanSettings(keys=config.keys, ridge=config.ridge)
        parts = executor.map(spec.text, scan_unit, shard([e.clean for e in examples], settings, 64), desc="scan")
        scan = result_table(finalize(reduce_partials(parts), settings), settings, spec.text, n_layers, n_heads)
        units = units_for(patch_config, examples, n_layers, n_heads)
        rows = [r for part in executor.map(spec.text, patch_unit, units, desc="patch") for r in part]
    heads_patch, per_example = tables(rows, patch_config, spec.text)
    result = validate(scan, per_example, config.threshold, config.seed)
    result.report += "\n\n" + circuit_report(probe, examples, result.heads)
    _write(config, spec.text, scan, heads_patch, per_example, result, round(time.perf_counter() - start, 3))
    echo(result.report)
    echo(f"wrote {config.out}")
    return result


def circuit_report(loaded, examples, heads, target: float = 0.8) -> str:
    """The smallest set of top-importance heads whose joint patch restores ``target`` of the
    clean logit difference, and what mean-ablating that set on the clean run removes."""
    from spectral.patching import task_caches, minimal_circuit

    adapter, task, clean, corrupt = task_caches(loaded, tuple(examples))
    rows = sorted(heads.to_pylist(), key=lambda r: (math.isnan(r["importance"]), -r["importance"]))
    ranking = [(r["layer"], r["head"]) for r in rows]
    circuit = minimal_circuit(adapter, task, clean, corrupt, ranking, target)
    if circuit is None:
        return (f"Circuit: no prefix of the importance ranking restores {target:.0%} of the clean logit "
                f"difference, even all {len(ranking)} heads together.")
    names = ", ".join(f"L{l}H{h}" for l, h in circuit.heads)
    return (f"Circuit: the {len(circuit.heads)} most important head(s) ({names}) patched together restore "
            f"{circuit.restoration:.3f} of the clean logit difference (target {target:.0%}); mean-ablating them "
            f"on the clean run removes {circuit.removed:.3f} of it.")


def _write(config, model, scan, heads_patch, per_example, result, seconds) -> None:
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    write_json({"config": config.model_dump(mode="json"), "seconds": seconds}, out / "params.json")
    write_parquet(scan, out / "scan.parquet")
    write_parquet(heads_patch, out / "patch.parquet")
    write_parquet(per_example, out / "patch_examples.parquet")
    write_parquet(result.heads, out / "heads.parquet")
    title = f"{model} - {config.task}"
    gap_heatmap(scan, out / "gap_heatmap.png", title=title, threshold=config.threshold)
    gap_importance_scatter(result.heads, out / "gap_vs_importance.png", title=title, threshold=config.threshold)
    gap_importance_heatmaps(result.heads, out / "gap_importance_heatmaps.png", title=title)
    write_text(f"# validate: {title}\n\n{result.report}\n", out / "report.md")
    write_parquet(result.statistics, out / RESULT_FILE)  # last: its presence means the run completed


def add_parser(sub) -> None:
    parser = sub.add_parser("validate", help="gap vs causal importance, with verdicts", description=__doc__.splitlines()[0])
    add_arguments(parser, ValidateConfig)
    parser.set_defaults(handler=lambda ns: run(parse_config(ValidateConfig, ns)))


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["validate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
