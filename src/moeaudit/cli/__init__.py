"""The ``moeaudit`` command. Sub-commands live one per module; heavy imports happen inside them."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import typer

from moeaudit import __version__
from moeaudit.errors import MoeAuditError, RunInterrupted

def _flags_without_a_type() -> None:
    """typer's rich help prints a type (``<bool>``) beside every on/off flag, as if it took a value
    (typer 0.29, the version in constraints.txt); a flag takes none, so its type column stays empty."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_moeaudit_flags", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) and not getattr(self, "count", False) and self.metavar is None:
            return None
        return shown(self, ctx)

    display_type_rich._moeaudit_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_without_a_type()

app = typer.Typer(
    name="moeaudit",
    help="Audit which experts in a Mixture-of-Experts language model actually matter.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moeaudit {__version__}")
        raise typer.Exit()


#: Structured fields a library log record may carry (``extra=``), e.g. a finished stage's counters.
LOG_FIELDS = ("stage", "run", "counters")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log record: time, level, logger, message, the record's structured fields
    (:data:`LOG_FIELDS`) and the exception text."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        entry.update({name: getattr(record, name) for name in LOG_FIELDS if hasattr(record, name)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextLogFormatter(logging.Formatter):
    """``LEVEL logger: message``, followed by a record's counters as compact JSON when it has them."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        counters = getattr(record, "counters", None)
        return f"{text}: {json.dumps(counters, default=str)}" if counters is not None else text


class CurrentStderrHandler(logging.StreamHandler):
    """A stream handler that writes to ``sys.stderr`` as it is at each record, not as it was when the handler was
    made: while a rich progress bar is live, rich redirects ``sys.stderr`` so that a warning prints above the
    bar instead of breaking it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(log_json: bool, verbose: bool) -> None:
    """Library code logs through `logging`; the CLI decides how those records reach the terminal."""
    handler = CurrentStderrHandler()
    handler.setFormatter(JsonLogFormatter() if log_json else TextLogFormatter())
    root = logging.getLogger("moeaudit")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if (log_json or verbose) else logging.WARNING)
    root.propagate = False


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    log_json: bool = typer.Option(False, "--log-json", help="Log records as JSON lines on stderr (INFO and up)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show INFO log records (stage counters, timings)."),
) -> None:
    """Audit which experts in a Mixture-of-Experts language model actually matter."""
    configure_logging(log_json, verbose)


from moeaudit.cli import inspect as _inspect  # noqa: E402  (sub-commands register themselves)
from moeaudit.cli import calibration as _calibration  # noqa: E402
from moeaudit.cli import demo as _demo  # noqa: E402
from moeaudit.cli import evaluate as _evaluate  # noqa: E402
from moeaudit.cli import interactions as _interactions  # noqa: E402
from moeaudit.cli import report as _report  # noqa: E402
from moeaudit.cli import stages as _stages  # noqa: E402

_inspect.register(app)
_stages.register(app)
_calibration.register(app)
_interactions.register(app)
_demo.register(app)
_report.register(app)
_evaluate.register(app)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    # The CLI owns what the terminal shows; transformers' own bars and notices would interleave with it.
    # Environment switches, read when transformers is first imported, keep `--help` free of that import.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # SIGTERM (a scheduler's stop, `kill`) takes the same path as Ctrl-C: the unit in flight is dropped,
    # finished units stay, and the user is told how to resume.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        app()
    except RunInterrupted as err:
        typer.echo(str(err), err=True)
        sys.exit(err.exit_code)
    except MoeAuditError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
