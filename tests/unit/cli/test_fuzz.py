"""Property: any argument list either parses or fails with exit 2 and one line; never a
traceback. Runs main() in-process against an empty workdir."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbsd.cli.args import parse
from cbsd.cli.main import main
from cbsd.cli.table import COMMANDS
from cbsd.errors import UsageError
from cbsd.names import check_name, parse_size

KEYS = [*sorted({k.name for c in COMMANDS.values() for k in c.keys}), "foo", "JNAME", ""]
word = st.one_of(
    st.text(max_size=20),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS),
              st.one_of(st.text(max_size=12), st.sampled_from(
                  ["1", "0", "512m", "*", "vm?", "../x", "a,b", "tcp:1:2", "list", "create"]))),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(COMMANDS)), st.lists(word, max_size=6))
def test_parse_never_crashes(command: str, argv: list[str]) -> None:
    try:
        parse(COMMANDS[command], argv)
    except UsageError as e:
        assert e.exit_code == 2
        assert "\n" not in e.message and e.message


@settings(max_examples=300)
@given(st.text(max_size=80))
def test_names_and_sizes_never_crash(text: str) -> None:
    for fn in (check_name, lambda t: parse_size(t, "x")):
        try:
            fn(text)
        except UsageError as e:
            assert "\n" not in e.message


@pytest.fixture(scope="module")
def empty_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wd")


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["bstart", "bstop", "bls", "bremove", "bcheckpoint", "bpause",
                        "bsuspend", "nosuch"]), st.lists(word, max_size=5))
def test_main_fails_cleanly(empty_workdir: Path, command: str, argv: list[str]) -> None:
    """No VM exists, so every call is an error or an empty listing: exit 0 or 2, one line."""
    out, err = io.StringIO(), io.StringIO()
    # Scoped to this call: the umask and signal handlers main() sets are restored by the
    # autouse fixture in tests/unit/conftest.py.
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(out), redirect_stderr(err):
        mp.setenv("CBSD_WORKDIR", str(empty_workdir))
        code = main([command, *argv])
    assert code in (0, 2), (command, argv, code, err.getvalue())
    if code == 2:
        assert err.getvalue().count("\n") == 1, err.getvalue()
