"""The seed's story, run for real: create a VM, start it, checkpoint it, let it change,
checkpoint again, stop it, restore the first checkpoint and watch the guest carry on.

Uses a throw-away workdir (CBSD_WORKDIR) so it touches nothing else on the host."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.guests.build import linux_guest  # noqa: E402

TICK = re.compile(r"tick n=(\d+) up=([\d.]+) disk=(\d+) (OK|BAD)")
DISKLESS = re.compile(r"^tick n=\d+ up=[\d.]+\s*$", re.M)  # the guest's ticks without /dev/vda
CBSD = [str(Path(sys.executable).parent / "cbsd")]


def say(text: str) -> None:
    print(f"\n\033[1m# {text}\033[0m" if sys.stdout.isatty() else f"\n# {text}", flush=True)


def run(*args: str) -> str:
    print("$ cbsd " + " ".join(shlex.quote(a) for a in args), flush=True)
    p = subprocess.run(CBSD + list(args), capture_output=True, text=True)
    sys.stdout.write(p.stdout)
    sys.stderr.write(p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"demo: cbsd {args[0]} failed with exit code {p.returncode}")
    return p.stdout


def ticks(log: Path, since: int) -> list[tuple[int, float, int, str]]:
    text = log.read_bytes()[since:].decode(errors="replace")
    return [(int(n), float(u), int(d), ok) for n, u, d, ok in TICK.findall(text)]


def wait_ticks(log: Path, since: int, count: int, timeout: float = 60) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while len(found := ticks(log, since)) < count:
        if time.monotonic() > deadline:
            show_console(log)
            diskless = DISKLESS.search(log.read_bytes()[since:].decode(errors="replace"))
            raise SystemExit("demo: the guest printed nothing in time (the end of its console "
                             "log is above)" + ("; it runs but sees no disk: its initramfs "
                                                "has no disk driver?" if diskless else ""))
        time.sleep(0.1)
    return found


def show_console(log: Path, lines: int = 25) -> None:
    """The end of the guest's console log, on stderr: what it did instead of printing."""
    try:
        text = log.read_bytes().decode(errors="replace")
    except OSError as e:
        print(f"demo: no console log ({e})", file=sys.stderr)
        return
    tail = text.splitlines()[-lines:]
    print(f"--- the last {len(tail)} lines of {log}:", *tail, "---", sep="\n", file=sys.stderr)


def show(lines: list, label: str) -> None:  # type: ignore[type-arg]
    for n, up, disk, ok in lines:
        print(f"   guest {label}: counter={n:<4} uptime={up:7.2f}s  disk={disk:<4} {ok}")


def main() -> None:
    say("Building the test guest: Debian's cloud kernel + a busybox initramfs")
    kernel, initrd = linux_guest()
    with tempfile.TemporaryDirectory(prefix="cbsd-demo-") as wd:
        os.environ["CBSD_WORKDIR"] = wd
        log = Path(wd) / "jails-system" / "demo1" / "console.log"
        try:
            say("Create a VM and start it")
            run("bcreate", "jname=demo1", f"kernel={kernel}", f"initrd={initrd}",
                "cmdline=console=ttyS0 loglevel=4 panic=-1", "vm_ram=256m", "imgsize=16m")
            run("bstart", "jname=demo1")
            run("bls")
            print("   (the guest boots, then prints its RAM counter, uptime and the value it last "
                  "wrote to its disk)")
            before = wait_ticks(log, 0, 4)
            show(before[-2:], "before")

            say("Checkpoint it: memory, CPU, devices and disk of one instant")
            mark = log.stat().st_size
            run("bcheckpoint", "mode=create", "jname=demo1", "name=first")
            at_ckp = (ticks(log, 0) or before)[-1]
            print(f"   (at the checkpoint the guest had counted to {at_ckp[0]})")

            say("Let it change for a few seconds, then checkpoint again")
            later = wait_ticks(log, mark, 6)
            show(later[-2:], "later ")
            run("bcheckpoint", "mode=create", "jname=demo1", "name=second")
            run("bcheckpoint", "mode=list", "jname=demo1")

            say("Stop it")
            run("bstop", "jname=demo1", "noacpi=1")
            run("bls", "display=jname,status")

            say("Restore the first checkpoint: no reboot, the guest carries on from there")
            mark = log.stat().st_size
            run("bstart", "jname=demo1", "checkpoint=first")
            after = wait_ticks(log, mark, 3)
            show(after, "after ")
            booted = "cbsd-guest: up" in log.read_bytes()[mark:].decode(errors="replace")
            first = after[0]
            # The guest may print once more between the checkpoint and our reading the log.
            continued = first[0] in (at_ckp[0], at_ckp[0] + 1)
            disk_ok = all(ok == "OK" for *_, ok in after)
            print(f"\n   counter went on from {at_ckp[0]} to {first[0]}, uptime from "
                  f"{at_ckp[1]:.2f}s to {first[1]:.2f}s; rebooted: {'yes' if booted else 'no'}; "
                  f"disk matches memory: {'yes' if disk_ok else 'NO'}")
            if booted or not continued or not disk_ok or first[1] > later[-1][1]:
                raise SystemExit("demo: the restore did not continue from the checkpoint")
            print("   The disk is back at the first checkpoint too (CBSD's checkpoints ignore it).")
        finally:
            subprocess.run([*CBSD, "bremove", "jname=*"], capture_output=True)
    say("Done.")


if __name__ == "__main__":
    main()
