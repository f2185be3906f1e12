"""A fake QEMU: an executable that cbsd runs as its QEMU (CBSD_QEMU), so core orchestration
(bstart, save's rollback, recovery, the settles of bmove/bmigrate) is tested in seconds
without a guest.

Why an executable and not a patched VM.launch or Monitor: everything between cbsd and QEMU
then stays real -- the argv cbsd builds, the -daemonize launch through subprocess, the pid
file, liveness read from /proc (the fake's own process carries the QMP socket path in its
command line, as QEMU does, and SIGKILL ends it), the QMP wire protocol on the unix socket
(greeting, qmp_capabilities, ids, events between replies, file descriptors passed with
SCM_RIGHTS), the disk files held open (save checks them through /proc/PID/fd) and internal
snapshots written into the qcow2 files (by qemu-img, as QEMU would write them), so the
offline paths (qemu-img snapshot -l/-d) see what the fake did. What is fake is only the
guest: run states change as QEMU's do on stop, cont, migrate, quit; a migration writes a
small stream into the file it was handed and completes at once, an incoming one reads the
whole file it was handed and leaves the VM paused (-S), as QEMU does.

The test side (FakeQemu) writes a scenario (JSON) beside a wrapper script and reads back the
record of commands the fake received. The scenario:

  version       "7.2.0" (what --version says; 10.x adds blockdev-set-active)
  state         the run state the daemon starts in (default: prelaunch with -S, inmigrate
                with -incoming, else running)
  capabilities  what query-migrate-capabilities lists
  added         block nodes present beyond the argv's (as blockdev-add would have added)
  launch        "ok"; "fail": exit 1 with a QEMU-style error before daemonizing; "die": the
                daemon writes its pid file and exits before serving QMP
  fail          [{"command": NAME, "nth": N, "action": "error"|"hang"|"die", "desc": ...}]:
                the Nth (default 1st) NAME this fake received (counted over all its
                daemons, so a relaunch does not fire it again) answers a GenericError,
                never answers, or ends the process before answering. Re-read on every
                command, so a test may script a failure after the launch.

Run as a script it is the QEMU; imported it is the test helper (no cbsd import here: the
daemon must start fast and stay independent of what it fakes).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

SCENARIO_ENV = "CBSD_FAKE_QEMU_DIR"
PAYLOAD = bytes(range(256)) * 1024  # what a migration writes: 256 KiB, not all zero

# The probes cbsd runs once per binary (qemu/host.py: --version, -machine help, -device help)
# are answered by the shell: three Python start-ups would cost more than the rest of a test.
WRAPPER = """#!/bin/sh
case "$*" in
    --version) echo "QEMU emulator version $(cat {home}/version) (fake)"; exit 0 ;;
    "-machine help") exec cat {home}/machines.txt ;;
    "-device help") exec cat {home}/devices.txt ;;
esac
{env}={home} exec {python} {script} "$@"
"""

# --- the test side ------------------------------------------------------------------------


class FakeQemu:
    """One fake QEMU binary (a wrapper script in *home*) and its scenario and record."""

    def __init__(self, home: Path, **scenario: Any) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.binary = home / "qemu-system-x86_64"
        (home / "machines.txt").write_text(MACHINES)
        (home / "devices.txt").write_text(DEVICES)
        self.binary.write_text(WRAPPER.format(home=home, env=SCENARIO_ENV, python=sys.executable,
                                              script=Path(__file__).resolve()))
        self.binary.chmod(0o755)
        self.scenario: dict[str, Any] = {}
        self.script(**scenario)

    def script(self, **changes: Any) -> None:
        """Change the scenario (the daemon re-reads its failures on every command)."""
        self.scenario.update(changes)
        (self.home / "version").write_text(str(self.scenario.get("version", "7.2.0")))
        tmp = self.home / "scenario.json.tmp"
        tmp.write_text(json.dumps(self.scenario))
        tmp.replace(self.home / "scenario.json")

    def fail(self, command: str, action: str = "error", nth: int = 1,
             desc: str = "fake failure") -> None:
        self.script(fail=[*self.scenario.get("fail", []),
                          {"command": command, "action": action, "nth": nth, "desc": desc}])

    def received(self) -> list[dict[str, Any]]:
        """Every QMP request the fake's daemons received, in order."""
        try:
            lines = (self.home / "record.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(ln) for ln in lines]

    def commands(self, since: int = 0) -> list[str]:
        """The names of the commands received (from request number *since* on), without the
        capabilities negotiation that opens every session."""
        return [r["execute"] for r in self.received()[since:]
                if r["execute"] != "qmp_capabilities"]

    def mark(self) -> int:
        return len(self.received())

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.home / "pids").read_text().split()]
        except FileNotFoundError:
            return []

    def end_all(self) -> None:
        """SIGKILL every daemon this fake started that still runs (test teardown)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- the QEMU side ------------------------------------------------------------------------

MACHINES = """Supported machines are:
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
"""
DEVICES = "".join(f'name "{d}", bus PCI\n' for d in (
    "virtio-blk-pci", "virtio-net-pci", "virtio-rng-pci", "virtio-serial-pci", "virtserialport",
    "e1000", "ahci", "nvme", "ide-hd", "ide-cd"))


def _opts(value: str) -> dict[str, str]:
    """QEMU's key=value,key=value with ',,' for a comma inside a value."""
    out: dict[str, str] = {}
    for part in value.replace(",,", "\0").split(","):
        key, _, val = part.partition("=")
        out[key] = val.replace("\0", ",")
    return out


class Daemon:
    def __init__(self, home: Path, argv: list[str]) -> None:
        self.home = home
        self.argv = argv
        scenario = self.scenario()
        self.version = str(scenario.get("version", "7.2.0"))
        self.caps: list[str] = list(scenario.get("capabilities",
                                                 ["background-snapshot", "x-ignore-shared"]))
        default = ("inmigrate" if "-incoming" in argv else "prelaunch" if "-S" in argv
                   else "running")
        self.state: str = scenario.get("state") or default
        self.migration: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []  # sent ahead of the reply, as QEMU may
        self.fds: dict[str, int] = {}
        self.fdsets: dict[int, int] = {}
        self.qmp = self.pidfile = ""
        self.files: dict[str, str] = {}  # block node name (disk0-file) -> file
        self.genid: str | None = None  # the vmgenid device's generation ID, if it has one
        self.nodes: dict[str, str] = {}  # qcow2 node (disk0) -> its file node
        for opt, val in itertools.pairwise(argv):
            if opt == "-chardev" and val.startswith("socket,id=qmp,"):
                self.qmp = _opts(val)["path"]
            elif opt == "-pidfile":
                self.pidfile = val
            elif opt == "-device" and val.startswith("vmgenid,"):
                # guid=auto: a new random one, as QEMU's (and what a load writes to the guest)
                guid = _opts(val)["guid"]
                self.genid = str(uuid.uuid4()) if guid == "auto" else guid
            elif opt == "-blockdev":
                # key=value, or JSON (cbsd's qcow2 nodes: they spell "backing": null)
                o = json.loads(val) if val.startswith("{") else _opts(val)
                if o.get("driver") == "file":
                    self.files[o["node-name"]] = o["filename"]
                elif o.get("driver") == "qcow2":
                    self.nodes[o["node-name"]] = o["file"]
        # Block nodes added at run time (blockdev-add; a scenario's "added": e.g. the mirror
        # targets a cut-off bmigrate leaves).
        self.added: list[str] = list(scenario.get("added", []))
        self.held = [os.open(f, os.O_RDONLY) for f in self.files.values() if os.path.exists(f)]

    def scenario(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.home / "scenario.json").read_text()))
        except (OSError, ValueError):
            return {}

    def log(self, text: str) -> None:
        with open(self.home / "daemon.log", "a") as f:
            f.write(f"{os.getpid()}: {text}\n")

    def exit(self) -> None:
        """QEMU's own exit: its pid file goes (QEMU removes it), then the process."""
        with contextlib.suppress(OSError):
            os.unlink(self.pidfile)
        os._exit(0)

    def event(self, name: str, **data: Any) -> None:
        self.events.append({"event": name, "data": data,
                            "timestamp": {"seconds": int(time.time()), "microseconds": 0}})

    # --- QMP ----------------------------------------------------------------------------

    def serve(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):  # a client gone mid-reply: QEMU lives on
                self.session(conn)

    def session(self, conn: socket.socket) -> None:
        def send(*objs: object) -> None:
            conn.sendall(b"".join(json.dumps(o).encode() + b"\n" for o in objs))

        send({"QMP": {"version": {"qemu": dict(zip(("major", "minor", "micro"),
                                                    map(int, self.version.split(".")),
                                                    strict=False))},
                      "capabilities": []}})
        buf = b""
        while True:
            fds: list[int] = []
            while b"\n" not in buf:
                try:
                    data, got, _, _ = socket.recv_fds(conn, 65536, 4)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                fds += got
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            req = json.loads(line)
            with open(self.home / "record.jsonl", "a") as f:
                f.write(json.dumps({**req, "fd": bool(fds)}) + "\n")
            name = str(req.get("execute"))
            reply = self.scripted(name)
            if reply is None:
                try:
                    result = self.execute(name, req.get("arguments", {}), fds)
                    reply = {"return": result}
                except QmpError as e:
                    reply = {"error": {"class": e.cls, "desc": e.desc}}
            send(*self.events, {**reply, "id": req.get("id")})
            self.events.clear()
            if name == "quit":
                self.exit()
            if name == "system_powerdown" and self.scenario().get("powerdown", "exit") == "exit":
                self.exit()

    def scripted(self, name: str) -> dict[str, Any] | None:
        fails = [f for f in self.scenario().get("fail", []) if f.get("command") == name]
        if not fails:
            return None
        with open(self.home / "record.jsonl") as rec:
            count = sum(json.loads(ln)["execute"] == name for ln in rec)
        for f in fails:
            if int(f.get("nth", 1)) == count:
                action = f.get("action", "error")
                self.log(f"scripted {action} on {name}")
                if action == "die":
                    os.kill(os.getpid(), signal.SIGKILL)
                if action == "hang":
                    while True:
                        time.sleep(3600)
                return {"error": {"class": "GenericError", "desc": f.get("desc", "fake")}}
        return None

    def execute(self, name: str, args: dict[str, Any], fds: list[int]) -> Any:
        if name == "qmp_capabilities":
            return {}
        if name == "query-status":
            return {"status": self.state, "running": self.state == "running",
                    "singlestep": False}
        if name == "stop":
            if self.state == "running":
                self.state = "paused"
                self.event("STOP")
            return {}
        if name == "cont":
            if self.state == "inmigrate":
                raise QmpError("Migration is not finished yet")
            self.state = "running"
            self.event("RESUME")
            return {}
        if name in ("quit", "system_powerdown", "set_password", "migrate-set-capabilities",
                    "migrate-set-parameters"):
            return {}
        if name == "query-vnc":
            return {"enabled": False}
        if name == "query-vm-generation-id":
            if self.genid is None:
                raise QmpError("VM Generation ID device not found")
            return {"guid": self.genid}
        if name == "query-chardev":
            return []
        if name == "query-migrate-parameters":
            return {}
        if name == "query-migrate-capabilities":
            return [{"capability": c, "state": False} for c in self.caps]
        if name == "getfd":
            self.fds[str(args["fdname"])] = fds[0]
            return {}
        if name == "add-fd":
            fdset = int(args.get("fdset-id", len(self.fdsets)))
            self.fdsets[fdset] = fds[0]
            return {"fdset-id": fdset, "fd": fds[0]}
        if name == "remove-fd":
            return {}
        if name == "migrate":
            return self.migrate(str(args["uri"]))
        if name == "migrate-incoming":
            return self.incoming(str(args["uri"]))
        if name == "query-migrate":
            return dict(self.migration)
        if name == "migrate_cancel":
            if self.migration.get("status") == "active":
                self.migration["status"] = "cancelled"
            return {}
        if name == "blockdev-set-active" and int(self.version.split(".")[0]) >= 10:
            return {}
        if name in ("query-block-jobs", "query-jobs"):
            return []
        if name == "query-named-block-nodes":
            return [{"node-name": n} for n in [*self.files, *self.nodes, *self.added]]
        if name == "blockdev-add":
            self.added.append(str(args["node-name"]))
            return {}
        if name == "blockdev-del":
            if args["node-name"] not in self.added:
                raise QmpError(f"Failed to find node with node-name='{args['node-name']}'")
            self.added.remove(str(args["node-name"]))
            return {}
        if name in ("blockdev-snapshot-internal-sync", "blockdev-snapshot-delete-internal-sync"):
            return self.snapshot(name, str(args["device"]), str(args["name"]))
        raise QmpError(f"The command {name} has not been found", "CommandNotFound")

    def channel(self, uri: str) -> int:
        """The file a migration URI names: fd:NAME (getfd) or file:/dev/fdset/N (add-fd)."""
        if uri.startswith("fd:"):
            return self.fds.pop(uri[3:])
        if uri.startswith("file:/dev/fdset/"):
            return self.fdsets[int(uri.rsplit("/", 1)[1])]
        raise QmpError(f"fake QEMU: unsupported migration URI {uri}")

    def incoming(self, uri: str) -> dict[str, Any]:
        """Load a state: read the whole file (through the descriptor whose offset cbsd
        follows), then stop as QEMU does with -S: paused, the migration completed."""
        if self.state != "inmigrate":
            raise QmpError("The incoming migration has already been started")
        fd = self.channel(uri)
        while os.read(fd, 1 << 16):
            pass
        os.close(fd)
        self.migration = {"status": "completed"}
        self.state = "paused"
        return {}

    def migrate(self, uri: str) -> dict[str, Any]:
        fd = self.channel(uri)
        os.write(fd, PAYLOAD)
        os.close(fd)
        total = len(PAYLOAD)
        self.migration = {"status": "completed", "total-time": 1,
                          "ram": {"total": total, "remaining": 0, "transferred": total}}
        self.state = "postmigrate"
        self.event("MIGRATION", status="completed")
        return {}

    def snapshot(self, name: str, device: str, tag: str) -> dict[str, Any]:
        """Internal snapshots go into the image file itself, as QEMU's do."""
        path = self.files.get(self.nodes.get(device, ""))
        if path is None:
            raise QmpError(f"Cannot find device='{device}' nor node-name='{device}'")
        qemu_img = os.environ.get("CBSD_QEMU_IMG") or "qemu-img"
        flag = "-c" if name == "blockdev-snapshot-internal-sync" else "-d"
        res = subprocess.run([qemu_img, "snapshot", flag, tag, path], capture_output=True,
                             text=True, check=False)
        if res.returncode != 0:
            raise QmpError(f"Snapshot '{tag}' on '{device}': {res.stderr.strip()}")
        return {}


class QmpError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc, self.cls = desc, cls


def main(argv: list[str]) -> int:
    home = Path(os.environ[SCENARIO_ENV])
    daemon = Daemon(home, argv)
    launch = daemon.scenario().get("launch", "ok")
    if launch == "fail":
        disk = next(iter(daemon.files.values()), "")
        print(f"qemu-system-x86_64: -blockdev driver=file,filename={disk}: Could not open: "
              "fake launch failure", file=sys.stderr)
        return 1
    # -daemonize: the parent returns once the child listens and has written its pid file.
    listener = socket.socket(socket.AF_UNIX)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(daemon.qmp)
    listener.bind(daemon.qmp)
    listener.listen(4)
    ready_r, ready_w = os.pipe()
    if os.fork():
        os.close(ready_w)
        return 0 if os.read(ready_r, 1) == b"1" else 1
    os.close(ready_r)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    with open(home / "pids", "a") as f:
        f.write(f"{os.getpid()}\n")
    Path(daemon.pidfile).write_text(f"{os.getpid()}\n")
    os.write(ready_w, b"1")
    os.close(ready_w)
    if launch == "die":
        daemon.log("scripted death after the pid file")
        os._exit(1)
    try:
        daemon.serve(listener)
    except BaseException as e:
        daemon.log(f"died: {e!r}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
