"""Helpers for benchmarks: timing whole CLI commands, medians, interleaved repetitions."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CBSD = str(Path(sys.executable).parent / "cbsd")


def cbsd(*args: str, env: dict[str, str] | None = None, check: bool = True) -> float:
    """Run the real CLI; return its wall time in seconds."""
    t = time.perf_counter()
    p = subprocess.run([CBSD, *args], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if check and p.returncode != 0:
        raise RuntimeError(f"cbsd {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return dt


def workdir_env(path: Path) -> dict[str, str]:
    return {**os.environ, "CBSD_WORKDIR": str(path)}


@dataclass
class Series:
    name: str
    samples: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.samples.append(v)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def row(self, unit: str = "s") -> str:
        return (f"| {self.name} | {self.median:.3f} {unit} | {min(self.samples):.3f} | "
                f"{max(self.samples):.3f} | {len(self.samples)} |")
