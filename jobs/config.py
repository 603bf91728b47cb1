"""Typed job configs and the CLI parsed from them.

A job's config is a pydantic model: one field per option, a docstring under each field
(its ``--help`` text), ``Literal`` for choices, constraints that raise naming the field.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spectral.errors import UsageError

C = TypeVar("C", bound="JobConfig")


class JobConfig(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid", frozen=True)


class ExecutorOptions(JobConfig):
    """Where a job's work units run: the options every job shares."""

    executor: Literal["local", "ray"] = "local"
    """Run in this process, or on Ray actors (a local cluster on 127.0.0.1 is started if none runs)."""
    workers: int = Field(2, ge=1)
    """Ray actors, each loading the model once and serving many work units."""
    ray_address: str | None = None
    """Address of an existing Ray cluster (default: RAY_ADDRESS, a running local one, or a new local one)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs Ray reserves for each actor (its torch threads)."""
    gpus_per_worker: float = Field(0.0, ge=0)
    """GPUs Ray reserves for each actor; more than one spreads the model over them with an
    accelerate device map (for models larger than one GPU)."""

    def make_executor(self, load_kwargs: dict | None = None, loaded=None):
        """The executor these options name; ``loaded`` is reused by a local executor."""
        from cluster.executors import LocalExecutor, RayExecutor

        if self.executor == "local":
            return LocalExecutor(loaded, load_kwargs=load_kwargs)
        return RayExecutor(workers=self.workers, address=self.ray_address, num_cpus=self.cpus_per_worker,
                           num_gpus=self.gpus_per_worker, load_kwargs=load_kwargs)


def _unwrap_optional(annotation: Any) -> Any:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type[JobConfig], positional: tuple[str, ...] = ()) -> None:
    """One option per config field; help from the field's docstring."""
    for name, field in cls.model_fields.items():
        ann = _unwrap_optional(field.annotation)
        kwargs: dict[str, Any] = {"help": (field.description or "").replace("%", "%%")}
        if not field.is_required() and field.default_factory is None:
            kwargs["help"] += f" (default: {field.default})".replace("%", "%%")
        if typing.get_origin(ann) is Literal:
            kwargs["choices"] = list(typing.get_args(ann))
        elif ann is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(ann) is list and typing.get_args(ann) == (int,):
            kwargs["type"] = _int_list
            kwargs["metavar"] = "I,J,..."
        elif typing.get_origin(ann) is list and typing.get_args(ann) == (float,):
            kwargs["type"] = _float_list
            kwargs["metavar"] = "X,Y,..."
        elif typing.get_origin(ann) is list:
            kwargs["nargs"] = "*"
        if name in positional:
            parser.add_argument(name, **kwargs)
            continue
        kwargs["default"] = None
        kwargs["dest"] = name
        if field.is_required():
            kwargs["required"] = True
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def parse_config(cls: type[C], namespace: argparse.Namespace) -> C:
    """Validate the parsed options; a bad value raises UsageError naming the option."""
    given = {k: v for k, v in vars(namespace).items() if k in cls.model_fields and v is not None}
    return validate(cls, given)


def validate(cls: type[C], values: Any, *, prefix: str = "", style: Literal["option", "field"] = "option") -> C:
    """``cls`` validated from ``values``; the first error becomes one UsageError line naming
    where it is: the command-line option (``--n-examples: ...``, style ``option``) or the
    field's path in a config file (``experiments.0.params.n_examples: ...``, style ``field``),
    after ``prefix``."""
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        msg = first["msg"].removeprefix("Value error, ")
        loc = first["loc"]
        if not loc:
            raise UsageError(f"{prefix}{msg}") from None
        where = "--" + str(loc[0]).replace("_", "-") if style == "option" else ".".join(str(p) for p in loc)
        raise UsageError(f"{prefix}{where}: {msg}") from None


def out_dir_ready(path: Path, marker: str, force: bool) -> None:
    """Refuse to overwrite earlier results unless asked (nothing computed is lost)."""
    if (path / marker).exists() and not force:
        raise UsageError(f"{path / marker} exists: pass --force to overwrite it, or choose another --out")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file, not a directory")


def steering_position(value, field_name: str):
    """A steering job's ``--positions`` ('all', 'last' or a token index) or ``--read-at`` ('last',
    'mean' or a token index) value, validated (a token index given as a string becomes an int)."""
    named = ("all", "last") if field_name == "positions" else ("last", "mean")
    if value in named:
        return value
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise ValueError(f"expected {' or '.join(named)} or a token index >= 0, got {value!r}")
