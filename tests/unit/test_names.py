from __future__ import annotations

import pytest

from cbsd.errors import UsageError
from cbsd.names import check_mask, check_name, match_mask, parse_size


@pytest.mark.parametrize("name", ["a", "vm1", "web-01", "A_b-c", "9lives", "x" * 64])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "_x", "-x", "a.b", "a/b", "..", "/etc", "a b", "é",
                                  "x" * 65, "vm*", "a\nb"])
def test_bad_names(name: str) -> None:
    with pytest.raises(UsageError):
        check_name(name)


@pytest.mark.parametrize(("mask", "expected"), [
    ("*", ["vm1", "vm2", "vm10", "web1", "Vm3"]),
    ("vm?", ["vm1", "vm2"]),
    ("vm*", ["vm1", "vm2", "vm10"]),
    ("*1", ["vm1", "web1"]),
    ("?m*", ["vm1", "vm2", "vm10", "Vm3"]),
    ("VM*", []),  # case-sensitive
    ("vm1", ["vm1"]),
])
def test_masks_are_shell_globs_with_star_and_question_mark(mask: str, expected: list[str]) -> None:
    assert match_mask(mask, ["vm1", "vm2", "vm10", "web1", "Vm3"]) == expected


@pytest.mark.parametrize("mask", ["[ab]*", "a/b", "../*", "*.ckp"])
def test_masks_reject_other_syntax(mask: str) -> None:
    with pytest.raises(UsageError):
        check_mask(mask)


@pytest.mark.parametrize(("text", "size"), [
    ("512m", 512 << 20), ("1g", 1 << 30), ("1G", 1 << 30), ("4096", 4096), ("2t", 2 << 40),
    ("64k", 64 << 10), ("10gb", 10 << 30),
])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text, "x") == size


@pytest.mark.parametrize("text", ["", "m", "1.5g", "-1g", "1p", "0", "1 g g"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text, "x")
