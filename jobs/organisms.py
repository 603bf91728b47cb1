"""``eigengap organisms``: train, locate, evaluate and list the built-in model organisms."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pydantic import Field, model_validator

from cluster.store import write_json, write_text
from jobs.config import JobConfig, add_arguments, parse_config
from spectral.models.loading import load_model
from spectral.organisms import SUITE, cache_root, organism_dir, train_organism
from spectral.organisms.language import corpus
from spectral.organisms.evaluate import evaluate, format_quality, load_tasks
from spectral.organisms.suite import organism_checkpoints, parse_seeds, recipe_of, spec_text, training_report


class TrainConfig(JobConfig):
    names: list[str] = Field(default_factory=list)
    """Organisms to train (see `eigengap organisms list`); NAME?seed=N names one training seed."""
    all: bool = False
    """Train the whole suite."""
    seeds: str | None = None
    """Training seeds of each organism, e.g. 0-4 or 0,3 (a population; default: the name's own seed)."""
    force: bool = False
    """Retrain even if a valid checkpoint is cached."""
    checkpoints: int = Field(0, ge=0)
    """Also keep this many training checkpoints at log-spaced steps (0: none; each such
    organism is cached apart from the plain one: docs/ORGANISMS.md, "Training checkpoints")."""
    arm: str | None = None
    """Train under a spectral-regularisation arm: baseline, sigma-reparam, gap-penalty, entropy or
    controlled-instability (docs/ORGANISMS.md, "Training arms"; cached as NAME[-seedN]-ARM)."""
    arm_heads: str | None = None
    """The arm's heads: L.H,... or L.* or all (gap-penalty, entropy, controlled-instability)."""
    arm_target: float | None = None
    """The arm's target gap in (0, 1) (gap-penalty, controlled-instability)."""
    arm_direction: str | None = None
    """The arm's direction: up or down (gap-penalty, entropy)."""
    arm_weight: float | None = None
    """The arm's penalty weight (> 0)."""
    steps: int | None = Field(None, ge=1)
    """Train for this many steps instead of the recipe's (a pilot, cached as NAME[-seedN]-stepsN)."""

    @model_validator(mode="after")
    def _something(self):
        if not self.names and not self.all:
            raise ValueError("name an organism or pass --all")
        options = {k: v for k, v in self.arm_options().items() if v is not None}
        if self.arm is None and options:
            raise ValueError(f"--{next(iter(options)).replace('_', '-')} needs --arm")
        for name in self.names if not self.all else list(SUITE):
            recipe_of(name, checkpoints=self.checkpoints, arm=self.spec(name), steps=self.steps)
        parse_seeds(self.seeds)
        return self

    def arm_options(self) -> dict:
        return {"arm_heads": self.arm_heads, "arm_target": self.arm_target, "arm_direction": self.arm_direction,
                "arm_weight": self.arm_weight}

    def spec(self, name: str):
        """The arm resolved for organism ``name`` (None: the plain recipe)."""
        from spectral.organisms.suite import arm_spec

        if self.arm is None:
            return None
        o = self.arm_options()
        return arm_spec(name, self.arm, heads=o["arm_heads"], target=o["arm_target"], direction=o["arm_direction"],
                        weight=o["arm_weight"])

    def specs(self) -> list[str]:
        names = list(SUITE) if self.all else self.names
        seeds = parse_seeds(self.seeds)
        if seeds is None:
            return names
        return [spec_text(recipe_of(n, s)) for n in names for s in seeds]


class PathConfig(JobConfig):
    name: str
    """Organism (NAME or NAME?seed=N)."""
    checkpoints: int = Field(0, ge=0)
    """The entry that keeps this many training checkpoints (0: the plain organism)."""


class CheckpointsConfig(JobConfig):
    name: str
    """Organism (NAME or NAME?seed=N) trained with `eigengap organisms train NAME --checkpoints K`."""
    checkpoints: int | None = Field(None, ge=2)
    """Which entry, when the organism is cached with several checkpoint counts."""


class EvalConfig(JobConfig):
    name: str
    """Organism to evaluate (NAME or NAME?seed=N)."""
    seeds: str | None = None
    """Evaluate several training seeds (e.g. 0-4; each trained if needed) and table them."""
    out: Path | None = None
    """Directory for quality.json and quality.md (default: the organism's checkpoint directory)."""
    n_ioi: int = Field(50, gt=0)
    """Held-out IOI prompts per template."""
    n_induction: int = Field(200, gt=0)
    """Held-out induction sequences."""
    n_sentiment: int = Field(200, gt=0)
    """Held-out contexts per polarity."""


def run_train(config: TrainConfig, echo=print) -> None:
    total = time.perf_counter()
    for name in config.specs():
        path = train_organism(name, checkpoints=config.checkpoints, arm=config.spec(name), steps=config.steps,
                              force=config.force)
        kept = f", {config.checkpoints} checkpoints" if config.checkpoints else ""
        kept += f", arm {config.spec(name).describe()}" if config.spec(name) is not None else ""
        echo(f"{name}: {path} (trained in {training_report(path)['train_seconds']} s{kept})")
    echo(f"done in {time.perf_counter() - total:.1f} s")


def run_eval(config: EvalConfig, echo=print):
    seeds = parse_seeds(config.seeds)
    names = [config.name] if seeds is None else [spec_text(recipe_of(config.name, s)) for s in seeds]
    rows = {}
    for name in names:
        path = organism_dir(name)
        rows[name] = evaluate(load_model(str(path)), load_tasks(path), n_ioi_per_template=config.n_ioi,
                              n_induction=config.n_induction, n_sentiment=config.n_sentiment)
        if config.out is None:  # beside the checkpoint, one file per organism
            write_json(rows[name].as_dict(), path / "quality.json")
            write_text(format_quality({name: rows[name]}) + "\n", path / "quality.md")
    table = format_quality(rows)
    if config.out is not None:
        write_json({n: q.as_dict() for n, q in rows.items()} if seeds is not None else rows[names[0]].as_dict(),
                   config.out / "quality.json")
        write_text(table + "\n", config.out / "quality.md")
    echo(table)
    missed = [n for n, q in rows.items() if not all(q.passes().values())]
    if len(rows) > 1:
        echo(f"{len(rows) - len(missed)} of {len(rows)} seeds meet every bar" + (f"; missed: {', '.join(missed)}" if missed else ""))
    return rows[names[0]] if seeds is None else rows


class PromptsConfig(JobConfig):
    out: Path
    """File to write: one prompt per line."""
    n: int = Field(256, gt=0)
    """Number of prompts (each a few episodes of the synthetic language)."""
    seed: int = 20_000
    """Generator seed (training uses the recipes' seeds, 0 by default: keep this different)."""
    episodes: int = Field(3, gt=0)
    """Episodes per prompt."""


def run_prompts(config: PromptsConfig, echo=print) -> None:
    texts = corpus(config.seed, config.n * config.episodes)
    lines = [" ".join(texts[i:i + config.episodes]) for i in range(0, len(texts), config.episodes)]
    write_text("\n".join(lines) + "\n", config.out)
    echo(f"wrote {len(lines)} prompts to {config.out}")


def run_checkpoints(config: CheckpointsConfig, echo=print) -> None:
    """One line per verified checkpoint: step, training loss, learning rate, directory."""
    for c in organism_checkpoints(config.name, checkpoints=config.checkpoints):
        echo(f"step {c.step:>6d}  loss {c.train_loss:.4f}  lr {c.lr:.2e}  {c.path}")


def run_list(echo=print) -> None:
    echo(f"cache: {cache_root()}")
    for name, r in SUITE.items():
        root = cache_root()
        seeds = sorted(int(p.name.rsplit("-seed", 1)[1]) for p in root.glob(f"{name}-seed*") if p.name.rsplit("-seed", 1)[1].isdigit()) \
            if root.exists() else []
        seeds = ([0] if (root / name).exists() else []) + seeds
        cached = f"cached seeds: {','.join(map(str, seeds))}" if seeds else "not trained"
        checkpointed = sorted(p.name for p in root.glob(f"{name}*-checkpoints*")) if root.exists() else []
        cached += f"; with training checkpoints: {', '.join(checkpointed)}" if checkpointed else ""
        echo(f"{name:12s} layers={r.layers} heads={r.heads} d_model={r.hidden} d_head={r.hidden // r.heads} "
             f"steps={r.steps}  [{cached}]")


def add_parser(sub) -> None:
    parser = sub.add_parser("organisms", help="built-in model organisms: train, path, checkpoints, eval, list")
    inner = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = inner.add_parser("train", help="train organisms into the cache")
    add_arguments(train, TrainConfig, positional=("names",))
    train.set_defaults(handler=lambda ns: run_train(parse_config(TrainConfig, ns)))
    path = inner.add_parser("path", help="print an organism's checkpoint directory (training it if needed)")
    add_arguments(path, PathConfig, positional=("name",))
    path.set_defaults(handler=lambda ns: print(organism_dir(**parse_config(PathConfig, ns).model_dump())))
    ck = inner.add_parser("checkpoints", help="list (and verify) an organism's training checkpoints")
    add_arguments(ck, CheckpointsConfig, positional=("name",))
    ck.set_defaults(handler=lambda ns: run_checkpoints(parse_config(CheckpointsConfig, ns)))
    ev = inner.add_parser("eval", help="held-out IOI, induction and sentiment quality")
    add_arguments(ev, EvalConfig, positional=("name",))
    ev.set_defaults(handler=lambda ns: run_eval(parse_config(EvalConfig, ns)))
    pr = inner.add_parser("prompts", help="write held-out prompts in the organisms' language")
    add_arguments(pr, PromptsConfig)
    pr.set_defaults(handler=lambda ns: run_prompts(parse_config(PromptsConfig, ns)))
    ls = inner.add_parser("list", help="the suite and what is cached")
    ls.set_defaults(handler=lambda ns: run_list())


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["organisms", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
