"""The one TCP probe: does anything answer at HOST:PORT within a few seconds?

Asked before handing an address to a client that would otherwise retry for minutes (the
Hugging Face hub, a Ray cluster), so an unreachable one fails in seconds with one line.
"""

from __future__ import annotations

import socket


def unreachable(host: str, port: int, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to ``host:port`` opens within ``timeout`` seconds, else why
    not (e.g. "Connection refused")."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__
