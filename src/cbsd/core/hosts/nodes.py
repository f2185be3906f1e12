"""node: the other hosts this one knows (add, remove, list), and commands run there.

How a node is reached (OpenSSH, its checks kept) is src/cbsd/ssh.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Any

from cbsd import node_answers
from cbsd.core.vm.context import Context
from cbsd.core.vm.moving import interrupted_to, node_named
from cbsd.errors import NodeError, StateError, UsageError
from cbsd.names import check_name
from cbsd.ssh import SSH_FAILED, Node, check_host


def add(ctx: Context, name: str, host: str, port: int) -> str:
    """Register a node once cbsd answers there over SSH (keys and host key checked)."""
    check_name(name, "node name")
    node = Node(name, check_host(host), port)
    if any(n == name for n, _, _ in ctx.inventory.nodes()):
        raise UsageError(f"node already exists: {name} (node mode=remove first)")
    version = node.checked("cbsd --version", lambda out: node_answers.text(
        node_answers.last_line(out), "the version", 200), node.call(["--version"], timeout=60))
    ctx.inventory.add_node(name, node.host, port)
    return f"node {name}: added ({node.host}, {version})"


def remove(ctx: Context, name: str) -> str:
    """Forget a node, once no interrupted bmove or bmigrate to it is left to settle: each is
    settled first (the node asked, as the VM's next command would); one that cannot be
    settled keeps the node (StateError, saying how out)."""
    node_named(ctx, name)
    for jname in interrupted_to(ctx, name):
        # recovery settles it as the VM's next command would ("it was moved there" too)
        with contextlib.suppress(StateError), ctx.locked_vm(jname, "node remove"):
            pass
    left = interrupted_to(ctx, name)
    if left:
        raise StateError(
            f"node {name}: not removed: the interrupted move of {', '.join(left)} to it is "
            f"settled only by asking it (retry once it answers; if {name} is gone for good, "
            f"delete {ctx.workdir.moving(left[0])} to keep {left[0]} here)")
    ctx.inventory.remove_node(name)
    return f"node {name}: removed"


def listing(ctx: Context) -> list[dict[str, Any]]:
    return [{"name": n, "host": h, "port": p} for n, h, p in ctx.inventory.nodes()]


def deadline() -> float:
    """Seconds a node may take to answer a listing (bls node=): CBSD_NODE_TIMEOUT, default
    15, so that a node that hangs delays a listing of all by that much at most."""
    raw = os.environ.get("CBSD_NODE_TIMEOUT", "15")
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise UsageError(f"CBSD_NODE_TIMEOUT: bad value '{raw}' (seconds, e.g. 15)")
    return value


def vm_rows(ctx: Context, names: list[str], jnames: list[str]
            ) -> list[tuple[str, list[dict[str, Any]] | NodeError]]:
    """Each node's VMs (its `bls format=json`, validated: cbsd/node_answers.py) or why
    not, asked in parallel (up to 16 at a time), each within deadline()."""
    # lazy: only bls across nodes; node= forwarding and 'node' skip it
    from concurrent.futures import ThreadPoolExecutor

    chosen = [node_named(ctx, n) for n in names]
    limit = deadline()
    args = ["bls", *(f"jname={j}" for j in jnames)]

    def one(node: Node) -> list[dict[str, Any]] | NodeError:
        try:
            return node.checked("bls", node_answers.bls_rows,
                                node.call_json(args, timeout=limit))
        except NodeError as e:
            return e

    if not chosen:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(chosen))) as pool:
        return list(zip(names, pool.map(one, chosen), strict=True))


def forward(ctx: Context, name: str, args: list[str]) -> int:
    """Run a whole command on a node, its terminal streams passed through; its exit code."""
    node = node_named(ctx, name)
    tty = sys.stdin.isatty() and args[:1] == ["blogin"]
    try:
        code = subprocess.run(node.argv(args, tty=tty), check=False).returncode
    except FileNotFoundError:
        raise NodeError("ssh is not installed (apt install openssh-client)") from None
    if code == SSH_FAILED:
        raise NodeError(f"node {name}: cannot reach {node.host} (ssh failed: see above)")
    return code
