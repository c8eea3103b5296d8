"""`--help` shows a value placeholder only for options that take a value."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("command", [(), ("prune",), ("observe",), ("demo",)])
def test_flags_show_no_type(cli, command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = cli(*command, "--help")
    assert code == 0 and "--help" in out
    assert "<bool>" not in out  # --quiet, --help, --log-json ... take no value
    if command == ("prune",):
        assert "<float>" in out  # --ratio still shows what it takes
