"""The web UI in a real browser (the browser tier): Debian's chromium driven by Playwright
against a real `cbsd serve` (TLS on 127.0.0.1) and a real boot-sector counter VM.

One service, one browser and one VM for the module (the steps build on each other: log in, see
the list, start, watch the console, checkpoint, restore); the refusals (bad token, a POST without
the CSRF token, a foreign Origin's WebSocket) use the same service. Every wait is Playwright's
(a condition with a deadline), never a fixed sleep.

CBSD_WEBUI_SCREENSHOTS=DIR saves the main pages as PNG into DIR (docs/web-ui/ is made so).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright import sync_api
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect, unix_connect

from tests.guests import build
from tests.harness import COUNTER_RE, Cbsd, counter_lines, kill_vms
from tests.service import Service

pytestmark = [pytest.mark.vm, pytest.mark.browser]


CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MARKER = "[cbsd: connected to vm1's console]"  # the page's line at each (re)connect
# The console's whole buffer (scrollback included) as text: what the page holds, not only the
# rows on screen.
TEXT_JS = """(() => { const b = document.querySelector('#terminal').terminal.buffer.active;
  const lines = []; for (let i = 0; i < b.length; i++)
    lines.push(b.getLine(i).translateToString(true));
  return lines.join('\\n'); })()"""
WAIT = 60_000  # ms: Playwright's deadline for a condition in the page (a loaded host)
SHOTS = os.environ.get("CBSD_WEBUI_SCREENSHOTS")
sync_api.expect.set_options(timeout=WAIT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UI:
    def __init__(self, cbsd: Cbsd, svc: Service, base: str, token: str, page: Any,
                 pool: Path) -> None:
        self.cbsd, self.svc, self.base, self.token, self.page = cbsd, svc, base, token, page
        self.pool = pool

    def shot(self, name: str) -> None:
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)

    def console_text(self) -> str:
        """What the page's console holds (its scrollback too) since it last (re)connected to
        a QEMU: the recent output the service replays, then the live output."""
        return str(self.page.evaluate(f"() => {TEXT_JS}").rpartition(MARKER)[2])

    def connections(self) -> int:
        return int(self.page.get_attribute("#console-state", "data-connections") or 0)

    def counts(self) -> list[int]:
        return [int(n) for n, _, _ in re.findall(COUNTER_RE, self.console_text())]

    def wait_counts(self, test: str, arg: Any) -> list[int]:
        """Wait until the counts the console shows since its last connect pass the JavaScript
        *test* (of `ns`, the counts in order, and `arg`); those counts."""
        self.page.wait_for_function(
            f"""([arg, marker]) => {{
                 const ns = [...{TEXT_JS}.split(marker).pop()
                   .matchAll(/n=(\\d+) disk=\\d+ OK/g)].map(m => Number(m[1]));
                 return {test}; }}""",
            arg=[arg, MARKER], timeout=WAIT)
        return self.counts()

    def wait_count(self, above: int) -> int:
        """Wait until the page's console shows a counter line above *above*; the last count."""
        return self.wait_counts("ns.some(n => n > arg)", above)[-1]


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    base = tmp_path_factory.mktemp("webui")
    wd = base / "wd"
    pool = base / "pool"
    pool.mkdir()
    build.counter_image(pool / "counter.raw")
    cbsd = Cbsd(wd)
    cbsd("bcreate", "jname=vm1", f"image={pool / 'counter.raw'}", "vm_os_type=other",
         "vm_ram=32m", "vnc=1").ok()
    token = cbsd("token", "mode=add", "name=browser").ok().out.strip().split()[-1]
    port = free_port()
    svc = Service(wd, f"listen=127.0.0.1:{port}", f"pools={pool}").start()
    profile = tempfile.mkdtemp(prefix="cbsd-chromium-")
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                ignore_https_errors=True, viewport={"width": 1280, "height": 900})
            page = browser.new_page()
            page.set_default_timeout(WAIT)
            yield UI(cbsd, svc, f"https://127.0.0.1:{port}", token, page, pool)
            browser.close()
    finally:
        svc.stop()
        kill_vms(wd)
        shutil.rmtree(profile, ignore_errors=True)


def test_bad_token_is_refused(ui: UI) -> None:
    ui.page.goto(ui.base + "/")
    ui.page.fill("#token", "not-a-token")
    ui.page.click("#login button[type=submit]")
    sync_api.expect(ui.page.locator("#login-error")).to_contain_text("unknown token")
    sync_api.expect(ui.page.locator("#vms")).to_have_count(0)


def test_log_in_and_see_the_list(ui: UI) -> None:
    ui.page.goto(ui.base + "/")
    ui.shot("login")
    ui.page.fill("#token", ui.token)
    ui.page.click("#login button[type=submit]")
    row = ui.page.locator('#vms tr[data-vm="vm1"]')
    sync_api.expect(row.locator(".status")).to_have_text("Off")
    sync_api.expect(ui.page.locator("#new-image option")).to_contain_text("counter.raw")


def test_create_a_vm_from_the_pool(ui: UI) -> None:
    ui.page.fill("#new-name", "vm2")
    ui.page.select_option("#new-image", str(ui.pool / "counter.raw"))
    ui.page.uncheck("#new-start")
    ui.page.click("#create button[type=submit]")
    sync_api.expect(ui.page.locator("#create-result .op-text")).to_have_text(
        "create vm2: Success")
    sync_api.expect(ui.page.locator('#vms tr[data-vm="vm2"] .status')).to_have_text("Off")
    assert ui.cbsd.status("vm2") == "Off"


def test_start_shows_live_status_and_the_console(ui: UI) -> None:
    row = ui.page.locator('#vms tr[data-vm="vm1"]')
    row.locator("button.action-start").click()
    sync_api.expect(ui.page.locator("#operations .op-text")).to_contain_text("Success")
    # the status comes from the event stream: nothing reloads the page
    sync_api.expect(row.locator(".status")).to_have_text("On")
    ui.shot("vms")
    row.locator("a").click()
    sync_api.expect(ui.page.locator("#console-state")).to_have_text("connected")
    first = ui.wait_count(-1)
    assert ui.wait_count(first + 2) > first  # it keeps counting, in the page


def test_checkpoint_and_restore_from_the_tree(ui: UI) -> None:
    page = ui.page
    before = ui.wait_count(-1)
    page.fill("#cp-name", "c1")
    page.click("#cp-create button[type=submit]")
    sync_api.expect(page.locator(".operation .op-text")).to_have_text("checkpoint vm1 c1: Success")
    # its progress bar was fed by the operation's progress reports (the event stream)
    sync_api.expect(page.locator(".operation")).to_have_attribute("data-progressed", "true")
    # The upper bound from the console's log, which QEMU writes as the guest prints (the page
    # may show the last lines a moment later): no count after it was taken before the save.
    after = counter_lines(ui.cbsd.console("vm1").text())[-1][0]
    node = page.locator('#checkpoints li[data-checkpoint="c1"]')
    sync_api.expect(node).to_have_count(1)
    later = ui.wait_count(after + 15)  # the guest goes on well past the checkpoint
    connections = ui.connections()
    node.locator("button.cp-restore").first.click()  # a running VM: stopped, then restored
    sync_api.expect(page.locator(".operation .op-text")).to_have_text("restore vm1 c1: Success")
    # The console reconnects to the restored QEMU (and shows what it printed meanwhile).
    page.wait_for_function(f"() => Number(document.querySelector('#console-state')"
                           f".dataset.connections) > {connections}", timeout=WAIT)
    # The counts go back: the restored guest's first line follows the checkpoint's count
    # (between the counts before and after the create, as vmchecks.restored_from judges a
    # CLI restore), and it counts on from there.
    shown = ui.wait_counts("ns.some((n, i) => i > 0 && n < ns[i - 1] && n + 5 < ns.at(-1))",
                           None)
    back = next(i for i in range(1, len(shown)) if shown[i] < shown[i - 1])
    assert shown[back - 1] >= later and before <= shown[back] <= after + 1, (
        shown, before, after, later)
    text = ui.console_text()
    assert "BOOT" not in text[text.rindex(f"n={shown[back]} "):], "a restore must not reboot"
    # one by one (a line printed while the console attached may show twice: replay + live)
    assert sorted(set(shown[back:])) == list(range(shown[back], shown[-1] + 1)), shown
    assert shown[back:] == sorted(shown[back:]), shown


def test_tree_verify_and_destroy(ui: UI) -> None:
    """A checkpoint taken after the restore is drawn under c1 (its parent); verify and
    destroy act from the tree."""
    page = ui.page
    page.fill("#cp-name", "c2")
    page.click("#cp-create button[type=submit]")
    sync_api.expect(page.locator(".operation .op-text")).to_have_text("checkpoint vm1 c2: Success")
    child = page.locator('#checkpoints li[data-checkpoint="c1"] li[data-checkpoint="c2"]')
    sync_api.expect(child).to_have_count(1)
    sync_api.expect(child.locator(".node")).to_have_class(re.compile(r"\bcurrent\b"))
    ui.shot("vm")
    child.locator("button.cp-verify").click()
    sync_api.expect(page.locator(".operation .op-text")).to_have_text(
        "verify checkpoint vm1 c2: Success")
    page.once("dialog", lambda dialog: dialog.accept())
    child.locator("button.cp-destroy").click()
    sync_api.expect(page.locator(".operation .op-text")).to_have_text(
        "destroy checkpoint vm1 c2: Success")
    sync_api.expect(page.locator('#checkpoints li[data-checkpoint="c2"]')).to_have_count(0)
    assert [c["name"] for c in ui.cbsd.checkpoints("vm1")] == ["c1"]


def test_post_without_csrf_token_is_refused(ui: UI) -> None:
    """The page's session cookie alone (as a form another site posts would carry it) changes
    nothing: 403, and the VM keeps running."""
    operations = len(ui.svc.client.get("/1.0/operations").json())
    answer = ui.page.evaluate(
        """async () => { const r = await fetch('/1.0/instances/vm1/state', {method: 'PUT',
             headers: {'Content-Type': 'application/json'}, credentials: 'same-origin',
             body: JSON.stringify({action: 'stop', noacpi: true})});
           return [r.status, await r.text()]; }""")
    assert answer[0] == 403 and "CSRF" in answer[1], answer
    assert len(ui.svc.client.get("/1.0/operations").json()) == operations  # none started
    # (Maintenance while a background fold of the last checkpoint holds it; never Off)
    assert ui.cbsd.status("vm1") in ("On", "Maintenance")


def test_websocket_from_a_foreign_origin_is_refused(ui: UI) -> None:
    cookies = {c["name"]: c["value"] for c in ui.page.context.cookies()}
    host = ui.base.removeprefix("https://")
    headers = {"Origin": "https://evil.example", "Connection": "Upgrade", "Upgrade": "websocket",
               "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
               "Host": host}
    with httpx.Client(verify=False, cookies=cookies) as c:  # the service's self-signed cert
        foreign = c.get(ui.base + "/1.0/instances/vm1/console", headers=headers)
        assert foreign.status_code == 403, foreign.text
    # the page's own origin gets the console (the same cookie, the same request otherwise)
    ok = ui.page.evaluate(
        """() => new Promise((resolve) => {
             const ws = new WebSocket(`wss://${location.host}/1.0/instances/vm1/console`);
             ws.onopen = () => { ws.close(); resolve(true); };
             ws.onerror = () => resolve(false); })""")
    assert ok


def test_console_for_api_clients(ui: UI) -> None:
    """The same WebSocket serves non-browser clients: over the Unix socket (trusted), and over
    TCP with a token but no session; without either it is refused. (The page holds the live
    console meanwhile: these see its recent output, which the endpoint sends first.)"""
    def counter_line(ws: Any) -> None:
        text = b""
        while not re.search(COUNTER_RE.encode(), text):
            text += ws.recv(timeout=WAIT / 1000)

    with unix_connect(str(ui.svc.socket), "ws://cbsd/1.0/instances/vm1/console") as ws:
        counter_line(ws)
    url = ui.base.replace("https://", "wss://") + "/1.0/instances/vm1/console"
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE  # self-signed
    with connect(url, ssl=insecure,
                 additional_headers={"Authorization": f"Bearer {ui.token}"}) as ws:
        counter_line(ws)
    with pytest.raises(InvalidStatus, match="403"):
        connect(url, ssl=insecure)


def test_vnc_display_in_the_page(ui: UI) -> None:
    ui.page.click("#vnc-open")
    sync_api.expect(ui.page.locator("#vnc-state")).to_have_text("connected")
    sync_api.expect(ui.page.locator("#vnc-screen canvas")).to_have_count(1)
    ui.shot("vm-vnc")


def test_pause_resume_hibernate_start(ui: UI) -> None:
    """The VM page's buttons, each an operation; the status follows from the event stream and
    the guest's counter goes on after each (no reboot)."""
    page = ui.page
    status = page.locator("#vm-status")
    sync_api.expect(status).to_have_text("On")
    log = ui.cbsd.console("vm1")
    for action, then in (("pause", "Paused"), ("resume", "On"), ("hibernate", "Suspended"),
                         ("start", "On")):
        if action == "hibernate":
            saved = counter_lines(log.text())[-1][0]  # the hibernated count is at least this
        mark = log.mark()
        page.click(f"#vm-actions button.action-{action}")
        sync_api.expect(page.locator("#operations .op-text")).to_have_text(
            f"{action} vm1: Success")
        sync_api.expect(status).to_have_text(then)
        assert ui.cbsd.status("vm1") == then
    # resumed from the hibernation, not booted: its first line goes on from the saved count,
    # and the page shows it counting on
    first = counter_lines(log.wait(COUNTER_RE, since=mark)[0].group(0))[0][0]
    assert first >= saved and "BOOT" not in log.since(mark), (first, saved)
    assert ui.wait_count(first + 3) > first


def test_log_out_ends_the_session(ui: UI) -> None:
    cookies = {c["name"]: c["value"] for c in ui.page.context.cookies()}
    ui.page.click("#logout")
    sync_api.expect(ui.page.locator("#token")).to_be_visible()
    # the old cookie is worth nothing now, to the page or to anyone who kept it
    with httpx.Client(verify=False, cookies=cookies) as c:  # the service's self-signed cert
        assert c.get(ui.base + "/1.0/instances").status_code == 401
    ui.page.reload()
    sync_api.expect(ui.page.locator("#token")).to_be_visible()
