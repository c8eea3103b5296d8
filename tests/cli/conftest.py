"""Run the `moeaudit` console entry point in-process and capture what it prints."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

import pytest

from moeaudit.cli import main


@contextmanager
def restored_logging():
    """The CLI configures the `moeaudit` logger for the terminal; in-process tests must undo that."""
    logger = logging.getLogger("moeaudit")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.fixture
def cli(monkeypatch, capsys):
    """``cli(*args) -> (exit_code, stdout, stderr)`` through ``moeaudit.cli.main`` (errors become exit 2)."""

    def run(*args):
        capsys.readouterr()  # drop what test set-up printed (save_pretrained progress bars)
        monkeypatch.setattr(sys, "argv", ["moeaudit", *args])
        code = 0
        with restored_logging():
            try:
                main()
            except SystemExit as exit_:
                code = exit_.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
