"""A Ray head node on this machine, bound to 127.0.0.1, for ``ray job submit``.

What a user does by hand (``ray start --head --dashboard-host 127.0.0.1``; ``ray job submit
--working-dir . -- python -m jobs.sweep CONFIG``; ``ray stop``), as a context manager for tests
and benchmarks. The head runs in the foreground (``--block``) in its own process group, so
leaving the block stops exactly this cluster (``ray stop`` would stop every Ray cluster on the
machine); token authentication is on, with a fresh token shared by the head and the submitter.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class LocalHead:
    def __init__(self, num_cpus: int = 2, start_timeout: float = 90.0):
        self.num_cpus, self.start_timeout = num_cpus, start_timeout
        self.port, self.dashboard_port = free_port(), free_port()
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # listen on 127.0.0.1 only (see cluster.executors)
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env.pop("RAY_ADDRESS", None)
        self.ray = str(Path(bin_dir) / "ray")
        self.process: subprocess.Popen | None = None

    @property
    def dashboard(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    def __enter__(self) -> LocalHead:
        self.process = subprocess.Popen(
            [self.ray, "start", "--head", "--block", "--node-ip-address", LOOPBACK, "--port", str(self.port),
             "--dashboard-host", LOOPBACK, "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true",
             "--num-cpus", str(self.num_cpus), "--disable-usage-stats",
             # every other listening port free too: another Ray cluster on this machine (a test
             # session's, a user's) holds the defaults, and the job agent would not start
             *[arg for option in ("--ray-client-server-port", "--dashboard-agent-listen-port",
                                  "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
                                  "--node-manager-port", "--object-manager-port")
               for arg in (option, str(free_port()))]],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start --head exited with status {self.process.returncode}")
            if self.jobs_api_up():
                return self
            time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"the Ray head's job server did not answer at {self.dashboard} within {self.start_timeout:g} s")

    def jobs_api_up(self) -> bool:
        request = urllib.request.Request(f"{self.dashboard}/api/version",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def submit(self, entrypoint: list[str], working_dir: str | Path = ".", timeout: float = 600) -> subprocess.CompletedProcess:
        """``ray job submit`` (waits for the job; its exit status is the job's). Retried while the
        head's job agent is still starting (the dashboard answers a few seconds before it)."""
        deadline = time.monotonic() + 180
        while True:
            done = subprocess.run([self.ray, "job", "submit", "--address", self.dashboard, "--working-dir",
                                   str(working_dir), "--", *entrypoint], env=self.env, capture_output=True, text=True,
                                  timeout=timeout)
            if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
                return done
            time.sleep(2)

    def __exit__(self, *exc) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGINT)  # `ray start --block` stops its processes on Ctrl-C
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left of this cluster's process group
        except ProcessLookupError:
            pass
        self.process.wait()
        self._forget()

    def _forget(self) -> None:
        """Remove Ray's record of this cluster as the machine's current one (``ray stop`` does
        the same), so that later drivers do not try to join a cluster that is gone."""
        import tempfile

        record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        try:
            if record.read_text().strip() == f"{LOOPBACK}:{self.port}":
                record.unlink()
        except OSError:
            pass
