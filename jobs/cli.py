"""The ``eigengap`` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import sys

from spectral.errors import UsageError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    from jobs import organisms, patch, plan, scan, steer, sweep, validate

    parser = argparse.ArgumentParser(
        prog="eigengap", description="Eigenvalue gaps of attention heads: scan, validate, steer.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for job in (scan, patch, validate, steer, sweep, plan, organisms):
        job.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except UsageError as err:
        print(f"eigengap {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
