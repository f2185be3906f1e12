"""What every bench module shares (it imports no other): timing whole CLI commands, the Case and
Series a run measures, their JSON, and the Study folder a run writes in docs/benchmarks/."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CBSD = str(Path(sys.executable).parent / "cbsd")
BENCHMARKS = ROOT / "docs" / "benchmarks"


@dataclass(frozen=True)
class Study:
    """Where one study's artefacts live: docs/benchmarks/<name>/ holds its report.md, the
    results.json it was rendered from and its chart.png; analysis.md, the prose across studies,
    sits beside the studies. *root* is docs/benchmarks except in tests."""

    name: str
    root: Path = BENCHMARKS

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"a study is one folder name, not {self.name!r}")

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def report(self) -> Path:
        return self.dir / "report.md"

    @property
    def results(self) -> Path:
        return self.dir / "results.json"

    @property
    def chart(self) -> Path:
        return self.dir / "chart.png"

    def analysis(self, section: str = "") -> str:
        """The link from this study's report to analysis.md (or one of its sections)."""
        link = os.path.relpath(self.root / "analysis.md", self.dir)
        return f"{link}#{section}" if section else link

    def save_results(self, cases: list[Case], versions: dict[str, str]) -> None:
        """Every sample of the run, written first: a report that fails to render loses no data."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results.write_text(cases_json(cases, versions))


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


@dataclass
class Case:
    """One measured question: a series per contender, and notes that explain the numbers."""

    title: str
    series: dict[str, Series] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, who: str, value: float) -> None:
        self.series.setdefault(who, Series(who)).add(value)

    def table(self, unit: str = "s") -> list[str]:
        """This case as a markdown section: its series' medians, ranges and runs."""
        return [f"## {self.title}", "", "| series | median | min | max | runs |",
                "|---|---|---|---|---|", *(s.row(unit) for s in self.series.values())]


def cases_json(cases: list[Case], versions: dict[str, str]) -> str:
    """Every sample of a run, for re-rendering and for the record."""
    return json.dumps({"versions": versions, "cases": [
        {"title": c.title, "notes": c.notes,
         "series": {k: s.samples for k, s in c.series.items()}} for c in cases]}, indent=1)


def load_cases(path: Path) -> tuple[list[Case], dict[str, str]]:
    """The cases and versions a run saved with cases_json."""
    data = json.loads(path.read_text())
    cases = []
    for c in data["cases"]:
        case = Case(c["title"], notes=c["notes"])
        case.series = {n: Series(n, v) for n, v in c["series"].items()}
        cases.append(case)
    return cases, data["versions"]


def machine() -> list[str]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.splitlines()[0]
    fs = subprocess.run(["df", "-T", "/var/tmp"], capture_output=True, text=True).stdout
    fstype = fs.splitlines()[-1].split()[1] if fs else "?"
    debian = Path("/etc/debian_version").read_text().strip()
    return [f"- CPU: {cpu}, {os.cpu_count()} cores (no vmx/svm: QEMU runs TCG)",
            f"- memory: {mem:.0f} GiB; disk: {fstype} (/var/tmp)",
            f"- Debian {debian}, Linux {platform.release()}; {qemu}"]
