"""The demo's background processes: ``cowfleet serve images``, ``serve api``, ``serve node``.

A long-running child cannot go through :func:`cowfleet.proc.run` (which waits
for its child); this module is the one place the demo starts a process it does
not wait for, and it always stops it (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cowfleet.errors import BackendUnavailableError, LocalIOError

log = logging.getLogger(__name__)

PREFERRED_PORT = 9292


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def pick_port(preferred: int = PREFERRED_PORT, host: str = "127.0.0.1") -> int:
    """``preferred`` when free, else a free port the kernel picks."""
    if port_free(preferred, host):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Background:
    """A ``cowfleet serve ...`` of the demo (the compute API, a node agent, the image service).

    Started with its own configuration file, waited for until ``probe`` answers
    (any HTTP status unless a subclass says otherwise), and stopped with SIGTERM,
    then SIGKILL.
    """

    def __init__(
        self, name: str, argv: list[str], probe: str, log_file: Path, env: dict[str, str]
    ) -> None:
        self.name = name
        self.argv = argv  # as a user types it: ["cowfleet", "serve", ...]
        self.probe = probe
        self.log_file = log_file
        self._env = env
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        try:
            out = self.log_file.open("ab")
        except OSError as exc:
            raise LocalIOError(f"cannot open {self.log_file}: {exc.strerror}") from exc
        with out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cowfleet", *self.argv[1:]],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=self._env,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops it in order
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BackendUnavailableError(
                    f"{self.name} exited with {self._proc.returncode}: {self._tail()}"
                )
            if self._answers():
                return
            time.sleep(0.2)
        self.stop()
        raise BackendUnavailableError(f"{self.name} did not answer in {timeout:.0f} s")

    def _answers(self) -> bool:
        try:
            httpx.get(self.probe, timeout=2.0)  # any HTTP status: the process is serving
            return True
        except httpx.HTTPError:
            return False

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_file.read_text(errors="replace")[-2000:].strip()
        return ""

    def stop(self, timeout: float = 15.0) -> None:
        p = self._proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class ImageService(Background):
    """``cowfleet serve images --config FILE`` running in the background."""

    def __init__(self, config_file: Path, url: str, log_file: Path, env: dict[str, str]) -> None:
        argv = ["cowfleet", "serve", "images", "--config", str(config_file)]
        super().__init__("image service", argv, f"{url}/versions", log_file, env)
        self.config_file = config_file
        self.url = url

    def _answers(self) -> bool:
        try:
            return httpx.get(self.probe, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def written_bytes(self) -> int | None:
        """Bytes the service process has written so far (``wchar`` of /proc/PID/io).

        Sockets and ``sendfile`` count here, so the difference over a boot phase
        is what the service sent to the nodes (plus a few log lines).
        """
        if self._proc is None:
            return None
        try:
            text = Path(f"/proc/{self._proc.pid}/io").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "wchar":
                return int(value)
        return None
