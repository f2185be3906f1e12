"""A real `cbsd serve` for tests: started as a subprocess on a test's private CBSD_WORKDIR,
ready once its Unix socket answers (within a deadline), with an httpx client over that socket.

    with Service(workdir, "pools=/some/dir") as svc:
        svc.client.get("/1.0/instances").json()
        svc.wait(svc.client.put("/1.0/instances/vm1/state", json={"action": "start"}))

Test modules import it (tests/integration/test_api*.py, and the metrics, schedules and web UI
tests built on the service).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

START_DEADLINE = 60.0  # seconds for the service to answer on its socket (a loaded host)


class Service:
    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> None:
        self.workdir = workdir
        self.prefix = prefix or []  # e.g. a test host's `ip netns exec NS` (its Unix socket
        #                             is a file: reachable from here all the same)
        self.args = list(args)
        self.env = {**os.environ, "CBSD_WORKDIR": str(workdir), **(env or {})}
        self.socket = workdir / "cbsd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                                   base_url="http://cbsd", timeout=120)

    def start(self) -> Service:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.workdir.parent / "serve.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "cbsd", "serve",
                                      *self.args],
                                     env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"cbsd serve exited {self.proc.returncode}: "
                                     f"{self.log_text()}")
            with contextlib.suppress(httpx.TransportError):
                if self.client.get("/1.0").status_code == 200:
                    return self
            if time.monotonic() > deadline:
                raise AssertionError(f"cbsd serve did not answer within {START_DEADLINE} s")
            time.sleep(0.05)

    def log_text(self) -> str:
        return (self.workdir.parent / "serve.log").read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send *sig* (kill -9 by default) to the service and reap it."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)
        self.client.close()

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, response: httpx.Response, timeout: float = 300) -> dict[str, Any]:
        """The operation *response* started (202), once it ended: its final object."""
        assert response.status_code == 202, (response.status_code, response.text)
        op_id = response.json()["id"]
        deadline = time.monotonic() + timeout
        while True:
            op: dict[str, Any] = self.client.get(f"/1.0/operations/{op_id}/wait",
                                                 params={"timeout": 30}).json()
            if op["status"] != "Running":
                return op
            assert time.monotonic() < deadline, f"operation still running: {op}"

    def ok(self, response: httpx.Response, timeout: float = 300) -> dict[str, Any]:
        """As wait(), and the operation succeeded."""
        op = self.wait(response, timeout)
        assert op["status"] == "Success", op
        return op
