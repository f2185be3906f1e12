"""Image pools are a security boundary: through the API a client names only files inside
the folders the administrator allowed (`cbsd serve pools=`), never /etc/shadow, never a path
that escapes by `..` or a symlink, never another VM's disk or a file an image refers to."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guests import build
from tests.harness import Cbsd
from tests.service import Service

pytestmark = pytest.mark.vm


@pytest.fixture
def pool(cbsd: Cbsd) -> Path:
    """The pool is the workdir's parent folder, which holds the workdir too: even a pool an
    administrator drew too wide cannot reach the VMs' own files."""
    pool = cbsd.workdir.parent
    pool.mkdir(parents=True, exist_ok=True)
    build.counter_image(pool / "counter.raw")
    (pool / "shadow-link.raw").symlink_to("/etc/shadow")
    (pool / "sub").mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw",
                    str(pool / "backed.qcow2")], check=True)
    return pool


@pytest.fixture
def service(cbsd: Cbsd, pool: Path) -> Iterator[Service]:
    with Service(cbsd.workdir, f"pools={pool}") as svc:
        yield svc


def create(svc: Service, jname: str, **keys: str) -> tuple[int, dict[str, object]]:
    r = svc.client.post("/1.0/instances", json={"jname": jname, "vm_os_type": "other",
                                                "vm_ram": "32m", **keys})
    return r.status_code, r.json()


def test_only_files_in_the_pool(service: Service, cbsd: Cbsd, pool: Path) -> None:
    cbsd("bcreate", "jname=other", f"image={pool / 'counter.raw'}", "vm_os_type=other",
         "vm_ram=32m").ok()
    other_disk = cbsd.workdir / "vm" / "other" / "dsk1.qcow2"
    assert other_disk.exists()
    refused = {
        "/etc/shadow": (403, "not inside an image pool"),
        f"{pool}/../../../etc/shadow": (400, "'..' is not allowed"),
        f"{pool}/sub/../counter.raw": (400, "'..' is not allowed"),
        str(pool / "shadow-link.raw"): (403, "not inside an image pool"),
        str(other_disk): (403, "a VM's or cbsd's own file"),
        "counter.raw": (400, "give an absolute path"),
        str(pool / "missing.raw"): (400, "no such file in the image pool"),
    }
    for path, (code, says) in refused.items():
        for key in ("image", "iso", "kernel"):
            got, body = create(service, "vm1", **{key: path})
            assert got == code and body["error_code"] == code, (key, path, body)
            error = str(body["error"])
            assert error.startswith(f"bcreate: {key}={path}: ") and says in error, error
    # image= is converted by qemu-img, which follows a qcow2's backing file; ISOs and kernels
    # are opened raw (qemu/argv.py), so only image= is refused for what it refers to.
    got, body = create(service, "vm1", image=str(pool / "backed.qcow2"))
    assert got == 403 and "it refers to /etc/shadow" in str(body["error"]), body
    got, body = create(service, "vm1", ci_user_pubkey="/etc/ssh/ssh_host_rsa_key.pub")
    assert got == 403 and "ci_user_pubkey=" in str(body["error"]), body
    # nothing was made by any refused request
    assert [r["jname"] for r in service.client.get("/1.0/instances").json()] == ["other"]
    assert not (cbsd.workdir / "vm" / "vm1").exists()
    got, body = create(service, "vm1", image=str(pool / "counter.raw"))
    assert got == 202
    op = service.client.get(f"/1.0/operations/{body['id']}/wait").json()
    assert (op["status"], op["result"]) == ("Success", "vm1: created"), op


def test_no_pools_no_files(cbsd: Cbsd, pool: Path) -> None:
    """Without pools= the API accepts no host file at all."""
    with Service(cbsd.workdir) as svc:
        got, body = create(svc, "vm1", image=str(pool / "counter.raw"))
        assert got == 403 and "pools: none" in str(body["error"]), body
