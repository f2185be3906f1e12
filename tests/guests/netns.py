"""Network namespaces for tests: a VM's QEMU started inside one reaches nothing but that
namespace's own interfaces (here: loopback only), so user-mode networking cannot carry a
guest's traffic off the machine, and forwarded ports exist only inside it."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Netns:
    name: str

    @classmethod
    def create(cls, tag: str) -> Netns:
        ns = cls(f"cbsd-{tag}-{os.getpid()}")
        subprocess.run(["ip", "netns", "add", ns.name], check=True)
        subprocess.run(["ip", "-n", ns.name, "link", "set", "lo", "up"], check=True)
        return ns

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(self, *argv: str, timeout: float = 60, input: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix, *argv], capture_output=True, text=True,
                              timeout=timeout, input=input, stdin=None if input else
                              subprocess.DEVNULL)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False)
