"""The ``eigengap`` command line: one subcommand per experiment kind (from the registry,
``jobs.registry``) and per tool (sweep, track, report, plan, organisms, predict-importance).

Only the chosen command's module is imported (torch, transformers and MLflow are heavy: a
command should not pay for the others); ``eigengap --help`` builds them all.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys

from jobs.registry import KINDS, experiment
from spectral.errors import UsageError

EXIT_USAGE = 2

TOOLS = {"sweep": "jobs.sweep", "track": "jobs.sweep", "report": "jobs.report", "plan": "jobs.plan",
         "organisms": "jobs.organisms", "predict-importance": "jobs.beyond", "dynamics": "jobs.dynamics"}
"""Subcommands that are not experiment kinds -> the module whose ``add_parser`` defines them."""


def add_experiment_parser(sub, kind: str) -> None:
    """``eigengap KIND``: one option per field of the kind's config."""
    from jobs.config import add_arguments, parse_config

    record = experiment(kind)
    text = record.help.replace("%", "%%")  # argparse formats help strings with %: "1 % FPR" must not break --help
    parser = sub.add_parser(kind, help=text, description=text)
    add_arguments(parser, record.config)
    parser.set_defaults(handler=lambda ns: record.run(parse_config(record.config, ns)))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eigengap", description="Eigenvalue gaps of attention heads: scan, validate, steer, sweep, report.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if only in KINDS:
        add_experiment_parser(sub, only)
    elif only in TOOLS:
        importlib.import_module(TOOLS[only]).add_parser(sub)
    else:
        for kind in KINDS:
            add_experiment_parser(sub, kind)
        for name in dict.fromkeys(TOOLS.values()):
            importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except UsageError as err:  # one line; a UsageError Ray re-raised keeps the worker's own as ``cause``
        lines = str(getattr(err, "cause", None) or err).strip().splitlines()
        print(f"eigengap {args.command}: error: {lines[0] if lines else type(err).__name__}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def exit_now(code: int) -> None:
    """Leave after a finished command without tearing the interpreter down module by module
    (1-2 s once torch and transformers are loaded): exit handlers run and output is flushed
    first, as at a normal exit. For process entry points only (never inside a test or a library
    call); an exception still takes the normal path with its traceback."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry() -> None:
    """The ``eigengap`` console script."""
    exit_now(main())


if __name__ == "__main__":
    entry()
