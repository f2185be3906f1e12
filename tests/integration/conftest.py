"""Fixtures shared by several integration modules: the Debian 12 guest's (test_debian.py,
test_clock.py), defined here, not in one of them, so a session that runs several boots the
guest once (a fixture imported into a second module would be a second session fixture: a
second boot, and a clash over the network namespace's name); and two hosts
(test_many_hosts.py, test_trust_hosts.py)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guests import hosts as twohosts
from tests.guests.debian import debian_guest
from tests.guests.debian_ssh import HOSTNAME, SSH_PORT, USER, Debian
from tests.guests.netns import Netns
from tests.harness import Cbsd


@pytest.fixture(scope="session")
def debian_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Debian]:
    guest = debian_guest()
    base = tmp_path_factory.mktemp("debian")
    ns = Netns.create("deb")
    key = base / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    known = base / "known_hosts"
    known.write_text(f"[127.0.0.1]:{SSH_PORT} {guest.host_key}\n")
    cbsd = Cbsd(base / "wd", prefix=ns.prefix)
    deb = Debian(cbsd, ns, key, known, guest)
    try:
        cbsd("bcreate", "jname=deb", f"image={guest.disk}", f"kernel={guest.kernel}",
             f"initrd={guest.initrd}", "cmdline=root=/dev/vda rw console=ttyS0 quiet",
             "vm_ram=1g", "vm_cpus=2", f"hostfwd=tcp:{SSH_PORT}:22", f"ci_user_add={USER}",
             f"ci_user_pubkey={key}.pub", f"ci_jname={HOSTNAME}",
             f"ci_fqdn={HOSTNAME}.cbsd.test").ok()
        cbsd("bstart", "deb").ok()
        deb.wait_ssh()
        state = deb.system_state()
        assert state == "running", (state, deb.ssh(
            "systemctl --failed --no-legend; sudo cloud-init schema --system", check=False))
        schema = deb.ssh("sudo cloud-init schema --system", check=False)
        assert schema.returncode == 0, f"cbsd's cloud-config is invalid: {schema}"
        deb.wait_rows(past=deb.workload()[0], what="the workload runs")
        cbsd("bcheckpoint", "mode=create", "jname=deb", "name=ready").ok()
        deb.ready_at = time.time()
        cbsd("bstop", "deb", "noacpi=1").ok()
        yield deb
    finally:
        with contextlib.suppress(Exception):
            cbsd("bstop", "deb", "noacpi=1")
        ns.delete()


@pytest.fixture
def deb(debian_session: Debian) -> Iterator[Debian]:
    yield debian_session
    if debian_session.cbsd.status("deb") != "Off":
        debian_session.cbsd("bstop", "deb", "noacpi=1").ok()


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[twohosts.Host, twohosts.Host]]:
    a, b = twohosts.make(tmp_path / "hosts")
    try:
        yield a, b
    finally:
        twohosts.remove((a, b))
