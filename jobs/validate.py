"""``eigengap validate``: scan a model, patch it, then test whether small gaps mark causally
important heads (research plan 1.1), with verdicts.

The scan that gives each head its gap runs, by default, on *held-out* prompts: a sample from
the same distribution as the patched examples, disjoint from them (built-in IOI: drawn with
``scan_seed``, any prompt also in the patched set removed; a task file: a seeded split). A
claim that the gap *predicts* importance needs the gap measured on prompts the importance
never saw. ``--scan-set in-sample`` scans the patched prompts themselves, labelled as such.

Also ``python -m jobs.validate ...``.
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from jobs.config import ExecutorOptions, out_dir_ready
from jobs.patch import PatchConfig, examples_for, replay_tokens, tables, units_for
from jobs.registry import Experiment, statistics_metrics
from jobs.scan import scan_metrics
from spectral import tables as schemas
from spectral.errors import UsageError
from spectral.kernels.metrics import UNSTABLE_GAP
from spectral.kernels.registry import KeyKind, RidgeMode
from spectral.models import Device

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
    keys: KeyKind = "raw"
    """Keys of the key kernel."""
    ridge: float = Field(1e-2, gt=0)
    """Ridge of the key kernel."""
    ridge_mode: RidgeMode = "absolute"
    """Key kernel ridge: absolute (the definitions' default) or relative to the kernel's mean eigenvalue."""
    threshold: float = Field(UNSTABLE_GAP, gt=0, lt=1)
    """Gap at or below which a head counts as unstable."""
    seed: int = 0
    """Seed of the built-in task and of the resampling."""
    scan_set: Literal["held-out", "in-sample"] = "held-out"
    """Prompts the gap is measured on: a held-out sample disjoint from the patched examples
    (default), or the patched examples themselves (in-sample; labelled in the report)."""
    n_scan: int = Field(64, gt=0)
    """Held-out scan prompts (built-in IOI task)."""
    scan_fraction: float = Field(0.5, gt=0, lt=1)
    """With a task file and a held-out scan: the fraction of its examples used for the scan
    (a seeded split; the rest are patched)."""
    scan_seed: int | None = None
    """Seed of the held-out scan sample or split (default: seed + 1); recorded in params.json."""
    device: Device = "auto"
    """Where the model runs."""
    force: bool = False
    """Overwrite existing results in --out."""


def run(config: ValidateConfig, *, echo=print):
    from analysis.render.markdown import validation_report
    from analysis.validation import validate
    from spectral.causal.patching import patch_unit
    from spectral.causal.tasks import encode
    from spectral.kernels.scan import ScanSettings, scan_table
    from spectral.models.loading import load_model, model_heads, parse_spec, require_causal_lm, resolve_device

    start = time.perf_counter()
    spec = parse_spec(config.model)
    out_dir_ready(config.out, RESULT_FILE, config.force)
    n_layers, n_heads, n_kv_heads = model_heads(spec)
    require_causal_lm(spec, "eigengap validate")
    device = resolve_device(config.device)
    with config.make_executor({"device": config.device}) as executor:  # one set of actors for both passes
        executor.start(spec.text)
        probe = load_model(spec, device=device)
        executor.reuse(probe)
        patch_config = PatchConfig(model=config.model, task=config.task, out=config.out, n_examples=config.n_examples,
                                   seed=config.seed)
        examples, scan_texts = scan_split(config, patch_config, probe)
        encode(probe.tokenizer, examples, source=config.task)
        settings = ScanSettings(keys=config.keys, ridge=config.ridge, ridge_mode=config.ridge_mode)
        scan = scan_table(executor, spec.text, scan_texts, settings, n_layers, n_heads, n_kv_heads)
        units = units_for(patch_config, examples, n_layers, n_heads)
        rows = [r for part in executor.map(spec.text, patch_unit, units, desc="patch") for r in part]
    heads_patch, per_example = tables(rows, patch_config, spec.text)
    result = validate(scan, per_example, config.threshold, config.seed)
    circuit, n_ranked = minimal_heads(probe, examples, result.heads)
    text = "\n\n".join((scan_note(config, len(scan_texts), len(examples)), validation_report(result),
                         circuit_report(circuit, n_ranked)))
    minimal = [list(h) for h in circuit.heads] if circuit is not None else None
    _write(config, spec.text, scan, heads_patch, per_example, result, text, round(time.perf_counter() - start, 3),
           minimal)
    echo(text)
    echo(f"wrote {config.out}")
    return result


def scan_seed(config: ValidateConfig) -> int:
    return config.seed + 1 if config.scan_seed is None else config.scan_seed


def scan_split(config: ValidateConfig, patch_config: PatchConfig, loaded) -> tuple[list, list[str]]:
    """(examples to patch, texts to scan): disjoint by default (module docstring)."""
    from spectral.causal.tasks import builtin_ioi

    examples = examples_for(patch_config, loaded)
    if config.scan_set == "in-sample":
        return examples, [e.clean for e in examples]
    seed = scan_seed(config)
    if config.task == "ioi":
        if seed == config.seed:
            raise UsageError("--scan-seed must differ from --seed for a held-out scan (or use --scan-set in-sample)")
        patched = {e.clean for e in examples}
        pool = [e.clean for e in builtin_ioi(loaded, 4 * config.n_scan, seed) if e.clean not in patched]
        texts = list(dict.fromkeys(pool))[:config.n_scan]
        if len(texts) < config.n_scan:
            raise UsageError(f"only {len(texts)} IOI prompts disjoint from the patched ones could be drawn for the "
                             f"held-out scan (asked {config.n_scan}): lower --n-scan or use --scan-set in-sample")
        return examples, texts
    if len(examples) < 4:
        raise UsageError(f"task {config.task}: {len(examples)} examples are too few to split into scan and patch "
                         "sets (need >= 4): use --scan-set in-sample")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    k = min(len(examples) - 2, max(2, round(config.scan_fraction * len(examples))))
    scan_idx, patch_idx = sorted(order[:k]), sorted(order[k:])
    patched = [examples[i] for i in patch_idx]
    texts = [examples[i].clean for i in scan_idx if examples[i].clean not in {e.clean for e in patched}]
    if not texts:
        raise UsageError(f"task {config.task}: every scan prompt also occurs among the patched prompts: "
                         "use --scan-set in-sample")
    return patched, texts


def scan_note(config: ValidateConfig, n_scan: int, n_patched: int) -> str:
    if config.scan_set == "in-sample":
        return (f"Scan set: IN-SAMPLE - the gaps were measured on the {n_patched} patched prompts themselves; "
                "a correlation here does not show that the gap predicts importance on unseen prompts.")
    return (f"Scan set: held out - gaps from {n_scan} prompts disjoint from the {n_patched} patched examples "
            f"(same distribution, scan seed {scan_seed(config)}).")


def minimal_heads(loaded, examples, heads, target: float = 0.8):
    """The smallest set of top-importance heads whose joint patch restores ``target`` of the
    clean logit difference (``patching.Circuit``, None when no prefix of the ranking does), and
    the ranking's length."""
    from spectral.causal.patching import task_caches, minimal_circuit

    adapter, task, clean, corrupt = task_caches(loaded, tuple(examples))
    rows = sorted(heads.to_pylist(), key=lambda r: (math.isnan(r["restoration"]), -r["restoration"]))
    ranking = [(r["layer"], r["head"]) for r in rows]
    return minimal_circuit(adapter, task, clean, corrupt, ranking, target), len(ranking)


def circuit_report(circuit, n_ranked: int, target: float = 0.8) -> str:
    """What ``minimal_heads`` found, and what mean-ablating that set on the clean run removes."""
    if circuit is None:
        return (f"Circuit: no prefix of the importance ranking restores {target:.0%} of the clean logit "
                f"difference, even all {n_ranked} heads together.")
    names = ", ".join(f"L{l}H{h}" for l, h in circuit.heads)
    return (f"Circuit: the {len(circuit.heads)} most important head(s) ({names}) patched together restore "
            f"{circuit.restoration:.3f} of the clean logit difference (target {target:.0%}); mean-ablating them "
            f"on the clean run removes {circuit.removed:.3f} of it.")


def _write(config, model, scan, heads_patch, per_example, result, text, seconds, minimal) -> None:
    from analysis.render.plots import gap_heatmap, gap_importance_heatmaps, gap_importance_scatter
    from cluster.store import write_json, write_parquet, write_text

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    write_json({"config": config.model_dump(mode="json"), "seconds": seconds, "minimal_circuit": minimal,
                "scan_set": config.scan_set, "scan_seed": scan_seed(config) if config.scan_set == "held-out" else None},
               out / "params.json")
    write_parquet(scan, out / "scan.parquet", schemas.SCAN)
    write_parquet(heads_patch, out / "patch.parquet", schemas.PATCH)
    write_parquet(per_example, out / "patch_examples.parquet", schemas.PATCH_EXAMPLES)
    write_parquet(result.heads, out / "heads.parquet", schemas.VALIDATE_HEADS)
    title = f"{model} - {config.task}"
    gap_heatmap(scan, out / "gap_heatmap.png", title=title, threshold=config.threshold)
    gap_importance_scatter(result.heads, out / "gap_vs_importance.png", title=title, threshold=config.threshold)
    gap_importance_heatmaps(result.heads, out / "gap_importance_heatmaps.png", title=title)
    write_text(f"# validate: {title}\n\n{text}\n", out / "report.md")
    write_parquet(result.statistics, out / RESULT_FILE, schemas.VALIDATE)  # last: its presence means the run completed


def unit_metrics(cell_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Every statistic of validate.parquet (``<key>/value|low|high``, ``verdict/<key>``) and the
    smallest gap of each layer of its scan (``min_gap/layer_<l>``)."""
    metrics, params = statistics_metrics(cell_dir / RESULT_FILE, schemas.VALIDATE)
    return {**metrics, **scan_metrics(cell_dir / "scan.parquet")}, params


def cost(params, facts) -> float:
    """The held-out scan, clean and corrupt caches, one replay per head (exact patching)."""
    return replay_tokens(params.get("n_examples", 64), facts.layers, facts.heads)


def load(cell_dir: Path):
    from cluster.store import read_cell

    return read_cell(cell_dir, EXPERIMENT.tables)


EXPERIMENT = Experiment(
    kind="validate", help="gap vs causal importance, with verdicts", config=ValidateConfig, run=run,
    tables={RESULT_FILE: schemas.VALIDATE, "heads.parquet": schemas.VALIDATE_HEADS, "scan.parquet": schemas.SCAN,
            "patch.parquet": schemas.PATCH, "patch_examples.parquet": schemas.PATCH_EXAMPLES},
    cost=cost, metrics=unit_metrics, load=load)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["validate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
