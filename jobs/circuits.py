"""``eigengap circuits``: head classes, edge-level circuit discovery and the circuit against the
gap landscape (research plan 2.2), for one model and one task.

Per head: attention-pattern scores (previous-token, duplicate-token, induction on repeated
random tokens), IOI role scores on the IOI task (name-mover attention and OV copy scores;
S-inhibition by path patching into the name movers' queries), a class label from documented
thresholds (``spectral.circuits.scores.THRESHOLDS``), and the spectral metrics of a scan on
held-out prompts of the task (disjoint from the patched examples). Per edge of the residual
graph (``spectral.circuits.edges``): EAP and EAP-IG scores, and exact edge patching on a
checked subset (their Spearman agreement). Circuits of growing size are cut from the chosen
method's ranking and re-measured by exact edge patching (faithfulness curve, CPR, CMD, the
ablation stated); the circuit is the smallest one reaching ``--target`` faithfulness. The
bottleneck check ablates the circuit's lowest-gap head alone and its median-gap head alone.

Also ``python -m jobs.circuits ...``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from jobs.config import ExecutorOptions, out_dir_ready
from jobs.registry import PROMPT_TOKENS, Experiment
from spectral import tables as schemas
from spectral.errors import UsageError
from spectral.models import Device

RESULT_FILE = "heads.parquet"
S_INHIBITION = 0.1
"""Mean restoration of path patching a head into the name movers' queries that makes it an
S-inhibition head (chosen once, not tuned)."""
EDGES_FILE = "edges.parquet"
CIRCUIT_FILE = "circuit.json"


class CircuitsConfig(ExecutorOptions):
    model: str
    """Model spec: hub id, checkpoint directory, random:ARCH[?k=v&...] or organism-NAME."""
    task: str = "ioi"
    """'ioi', 'induction', or a JSONL task file (clean, corrupt, answer, distractor per line)."""
    out: Path
    """Output directory."""
    method: Literal["eap", "eap-ig", "exact"] = "eap-ig"
    """The edge ranking circuits are cut from: EAP (one forward + backward per batch), EAP with
    integrated gradients (--steps), or exact single-edge patching of every edge (slow)."""
    steps: int = Field(5, ge=2)
    """EAP-IG interpolation steps m."""
    ablation: Literal["corrupt", "mean", "resample"] = "corrupt"
    """What an ablated edge carries: the sender's write on the corrupt prompt, its mean over the
    task's clean prompts, or another example's clean write."""
    sizes: list[int] | None = None
    """Circuit sizes (edges) of the faithfulness curve (default: 1, 2, 5, 10, 20, 50, ... up to
    every edge)."""
    target: float = Field(0.8, gt=0, le=1)
    """Faithfulness the chosen circuit must reach (the smallest size that does)."""
    n_examples: int = Field(64, ge=4)
    """Examples of a built-in task; a seeded half chooses the circuit (edge scores), the other
    half measures it (faithfulness, bottleneck): selection never sees the data that scores it."""
    n_scan: int = Field(64, gt=0)
    """Held-out prompts of the gap scan (a built-in task, drawn with seed + 1, disjoint from the
    patched examples; a task file: its clean prompts, labelled in-sample)."""
    n_sequences: int = Field(64, gt=0)
    """Repeated random sequences of the attention-pattern scores."""
    length: int = Field(8, ge=3)
    """Tokens of each repeated sequence's first copy (8: near the organisms' 5-10-token spans;
    their scores at 32 are far lower)."""
    agreement_edges: int = Field(50, ge=2)
    """Edges whose exact patching checks EAP and EAP-IG: the top ones by EAP, and as many drawn at random."""
    seed: int = 0
    """Seed of the tasks, the random sequences and the resampling ablation."""
    device: Device = "auto"
    """Where the model runs."""
    force: bool = False
    """Overwrite existing results in --out."""

    @field_validator("task")
    @classmethod
    def _task(cls, value):
        if value not in ("ioi", "induction") and not Path(value).is_file():
            raise ValueError(f"unknown task {value!r}: expected ioi, induction or an existing JSONL task file")
        return value

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, value):
        if value is not None and (not value or min(value) < 1):
            raise ValueError("sizes must be positive edge counts, at least one")
        return sorted(set(value)) if value is not None else value


@dataclass(frozen=True)
class CircuitsUnit:
    """The whole computation for one model: one work unit (a Ray actor holds the model)."""

    config: CircuitsConfig


def default_sizes(n_edges: int) -> list[int]:
    sizes, base = [], 1
    while base <= n_edges:
        sizes += [s for s in (base, 2 * base, 5 * base) if s <= n_edges]
        base *= 10
    return sorted(set(sizes + [n_edges]))


def _head_name(name: str) -> tuple[int, int] | None:
    """``a3.h2`` -> (3, 2); other nodes -> None."""
    if not name.startswith("a") or ".h" not in name:
        return None
    layer, head = name[1:].split(".h")
    return int(layer), int(head)


def _relabel(rows: list[dict], n_layers: int, n_heads: int, s_inhibition, backup) -> None:
    """Labels and classes again with the intervention classes (S-inhibition: restoration of
    path patching into the name movers' queries >= ``S_INHIBITION``; backup name movers:
    ``roles.backup_gain`` >= ``roles.BACKUP_GAIN``), in ``scores.PRIORITY`` order (in place)."""
    import numpy as np

    from spectral.circuits.roles import BACKUP_GAIN
    from spectral.circuits.scores import IOI_SCORES, PATTERNS, PRIORITY, class_masks, classify

    if s_inhibition is None and backup is None:
        return
    grid = {k: np.full((n_layers, n_heads), np.nan) for k in (*PATTERNS, *IOI_SCORES)}
    for r in rows:
        for k in grid:
            if r[k] is not None:
                grid[k][r["layer"], r["head"]] = r[k]
    scores = {k: v for k, v in grid.items() if k in PATTERNS or not np.isnan(v).all()}
    with np.errstate(invalid="ignore"):
        extra = {"s_inhibition": np.nan_to_num(s_inhibition, nan=-np.inf) >= S_INHIBITION if s_inhibition is not None
                 else np.zeros((n_layers, n_heads), bool),
                 "backup_name_mover": np.nan_to_num(backup, nan=-np.inf) >= BACKUP_GAIN if backup is not None
                 else np.zeros((n_layers, n_heads), bool)}
    labels, masks = classify(scores, extra), class_masks(scores, extra)
    for r in rows:
        l, h = r["layer"], r["head"]
        r["label"] = str(labels[l, h])
        r["classes"] = ",".join(c for c in PRIORITY if masks[c][l, h])


def circuits_unit(loaded, unit: CircuitsUnit) -> dict:
    """Scores, edges, faithfulness, spectra and the bottleneck check of one model."""
    import numpy as np
    import pyarrow as pa
    import torch

    from spectral.causal.patching import task_caches
    from spectral.circuits import edges as E
    from spectral.circuits.paths import path_scores_into
    from spectral.circuits.scores import head_score_table
    from spectral.circuits.tasks import pattern_token_pool, task_examples
    from spectral.kernels.scan import ScanSettings, scan_table
    from cluster.executors import LocalExecutor

    c = unit.config
    examples = task_examples(loaded, c.task, c.n_examples, c.seed)
    if len(examples) < 4:
        raise UsageError(f"task {c.task}: {len(examples)} examples are too few to split into selection and "
                         "held-out halves (need >= 4)")
    adapter, task, clean, corrupt = task_caches(loaded, tuple(examples))
    order = np.random.default_rng(c.seed).permutation(len(examples))
    half = len(examples) // 2
    chosen_on = [examples[i] for i in sorted(order[:half])]
    measured_on = [examples[i] for i in sorted(order[half:])]
    _, task_select, _, _ = task_caches(loaded, tuple(chosen_on))
    _, task_heldout, _, _ = task_caches(loaded, tuple(measured_on))

    # heads: attention patterns, IOI roles, S-inhibition by path patching into the name movers' queries
    heads = head_score_table(loaded, n=c.n_sequences, length=c.length, seed=c.seed,
                             ioi_examples=examples if c.task == "ioi" else None, token_pool=pattern_token_pool(loaded))
    s_inhibition, movers = None, []
    if c.task == "ioi":
        movers = [(l, h) for l, h, lab in zip(heads["layer"].to_pylist(), heads["head"].to_pylist(),
                                              heads["label"].to_pylist()) if lab == "name_mover"]
        if movers and min(l for l, _ in movers) > 0:
            s_inhibition = path_scores_into(adapter, task, clean, corrupt, [(l, h, "q") for l, h in movers])

    # edges
    graph = E.build_graph(adapter)
    if c.sizes and max(c.sizes) > graph.n_edges:
        raise UsageError(f"--sizes: {max(c.sizes)} out of range (the model's graph has {graph.n_edges} edges)")
    eap = E.eap_scores(adapter, task_select, c.ablation, 1, seed=c.seed, graph=graph)
    ig = E.eap_scores(adapter, task_select, c.ablation, c.steps, seed=c.seed, graph=graph) if c.method != "eap" else None
    ablated = E.AblatedWrites(adapter, task_select, c.ablation, seed=c.seed)
    check = E.agreement_subset(eap.scores, c.agreement_edges, c.agreement_edges, c.seed)
    exact_all = None
    if c.method == "exact":
        exact_all = E.exact_edge_scores(adapter, task_select, ablated, list(range(graph.n_edges)), graph)
        check = torch.arange(graph.n_edges)
        exact_checked = exact_all
    else:
        exact_checked = E.exact_edge_scores(adapter, task_select, ablated, check.tolist(), graph)
    agreement = {"eap": E.spearman(eap.scores[check], exact_checked)}
    if ig is not None:
        agreement["eap-ig"] = E.spearman(ig.scores[check], exact_checked)
    chosen = {"eap": eap, "eap-ig": ig}.get(c.method) or E.EdgeScores(graph, exact_all, "exact", c.ablation, 1,
                                                                        eap.metric_clean)
    sizes = c.sizes or default_sizes(graph.n_edges)
    ablated_heldout = E.AblatedWrites(adapter, task_heldout, c.ablation, seed=c.seed)
    faith = E.faithfulness_curve(adapter, task_heldout, chosen, sizes, ablated_heldout)
    # the attribution's own estimate of f: linear in the edge scores, f = sum over the circuit's
    # edges / sum over every edge (on the selection half), beside the exact re-measurement
    total = float(chosen.scores.sum())
    attribution_f = [float(chosen.scores[E.top_edges(chosen.scores, s)].sum()) / total if total else float("nan")
                     for s in faith.sizes]
    reached = [s for s, f in zip(faith.sizes, faith.faithfulness) if f >= c.target]
    size = reached[0] if reached else faith.sizes[-1]
    circuit = E.top_edges(chosen.scores, size)
    in_circuit = torch.zeros(graph.n_edges, dtype=torch.bool)
    in_circuit[circuit] = True
    table = graph.edges()
    nodes = E.circuit_nodes(graph, circuit.tolist())

    # spectra: a key-kernel scan on held-out prompts of the task
    if c.task in ("ioi", "induction"):
        patched = {e.clean for e in examples}
        pool = [e.clean for e in task_examples(loaded, c.task, 4 * c.n_scan, c.seed + 1) if e.clean not in patched]
        texts, scan_set = list(dict.fromkeys(pool))[:c.n_scan], "held-out"
    else:
        texts, scan_set = [e.clean for e in examples], "in-sample"
    if not texts:
        raise UsageError(f"task {c.task}: no held-out prompts for the scan (every drawn prompt is a patched one)")
    settings = ScanSettings()
    scan = scan_table(LocalExecutor(loaded, progress=False), loaded.spec.text, texts, settings, adapter.n_layers,
                      adapter.n_heads, adapter.n_kv_heads).to_pylist()
    spectral_of = {(r["layer"], r["head"]): r for r in scan}

    # node scores and circuit membership of heads
    score_sum: dict[str, float] = {}
    for i, e in enumerate(table):
        w = abs(float(chosen.scores[i]))
        for node in (e.sender, e.receiver):
            score_sum[node] = score_sum.get(node, 0.0) + w
    head_nodes = {_head_name(n) for n in nodes} - {None}

    # bottleneck: the circuit's lowest-gap head alone vs its median-gap head alone
    circuit_heads = sorted(head_nodes, key=lambda lh: (spectral_of[lh]["gap"], lh))
    backup = None
    if c.task == "ioi" and movers:
        from spectral.circuits.roles import backup_gain

        backup = backup_gain(adapter, task_heldout, ablated_heldout, graph, movers)
    bottleneck = None
    if len(circuit_heads) >= 2:
        low, median = circuit_heads[0], circuit_heads[len(circuit_heads) // 2]
        drops = torch.zeros(3, graph.n_edges, dtype=torch.bool)
        for row, (l, h) in enumerate((low, median)):
            name = f"a{l}.h{h}"
            drops[row] = torch.tensor([e.sender == name for e in table])
        drops[2] = True
        m = E.patched_metrics(adapter, task_heldout, ablated_heldout, drops, graph).tolist()
        full, empty = faith.metric_full, m[2]  # m(N) of the held-out half, measured once
        removed = [(full - x) / (full - empty) if abs(full - empty) > 1e-9 else float("nan") for x in m[:2]]
        bottleneck = {"lowest_gap_head": list(low), "median_gap_head": list(median), "removed_lowest": removed[0],
                      "removed_median": removed[1], "difference": removed[0] - removed[1]}

    rows = heads.to_pylist()
    for r in rows:
        lh = (r["layer"], r["head"])
        sp = spectral_of[lh]
        r.update({k: float(sp[k]) for k in ("gap", "entropy", "effective_rank", "condition_number", "lambda1")})
        r["s_inhibition"] = None if s_inhibition is None or not np.isfinite(s_inhibition[lh]) else float(s_inhibition[lh])
        r["backup_gain"] = None if backup is None or not np.isfinite(backup[lh]) else float(backup[lh])

        r["in_circuit"] = lh in head_nodes
        r["node_score"] = score_sum.get(f"a{lh[0]}.h{lh[1]}", 0.0)
    _relabel(rows, adapter.n_layers, adapter.n_heads, s_inhibition, backup)
    head_table = schemas.from_rows(rows, schemas.CIRCUIT_HEADS, "circuits: heads")
    exact_col = [None] * graph.n_edges
    for i, v in zip(check.tolist(), exact_checked.tolist()):
        exact_col[i] = float(v)
    edge_table = pa.table({
        "sender": [e.sender for e in table], "receiver": [e.receiver for e in table], "input": [e.input for e in table],
        "score": chosen.scores.double().numpy(), "score_eap": eap.scores.double().numpy(),
        "score_eap_ig": pa.array(ig.scores.double().numpy() if ig is not None else [None] * graph.n_edges, pa.float64()),
        "exact": pa.array(exact_col, pa.float64()), "in_circuit": in_circuit.numpy()})
    summary = {
        "task": c.task, "method": c.method, "ablation": c.ablation, "steps": c.steps if c.method == "eap-ig" else 1,
        "n_examples": len(examples), "n_select": len(chosen_on), "n_heldout": len(measured_on),
        "n_edges": graph.n_edges, "target": c.target, "size": int(size),
        "reached_target": bool(reached), "nodes": nodes, "heads": [list(lh) for lh in sorted(head_nodes)],
        "edges": [{"sender": table[i].sender, "receiver": table[i].receiver, "input": table[i].input,
                   "score": float(chosen.scores[i])} for i in circuit.tolist()],
        "faithfulness": {"sizes": faith.sizes, "f": faith.faithfulness, "f_attribution": attribution_f,
                         "metrics": faith.metrics,
                         "metric_full": faith.metric_full, "metric_empty": faith.metric_empty,
                         "cpr": faith.cpr, "cmd": faith.cmd},
        "faithfulness_of_circuit": float(dict(zip(faith.sizes, faith.faithfulness))[size]),
        "agreement": {"edges_checked": len(check), "spearman": agreement,
                      "subset": "every edge" if c.method == "exact" else
                      f"the top {c.agreement_edges} edges by |EAP| and {c.agreement_edges} drawn at random"},
        "scan": {"set": scan_set, "n_texts": len(texts), "seed": c.seed + 1 if scan_set == "held-out" else None},
        "bottleneck": bottleneck,
    }
    return {"heads": head_table, "edges": schemas.conform(edge_table, schemas.CIRCUIT_EDGES, "circuits: edges"),
            "summary": summary}


def run(config: CircuitsConfig, *, echo=print):
    from analysis.render.markdown import circuits_report
    from analysis.render.plots import circuit_landscape
    from cluster.store import write_json, write_parquet, write_text
    from spectral.models.loading import model_heads, parse_spec, require_causal_lm

    start = time.perf_counter()
    spec = parse_spec(config.model)
    out_dir_ready(config.out, RESULT_FILE, config.force)
    model_heads(spec)  # an unsupported architecture is refused here, before any work
    require_causal_lm(spec, "eigengap circuits")
    with config.make_executor({"device": config.device}) as executor:
        result = executor.map(spec.text, circuits_unit, [CircuitsUnit(config)], desc="circuits")[0]
    summary = {**result["summary"], "config": config.model_dump(mode="json"),
               "seconds": round(time.perf_counter() - start, 3)}
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(result["edges"], out / EDGES_FILE, schemas.CIRCUIT_EDGES)
    write_json(summary, out / CIRCUIT_FILE)
    head_edges = []
    for e in summary["edges"]:
        s, r = _head_name(e["sender"]), _head_name(e["receiver"])
        if s is not None and r is not None:
            head_edges.append((*s, *r, e["input"]))
    circuit_landscape(result["heads"], head_edges, out / "circuit_landscape.png", title=f"{spec.text} - {config.task}")
    text = circuits_report(result["heads"], summary, spec.text)
    write_text(text + "\n", out / "report.md")
    write_parquet(result["heads"], out / RESULT_FILE, schemas.CIRCUIT_HEADS)  # last: its presence means the run completed
    echo(text)
    echo(f"wrote {out}")
    return result


def unit_metrics(cell_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """``faithfulness/circuit``, ``faithfulness/cpr``, ``faithfulness/cmd``, ``circuit/size``,
    ``circuit/heads``, ``agreement/<method>`` (Spearman with exact patching), ``bottleneck/difference``."""
    import json

    path = cell_dir / CIRCUIT_FILE
    if not path.is_file():
        return {}, {}
    s = json.loads(path.read_text())
    metrics = {"faithfulness/circuit": s["faithfulness_of_circuit"], "faithfulness/cpr": s["faithfulness"]["cpr"],
               "faithfulness/cmd": s["faithfulness"]["cmd"], "circuit/size": float(s["size"]),
               "circuit/heads": float(len(s["heads"]))}
    metrics.update({f"agreement/{m}": v for m, v in s["agreement"]["spearman"].items()})
    if s.get("bottleneck"):
        metrics["bottleneck/difference"] = s["bottleneck"]["difference"]
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}, {
        "circuit/method": s["method"], "circuit/ablation": s["ablation"]}


def cost(params, facts) -> float:
    """Token-forwards: EAP (2 forwards + a backward ~ 4), EAP-IG (m more), the faithfulness
    curve and the exact checks (one forward per circuit or edge, 8 per batch), the scan."""
    n = params.get("n_examples", 64)
    steps = params.get("steps", 5) if params.get("method", "eap-ig") == "eap-ig" else 0
    edges_checked = 2 * params.get("agreement_edges", 50)
    sizes = len(params.get("sizes") or []) or 12
    passes = 4 + 3 * steps + (edges_checked + sizes + 3) / 8 * 8 + 2
    if params.get("method") == "exact":
        passes += facts.heads * facts.layers * facts.layers * 3
    return float(passes * n * PROMPT_TOKENS)


def load(cell_dir: Path):
    """heads.parquet and edges.parquet (schema-checked); ``params``: circuit.json."""
    import json

    from cluster.store import read_cell

    cell = read_cell(cell_dir, EXPERIMENT.tables)
    cell.params = json.loads((cell_dir / CIRCUIT_FILE).read_text()) if (cell_dir / CIRCUIT_FILE).is_file() else {}
    return cell


EXPERIMENT = Experiment(
    kind="circuits", help="head classes, edge-level circuits and the circuit against the gap landscape",
    config=CircuitsConfig, run=run, tables={RESULT_FILE: schemas.CIRCUIT_HEADS, EDGES_FILE: schemas.CIRCUIT_EDGES},
    cost=cost, metrics=unit_metrics, load=load)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["circuits", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
