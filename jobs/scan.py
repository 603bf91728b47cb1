"""``eigengap scan``: spectral metrics of every head, written as Parquet.

Also ``python -m jobs.scan ...`` (what ``ray job submit`` runs).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pydantic import Field, model_validator

from jobs.config import ExecutorOptions, out_dir_ready
from jobs.registry import Experiment
from spectral import tables
from spectral.models.ranges import check_range
from spectral.kernels.metrics import UNSTABLE_GAP
from spectral.kernels.registry import KERNELS, Kernel, KeyKind, RidgeMode
from spectral.models import Device, DType

RESULT_FILE = "scan.parquet"


class ScanOptions(ExecutorOptions):
    """The options of a pass over prompts that streams head statistics: shared by ``scan`` and
    ``features`` (one declaration)."""

    ridge: float = Field(1e-2, gt=0)
    """Ridge lambda added to the Gram kernels (keys; queries in features)."""
    ridge_mode: RidgeMode = "absolute"
    """Gram kernels' ridge: absolute (lambda = ridge, the definitions' default) or relative
    (lambda = ridge x the kernel's mean eigenvalue: metrics invariant to the vectors' scale)."""
    center: bool = True
    """Subtract the mean vector (key, query) before forming the Gram."""
    batch_size: int = Field(8, gt=0)
    """Prompts per forward pass."""
    max_tokens: int | None = Field(None, gt=0)
    """Truncate each prompt to this many tokens (default: the model's context length)."""
    layers: list[int] | None = None
    """Only these layers (comma-separated; default all)."""
    heads: list[int] | None = None
    """Only these heads (comma-separated; default all)."""
    shard_size: int = Field(64, gt=0)
    """Prompts per work unit."""
    device: Device = "auto"
    """Where the model runs ('auto': a CUDA GPU when there is one)."""
    dtype: DType = "float32"
    """Model weights dtype (statistics are always accumulated in float64)."""
    threshold: float = Field(UNSTABLE_GAP, gt=0, lt=1)
    """Gap at or below which a head counts as unstable in the summary."""

    def selection(self) -> dict:
        """layers and heads as sorted tuples (None: all)."""
        return {"layers": tuple(sorted(set(self.layers))) if self.layers else None,
                "heads": tuple(sorted(set(self.heads))) if self.heads else None}

    def load_kwargs(self) -> dict:
        import torch

        return {"device": self.device, "dtype": getattr(torch, self.dtype)}


class ScanConfig(ScanOptions):
    model: str
    """Model spec: hub id, checkpoint directory, random:ARCH[?k=v&...], organism-NAME, or minilm (real
    all-MiniLM-L6-v2 weights, a BERT encoder, from the realweights extra)."""
    out: Path
    """Output directory (scan.parquet, params.json, summary.md, gap_heatmap.png)."""
    prompts: Path | None = None
    """Prompts: plain text, one per line, or JSONL with a 'text' field (not needed for --kernel weights)."""
    kernel: Kernel = "key"
    """Which kernel of each head: key Gram, pre-softmax scores, attention probabilities, or W_Q W_K^T
    (``spectral.kernels.registry.KERNELS``)."""
    keys: KeyKind = "raw"
    """Keys before ('raw') or after ('rotated') the rotary rotation (key kernel)."""
    force: bool = False
    """Overwrite an existing scan.parquet in --out."""

    @model_validator(mode="after")
    def _prompts_needed(self):
        if KERNELS[self.kernel].forward and self.prompts is None:
            raise ValueError("--prompts is required for --kernel " + self.kernel)
        return self

    def settings(self):
        from spectral.kernels.scan import ScanSettings

        return ScanSettings(
            kernel=self.kernel, keys=self.keys, ridge=self.ridge, center=self.center, ridge_mode=self.ridge_mode,
            batch_size=self.batch_size, max_tokens=self.max_tokens, **self.selection())



def check_selection(settings, n_layers: int, n_heads: int) -> None:
    check_range("layer", settings.layers, n_layers, option="--layers")
    check_range("head", settings.heads, n_heads, option="--heads")


def run(config: ScanConfig, *, executor=None, echo=print):
    """Validate everything, compute, then write the results directory."""
    from analysis.render.markdown import format_summary
    from analysis.summary import layer_summaries
    from spectral.kernels.prompts import read_prompts
    from spectral.kernels.scan import scan_table, settings_dict
    from spectral.models.loading import model_heads, parse_spec

    start = time.perf_counter()
    spec = parse_spec(config.model)
    prompts = read_prompts(config.prompts) if KERNELS[config.kernel].forward else []
    out_dir_ready(config.out, RESULT_FILE, config.force)
    n_layers, n_heads, n_kv_heads = model_heads(spec)
    settings = config.settings()
    check_selection(settings, n_layers, n_heads)
    executor = executor or config.make_executor(config.load_kwargs())
    table = scan_table(executor, spec.text, prompts, settings, n_layers, n_heads, n_kv_heads,
                       shard_size=config.shard_size)
    summary = format_summary(layer_summaries(table, config.threshold), config.threshold)
    params = {"config": config.model_dump(mode="json"), "settings": settings_dict(settings),
              "n_prompts": len(prompts), "seconds": round(time.perf_counter() - start, 3),
              "versions": _versions()}
    _write(config.out, table, params, summary, f"{spec.text} - {config.kernel} kernel ({table['keys'][0]} keys)",
           config.threshold)
    echo(summary)
    echo(f"wrote {config.out / RESULT_FILE} ({table.num_rows} heads) in {params['seconds']:.1f} s")
    return table


def _write(out: Path, table, params, summary, title, threshold) -> None:
    from analysis.render.plots import gap_heatmap
    from cluster.store import write_json, write_parquet, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(params, out / "params.json")
    write_text(summary + "\n", out / "summary.md")
    gap_heatmap(table, out / "gap_heatmap.png", title=title, threshold=threshold)
    write_parquet(table, out / RESULT_FILE, tables.SCAN)  # last: its presence means the run completed


def _versions() -> dict[str, str]:
    import pyarrow
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "pyarrow": pyarrow.__version__}


def unit_metrics(cell_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """The smallest gap of each layer (MLflow keys ``min_gap/layer_<l>``)."""
    return scan_metrics(cell_dir / RESULT_FILE), {}


def scan_metrics(path: Path, schema=tables.SCAN) -> dict[str, float]:
    """``min_gap/layer_<l>`` of a scan table of ``schema`` (read by every kind that writes one)."""
    import math

    from cluster.store import read_parquet

    if not path.is_file():
        return {}
    rows = read_parquet(path, schema, ["layer", "gap"]).to_pylist()
    metrics = {}
    for layer in sorted({r["layer"] for r in rows}):
        gaps = [r["gap"] for r in rows if r["layer"] == layer and r["gap"] is not None and math.isfinite(r["gap"])]
        if gaps:
            metrics[f"min_gap/layer_{layer}"] = min(gaps)
    return metrics


def cost(params, facts) -> float:
    """Token-forwards: every prompt once (256 prompts of 256 tokens when the file is not here);
    none for a kernel read from the weights."""
    if not KERNELS[params.get("kernel", "key")].forward:
        return 0.0
    prompts = params.get("prompts")
    count = sum(1 for line in Path(prompts).read_text().splitlines() if line.strip()) \
        if prompts and Path(prompts).is_file() else 256
    return float(count * (params.get("max_tokens") or 256))


def load(cell_dir: Path):
    from cluster.store import read_cell

    return read_cell(cell_dir, EXPERIMENT.tables)


EXPERIMENT = Experiment(
    kind="scan", help="spectral metrics of every head", config=ScanConfig, run=run,
    tables={RESULT_FILE: tables.SCAN}, cost=cost, metrics=unit_metrics, load=load)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["scan", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
