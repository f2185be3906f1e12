"""cloud-init from CBSD's ci_* keys: validation (table of bad input, each with its message),
the NoCloud documents, and the seed image read back."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from cbsd.core.manage import cloudinit
from cbsd.errors import UsageError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE0 test@host"

BAD = [
    ({"ci_user_pubkey": KEY}, "ci_user_pubkey= needs ci_user_add="),
    ({"ci_user_pw_user": "x"}, "ci_user_pw_user= needs ci_user_add="),
    ({"ci_user_add": "bad name"}, "bad ci_user_add"),
    ({"ci_user_add": "u", "ci_user_pubkey": "/nonexistent/key.pub"}, "cannot read"),
    ({"ci_user_add": "u", "ci_user_pubkey": "not a key"}, "cannot read"),
    ({"ci_jname": "a_b"}, "is not a host name"),
    ({"ci_fqdn": "-x.example"}, "is not a host name"),
    ({"ci_ip4_addr": "10.0.0.300/24"}, "bad value for ci_ip4_addr"),
    ({"ci_ip4_addr": "10.0.0.5"}, "needs a prefix length"),
    ({"ci_ip4_addr": "10.0.0.5/24", "ci_gw4": "gateway"}, "bad value for ci_gw4"),
    ({"ci_ip4_addr": "10.0.0.5/24", "ci_nameserver_address": "1.1.1.1,x"},
     "bad value for ci_nameserver_address"),
    ({"ci_gw4": "10.0.0.1"}, "need a static ci_ip4_addr"),
]


@pytest.mark.parametrize(("keys", "message"), BAD)
def test_bad_keys_are_refused_with_a_reason(keys: dict[str, str | None], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")) as e:
        cloudinit.settings(keys)
    assert e.value.exit_code == 2


def test_a_key_file_with_several_keys(tmp_path: Path) -> None:
    f = tmp_path / "keys.pub"
    f.write_text(f"# mine\n{KEY}\nssh-rsa AAAAB3Nza other\n")
    ci = cloudinit.settings({"ci_user_add": "u", "ci_user_pubkey": str(f)})
    assert ci["ci_user_pubkey"].splitlines() == [KEY, "ssh-rsa AAAAB3Nza other"]


def test_passwords_are_kept_hashed_only() -> None:
    ci = cloudinit.settings({"ci_user_add": "u", "ci_user_pw_user": "s3cret",
                             "ci_user_pw_root": "r00t"})
    assert ci["ci_user_pw_user"].startswith("$6$") and ci["ci_user_pw_root"].startswith("$6$")
    docs = cloudinit.documents("vm1", ci)
    assert "s3cret" not in json.dumps(docs) and "r00t" not in json.dumps(docs)


def test_no_keys_no_seed() -> None:
    assert cloudinit.settings({"ci_user_add": None, "ci_jname": ""}) == {}


def test_documents() -> None:
    ci = cloudinit.settings({"ci_user_add": "admin", "ci_user_pubkey": KEY, "ci_jname": "web1",
                             "ci_fqdn": "web1.example.org", "ci_ip4_addr": "10.0.0.5/24",
                             "ci_gw4": "10.0.0.1", "ci_nameserver_address": "10.0.0.1, 9.9.9.9",
                             "ci_nameserver_search": "example.org"})
    docs = cloudinit.documents("vm1", ci)
    assert sorted(docs) == ["meta-data", "network-config", "user-data"]
    meta = json.loads(docs["meta-data"])
    assert meta["local-hostname"] == "web1" and meta["instance-id"].startswith("cbsd-vm1-")
    assert docs["user-data"].startswith("#cloud-config\n")
    user_data = json.loads(docs["user-data"].split("\n", 1)[1])
    assert user_data["fqdn"] == "web1.example.org" and user_data["hostname"] == "web1"
    admin = user_data["users"][1]
    assert admin["name"] == "admin" and admin["ssh_authorized_keys"] == [KEY]
    assert admin["lock_passwd"] is True and user_data["ssh_pwauth"] is False
    eth = json.loads(docs["network-config"])["ethernets"]["eth0"]
    assert eth["addresses"] == ["10.0.0.5/24"]
    assert eth["routes"] == [{"to": "0.0.0.0/0", "via": "10.0.0.1"}]
    assert eth["nameservers"] == {"addresses": ["10.0.0.1", "9.9.9.9"],
                                  "search": ["example.org"]}
    dhcp = cloudinit.documents("vm1", cloudinit.settings({"ci_ip4_addr": "dhcp"}))
    assert json.loads(dhcp["network-config"])["ethernets"]["eth0"]["dhcp4"] is True
    assert "network-config" not in cloudinit.documents("vm1", cloudinit.settings(
        {"ci_jname": "x"}))


def test_each_vm_gets_its_own_instance_id() -> None:
    a, b = (cloudinit.settings({"ci_jname": "x"}) for _ in range(2))
    assert a["instance_id"] != b["instance_id"]


def test_the_seed_is_a_cidata_iso_with_the_documents(tmp_path: Path) -> None:
    import pycdlib

    docs = cloudinit.documents("vm1", cloudinit.settings({"ci_user_add": "u",
                                                          "ci_user_pubkey": KEY}))
    seed = tmp_path / "seed.iso"
    cloudinit.write_seed(seed, docs)
    assert seed.stat().st_mode & 0o077 == 0
    iso = pycdlib.PyCdlib()
    iso.open(str(seed))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        for name, text in docs.items():
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            assert out.getvalue().decode() == text
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, joliet_path=f"/{name}")
            assert out.getvalue().decode() == text
    finally:
        iso.close()
