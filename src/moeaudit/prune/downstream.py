"""Downstream evaluation of an exported pruned checkpoint with lm-evaluation-harness (``[eval]`` extra).

Held-out NLL (:mod:`moeaudit.prune.evaluate`) says how much a pruned model's language modelling degrades;
benchmark accuracy is what pruning papers report. :func:`evaluate_downstream` runs lm-evaluation-harness
(``lm_eval.simple_evaluate`` on ``lm_eval.models.huggingface.HFLM``) on a checkpoint directory written by
:func:`moeaudit.prune.export_pruned` and returns one tidy row per (task, metric, filter).

Tasks are lm-eval's own (which fetch their data sets from the Hugging Face Hub, or its cache) or
user-defined YAML files in ``include_path``; a task whose YAML points at local files
(``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``) runs with no network at all. The
checkpoint must be a local directory: the model and tokenizer are never fetched. Two network calls that
lm-eval and datasets make even for local files are prevented: lm-eval's Hub lookup of the model's
revision (the checkpoint is passed as an absolute path, which is no valid repo id) and datasets'
download-count ping (switched off while the evaluation runs).

lm_eval, accelerate and datasets are imported only when the function runs, so ``import moeaudit.prune``
and ``moeaudit --help`` stay fast and work without the extra.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd

from moeaudit.errors import CorpusError, InvalidParameterError, ModelLoadError, MoeAuditError, first_line, invalid
from moeaudit.options import DTYPES, Dtype, one_of
from moeaudit.tables import DOWNSTREAM_COLUMNS

logger = logging.getLogger(__name__)


#: Files that make a directory a loadable tokenizer (the same set :mod:`moeaudit.models.loading` checks).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")

_INSTALL_HINT = 'pip install "moeaudit[eval]"'

#: Keys of an lm-eval per-task result that are not metrics.
_NON_METRIC_KEYS = frozenset({"alias", "name", "sample_len", "sample_count", "samples"})


@dataclass(frozen=True)
class DownstreamResult:
    """What :func:`evaluate_downstream` measured.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per (task, metric, filter): ``task``, ``metric`` (e.g. ``acc``, ``acc_norm``), ``filter``
        (lm-eval's answer filter; ``none`` for log-likelihood tasks), ``value``, ``stderr`` (NaN where
        lm-eval gives none) and ``n`` (documents evaluated; <NA> for a group's aggregate row).
    raw : dict
        lm-eval's own result dictionary (``results``, ``configs``, ``n-samples``, ``samples`` with each
        document's per-choice log-likelihoods, versions, environment).
    checkpoint : Path
        The evaluated checkpoint directory (absolute).
    tasks : tuple of str
    seconds : float
        Wall time of the evaluation (model loading included).
    """

    table: pd.DataFrame = field(repr=False)
    raw: dict[str, Any] = field(repr=False)
    checkpoint: Path
    tasks: tuple[str, ...]
    seconds: float

    def to_frame(self) -> pd.DataFrame:
        """A copy of :attr:`table`."""
        return self.table.copy()


def _check_arguments(checkpoint: str | Path, tasks: Sequence[str], include_path: str | Path | None,
                     limit: int | None, batch_size: int, dtype: str,
                     num_fewshot: int | None) -> tuple[Path, list[str], Path | None]:
    """Validate everything that needs neither lm_eval nor the model; return resolved paths and task names."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [str(t).strip() for t in tasks if str(t).strip()]
    if not names:
        raise invalid("tasks", "one or more lm-eval task names such as hellaswag or a task defined under "
                      "include_path", list(tasks))
    if len(set(names)) != len(names):
        raise invalid("tasks", "distinct task names", names)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise invalid("limit", "a positive number of documents per task, or None for all", limit)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise invalid("batch_size", "a positive integer", batch_size)
    if dtype not in DTYPES:
        raise invalid("dtype", one_of(DTYPES), dtype)
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                    or num_fewshot < 0):
        raise invalid("num_fewshot", "a non-negative integer, or None for each task's default", num_fewshot)
    include = None
    if include_path is not None:
        include = Path(include_path).expanduser().resolve()
        if not include.is_dir():
            raise InvalidParameterError(f"`include_path` must be a directory of lm-eval task YAML files; got "
                                        f"{str(include_path)!r}, which is not a directory.")
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"checkpoint directory {str(checkpoint)!r} does not exist; pass a local directory "
                             "written by `moeaudit prune --export` or moeaudit.prune.export_pruned (hub ids are "
                             "not fetched)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json, so it is not a Hugging Face checkpoint; pass the "
                             "directory written by `moeaudit prune --export` or export_pruned")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(f"{path} has no tokenizer files, which lm-eval needs to turn tasks into tokens; "
                             "save the tokenizer into it (tokenizer.save_pretrained(DIR))")
    # An absolute path also keeps lm-eval's model-info lookup (HfApi().model_info(repo_id=pretrained)) from
    # ever reaching the hub: an absolute path is not a valid repo id, so it is rejected before any request.
    return path.resolve(), names, include


def _import_lm_eval() -> tuple[Any, Any, Any]:
    """``(simple_evaluate, HFLM, TaskManager)``, or one line naming the extra to install."""
    try:
        evaluator = importlib.import_module("lm_eval.evaluator")
        huggingface = importlib.import_module("lm_eval.models.huggingface")  # needs accelerate
        tasks = importlib.import_module("lm_eval.tasks")
    except ImportError as err:
        missing = f" (missing module {err.name!r})" if err.name else ""
        raise MoeAuditError(f"downstream evaluation needs lm-evaluation-harness with its Hugging Face "
                            f"backend{missing}; install it with {_INSTALL_HINT}") from None
    return evaluator.simple_evaluate, huggingface.HFLM, tasks.TaskManager


def _check_device(device: str) -> str:
    """lm-eval silently falls back to another device for a name it does not know; refuse instead."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise invalid("device", "a torch device such as cpu, cuda or cuda:1", device) from None
    if parsed.type == "cuda" and (not torch.cuda.is_available()
                                  or (parsed.index or 0) >= torch.cuda.device_count()):
        raise invalid("device", "a device this machine has (CUDA is not available here, or not that GPU; "
                      "use cpu)", device)
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise invalid("device", "cpu, cuda, cuda:N or mps", device)
    return str(parsed)


@contextmanager
def _no_download_counts() -> Iterator[None]:
    """Switch off ``datasets``' download-count ping for the duration of an evaluation.

    ``datasets.load_dataset`` sends a HEAD request to S3 to count a download on every call, even for a
    local JSON file (``increase_load_count``; errors are swallowed, but a firewalled machine waits up to 3 s
    per task). It is telemetry, not data, so a local task must not depend on it.
    """
    import datasets.config

    saved = getattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", None)
    if saved is None:  # a datasets version without the ping
        yield
        return
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = saved


def _task_manager(TaskManager: Any, names: list[str], include: Path | None) -> Any:
    """A TaskManager that knows every requested name; an unknown name is one line with close matches.

    Indexing lm-eval's ~15,000 built-in task files takes seconds, so when ``include_path`` alone defines
    every requested name as a plain task the built-in index is skipped (a group or tag defined there may
    name built-in tasks, so those get the full index).
    """
    def unknown(names_known: list[str]) -> list[str]:
        known = set(names_known)
        return [n for n in names if n not in known and not (n.endswith((".yaml", ".yml")) and Path(n).is_file())]

    if include is not None:
        local = TaskManager(include_path=str(include), include_defaults=False)
        if not unknown(local.all_subtasks):
            return local
    manager = TaskManager(include_path=str(include) if include is not None else None)
    missing = unknown(manager.all_tasks)
    if missing:
        close = difflib.get_close_matches(missing[0], manager.all_tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        where = f" or defined by a YAML file under {include}" if include is not None else ""
        raise InvalidParameterError(
            f"`tasks` must be lm-eval task, group or tag names{where}; got unknown {missing[0]!r}{hint}; "
            "list the known ones with `lm-eval ls tasks`, or pass include_path= / --include-path with a "
            "directory holding your task YAML.")
    return manager


def _number(value: Any) -> float:
    """lm-eval writes "N/A" (or nothing) where a metric has no standard error."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def tidy_results(raw: dict[str, Any]) -> pd.DataFrame:
    """lm-eval's result dictionary as one row per (task, metric, filter).

    Parameters
    ----------
    raw : dict
        What ``lm_eval.simple_evaluate`` returns; ``raw["results"][task]`` holds ``"metric,filter"`` keys
        and their ``"metric_stderr,filter"`` partners.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`DOWNSTREAM_COLUMNS`; tasks in lm-eval's order, metrics sorted.
    """
    samples = raw.get("n-samples", {})
    rows = []
    for task, metrics in raw.get("results", {}).items():
        counts = samples.get(task, {})
        n = counts.get("effective", metrics.get("sample_len"))
        for key in sorted(metrics):
            if key in _NON_METRIC_KEYS or "," not in key:
                continue
            metric, filter_name = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            value = _number(metrics[key])
            rows.append(dict(task=task, metric=metric, filter=filter_name, value=value,
                             stderr=_number(metrics.get(f"{metric}_stderr,{filter_name}")),
                             n=pd.NA if n is None else int(n)))
    table = pd.DataFrame(rows, columns=list(DOWNSTREAM_COLUMNS))
    return table.astype({"task": str, "metric": str, "filter": str, "value": float, "stderr": float,
                         "n": "Int64"})


def evaluate_downstream(
    checkpoint: str | Path,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: Dtype = "float32",
    num_fewshot: int | None = None,
    seed: int = 42,
) -> DownstreamResult:
    """Run lm-evaluation-harness tasks on a local (pruned) checkpoint.

    Parameters
    ----------
    checkpoint : str or Path
        A local Hugging Face checkpoint directory with tokenizer files, such as one written by
        :func:`moeaudit.prune.export_pruned` (which saves the tokenizer beside the weights). Hub ids are
        refused: nothing is downloaded for the model.
    tasks : sequence of str
        lm-eval task, group or tag names (e.g. ``["arc_easy", "hellaswag"]``), names defined by YAML files
        under ``include_path``, or paths to task YAML files.
    include_path : str or Path, optional
        A directory of user-defined task YAML files (lm-eval's ``--include_path``).
    limit : int, optional
        Evaluate at most this many documents per task (the first ones; for quick checks only — lm-eval's
        scores on a prefix are not the benchmark's).
    batch_size : int
        Requests per forward pass.
    device : str
        ``cpu``, ``cuda``, ``cuda:1``, ...
    dtype : {"float32", "bfloat16", "float16"}
        Weights and compute dtype; float32 is the exact reference on CPU.
    num_fewshot : int, optional
        Few-shot examples per prompt; None keeps each task's default (0 where the task sets none).
    seed : int
        Seeds Python, NumPy and torch, and lm-eval's few-shot sampler.

    Returns
    -------
    DownstreamResult
        ``table`` (one row per task, metric and filter: value, stderr, n) and ``raw`` (lm-eval's dictionary,
        with each document's log-likelihoods under ``raw["samples"]``).

    Raises
    ------
    MoeAuditError
        lm-eval (or its Hugging Face backend) is not installed: ``pip install "moeaudit[eval]"``.
    ModelLoadError
        ``checkpoint`` is not a local checkpoint directory with tokenizer files.
    InvalidParameterError
        An unknown task name or a parameter out of range.
    CorpusError
        A task's data could not be loaded (missing local file, or hub data sets without network).

    Notes
    -----
    lm-eval scores a multiple-choice document by the summed log-probability of each choice's tokens given
    the context (context tokens then continuation tokens, split where the tokenisation of the context
    alone ends; trailing spaces of the context move to the continuation) and takes the argmax: ``acc``.
    ``acc_norm`` divides by the choice's length in bytes. Standard errors are lm-eval's (the sample standard
    error of the mean for ``acc``; bootstrap for non-mean metrics).

    References
    ----------
    .. [1] Gao et al., "The Language Model Evaluation Harness", Zenodo 10.5281/zenodo.10256836 (2024).

    Examples
    --------
    >>> from moeaudit.prune import evaluate_downstream  # doctest: +SKIP
    >>> result = evaluate_downstream("pruned/", ["arc_easy"], limit=100)  # doctest: +SKIP
    >>> result.table  # doctest: +SKIP
           task    metric filter  value  stderr    n
    0  arc_easy       acc   none  0.410   0.049  100
    1  arc_easy  acc_norm   none  0.380   0.049  100
    """
    path, names, include = _check_arguments(checkpoint, tasks, include_path, limit, batch_size, dtype,
                                            num_fewshot)
    simple_evaluate, HFLM, TaskManager = _import_lm_eval()
    device = _check_device(device)
    manager = _task_manager(TaskManager, names, include)
    start = time.perf_counter()
    try:
        model = HFLM(pretrained=str(path), device=device, dtype=dtype, batch_size=batch_size)
    except (OSError, ValueError, RuntimeError) as err:
        reason = first_line(err)[:200]
        raise ModelLoadError(f"lm-eval could not load the checkpoint {path} on {device!r} ({reason}); check "
                             "the directory and the device (cpu, cuda, cuda:N)") from None
    try:
        with _no_download_counts():
            raw = simple_evaluate(model=model, tasks=names, task_manager=manager, num_fewshot=num_fewshot,
                                  limit=limit, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed, log_samples=True)
    except (ConnectionError, FileNotFoundError) as err:
        # datasets and huggingface_hub raise subclasses of these for a missing local file and for hub data
        # that cannot be reached (offline mode included).
        reason = first_line(err)[:200]
        raise CorpusError(f"a task's data could not be loaded ({reason}); point the task YAML at local files "
                          "(dataset_path: json with dataset_kwargs.data_files) or run once with network "
                          "access to fill the Hugging Face cache") from None
    seconds = time.perf_counter() - start
    table = tidy_results(raw)
    logger.info("evaluated %s on %s in %.1fs (%d metric rows)", path, ", ".join(names), seconds, len(table))
    return DownstreamResult(table=table, raw=raw, checkpoint=path, tasks=tuple(names), seconds=seconds)
