"""The web UI (issue 24): how soon its first page is usable in Debian's chromium (<= 1 s on this
host). Measured from the navigation until the page can be used: the log-in form (a new
browser profile, nothing cached), and the VM list drawn with every VM's status (logged in, as
a user opening the page again). A real `cbsd serve` with TLS on 127.0.0.1 and N VMs defined.

    python -m bench.bench_webui [N ...]
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from bench.common import Case, cbsd, workdir_env

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_DEADLINE = 60.0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(wd: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "cbsd", "serve", f"listen=127.0.0.1:{port}"],
                            env=workdir_env(wd), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_DEADLINE
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("cbsd serve did not start") from None
            time.sleep(0.05)


def run(counts: tuple[int, ...] = (10, 100), repeat: int = 9) -> list[Case]:
    cases = []
    with tempfile.TemporaryDirectory(prefix="cbsd-bench-webui-") as tmp:
        wd = Path(tmp) / "wd"
        env = workdir_env(wd)
        token = subprocess.run([sys.executable, "-m", "cbsd", "token", "mode=add", "name=bench"],
                               env=env, check=True, capture_output=True, text=True
                               ).stdout.split()[-1]
        defined = 0
        for n in counts:
            while defined < n:
                defined += 1
                cbsd("bcreate", f"jname=w{defined:04d}", "vm_os_type=other", "vm_ram=32m",
                     "imgsize=1m", env=env)
            port = _port()
            proc = _serve(wd, port)
            base = f"https://127.0.0.1:{port}"
            case = Case(f"the web UI's first page usable, {n} VMs defined (s)")
            try:
                with sync_playwright() as pw:
                    for _ in range(repeat):
                        with tempfile.TemporaryDirectory(prefix="cbsd-chromium-") as profile:
                            browser = pw.chromium.launch_persistent_context(
                                profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                                ignore_https_errors=True)
                            page = browser.new_page()
                            t = time.perf_counter()
                            page.goto(base + "/")
                            page.wait_for_selector("#token")
                            case.add("log-in page, nothing cached", time.perf_counter() - t)
                            page.fill("#token", token)
                            page.click("#login button[type=submit]")
                            page.wait_for_selector(f"#vms tr[data-vm] >> nth={n - 1}")
                            t = time.perf_counter()
                            page.goto(base + "/ui/?again")
                            page.wait_for_selector(f"#vms tr[data-vm] >> nth={n - 1}")
                            case.add("VM list, logged in", time.perf_counter() - t)
                            browser.close()
            finally:
                proc.terminate()
                proc.wait(30)
            cases.append(case)
    return cases


if __name__ == "__main__":
    for c in run(tuple(int(a) for a in sys.argv[1:]) or (10, 100)):
        print(c.title, {k: (round(s.median, 3), round(max(s.samples), 3))
                        for k, s in c.series.items()}, flush=True)
