"""The service's REST API (docs/api.md) against a real `cbsd serve` and real VMs (the
boot-sector counter guest): what the API does is judged by what the guest shows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import COUNTER_RE, Cbsd
from tests.service import Service

pytestmark = pytest.mark.vm


@pytest.fixture
def service(cbsd: Cbsd) -> Iterator[Service]:
    with Service(cbsd.workdir) as svc:
        yield svc


def test_server_info_and_list(service: Service, cbsd: Cbsd, counter_vm: str) -> None:
    info = service.client.get("/1.0").json()
    assert info["api_version"] == "1.0" and info["auth"] == "unix"
    rows = service.client.get("/1.0/instances").json()
    assert [(r["jname"], r["status"]) for r in rows] == [("vm1", "Off")]
    # the same facts bls gives
    import json
    assert rows == json.loads(cbsd("bls", "format=json").ok().out)


def test_unknown_vm_is_404_with_the_cli_message(service: Service) -> None:
    r = service.client.get("/1.0/instances/nope")
    assert r.status_code == 404
    assert r.json() == {"error": "No such VM: nope", "error_code": 404}


def test_socket_is_owner_only_without_a_cbsd_group(service: Service) -> None:
    import grp
    mode = Path(service.socket).stat().st_mode & 0o777
    try:
        grp.getgrnam("cbsd")
        assert mode == 0o660
    except KeyError:
        assert mode == 0o600


__all__ = ["COUNTER_RE"]
