"""The service (issue 24, "Measured"): python -m bench.run service -> docs/benchmarks/service/
(report.md, results.json; no chart).

One workdir with a running boot-sector guest (`ctr`, vm_dedup=off: no fold helper competes
with the timings) and, for the listing, 1,000 defined VMs more. The 1,000 are made cheaply:
one `cbsd bcreate`, then its inventory row copied under 999 names (Inventory.add, what bcreate
records) -- listing reads the inventory and each VM's status, never its disks.

- idle: a real `cbsd serve` left alone for IDLE_S seconds, once with the one VM and once with
  1,001: its CPU (from /proc/PID/stat, per second) and resident memory (sampled each second);
- listing: GET /1.0/instances (httpx over the Unix socket, response parsed) against the CLI's
  `cbsd bls format=json` (wall time, a new process each) with 11, 101 and 1,001 VMs, and
  the derivation of every row alone (listing.rows in this process: what each look cost
  before the service kept rows, service/rowcache.py); and GET /metrics with 1,001;
- events: a subscriber on GET /1.0/events; `cbsd bpause` pauses and resumes the guest; the
  time from the command's exit (a lower bound: QEMU had changed state just before) and from
  its start (an upper bound) until the lifecycle event arrives;
- checkpoint create: POST /1.0/instances/ctr/checkpoints until its operation ended, against
  `cbsd bcheckpoint mode=create`, alternating.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from tests.guests.build import counter_image
from tests.service import Service

from bench.bench_engine import cli
from bench.common import CBSD, Case, Study, report_header, workdir_env
from bench.timing import run as timed
from bench.timing import settle

SERVICE = Study("service")
IDLE_S = 30.0
MANY = 1000
SMALL = (10, 100)  # the list's other sizes (VMs besides the guest)
GUEST = "ctr"


def _proc(pid: int) -> tuple[float, int]:
    """(CPU seconds used, resident bytes) of a process, from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    with open(f"/proc/{pid}/statm", "rb") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), rss


def idle(svc: Service, vms: int, seconds: float = IDLE_S) -> Case:
    assert svc.proc is not None
    pid = svc.proc.pid
    case = Case(f"idle service, {vms} VM(s) defined, {seconds:.0f} s")
    time.sleep(2.0)  # past its start-up
    cpu0, _ = _proc(pid)
    start = last_t = time.monotonic()
    last_cpu = cpu0
    while time.monotonic() - start < seconds:
        time.sleep(1.0)
        cpu, rss = _proc(pid)
        now = time.monotonic()
        case.add("CPU, % of one core (each second)", 100 * (cpu - last_cpu) / (now - last_t))
        case.add("resident memory, MiB (each second)", rss / 2**20)
        last_cpu, last_t = cpu, now
    total = _proc(pid)[0] - cpu0
    case.notes.append(f"CPU over the whole {seconds:.0f} s: {total:.2f} s "
                      f"({100 * total / seconds:.2f} % of one core; clock tick "
                      f"{1 / os.sysconf('SC_CLK_TCK'):.2f} s)")
    return case


def many(env: dict[str, str], wd: Path, count: int) -> None:
    """*count* defined VMs b0000... in all: one bcreate, its row copied (see the module's
    docstring); VMs already there are kept."""
    from cbsd.storage.inventory import Inventory
    from cbsd.storage.paths import Workdir

    inv = Inventory(Workdir(wd).inventory)
    if inv.get("b0000") is None:
        inv.close()
        cli(env, "bcreate", "jname=b0000", "vm_os_type=other", "vm_ram=32m", "imgsize=1m")
        inv = Inventory(Workdir(wd).inventory)
    spec = inv.get("b0000")
    assert spec is not None
    for i in range(1, count):
        if inv.get(f"b{i:04d}") is None:
            inv.add(dataclasses.replace(spec, jname=f"b{i:04d}"))
    inv.close()


def listing(svc: Service, env: dict[str, str], repeat: int, vms: int,
            metrics: bool = False) -> Case:
    case = Case(f"list {vms} VMs: API vs CLI")
    for _ in range(repeat):
        settle()
        t = time.perf_counter()
        r = svc.client.get("/1.0/instances")
        rows = r.json()
        case.add("GET /1.0/instances", time.perf_counter() - t)
        assert r.status_code == 200 and len(rows) == vms, (r.status_code, len(rows))
        case.add("cbsd bls format=json", timed([CBSD, "bls", "format=json"], env))
        settle()
        case.add("every row derived (listing.rows in process: bls's core)",
                 derive_all(svc.workdir))
        if metrics:
            settle()
            t = time.perf_counter()
            m = svc.client.get("/metrics")
            case.add("GET /metrics", time.perf_counter() - t)
            assert m.status_code == 200
    return case


def derive_all(wd: Path) -> float:
    """Seconds to derive every VM's row (what bls does, and the service for the rows that
    may have changed), in this process: no process start, no HTTP."""
    from cbsd.core.manage import listing
    from cbsd.core.vm.context import Context
    from cbsd.storage.paths import Workdir

    ctx = Context(Workdir(wd), writable=False)
    try:
        t = time.perf_counter()
        listing.rows(ctx, None)
        return time.perf_counter() - t
    finally:
        ctx.inventory.close()


class Subscriber:
    """GET /1.0/events in a thread of its own: each lifecycle event of GUEST with the
    perf_counter() of its arrival."""

    def __init__(self, socket: Path) -> None:
        self.arrived: queue.Queue[tuple[str, float]] = queue.Queue()
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)),
                                   base_url="http://cbsd", timeout=None)
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.ready.wait(30), "the event stream did not open"

    def _read(self) -> None:
        with contextlib.suppress(httpx.TransportError):  # closed: the bench is done with it
            self._lines()

    def _lines(self) -> None:
        with self.client.stream("GET", "/1.0/events") as r:
            for line in r.iter_lines():
                self.ready.set()
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                meta = event.get("metadata", {})
                if event.get("type") == "lifecycle" and meta.get("name") == GUEST:
                    self.arrived.put((str(meta.get("status")), time.perf_counter()))

    def wait(self, status: str, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while True:
            got, at = self.arrived.get(timeout=max(0.01, deadline - time.monotonic()))
            if got == status:
                return at


def events(svc: Service, env: dict[str, str], repeat: int) -> Case:
    case = Case("a status change reaches an event subscriber")
    sub = Subscriber(svc.socket)
    for _ in range(repeat):
        for mode, status in (("on", "Paused"), ("off", "On")):
            settle()
            t0 = time.perf_counter()
            subprocess.run([CBSD, "bpause", GUEST, f"mode={mode}"], env=env, check=True,
                           capture_output=True)
            t1 = time.perf_counter()
            at = sub.wait(status)
            case.add("after the command's exit", at - t1)
            case.add("after the command's start", at - t0)
    sub.client.close()
    return case


def checkpoints(svc: Service, env: dict[str, str], repeat: int) -> Case:
    case = Case(f"checkpoint create of the running {GUEST}: API vs CLI")
    for i in range(repeat):
        settle()
        t = time.perf_counter()
        r = svc.client.post(f"/1.0/instances/{GUEST}/checkpoints", json={"name": f"api{i}"})
        if r.status_code != 202:
            case.notes.append(f"not measured: POST /1.0/instances/{GUEST}/checkpoints answered "
                              f"{r.status_code} ({r.text[:120]}): the service has no "
                              "checkpoint endpoint yet")
            return case
        op = svc.wait(r)
        case.add("API (POST, until its operation ended)", time.perf_counter() - t)
        assert op["status"] == "Success", op
        case.add("cbsd bcheckpoint mode=create", timed(
            [CBSD, "bcheckpoint", "mode=create", f"jname={GUEST}", f"name=cli{i}"], env))
    return case


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_all(repeat: int = 9, idle_s: float = IDLE_S) -> tuple[list[Case], dict[str, str]]:
    cases = []
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="cbsd-bench-service-") as tmp:
        wd = Path(tmp) / "wd"
        env = workdir_env(wd)
        wd.mkdir()
        img = counter_image(Path(tmp) / "ctr.raw", 0)
        cli(env, "bcreate", f"jname={GUEST}", f"image={img}", "vm_os_type=other",
            "vm_ram=256m", "vm_dedup=off")
        cli(env, "bstart", GUEST)
        try:
            with Service(wd) as svc:
                cases.append(idle(svc, 1, idle_s))
                svc.client.get("/1.0/instances")  # warm: the first look loads the modules
                for count in SMALL:  # how the time grows with the VMs
                    many(env, wd, count)
                    cases.append(listing(svc, env, repeat, count + 1))
            many(env, wd, MANY)
            with Service(wd) as svc:
                cases.append(idle(svc, MANY + 1, idle_s))
                cases.append(listing(svc, env, repeat, MANY + 1, metrics=True))
                cases.append(events(svc, env, repeat))
                cases.append(checkpoints(svc, env, repeat))
        finally:
            subprocess.run([CBSD, "bstop", GUEST, "noacpi=1"], env=env, capture_output=True,
                           check=False)
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.splitlines()[0]
    # The host is shared: its load (1, 5, 15 min) says how far to trust absolute times.
    return cases, {"qemu": qemu, "python": sys.version.split()[0],
                   "load": f"{load_before} before, {_load()} after"}


def _ratio(c: Case, mine: str, other: str) -> str | None:
    if mine in c.series and other in c.series and c.series[other].median > 0:
        return (f"- ratio {mine} / {other}: **{c.series[mine].median / c.series[other].median:.2f}"
                "x**")
    return None


def write(cases: list[Case], versions: dict[str, str], study: Study = SERVICE) -> str:

    study.save_results(cases, versions)
    lines = report_header("Service benchmarks", "service", "bench_service",
                          f"analysis in [analysis.md]({study.analysis('the-service')}).",
                          f"- Python {versions['python']}",
                          f"- load average (1, 5, 15 min): {versions.get('load', 'not recorded')}")
    for c in cases:
        lines += c.table("")
        for mine, other in (("GET /1.0/instances", "cbsd bls format=json"),
                            ("API (POST, until its operation ended)",
                             "cbsd bcheckpoint mode=create")):
            ratio = _ratio(c, mine, other)
            if ratio:
                lines.append(ratio)
        lines += [f"- {n}" for n in c.notes] + [""]
    return study.publish(lines)


if __name__ == "__main__":
    print(write(*run_all(int(sys.argv[1]) if len(sys.argv) > 1 else 9)))
