"""`cbsd serve` and `cbsd token`: the service's two commands. The service's web stack
(FastAPI, uvicorn, pydantic) is imported only by `cbsd serve`, inside it."""

from __future__ import annotations

import sys
from typing import Any

from cbsd.cli import output
from cbsd.cli.args import parse
from cbsd.core.vm.context import Context
from cbsd.errors import UsageError

Args = dict[str, Any]


def api_keys(command: str, body: dict[str, Any]) -> Args:
    """An API body's keys, checked and converted by *command*'s own key table, exactly as the
    CLI checks `key=value` words: one definition of every key, its bounds and its messages.
    JSON's booleans, numbers and lists become the words the table parses."""
    # lazy: only the service calls this, on a request
    from cbsd.cli.table import COMMANDS

    words = []
    for key, value in body.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "1" if value else "0"
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif not isinstance(value, (str, int)):
            raise UsageError(f"{command}: bad value for {key}: {value!r}")
        words.append(f"{key}={value}")
    return parse(COMMANDS[command], words)


def serve(ctx: Context, a: Args) -> int:
    # lazy: the web stack only for `cbsd serve`; every other command starts without it
    from cbsd.service import pools, server

    # lazy: the web stack only for `cbsd serve`
    from cbsd.service.app import Config

    server.run(Config(workdir=ctx.workdir, listen=a["listen"],
                             pools=pools.parse_pools(a["pools"]), keys=api_keys))
    return 0


def token(ctx: Context, a: Args) -> int:
    # lazy: only `cbsd token` (stdlib only: no web stack)
    from cbsd.service import auth

    mode = a["mode"]
    if mode == "list":
        rows = auth.list_tokens(ctx.workdir)
        if a["format"] == "json":
            sys.stdout.write(output.as_json(rows))
        else:
            sys.stdout.write(output.table(rows, ["name", "created"], True))
        return 0
    if not a["name"]:
        raise UsageError(f"token: mode={mode} needs name=")
    if mode == "add":
        print(auth.add_token(ctx.workdir, a["name"]))
    else:
        print(auth.remove_token(ctx.workdir, a["name"]))
    return 0
