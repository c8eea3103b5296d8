"""Pieces shared by the stage commands: config from flags/file/manifest, progress bars, summaries."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

import typer


# Settings of the run that several stage commands accept, declared once.
MODEL_OPTION = typer.Option(None, "--model", help="Built-in name, checkpoint directory or hub id.")
CORPUS_OPTION = typer.Option(None, "--corpus", help="builtin, a .txt/.jsonl/.parquet file, or a hub dataset.")
TEXT_FIELD_OPTION = typer.Option(None, "--text-field", help="The .jsonl field / .parquet or hub column holding "
                                 "the text (default text).")
MAX_LEN_OPTION = typer.Option(None, "--max-len", help="Window length in tokens.")
MAX_WINDOWS_OPTION = typer.Option(None, "--max-windows", help="Cap on windows per observed split.")
DTYPE_OPTION = typer.Option(None, "--dtype", help="float32 (default), bfloat16, float16 or auto (the checkpoint's "
                            "own); bf16, fp16 also read.")
DEVICE_OPTION = typer.Option(None, "--device", help="cpu, cuda, ...")
OVERWRITE_OPTION = typer.Option(False, "--overwrite", help="Start afresh (else a re-run resumes).")
QUIET_OPTION = typer.Option(False, "--quiet", help="No progress bars.")

# Execution settings shared by the stage commands (they never change a run's results, so a run may be
# resumed with other values).
EXECUTOR_OPTION = typer.Option(None, "--executor", help="local (default) or ray: run the work units as Ray tasks.")
ADDRESS_OPTION = typer.Option(None, "--address", help="With --executor ray: a running cluster, e.g. auto.")
WORKERS_OPTION = typer.Option(None, "--workers", help="With --executor ray: model replicas (default: one per GPU/CPU).")
UNIT_WINDOWS_OPTION = typer.Option(None, "--unit-windows", help="Windows per resumable work unit (default 16).")


# Any setting by its configuration name, for the settings without a flag of their own.
SET_OPTION = typer.Option(None, "--set", help="NAME=VALUE: any setting by its name in the configuration (TOML) "
                          "file, repeatable, value in TOML syntax; e.g. --set alpha=0.01 --set "
                          "designs='[\"paired\"]'; a bare none unsets a setting that may be unset "
                          "(--set intervene_n=none). Flags named after a setting win.")


def parse_settings(items: list[str] | None) -> dict[str, Any]:
    """``--set NAME=VALUE`` items as settings: each value read as a TOML value (``0.01``, ``true``,
    ``[1, 2]``, ``"text"``), or as the bare text when it is not one (``--set correction=holm``); a bare
    ``none`` or ``null`` unsets a setting that may be unset (``--set intervene_n=none``: every token again;
    :func:`moeaudit.config.unsets`). Names are checked with the whole configuration (an unknown one suggests
    the closest)."""
    import tomllib

    from moeaudit.config import UNSET, unsets
    from moeaudit.errors import invalid

    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name or not text.strip():
            raise invalid("--set", "NAME=VALUE, e.g. --set alpha=0.01", item)
        if text.strip().lower() in ("none", "null") and unsets(name):
            out[name] = UNSET
            continue
        try:
            value = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        out[name] = value
    return out


def with_settings(items: list[str] | None, flags: dict[str, Any]) -> dict[str, Any]:
    """``--set`` items (:func:`parse_settings`) updated by the command's own flags that were given."""
    return {**parse_settings(items), **{name: value for name, value in flags.items() if value is not None}}


def execution_flags(executor, address, workers, unit_windows) -> dict[str, Any]:
    return dict(executor=executor, ray_address=address, workers=workers, unit_windows=unit_windows)


def resumable(run_dir_param: str) -> Callable:
    """Decorate a stage command: Ctrl-C or SIGTERM outside a work unit (loading the model, say) also ends
    with exit code 130 and says how to resume, as an interrupted unit does."""

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from moeaudit.errors import RunInterrupted

            try:
                return command(*args, **kwargs)
            except KeyboardInterrupt:
                raise RunInterrupted(f"interrupted; finished work units are kept in {kwargs[run_dir_param]}; "
                                     "re-run the same command to resume") from None

        return wrapper

    return decorate


def parse_int_list(text: str | None, name: str) -> list[int] | None:
    """``"0,4,7"`` -> ``[0, 4, 7]``; anything else is the house one-line error naming ``name``."""
    return _parse_list(text, name, int, "integers such as 0,4,7")


def parse_float_list(text: str | None, name: str) -> list[float] | None:
    """``"0.125,0.25"`` -> ``[0.125, 0.25]``; anything else is the house one-line error naming ``name``."""
    return _parse_list(text, name, float, "numbers such as 0.125,0.25,0.5")


def _parse_list(text: str | None, name: str, cast, what: str) -> list | None:
    if text is None:
        return None
    from moeaudit.errors import invalid

    try:
        values = [cast(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise invalid(name, f"a comma-separated list of {what}", text)
    return values


def resolve_config(run_dir: Path, overrides: dict[str, Any], config_file: Path | None, *, overwrite: bool = False,
                   base: Any = None):
    """Settings: defaults < stored manifest (existing run) < config file < flags given on the command line.

    With ``overwrite`` a damaged manifest is skipped (the run is about to be replaced); without, it is the
    one-line error that names ``--overwrite``. ``base`` (an AuditConfig, e.g. a preset's or another run's)
    stands in for the stored manifest. A run made from a preset records where the file or the flags depart
    from it (:meth:`~moeaudit.config.AuditConfig.departing_from`).
    """
    from moeaudit.config import AuditConfig, build_config, merge_values, read_toml, unset_to_none
    from moeaudit.errors import RunDirectoryError
    from moeaudit.rundir import MANIFEST

    manifest = run_dir / MANIFEST
    if base is None and manifest.exists():
        try:
            base = AuditConfig.from_manifest(manifest)
        except RunDirectoryError:
            if not overwrite:
                raise
    from_file = read_toml(config_file) if config_file is not None else {}
    given = unset_to_none({k: v for k, v in overrides.items() if v is not None})  # --set NAME=none: None
    layers = ([base.model_dump()] if base is not None else []) + [from_file, given]
    config = build_config(merge_values(*layers))
    if base is not None:
        config = config.departing_from(base)
    config = checked_config(config, merge_values(from_file, given))
    if base is None and "model" not in given and "model" not in from_file:  # never a silent default model
        from moeaudit.errors import InvalidParameterError

        raise InvalidParameterError("`--model` is required for a new run directory: give a checkpoint path, a hub "
                                    "id, or a built-in model (tiny-olmoe, tiny-qwen-moe, tiny-deepseek).")
    return config


def checked_config(config, given: dict[str, Any]):
    """The checks a configuration passes before any model loads or anything is written (one line each).

    ``given`` holds the settings this command set (config file and flags, nested): an execution setting
    the chosen executor ignores is refused when given, and dropped when inherited from a stored run.
    """
    from moeaudit.errors import invalid
    from moeaudit.metrics.registry import check_audit_metrics
    from moeaudit.models.loading import resolve_device

    check_audit_metrics(config.audit.audit_metrics)
    execution = config.execution
    if execution.executor == "local":
        stale = {}
        for field, flag in (("workers", "--workers"), ("ray_address", "--address")):
            value = getattr(execution, field)
            if value is not None and field in given.get("execution", {}):
                raise invalid(flag, "given with --executor ray (the local executor runs one model in this "
                              "process; add --executor ray or drop the setting)", value)
            if value is not None:
                stale[field] = None
        if stale:
            config = config.model_copy(update={"execution": execution.model_copy(update=stale)})
        resolve_device(execution.device)  # a device this machine lacks: one line, before anything is written
    # Ray workers may have devices this driver lacks; they check themselves.
    return config


@contextmanager
def progress_bar(description: str, quiet: bool = False, unit: str = "windows") -> Iterator[Any]:
    """Yield a callback(done, total) that drives a rich progress bar (a no-op when quiet): done/total, the
    rate in ``unit`` per second, elapsed and remaining time. The stages report every finished window
    (:func:`moeaudit.scale.units.window_done`), so the bar moves within a work unit too."""
    if quiet:
        yield lambda done, total: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:.3g} {unit}/s", style="progress.data.speed")

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=False) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def console():
    """A rich console for the command's output: as wide as the terminal (``COLUMNS`` wins; 80 when the
    output is not a terminal), written to the ``sys.stdout`` of the moment."""
    from rich.console import Console

    return Console()


def print_note(text: str, *, indent: str = "  ", bold: bool = False, fg: str | None = None, err: bool = False,
               out=None) -> None:
    """Print ``text`` wrapped to the console width at spaces, later lines indented by ``indent``.

    A word longer than the width (a long path, say) keeps its own line whole rather than being split.

    Parameters
    ----------
    text : str
        One paragraph.
    indent : str
        Prefix of the second and later lines.
    bold : bool
        Print in bold (on a terminal).
    fg : str, optional
        Colour (on a terminal), e.g. ``"yellow"``.
    err : bool
        Print to stderr instead of stdout.
    out : rich.console.Console, optional
        Print here (its width decides the wrapping) instead of to stdout/stderr.
    """
    import textwrap

    width = (out or console()).width
    lines = textwrap.fill(text, width=width, subsequent_indent=indent, break_long_words=False,
                          break_on_hyphens=False)
    if out is not None:
        out.print(lines, style=" ".join(filter(None, ["bold" if bold else "", fg])) or None, markup=False,
                  highlight=False, soft_wrap=True)
    else:
        typer.secho(lines, bold=bold or None, fg=fg, err=err)


def frame_tables(frame, title: str | None = None, float_format: str | None = "{:.3f}", *, key: int = 1,
                 left: Collection[str] = (), caption: str | None = None, width: int | None = None) -> list:
    """``frame`` as rich tables that together fit ``width`` columns and show every character of every cell.

    A cell or header wraps at its spaces (never inside a word); when the columns do not fit side by side even
    so, they are split over several tables, each repeating the first ``key`` columns (the row labels). Only a
    single word wider than the whole table is folded onto the next line; nothing is cut off.

    Parameters
    ----------
    frame : DataFrame
        Rows to show; the column names are the headers.
    title, caption : str, optional
        Above the first table and below the last.
    float_format : str or None
        Format of float cells; ``None`` formats each column as ``DataFrame.to_string`` does.
    key : int
        Leading columns repeated in every table when the columns are split.
    left : collection of str
        Columns justified left (the others are justified right).
    width : int, optional
        Width to fit; default the console's.

    Returns
    -------
    list of rich.table.Table
    """
    from rich.cells import cell_len
    from rich.markup import escape
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    out = console()
    width = out.width if width is None else width
    headers = [str(column) for column in frame.columns]
    cells = [_column_text(frame.iloc[:, i], float_format) for i in range(len(headers))]

    def table(columns: list[int], widths: dict[int, int] | None = None, **text) -> Table:
        built = Table(**text)
        for i in columns:
            built.add_column(Text(headers[i]), justify="left" if headers[i] in left else "right", overflow="fold",
                             width=(widths or {}).get(i))
        for row in range(len(frame)):
            built.add_row(*[Text(cells[i][row]) for i in columns])
        return built

    def measure(built: Table):
        return Measurement.get(out, out.options.update_width(10**6), built)

    empty = Table()
    frame_width = measure(empty).minimum  # a table's width: frame_width + for each column, its own + per_column
    empty.add_column("")
    per_column = measure(empty).minimum - frame_width
    # as rich measures a cell of text: its longest word, its longest line
    narrowest = [max(cell_len(word) for text in [headers[i], *cells[i]] for word in text.split() or [""])
                 for i in range(len(headers))]
    longest = [max([cell_len(line) for text in cells[i] for line in text.splitlines()] or [0])
               for i in range(len(headers))]
    widest = [max(longest[i], *[cell_len(line) for line in headers[i].splitlines() or [""]])
              for i in range(len(headers))]
    keys = list(range(min(key, len(headers))))
    groups: list[list[int]] = []
    used = 0
    for i in range(len(keys), len(headers)):
        if groups and used + narrowest[i] + per_column <= width:
            groups[-1].append(i)
            used += narrowest[i] + per_column
        else:  # a new table: the key columns and this one (folded only if they alone are too wide)
            groups.append([i])
            used = frame_width + sum(narrowest[j] + per_column for j in keys + [i])
    groups = [keys + group for group in groups] or [keys]
    title, caption = (escape(text) if text else None for text in (title, caption))  # text, not markup
    return [table(columns, _widths(columns, narrowest, [longest, widest],
                                             width - frame_width - per_column * len(columns)),
                  title=title if n == 0 else ("(continued)" if title else None),
                  caption=caption if n == len(groups) - 1 else None) for n, columns in enumerate(groups)]


def _widths(columns: list[int], narrowest: list[int], wanted: list[list[int]], room: int) -> dict[int, int] | None:
    """Column widths that fill ``room`` when the columns' natural widths do not fit (``None`` when they do).

    Each column gets at least its longest word; the rest is shared out towards each target width of
    ``wanted`` in turn (the cells on one line, then the headers too), in proportion to what each column
    still lacks. rich itself would narrow the widest columns first, below their longest word, and cut it.
    """
    if sum(wanted[-1][i] for i in columns) <= room:
        return None
    widths = {i: narrowest[i] for i in columns}
    for target in wanted:
        lacks = {i: max(target[i] - widths[i], 0) for i in columns}
        spare = room - sum(widths.values())
        if spare <= 0 or not sum(lacks.values()):
            continue
        if spare >= sum(lacks.values()):
            widths = {i: widths[i] + lacks[i] for i in columns}
            continue
        shares = {i: spare * lacks[i] // sum(lacks.values()) for i in columns}
        widths = {i: widths[i] + shares[i] for i in columns}
        left_over = room - sum(widths.values())
        for i in sorted(columns, key=lambda i: lacks[i] - shares[i], reverse=True)[:left_over]:
            widths[i] += 1
        break
    return widths


def _column_text(column, float_format: str | None) -> list[str]:
    """The cells of one column as text: floats by ``float_format``, or as ``DataFrame.to_string`` prints them."""
    if float_format is None:
        if not len(column):
            return []
        text = column.to_frame().to_string(index=False, header=False).splitlines()
        return [line.strip() for line in text]
    return [float_format.format(v) if isinstance(v, float) else str(v) for v in column]


def print_frame(frame, title: str | None = None, float_format: str | None = "{:.3f}", *, key: int = 1,
                left: Collection[str] = (), caption: str | None = None, out=None) -> None:
    """Print ``frame`` as rich tables that fit the console width without hiding a character.

    The one table printer of the commands; see :func:`frame_tables` for the parameters and the layout.
    ``out`` (a rich console) prints there instead of to stdout.
    """
    out = out or console()
    for table in frame_tables(frame, title, float_format, key=key, left=left, caption=caption, width=out.width):
        out.print(table)


class StagePrinter:
    """Render :mod:`moeaudit.pipeline` progress events as the stage commands do: a progress bar per stage
    that runs work units (labelled ``prefix + stage``), then ``on_finished[stage](record)`` once the stage
    is done. Use it as a context manager, so a bar left open by a failing stage is closed."""

    def __init__(self, quiet: bool = False, prefix: str = "",
                 on_finished: dict[str, Callable[[Any], None]] | None = None) -> None:
        from contextlib import ExitStack

        self.quiet, self.prefix, self.on_finished = quiet, prefix, on_finished or {}
        self._bar: ExitStack | None = None
        self._update: Callable[[int, int], None] | None = None

    def __enter__(self) -> "StagePrinter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            bar, self._bar, self._update = self._bar, None, None
            bar.close()

    def __call__(self, event: Any) -> None:
        from contextlib import ExitStack

        from moeaudit.pipeline import EXECUTOR_STAGES, StageFailed, StageFinished, StageProgress, StageStarted

        if isinstance(event, StageStarted) and event.stage in EXECUTOR_STAGES:
            self._close()
            self._bar = ExitStack()
            self._update = self._bar.enter_context(progress_bar(f"{self.prefix}{event.stage}", self.quiet))
        elif isinstance(event, StageProgress) and self._update is not None:
            self._update(event.done, event.total)
        elif isinstance(event, StageFailed):
            self._close()
        elif isinstance(event, StageFinished):
            self._close()
            if event.stage in self.on_finished:
                self.on_finished[event.stage](event.record)
