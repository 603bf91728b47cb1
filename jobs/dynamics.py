"""``eigengap dynamics train|generate|steer``: the dynamics experiment kinds (issue 17) under one
command. Each subcommand is the experiment kind of the same record (``jobs.registry``):

- ``train`` -> ``dynamics_train`` (spectra and behaviour across training checkpoints);
- ``generate`` -> ``dynamics_generate`` (spectra token by token during generation);
- ``steer`` -> ``dynamics_steer`` (spectrally adaptive steering vs a fixed coefficient).

A sweep names the kinds themselves (``kind: dynamics_train``); ``eigengap dynamics_train ...``
is the same command.
"""

from __future__ import annotations

SUBCOMMANDS: dict[str, str] = {"train": "dynamics_train", "generate": "dynamics_generate", "steer": "dynamics_steer"}
"""``eigengap dynamics NAME`` -> the experiment kind it runs."""


def add_parser(sub) -> None:
    from jobs.config import add_arguments, parse_config
    from jobs.registry import KINDS, experiment

    parser = sub.add_parser("dynamics", help="Spectra across training and during generation; adaptive steering.",
                            description="Spectra across training checkpoints (train) and token by token during generation "
                            "(generate), and spectrally adaptive steering (steer).")
    inner = parser.add_subparsers(dest="dynamics_command", required=True, metavar="SUBCOMMAND")
    for name, kind in SUBCOMMANDS.items():
        if kind not in KINDS:
            continue
        record = experiment(kind)
        p = inner.add_parser(name, help=record.help, description=record.help)
        add_arguments(p, record.config)
        p.set_defaults(handler=lambda ns, record=record: record.run(parse_config(record.config, ns)))
