"""cloud-init NoCloud from CBSD's ci_* keys: validation (pure), the seed's three documents
(pure), and the seed itself -- an ISO 9660 image labelled `cidata` with Joliet and Rock Ridge
names, written with pycdlib (as cloud-localds does with genisoimage).

Passwords never reach the seed, the inventory or a checkpoint in clear: they are hashed at
bcreate (SHA-512 crypt, `openssl passwd -6`, the password on its stdin) and only the hash is
kept. The seed is owner-only: it still holds the hashes and the keys.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from cbsd.core.checkpoint.identity import RENEW_SCRIPT
from cbsd.errors import CbsdError, UsageError
from cbsd.model import CLOUD_INIT_KEYS
from cbsd.names import check_name

_KEY_PREFIXES = ("ssh-", "ecdsa-", "sk-ssh-", "sk-ecdsa-")


def settings(raw: dict[str, str | None]) -> dict[str, str]:
    """The ci_* keys given at bcreate -> what the VM keeps (passwords hashed, the public key
    read from its file). UsageError (exit 2) for anything malformed."""
    ci = {k: v for k, v in raw.items() if k in CLOUD_INIT_KEYS and v not in (None, "")}
    if not ci:
        return {}
    values: dict[str, str] = {k: str(v) for k, v in ci.items()}
    user = values.get("ci_user_add")
    for needs_user in ("ci_user_pubkey", "ci_user_pw_user"):
        if needs_user in values and not user:
            raise UsageError(f"bcreate: {needs_user}= needs ci_user_add=")
    if user is not None:
        check_name(user, "ci_user_add")
    if "ci_user_pubkey" in values:
        values["ci_user_pubkey"] = _public_key(values["ci_user_pubkey"])
    for key in ("ci_user_pw_user", "ci_user_pw_root"):
        if key in values:
            values[key] = hash_password(values[key])
    for key in ("ci_jname", "ci_fqdn"):
        if key in values and not _hostname(values[key]):
            raise UsageError(f"bcreate: bad value for {key}: '{values[key]}' is not a host name")
    addr = values.get("ci_ip4_addr")
    if addr is not None and addr.upper() != "DHCP":
        try:
            iface = ipaddress.IPv4Interface(addr)
        except ValueError:
            raise UsageError(f"bcreate: bad value for ci_ip4_addr: '{addr}' (DHCP or "
                             "ADDRESS/PREFIX, e.g. 10.0.0.5/24)") from None
        if "/" not in addr:
            raise UsageError(f"bcreate: ci_ip4_addr={addr} needs a prefix length "
                             f"(e.g. {addr}/24)")
        values["ci_ip4_addr"] = str(iface)
    elif addr is not None:
        values["ci_ip4_addr"] = "DHCP"
    for key in ("ci_gw4", "ci_nameserver_address"):
        for ip in values[key].split(",") if key in values else ():
            try:
                ipaddress.IPv4Address(ip.strip())
            except ValueError:
                raise UsageError(f"bcreate: bad value for {key}: '{ip}' is not an IPv4 "
                                 "address") from None
    if ("ci_gw4" in values or "ci_nameserver_address" in values) and \
            values.get("ci_ip4_addr", "DHCP") == "DHCP":
        raise UsageError("bcreate: ci_gw4= and ci_nameserver_address= need a static "
                         "ci_ip4_addr=ADDRESS/PREFIX")
    values["instance_id"] = os.urandom(8).hex()  # a new identity: cloud-init runs once per id
    values["identity_id"] = os.urandom(8).hex()  # the machine's: bset keeps it, bclone not
    return values


# A bootcmd (every boot, before sshd starts) that renews machine-id and SSH host keys once on
# the first boot of a clone: the identity_id the guest recorded (/var/lib/cbsd/identity) is
# another machine's. A guest without the record (its first boot, or an original made before
# cbsd wrote one) renews them only if cloud-init ran on this disk before, for another
# instance -- a clone's first boot; never on an original's first boot.
FIRST_BOOT_RENEW = """\
T={token}; F=/var/lib/cbsd/identity
if [ "$(cat $F 2>/dev/null)" != "$T" ]; then
  p=$(cat /var/lib/cloud/data/previous-instance-id 2>/dev/null)
  if [ -e $F ] || {{ [ -n "$p" ] && [ "$p" != NO_PREVIOUS_INSTANCE_ID ] && \
      [ "$p" != "$INSTANCE_ID" ]; }}; then
{renew}  fi
  mkdir -p /var/lib/cbsd && echo "$T" > $F
fi
"""


def _hostname(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return 0 < len(name) <= 253 and all(
        0 < len(lb) <= 63 and lb.replace("-", "").isalnum() and lb.isascii()
        and not lb.startswith("-") for lb in labels)


def names_a_file(pubkey: str) -> bool:
    """Whether a ci_user_pubkey value is a path to read (not the key itself)."""
    return not pubkey.startswith(_KEY_PREFIXES)


def _public_key(value: str) -> str:
    """A path to a public key file, or the key itself."""
    text = value
    if names_a_file(value):
        try:
            text = Path(value).read_text().strip()
        except OSError as e:
            raise UsageError(f"bcreate: ci_user_pubkey: cannot read {value}: "
                             f"{e.strerror or e}") from None
    keys = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not keys or not all(k.startswith(_KEY_PREFIXES) for k in keys):
        raise UsageError("bcreate: ci_user_pubkey is not an OpenSSH public key (a path to "
                         "one, or the key itself: 'ssh-ed25519 AAAA...')")
    return "\n".join(keys)


def hash_password(password: str) -> str:
    """SHA-512 crypt of *password*, by OpenSSL (the password goes through stdin, never argv)."""
    if password.startswith("$6$"):
        return password  # already a hash (a user may pass one)
    try:
        out = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password + "\n",
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CbsdError(f"cannot hash the cloud-init password: openssl passwd failed ({e})"
                        ) from e
    return out.strip()


def documents(jname: str, ci: dict[str, str]) -> dict[str, str]:
    """The NoCloud documents: meta-data, user-data, and network-config when an address is
    configured. JSON is YAML, so no YAML library is needed to write them."""
    hostname = ci.get("ci_jname") or jname
    meta = {"instance-id": f"cbsd-{jname}-{ci.get('instance_id', '0')}",
            "local-hostname": hostname}
    user_data: dict[str, Any] = {"hostname": hostname, "manage_etc_hosts": True,
                                 "ssh_pwauth": False}
    if "ci_fqdn" in ci:
        user_data["fqdn"] = ci["ci_fqdn"]
    users: list[Any] = ["default"]
    if "ci_user_add" in ci:
        user: dict[str, Any] = {"name": ci["ci_user_add"], "shell": "/bin/bash",
                                "sudo": "ALL=(ALL) NOPASSWD:ALL", "groups": ["sudo"],
                                "lock_passwd": "ci_user_pw_user" not in ci}
        if "ci_user_pubkey" in ci:
            user["ssh_authorized_keys"] = ci["ci_user_pubkey"].splitlines()
        if "ci_user_pw_user" in ci:
            user["passwd"] = ci["ci_user_pw_user"]
            user_data["ssh_pwauth"] = True
        users.append(user)
    user_data["users"] = users
    if "identity_id" in ci:
        user_data["bootcmd"] = [FIRST_BOOT_RENEW.format(token=ci["identity_id"],
                                                        renew=RENEW_SCRIPT)]
    if "ci_user_pw_root" in ci:
        user_data["chpasswd"] = {"expire": False, "users": [
            {"name": "root", "password": ci["ci_user_pw_root"]}]}
        user_data["disable_root"] = False
    docs = {"meta-data": json.dumps(meta, indent=1) + "\n",
            "user-data": "#cloud-config\n" + json.dumps(user_data, indent=1) + "\n"}
    if "ci_ip4_addr" in ci:
        eth: dict[str, Any] = {"match": {"name": "e*"}, "set-name": "eth0"}
        if ci["ci_ip4_addr"] == "DHCP":
            eth["dhcp4"] = True
        else:
            eth["addresses"] = [ci["ci_ip4_addr"]]
            if "ci_gw4" in ci:
                eth["routes"] = [{"to": "0.0.0.0/0", "via": ci["ci_gw4"]}]
            ns: dict[str, Any] = {}
            if "ci_nameserver_address" in ci:
                ns["addresses"] = [a.strip() for a in ci["ci_nameserver_address"].split(",")]
            if "ci_nameserver_search" in ci:
                ns["search"] = [d.strip() for d in ci["ci_nameserver_search"].split(",")]
            if ns:
                eth["nameservers"] = ns
        docs["network-config"] = json.dumps({"version": 2, "ethernets": {"eth0": eth}},
                                            indent=1) + "\n"
    return docs


def write_seed(path: Path, docs: dict[str, str]) -> None:
    """An ISO 9660 image labelled cidata holding *docs*, written owner-only and atomically."""
    # lazy: pycdlib is heavy and only a VM with cloud-init keys writes a seed
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for i, (name, text) in enumerate(sorted(docs.items())):
        data = text.encode()
        iso.add_fp(io.BytesIO(data), len(data), f"/DOC{i}.;1", rr_name=name,
                   joliet_path=f"/{name}")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            iso.write_fp(f)
            f.flush()
            os.fsync(f.fileno())
        iso.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
