"""Run the `moeaudit` console entry point in-process and capture what it prints."""

from __future__ import annotations

import sys

import pytest

from moeaudit.cli import main


@pytest.fixture
def cli(monkeypatch, capsys):
    """``cli(*args) -> (exit_code, stdout, stderr)`` through ``moeaudit.cli.main`` (errors become exit 2)."""

    def run(*args):
        capsys.readouterr()  # drop what test set-up printed (save_pretrained progress bars)
        monkeypatch.setattr(sys, "argv", ["moeaudit", *args])
        code = 0
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
