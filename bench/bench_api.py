"""The service (issue 24): GET /1.0/instances of many VMs against `cbsd bls` (<= 0.1 s for
1,000 VMs, never slower than bls), how soon an event reaches a subscriber after a CLI command
changed a VM's status (<= 0.2 s), and the idle service's CPU and memory (no measurable CPU,
under ~80 MB)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.common import CBSD, Case, cbsd, workdir_env
from bench.timing import run as timed

START_DEADLINE = 60.0


def _serve(wd: Path) -> tuple[subprocess.Popen[bytes], httpx.Client]:
    proc = subprocess.Popen([sys.executable, "-m", "cbsd", "serve"], env=workdir_env(wd),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(wd / "cbsd.sock")),
                          base_url="http://cbsd", timeout=60)
    deadline = time.monotonic() + START_DEADLINE
    while True:
        try:
            client.get("/1.0").raise_for_status()
            return proc, client
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _event_latency(wd: Path, image: Path, repeat: int) -> list[float]:
    """Seconds from `cbsd bpause` returning to its lifecycle event arriving."""
    env = workdir_env(wd)
    cbsd("bcreate", "jname=ev", f"image={image}", "vm_os_type=other", "vm_ram=32m", env=env)
    cbsd("bstart", "ev", env=env)
    proc, client = _serve(wd)
    arrived: dict[str, float] = {}
    seen = threading.Condition()

    def read() -> None:
        with client.stream("GET", "/1.0/events", timeout=None) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    e = json.loads(line[6:])
                    if e["type"] == "lifecycle" and e["metadata"]["name"] == "ev":
                        with seen:
                            arrived[e["metadata"]["status"]] = time.perf_counter()
                            seen.notify_all()

    threading.Thread(target=read, daemon=True).start()
    time.sleep(1)
    out = []
    try:
        for i in range(repeat):
            want = "Paused" if i % 2 == 0 else "On"
            with seen:
                arrived.pop(want, None)
            subprocess.run([CBSD, "bpause", "ev", f"mode={'on' if want == 'Paused' else 'off'}"],
                           env=env, check=True, capture_output=True)
            done = time.perf_counter()
            with seen:
                seen.wait_for(lambda w=want: w in arrived, 10)  # type: ignore[misc]
                out.append(max(0.0, arrived[want] - done))
    finally:
        proc.terminate()
        proc.wait(30)
        cbsd("bstop", "ev", "noacpi=1", env=env)
    return out


def run(counts: tuple[int, ...] = (10, 200, 1000), repeat: int = 9) -> list[Case]:
    # lazy: the test guests' builder, only for the event case
    from tests.guests import build

    cases = []
    with tempfile.TemporaryDirectory(prefix="cbsd-bench-api-") as tmp:
        wd = Path(tmp) / "wd"
        env = workdir_env(wd)
        defined = 0
        for n in counts:
            while defined < n:
                defined += 1
                cbsd("bcreate", f"jname=b{defined:04d}", "vm_os_type=other", "vm_ram=32m",
                     "imgsize=1m", env=env)
            proc, client = _serve(wd)
            try:
                case = Case(f"list, {n} VMs defined (wall time)")
                client.get("/1.0/instances")  # warm
                for _ in range(repeat):
                    t = time.perf_counter()
                    assert len(client.get("/1.0/instances").json()) == n
                    case.add("GET /1.0/instances", time.perf_counter() - t)
                    case.add("cbsd bls format=json", timed([CBSD, "bls", "format=json"], env))
                cases.append(case)
                if n == counts[-1]:
                    idle = Case(f"the idle service, {n} VMs defined")
                    time.sleep(2)
                    cpu0 = _cpu_seconds(proc.pid)
                    time.sleep(10)
                    idle.add("CPU while idle (% of one core)",
                             (_cpu_seconds(proc.pid) - cpu0) * 10)
                    idle.add("resident memory (MB)", _rss_mb(proc.pid))
                    cases.append(idle)
            finally:
                proc.terminate()
                proc.wait(30)
        image = build.counter_image(Path(tmp) / "counter.raw")
        ev = Case("event after a CLI status change (bpause), to an SSE subscriber (s)")
        for v in _event_latency(Path(tmp) / "wd-ev", image, repeat):
            ev.add("lifecycle event", v)
        cases.append(ev)
    return cases


if __name__ == "__main__":
    for c in run(tuple(int(a) for a in sys.argv[1:]) or (10, 200, 1000)):
        print(c.title, {k: (round(s.median, 4), round(max(s.samples), 4))
                        for k, s in c.series.items()}, flush=True)
