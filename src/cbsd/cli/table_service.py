"""The service's commands (issue 24): `cbsd serve` and `cbsd token`, declared as every other
command is (cli/table.py merges them into COMMANDS: parsing, --help and the man page)."""

from __future__ import annotations

from cbsd.cli.args import Command, Key

SERVICE_COMMANDS = (
    Command(
        "serve", "Run the service: the REST API (docs/api.md) on the workdir's Unix socket, "
        "and on TCP with TLS when asked.",
        (
            Key("listen", "str", None, help="also listen on TCP at ADDRESS:PORT, always with "
                "TLS (a self-signed certificate is made on first start); clients need a "
                "token or a trusted client certificate"),
            Key("pools", "str", None, help="image pools: folders, comma-separated, whose "
                "files (disk images, ISOs, kernels) API clients may name; no other host "
                "file can be named through the API"),
        ),
        "cbsd serve listen=0.0.0.0:8443 pools=/srv/images,/srv/isos",
        bare="none",
        details=("The socket is <workdir>/cbsd.sock (mode 0660, group cbsd where that group "
                 "exists); its peers are\ntrusted. Stopping or killing the service never "
                 "stops a VM: QEMU is not its child.\nThe systemd unit contrib/systemd/"
                 "cbsd-serve.service runs it (scripts/install-host-integration.sh)."),
    ),
    Command(
        "token", "Add, list or remove the API tokens TCP clients authenticate with.",
        (
            Key("mode", "enum", None, required=True, help="action",
                choices=("add", "list", "remove")),
            Key("name", "name", None, help="the token's name (add, remove)"),
            Key("format", "enum", "text", help="list: output format", choices=("text", "json")),
        ),
        "cbsd token mode=add name=ci",
        bare="none",
        readonly_modes=("list",),
        details=("mode=add prints the new token once; only its hash is kept "
                 "(<workdir>/service/tokens.json,\nowner-only). Clients send it as "
                 "'Authorization: Bearer TOKEN'."),
    ),
)
