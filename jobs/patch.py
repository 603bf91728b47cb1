"""``eigengap patch``: causal importance of every head by activation patching.

Also ``python -m jobs.patch ...``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from jobs.config import ExecutorOptions, out_dir_ready
from jobs.registry import PROMPT_TOKENS, Experiment
from spectral import tables as schemas
from spectral.errors import UsageError
from spectral.models import Device
from spectral.models.ranges import check_range

if TYPE_CHECKING:
    import pyarrow as pa

RESULT_FILE = "patch.parquet"
EXAMPLES_FILE = "patch_examples.parquet"


class PatchConfig(ExecutorOptions):
    model: str
    """Model spec: hub id, checkpoint directory, random:ARCH[?k=v&...] or organism-NAME."""
    task: str
    """A JSONL task file (clean, corrupt, answer, distractor per line), or 'ioi' for the built-in IOI task."""
    out: Path
    """Output directory (patch.parquet, patch_examples.parquet, params.json)."""
    method: Literal["exact", "attribution", "ablate-zero", "ablate-mean", "resample"] = "exact"
    """Exact patching, its gradient approximation, or an ablation of each head on the clean run."""
    direction: Literal["denoise", "noise"] = "denoise"
    """denoise: clean values into the corrupt run (sufficiency); noise: corrupt into clean (necessity)."""
    n_examples: int = Field(64, gt=0)
    """Examples of the built-in IOI task."""
    seed: int = 0
    """Seed of the built-in task and of resample ablations."""
    layers: list[int] | None = None
    """Only these layers (comma-separated; default all)."""
    heads: list[int] | None = None
    """Only these heads (comma-separated; default all)."""
    heads_per_unit: int | None = Field(None, gt=0)
    """Heads per work unit (default: all heads of a layer in one unit); smaller units spread
    one layer's heads over several Ray workers."""
    examples_per_unit: int | None = Field(None, gt=0)
    """Data-parallel units: split the task into chunks of this many examples, each unit patching
    every chosen head on one chunk (each worker runs clean/corrupt only on its own chunks).
    Exact patching and attribution only (ablations take statistics over the whole task)."""
    device: Device = "auto"
    """Where the model runs."""
    force: bool = False
    """Overwrite existing results in --out."""


def check_examples_per_unit(config: PatchConfig) -> None:
    if config.examples_per_unit and config.method not in ("exact", "attribution"):
        raise UsageError(f"--examples-per-unit works with exact patching and attribution only, not {config.method} "
                         "(ablations use statistics of the whole task)")


def examples_for(config: PatchConfig, loaded) -> list:
    from spectral.causal.tasks import builtin_ioi, read_task_file

    if config.task == "ioi":
        return builtin_ioi(loaded, config.n_examples, config.seed)
    return read_task_file(config.task)


def units_for(config: PatchConfig, examples, n_layers: int, n_heads: int) -> list:
    from spectral.causal.patching import PatchUnit

    layers = check_range("layer", config.layers or None, n_layers, option="--layers")
    heads = tuple(check_range("head", config.heads or None, n_heads, option="--heads"))
    examples = tuple(examples)
    size = config.examples_per_unit or len(examples)
    chunks = [(i, examples[i:i + size]) for i in range(0, len(examples), size)]
    if config.method == "attribution":
        return [PatchUnit(chunk, "attribution", config.direction, tuple(layers), heads, config.seed, first)
                for first, chunk in chunks]
    step = config.heads_per_unit or len(heads)
    head_groups = [heads[i:i + step] for i in range(0, len(heads), step)]
    if config.examples_per_unit:  # one unit per chunk (and head group): every layer on that chunk
        return [PatchUnit(chunk, config.method, config.direction, tuple(layers), group, config.seed, first)
                for first, chunk in chunks for group in head_groups]
    return [PatchUnit(examples, config.method, config.direction, (l,), group, config.seed)
            for l in layers for group in head_groups]


def attribution_agreement(config: PatchConfig, executor, spec: str, examples, n_layers: int, n_heads: int,
                          attributed: pa.Table) -> tuple[pa.Table, float]:
    """Exact patching of the same heads, and the Spearman correlation of the attribution
    estimate's per-head restoration with the exact one (reported with every attribution run)."""
    import pyarrow as pa

    from spectral.causal.patching import patch_unit

    exact_config = config.model_copy(update={"method": "exact"})
    units = units_for(exact_config, examples, n_layers, n_heads)
    rows = [r for part in executor.map(spec, patch_unit, units, desc="exact (for agreement)") for r in part]
    exact, _ = tables(rows, exact_config, spec)
    by_head = {(r["layer"], r["head"]): r["restoration"] for r in exact.to_pylist()}
    column = [by_head[(l, h)] for l, h in zip(attributed["layer"].to_pylist(), attributed["head"].to_pylist())]
    from scipy.stats import spearmanr

    rho = float(spearmanr(attributed["restoration"].to_numpy(), column, nan_policy="omit").statistic)
    return attributed.set_column(attributed.schema.get_field_index("restoration_exact"), "restoration_exact",
                                 pa.array(column, pa.float64())), rho


def tables(rows: list[dict], config: PatchConfig, model: str) -> tuple[pa.Table, pa.Table]:
    """Per-example rows and the per-head aggregate (restoration of the mean metrics)."""
    import numpy as np
    import pyarrow as pa

    from spectral.causal.patching import restoration

    meta = {"model": model, "method": config.method, "direction": config.direction}
    examples = pa.table({**{k: [v] * len(rows) for k, v in meta.items()},
                         **{k: [r[k] for r in rows] for k in rows[0]}})
    heads: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        heads.setdefault((r["layer"], r["head"]), []).append(r)
    agg = []
    for (layer, head), rs in sorted(heads.items()):
        clean, corrupt, patched = (float(np.mean([r[k] for r in rs])) for k in ("metric_clean", "metric_corrupt", "metric_patched"))
        agg.append({**meta, "layer": layer, "head": head, "n_examples": len(rs), "metric_clean": clean,
                    "metric_corrupt": corrupt, "metric_patched": patched,
                    "restoration": restoration(patched, clean, corrupt) if clean != corrupt else float("nan"),
                    "restoration_exact": None})  # filled in beside an attribution estimate
    return schemas.from_rows(agg, schemas.PATCH, "patch: heads"), examples


def run(config: PatchConfig, *, executor=None, echo=print):
    from cluster.store import write_json, write_parquet
    from spectral.causal.patching import patch_unit
    from spectral.causal.tasks import encode
    from spectral.models.loading import load_model, model_shape, parse_spec, require_causal_lm, resolve_device

    start = time.perf_counter()
    spec = parse_spec(config.model)
    check_examples_per_unit(config)
    out_dir_ready(config.out, RESULT_FILE, config.force)
    n_layers, n_heads = model_shape(spec)
    require_causal_lm(spec, "eigengap patch")
    check_range("layer", config.layers or None, n_layers, option="--layers")  # before any model is loaded
    check_range("head", config.heads or None, n_heads, option="--heads")
    device = resolve_device(config.device)
    with executor or config.make_executor({"device": config.device}) as executor:
        executor.start(spec.text)  # Ray actors load the model while the task is built here
        probe = load_model(spec, device=device)  # the task is built and checked before any work is sent out
        executor.reuse(probe)
        examples = examples_for(config, probe)
        encode(probe.tokenizer, examples, source=config.task)
        units = units_for(config, examples, n_layers, n_heads)
        rows = [r for part in executor.map(spec.text, patch_unit, units, desc="patch") for r in part]
        heads, per_example = tables(rows, config, spec.text)
        params = {"config": config.model_dump(mode="json"), "n_examples": len(examples)}
        if config.method == "attribution":
            heads, rho = attribution_agreement(config, executor, spec.text, examples, n_layers, n_heads, heads)
            params["spearman_attribution_vs_exact"] = rho
            echo(f"attribution vs exact patching: Spearman rho = {rho:.3f} over {heads.num_rows} heads")
    config.out.mkdir(parents=True, exist_ok=True)
    write_json({**params, "seconds": round(time.perf_counter() - start, 3)}, config.out / "params.json")
    write_parquet(per_example, config.out / EXAMPLES_FILE, schemas.PATCH_EXAMPLES)
    write_parquet(heads, config.out / RESULT_FILE, schemas.PATCH)
    top = heads.sort_by([("restoration", "descending")]).slice(0, 5).to_pylist()
    echo("top heads by restoration: " + ", ".join(f"L{r['layer']}H{r['head']}={r['restoration']:.3f}" for r in top))
    echo(f"wrote {config.out / RESULT_FILE} ({heads.num_rows} heads x {len(examples)} examples)")
    return heads


def unit_metrics(cell_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """``max_restoration`` over heads; ``spearman_attribution_vs_exact`` for attribution runs."""
    import json

    from cluster.store import read_parquet

    metrics: dict[str, float] = {}
    if (cell_dir / RESULT_FILE).is_file():
        table = read_parquet(cell_dir / RESULT_FILE, schemas.PATCH, ["restoration"])
        values = [v for v in table["restoration"].to_pylist() if v is not None]
        if values:
            metrics["max_restoration"] = float(max(values))
    params = json.loads((cell_dir / "params.json").read_text()) if (cell_dir / "params.json").is_file() else {}
    if "spearman_attribution_vs_exact" in params:
        metrics["spearman_attribution_vs_exact"] = float(params["spearman_attribution_vs_exact"])
    return metrics, {}


def replay_tokens(n: int, layers: int, heads: int) -> float:
    """Token-forwards of exact patching of every head: clean and corrupt caches, one replay per
    head and layer prefix (a scan pass included)."""
    return (3 + heads * (layers + 1) / 2) * n * PROMPT_TOKENS


def cost(params, facts) -> float:
    n = params.get("n_examples", 64)
    if params.get("method") == "attribution":  # forward + backward passes, then exact patching for agreement
        return 2 * n * PROMPT_TOKENS + 3 * n * PROMPT_TOKENS + (2 + facts.heads * (facts.layers + 1) / 2) * n * PROMPT_TOKENS
    return replay_tokens(n, facts.layers, facts.heads)


def load(cell_dir: Path):
    from cluster.store import read_cell

    return read_cell(cell_dir, EXPERIMENT.tables)


EXPERIMENT = Experiment(
    kind="patch", help="activation patching of every head", config=PatchConfig, run=run,
    tables={RESULT_FILE: schemas.PATCH, EXAMPLES_FILE: schemas.PATCH_EXAMPLES}, cost=cost, metrics=unit_metrics,
    load=load)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["patch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
