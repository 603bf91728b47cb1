"""``eigengap dynamics generate`` (experiment kind ``dynamics_generate``): key-kernel spectra token
by token during generation (issue 17, point 3).

One run, on one model: generate up to ``--max-new-tokens`` tokens for each prompt (greedy by
default) and record, at every step, every selected head's key-kernel spectrum of the context so
far (rank-one updates of the streamed d_head x d_head statistics, exactly what a scan of the
context gives) and the step query's attention over it
(``spectral.dynamics.generation.generate_trajectories``). Then, per prompt and head, the
change-points of the head's gap trajectory over the steps (``spectral.dynamics.changepoints``,
its fixed rule: the step index plays the checkpoint's part) and the size of the gap's change.

Prompts: ``--prompts FILE`` (one per line, or JSONL with a 'text' field); without it, for an
organism (organism-NAME, or a directory with its recipe.json) the first half (in words) of
``--n-prompts`` fresh episodes of its language (``spectral.organisms.language.corpus``, seed
``PROMPT_SEED``), else the first ``--n-prompts``
lines of the shipped demo prompts (``spectral/data/demo_prompts.txt``).

Change-points, caveat: the detector's stated false-alarm rates (at most 1 % on white noise, 5 %
under AR(1) noise with rho = 0.3, for 30-60 points) assume a stationary series around its segment
means. A gap trajectory during generation is not that: each step adds one key to cumulative
statistics, so the gap drifts smoothly and its step-to-step noise is strongly autocorrelated,
and the detector reads a slow drift as one or more mean shifts. Counts of change-points here are
descriptive (where the gap moves most), not tests of a phase change. Series shorter than the
detector's minimum (``MIN_LENGTH`` steps) or with a non-finite gap get none and are counted apart.

Writes trajectories.parquet (one row per prompt x step x layer x head, ``TRAJECTORIES``),
generation_changepoints.parquet (one row per prompt x layer x head), generations.json (the
prompts and generated texts), params.json, summary.md, gap_trajectories.png (per layer, each
head's gap over the steps: mean over prompts with a 10-90 % band, change-points marked) and
gap_steps_heatmap.png (step x head, mean gap over prompts, change-points marked);
trajectories.parquet last (its presence means the run completed: without --force an existing one
is kept and the run refused). Bad input (max-new-tokens <= 0, a missing or empty prompts file,
layers or heads out of range) is one line, exit 2, before anything is written.

Also ``python -m jobs.dynamics_generate ...``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pyarrow as pa
from pydantic import Field

from jobs.config import JobConfig, out_dir_ready
from jobs.registry import PROMPT_TOKENS, Experiment
from spectral import tables as schemas
from spectral.kernels.registry import KeyKind, RidgeMode
from spectral.models import Device

RESULT_FILE = "trajectories.parquet"
CHANGES_FILE = "generation_changepoints.parquet"
TEXTS_FILE = "generations.json"
SUMMARY_FILE = "summary.json"
PROMPT_SEED = 7
"""Seed of the organisms' default prompts (episodes of their language)."""
METRIC = "gap"
"""The trajectory whose change-points are found."""

CHANGEPOINTS = schemas.GENERATION_CHANGEPOINTS


class DynamicsGenerateConfig(JobConfig):
    model: str
    """Model spec: hub id, checkpoint directory, random:ARCH[?k=v&...] or organism-NAME (a causal LM)."""
    out: Path
    """Output directory."""
    prompts: Path | None = None
    """Prompts: plain text, one per line, or JSONL with a 'text' field (default: organism episodes, else the
    demo prompts)."""
    n_prompts: int = Field(8, gt=0)
    """Default prompts taken when --prompts is not given."""
    max_new_tokens: int = Field(32, gt=0)
    """Tokens generated per prompt (fewer where a prompt emits its end-of-sequence token); every step is measured."""
    keys: KeyKind = "raw"
    """Keys of the kernel: before ('raw', the scan's default) or after ('rotated') the rotary rotation."""
    ridge: float = Field(1e-2, gt=0)
    """Ridge lambda of the key kernel (as eigengap scan)."""
    ridge_mode: RidgeMode = "absolute"
    """absolute (lambda = ridge) or relative (lambda = ridge x the kernel's mean eigenvalue)."""
    center: bool = True
    """Subtract the mean key before forming the Gram."""
    layers: list[int] | None = None
    """Only these layers (comma-separated; default all)."""
    heads: list[int] | None = None
    """Only these heads (comma-separated; default all)."""
    batch_size: int = Field(8, gt=0)
    """Prompts generated together."""
    sample: bool = False
    """Sample from softmax(logits / temperature) instead of greedy decoding."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (with --sample)."""
    seed: int = 0
    """Seed of the sampling (with --sample)."""
    stop_at_eos: bool = True
    """Stop a prompt at the model's end-of-sequence token."""
    device: Device = "auto"
    """Where the model runs."""
    force: bool = False
    """Overwrite existing results in --out."""

    def settings(self):
        from spectral.dynamics.generation import GenerationSettings

        return GenerationSettings(
            max_new_tokens=self.max_new_tokens, keys=self.keys, ridge=self.ridge, center=self.center,
            ridge_mode=self.ridge_mode, batch_size=self.batch_size, sample=self.sample, temperature=self.temperature,
            seed=self.seed, stop_at_eos=self.stop_at_eos,
            layers=tuple(sorted(set(self.layers))) if self.layers else None,
            heads=tuple(sorted(set(self.heads))) if self.heads else None)


def default_prompts(spec, n: int) -> tuple[list[str], str]:
    """``n`` prompts for ``spec`` when no file is given, and where they came from (module docstring)."""
    if spec.kind == "organism" or (spec.kind == "local" and (Path(spec.name) / "recipe.json").is_file()):
        from spectral.organisms.language import corpus

        prompts = []
        for episode in corpus(PROMPT_SEED, n):
            words = episode.split()
            prompts.append(" ".join(words[:max(2, len(words) // 2)]))
        return prompts, f"organism episodes (seed {PROMPT_SEED}), first half of each"
    from spectral.kernels.prompts import read_prompts

    path = Path(__file__).resolve().parent.parent / "spectral" / "data" / "demo_prompts.txt"
    return read_prompts(path)[:n], "spectral/data/demo_prompts.txt"


def changepoint_rows(table: pa.Table, model: str) -> list[dict]:
    """One row per (prompt, layer, head) of the trajectories ``table`` (``CHANGEPOINTS``)."""
    import numpy as np

    from spectral.dynamics.changepoints import MIN_LENGTH, change_points

    prompt, layer, head, step = (table[c].to_numpy() for c in ("prompt", "layer", "head", "step"))
    gap = table[METRIC].to_numpy(zero_copy_only=False).astype(float)
    order = np.lexsort((step, head, layer, prompt))
    keys = np.stack([prompt[order], layer[order], head[order]], axis=1)
    starts = np.flatnonzero(np.r_[True, (np.diff(keys, axis=0) != 0).any(axis=1)])
    rows = []
    for a, b in zip(starts, np.r_[starts[1:], len(order)]):
        idx = order[a:b]
        y, steps = gap[idx], step[idx]
        finite = np.isfinite(y)
        row = {"model": model, "prompt": int(prompt[idx[0]]), "layer": int(layer[idx[0]]), "head": int(head[idx[0]]),
               "n_steps": int(len(idx)), "gap_first": _num(y[0]), "gap_last": _num(y[-1]),
               "gap_change": _num(y[-1] - y[0]),
               "gap_range": _num(np.nanmax(y) - np.nanmin(y)) if finite.any() else None,
               "n_changes": None, "first_change_step": None, "first_shift": None, "change_steps": None,
               "sigma": None, "penalty": None, "method": None, "detected": False}
        if len(idx) >= MIN_LENGTH and finite.all():
            cp = change_points(y, steps)
            row |= {"n_changes": len(cp.indices), "change_steps": ",".join(str(int(steps[i])) for i in cp.indices),
                    "first_change_step": int(steps[cp.indices[0]]) if cp.indices else None,
                    "first_shift": cp.shifts[0] if cp.indices else None, "sigma": cp.sigma, "penalty": cp.penalty,
                    "method": cp.method, "detected": True}
        rows.append(row)
    return rows


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def summarise(rows: list[dict]) -> dict:
    """The numbers of summary.md, the report and MLflow from the change-point rows of one model."""
    import numpy as np

    done = [r for r in rows if r["detected"]]
    heads = sorted({(r["layer"], r["head"]) for r in rows})
    per_head = {lh: [r for r in done if (r["layer"], r["head"]) == lh] for lh in heads}
    with_change = [lh for lh, rs in per_head.items() if any(r["n_changes"] for r in rs)]
    majority = [lh for lh, rs in per_head.items() if rs and sum(bool(r["n_changes"]) for r in rs) * 2 >= len(rs)]
    change = np.array([abs(r["gap_change"]) for r in rows if r["gap_change"] is not None])
    spread = np.array([r["gap_range"] for r in rows if r["gap_range"] is not None])
    first = np.array([r["first_change_step"] for r in done if r["first_change_step"] is not None])

    def q(values, p):
        return float(np.quantile(values, p)) if len(values) else float("nan")

    return {
        "n_series": len(rows), "n_series_detected": len(done), "n_series_too_short": len(rows) - len(done),
        "n_heads": len(heads), "n_prompts": len({r["prompt"] for r in rows}),
        "share_series_with_change": sum(bool(r["n_changes"]) for r in done) / len(done) if done else float("nan"),
        "share_heads_with_change": len(with_change) / len(heads) if heads else float("nan"),
        "share_heads_change_in_most_prompts": len(majority) / len(heads) if heads else float("nan"),
        "mean_changes_per_series": float(np.mean([r["n_changes"] for r in done])) if done else float("nan"),
        "median_abs_gap_change": q(change, 0.5), "p90_abs_gap_change": q(change, 0.9),
        "median_gap_range": q(spread, 0.5), "p90_gap_range": q(spread, 0.9),
        "median_first_change_step": q(first, 0.5),
    }


def summary_text(model: str, s: dict, config: DynamicsGenerateConfig, source: str, n_new: list[int]) -> str:
    from spectral.dynamics.changepoints import RULE

    def f(x) -> str:
        return "–" if x is None or x != x else f"{x:.3g}"

    return "\n".join([
        f"# Generation dynamics: {model}", "",
        f"{s['n_prompts']} prompts ({source}), {'sampled' if config.sample else 'greedy'} generation of up to "
        f"{config.max_new_tokens} tokens ({min(n_new)}-{max(n_new)} generated), {config.keys} keys, ridge "
        f"{config.ridge:g} ({config.ridge_mode}); {s['n_heads']} heads, one key-kernel spectrum per head and step.", "",
        "| quantity | value |", "|---|---|",
        f"| (prompt, head) series with a gap change-point | {f(s['share_series_with_change'])} "
        f"({s['n_series_detected']} series; {s['n_series_too_short']} too short or not finite) |",
        f"| heads with a change-point in at least one prompt | {f(s['share_heads_with_change'])} |",
        f"| heads with a change-point in at least half the prompts | {f(s['share_heads_change_in_most_prompts'])} |",
        f"| change-points per series (mean) | {f(s['mean_changes_per_series'])} |",
        f"| first change-point step (median) | {f(s['median_first_change_step'])} |",
        f"| abs(gap at last step - gap at first step): median, 90th percentile | {f(s['median_abs_gap_change'])}, "
        f"{f(s['p90_abs_gap_change'])} |",
        f"| gap range over the steps (max - min): median, 90th percentile | {f(s['median_gap_range'])}, "
        f"{f(s['p90_gap_range'])} |", "",
        f"Change-points: {RULE}; the step index is the series' x.", "",
        "Caveat: the detector's false-alarm rates (at most 1 % on white noise, 5 % under AR(1) noise with "
        "rho = 0.3) hold for stationary noise around segment means. A gap trajectory during generation comes "
        "from cumulative key statistics (one key more per step): it drifts smoothly and its noise is strongly "
        "autocorrelated, so a slow drift reads as mean shifts. These counts describe where the gap moves, "
        "they do not test for a phase change.", ""])


def run(config: DynamicsGenerateConfig, *, echo=print):
    import torch

    from spectral.dynamics.generation import generate_trajectories
    from spectral.errors import UsageError
    from spectral.kernels.prompts import read_prompts
    from spectral.models.loading import load_model, model_heads, parse_spec, require_causal_lm, resolve_device
    from spectral.models.ranges import check_range

    start = time.perf_counter()
    spec = parse_spec(config.model)
    out_dir_ready(config.out, RESULT_FILE, config.force)
    require_causal_lm(spec, "eigengap dynamics generate")
    n_layers, n_heads, _ = model_heads(spec)
    check_range("layer", config.layers, n_layers, option="--layers")
    check_range("head", config.heads, n_heads, option="--heads")
    if config.prompts is not None:
        prompts, source = read_prompts(config.prompts), str(config.prompts)
    else:
        prompts, source = default_prompts(spec, config.n_prompts)
    if not prompts:
        raise UsageError("no prompts to generate from")
    settings = config.settings()
    settings.check()
    loaded = load_model(spec, device=resolve_device(config.device))
    gen = generate_trajectories(loaded, prompts, settings)
    rows = changepoint_rows(gen.trajectories, spec.text)
    stats = summarise(rows)
    tok = loaded.tokenizer
    texts = [{"prompt": i, "text": p, "prompt_tokens": len(ids), "generated": tok.decode(new),
              "tokens": new} for i, (p, ids, new) in enumerate(zip(prompts, gen.prompt_tokens, gen.tokens))]
    params = {"config": config.model_dump(mode="json"), "prompt_source": source, "n_prompts": len(prompts),
              "generated_tokens": sum(len(t) for t in gen.tokens), "summary": stats,
              "torch_threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - start, 3)}
    text = summary_text(spec.text, stats, config, source, [len(t) for t in gen.tokens])
    _write(config.out, gen.trajectories, rows, texts, params, text, spec.text)
    echo(text)
    echo(f"wrote {config.out}")
    return gen


def _write(out: Path, trajectories: pa.Table, rows: list[dict], texts, params, text: str, title: str) -> None:
    from analysis.render.dynamics_plots import gap_steps_heatmap, gap_trajectories
    from cluster.store import write_json, write_parquet, write_text

    out.mkdir(parents=True, exist_ok=True)
    changes = schemas.from_rows(rows, CHANGEPOINTS, "generation change-points")
    write_json(params, out / "params.json")
    write_json(texts, out / TEXTS_FILE)
    write_parquet(changes, out / CHANGES_FILE, CHANGEPOINTS)
    gap_trajectories(trajectories, rows, out / "gap_trajectories.png", title)
    gap_steps_heatmap(trajectories, rows, out / "gap_steps_heatmap.png", title)
    write_text(text, out / "summary.md")
    write_parquet(trajectories, out / RESULT_FILE, schemas.TRAJECTORIES)  # last: its presence means the run completed


def unit_metrics(cell_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """``changes/share_series``, ``changes/share_heads``, ``gap/median_abs_change``, ``gap/median_range``
    and the counts, from params.json's summary."""
    import json

    path = cell_dir / "params.json"
    if not path.is_file():
        return {}, {}
    s = json.loads(path.read_text()).get("summary", {})
    names = {"changes/share_series": "share_series_with_change", "changes/share_heads": "share_heads_with_change",
             "changes/share_heads_most_prompts": "share_heads_change_in_most_prompts",
             "gap/median_abs_change": "median_abs_gap_change", "gap/median_range": "median_gap_range",
             "series/detected": "n_series_detected", "series/heads": "n_heads", "series/prompts": "n_prompts"}
    metrics = {k: float(s[v]) for k, v in names.items() if s.get(v) is not None and math.isfinite(float(s[v]))}
    return metrics, {}


def cost(params, facts) -> float:
    """Token-forwards: every prompt's prefill and one forward per new token; the per-step spectra
    (a d_head x d_head eigendecomposition per head) cost about as much again."""
    n = params.get("n_prompts", 8)
    new = params.get("max_new_tokens", 32)
    return float(2 * n * (PROMPT_TOKENS + new))


def load(cell_dir: Path):
    """trajectories.parquet and generation_changepoints.parquet (schema-checked), params.json."""
    from cluster.store import read_cell

    return read_cell(cell_dir, EXPERIMENT.tables)


EXPERIMENT = Experiment(
    kind="dynamics_generate", help="key-kernel spectra of every head token by token during generation",
    config=DynamicsGenerateConfig, run=run, tables={RESULT_FILE: schemas.TRAJECTORIES, CHANGES_FILE: CHANGEPOINTS},
    cost=cost, metrics=unit_metrics, load=load)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["dynamics", "generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
