"""The organism spec syntax, ``organism-NAME[?seed=N]`` (light: no torch; ``spectral.models.specs``
parses organism specs with it)."""

from __future__ import annotations

from urllib.parse import parse_qsl

from spectral.errors import UsageError


def parse_name(text: str) -> tuple[str, dict[str, int]]:
    """``organism-s?seed=3`` -> ("organism-s", {"seed": 3}): the organism spec syntax (the only
    option is the training seed); ``spectral.models.specs`` parses organism specs with it."""
    text = text.strip()
    if not text.startswith("organism-"):
        raise UsageError(f"{text!r} is not an organism (organism-NAME[?seed=N])")
    name, _, query = text.partition("?")
    overrides: dict[str, int] = {}
    if query:
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise UsageError(f"model spec {text!r}: an organism takes only ?seed=N") from None
        for key, value in pairs:
            if key != "seed":
                raise UsageError(f"model spec {text!r}: unknown organism option {key!r} (known: seed)")
            if not value.isdigit():
                raise UsageError(f"model spec {text!r}: seed={value!r} is not a non-negative integer")
            overrides["seed"] = int(value)
    return name, overrides
