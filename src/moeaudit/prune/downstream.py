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

With ``output_path`` lm-eval's own results JSON (and, with ``log_samples``, its per-document samples) is
written by lm-eval's ``EvaluationTracker``, as ``lm-eval run --output_path`` writes it, so lm-eval's tools
read it. :func:`compare_downstream` evaluates a pruned checkpoint and a baseline (e.g. the unpruned model)
with the same settings and lines them up: ``difference`` = pruned - baseline.

lm_eval, accelerate and datasets are imported only when the function runs, so ``import moeaudit.prune``
and ``moeaudit --help`` stay fast and work without the extra.
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pandas as pd

from moeaudit.errors import (CorpusError, InvalidParameterError, ModelLoadError, MoeAuditError, RunDirectoryError,
                             first_line, invalid)
from moeaudit.options import DTYPES, Dtype, one_of
from moeaudit.tables import DOWNSTREAM_COLUMNS, DOWNSTREAM_COMPARISON_COLUMNS

logger = logging.getLogger(__name__)


#: Files that make a directory a loadable tokenizer (the same set :mod:`moeaudit.models.loading` checks).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")

_INSTALL_HINT = 'pip install "moeaudit[eval]"'

#: Keys of an lm-eval per-task result that are not metrics.
_NON_METRIC_KEYS = frozenset({"alias", "name", "sample_len", "sample_count", "samples"})

#: HFLM arguments moeaudit sets itself, and the option (or reason) a user sets them with instead.
_RESERVED_MODEL_ARGS = {
    "pretrained": "the checkpoint argument",
    "device": "--device / device=",
    "dtype": "--dtype / dtype=",
    "batch_size": "--batch-size / batch_size=",
    "tokenizer": "the checkpoint's own tokenizer files",
}

#: Files that give a checkpoint's tokenizer a chat template (transformers >= 4.43 may save it separately).
_CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


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
    results_file : Path or None
        lm-eval's results JSON, where ``output_path`` was given (lm-eval's own file, readable by its tools).
    sample_files : tuple of Path
        lm-eval's per-task ``samples_*.jsonl`` files, where ``log_samples`` was set.
    """

    table: pd.DataFrame = field(repr=False)
    raw: dict[str, Any] = field(repr=False)
    checkpoint: Path
    tasks: tuple[str, ...]
    seconds: float
    results_file: Path | None = None
    sample_files: tuple[Path, ...] = ()

    def to_frame(self) -> pd.DataFrame:
        """A copy of :attr:`table`."""
        return self.table.copy()


def _check_arguments(checkpoint: str | Path, tasks: Sequence[str], include_path: str | Path | None,
                     limit: int | None, batch_size: int, dtype: str,
                     num_fewshot: int | None, what: str = "checkpoint") -> tuple[Path, list[str], Path | None]:
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
    path, _ = _checkpoint(checkpoint, what)
    return path, names, include


def _checkpoint(checkpoint: str | Path, what: str = "checkpoint") -> tuple[Path, Path | None]:
    """``(absolute model directory, separate tokenizer directory or None)`` for a local checkpoint directory
    or a built-in model name (whose weights and shared tokenizer ship with moeaudit); hub ids are refused."""
    from moeaudit.models import builtin

    path = Path(checkpoint).expanduser()
    if not path.is_dir() and str(checkpoint) in builtin.BUILTIN_MODELS:
        return builtin.builtin_path(str(checkpoint)).resolve(), builtin.tokenizer_path().resolve()
    if not path.is_dir():
        raise ModelLoadError(f"{what} directory {str(checkpoint)!r} does not exist; pass a local directory "
                             "written by `moeaudit prune --export` or moeaudit.prune.export_pruned, or a built-in "
                             f"model name ({', '.join(builtin.BUILTIN_MODELS)}); hub ids are not fetched")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json, so it is not a Hugging Face checkpoint; pass the "
                             "directory written by `moeaudit prune --export` or export_pruned")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(f"{path} has no tokenizer files, which lm-eval needs to turn tasks into tokens; "
                             "save the tokenizer into it (tokenizer.save_pretrained(DIR))")
    # An absolute path also keeps lm-eval's model-info lookup (HfApi().model_info(repo_id=pretrained)) from
    # ever reaching the hub: an absolute path is not a valid repo id, so it is rejected before any request.
    return path.resolve(), None


def _check_model_args(model_args: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Extra HFLM arguments as a dict (values of a ``key=value,...`` string still as text; lm-eval casts them).

    Keys moeaudit sets itself are refused, and so is ``trust_remote_code`` (moeaudit runs no model code from
    a checkpoint directory).
    """
    if model_args is None:
        return {}
    if isinstance(model_args, Mapping):
        parsed = {str(key): value for key, value in model_args.items()}
    elif isinstance(model_args, str):
        parsed = {}
        for item in (part.strip() for part in model_args.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep or not key.strip().isidentifier():
                raise invalid("model_args", "comma-separated key=value pairs for lm-eval's HF model, e.g. "
                              "max_length=2048,attn_implementation=eager", model_args)
            if key.strip() in parsed:
                raise invalid("model_args", "each key once", model_args)
            parsed[key.strip()] = value.strip()
    else:
        raise invalid("model_args", "a key=value,... string or a dict", model_args)
    for key in parsed:
        if key in _RESERVED_MODEL_ARGS:
            raise invalid("model_args", f"keys moeaudit does not set itself ({key} comes from "
                          f"{_RESERVED_MODEL_ARGS[key]})", f"{key}={parsed[key]}")
    if "trust_remote_code" in parsed and str(parsed["trust_remote_code"]).strip().lower() not in ("false", "0"):
        raise invalid("model_args", "free of trust_remote_code=True (moeaudit runs no code shipped with a "
                      "checkpoint; supported MoE families load without it)",
                      f"trust_remote_code={parsed['trust_remote_code']}")
    return parsed


def _cast_model_args(parsed: dict[str, Any]) -> dict[str, Any]:
    """Cast ``key=value`` text values the way lm-eval's own ``--model_args`` parser does."""
    from lm_eval.utils import handle_arg_string

    return {key: handle_arg_string(value) if isinstance(value, str) else value for key, value in parsed.items()}


def _has_chat_template(tokenizer_dir: Path) -> bool:
    """Whether the tokenizer saved in ``tokenizer_dir`` carries a chat template."""
    if any((tokenizer_dir / name).is_file() for name in _CHAT_TEMPLATE_FILES):
        return True
    config = tokenizer_dir / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text()).get("chat_template")) if config.is_file() else False
    except (OSError, ValueError):
        return False


def _check_output(output_path: str | Path | None, log_samples: bool) -> Path | None:
    """lm-eval's ``--output_path``: a directory (created) or a ``.json`` file name; samples need it."""
    if not isinstance(log_samples, bool):
        raise invalid("log_samples", "True or False", log_samples)
    if output_path is None:
        if log_samples:
            raise invalid("log_samples", "used together with output_path / --output-path (the samples are "
                          "written beside lm-eval's results file)", log_samples)
        return None
    out = Path(output_path).expanduser().resolve()
    if out.exists() and not out.is_dir() and out.suffix != ".json":
        raise invalid("output_path", "a directory (created if missing) or a file name ending in .json, as for "
                      "lm-eval's --output_path", str(output_path))
    return out


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
    model_args: str | Mapping[str, Any] | None = None,
    apply_chat_template: bool | str = False,
    output_path: str | Path | None = None,
    log_samples: bool = False,
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
    model_args : str or dict, optional
        Extra arguments for lm-eval's HF model (``HFLM``), as lm-eval's ``--model_args`` takes them
        (``"max_length=2048,attn_implementation=eager"``; values cast as lm-eval casts them) or a dict. Keys
        moeaudit sets itself (``pretrained``, ``device``, ``dtype``, ``batch_size``, ``tokenizer``) and
        ``trust_remote_code=True`` are refused.
    apply_chat_template : bool or str
        Format prompts with the tokenizer's chat template (a name picks one of several), as lm-eval's
        ``--apply_chat_template``; the checkpoint's tokenizer must have one.
    output_path : str or Path, optional
        Write lm-eval's own results JSON there, as lm-eval's ``--output_path`` does (its
        ``EvaluationTracker``): a directory gets ``<model name>/results_<date>.json``, a ``.json`` name gets
        ``<stem>_<date>.json`` beside it.
    log_samples : bool
        Also write lm-eval's per-document ``samples_<task>_<date>.jsonl`` files (needs ``output_path``).
        The returned ``raw`` holds the samples either way.

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
    plan = _plan(checkpoint, tasks, include_path=include_path, limit=limit, batch_size=batch_size,
                 device=device, dtype=dtype, num_fewshot=num_fewshot, seed=seed, model_args=model_args,
                 apply_chat_template=apply_chat_template, output_path=output_path, log_samples=log_samples)
    return _run(plan)


@dataclass(frozen=True)
class _Plan:
    """A checked evaluation: everything validated, lm_eval imported, no model loaded yet."""

    path: Path
    tokenizer: Path | None
    names: list[str]
    manager: Any
    device: str
    dtype: str
    batch_size: int
    limit: int | None
    num_fewshot: int | None
    seed: int
    model_args: dict[str, Any]
    apply_chat_template: bool | str
    output: Path | None
    log_samples: bool
    lm_eval: tuple[Any, Any, Any]


def _plan(checkpoint: str | Path, tasks: Sequence[str], *, include_path: str | Path | None, limit: int | None,
          batch_size: int, device: str, dtype: str, num_fewshot: int | None, seed: int,
          model_args: str | Mapping[str, Any] | None, apply_chat_template: bool | str,
          output_path: str | Path | None, log_samples: bool, what: str = "checkpoint",
          manager: Any = None) -> _Plan:
    """Check every argument (and that lm-eval knows the tasks) without loading a model."""
    _, names, include = _check_arguments(checkpoint, tasks, include_path, limit, batch_size, dtype, num_fewshot,
                                         what)
    path, tokenizer = _checkpoint(checkpoint, what)
    extra = _check_model_args(model_args)
    if not isinstance(apply_chat_template, (bool, str)) or apply_chat_template == "":
        raise invalid("apply_chat_template", "True, False or the name of one of the tokenizer's chat templates",
                      apply_chat_template)
    if apply_chat_template is not False and not _has_chat_template(tokenizer or path):
        raise invalid("apply_chat_template", "used with a tokenizer that has a chat template (its "
                      "tokenizer_config.json has none, and there is no chat_template.jinja)",
                      apply_chat_template, str(tokenizer or path))
    output = _check_output(output_path, log_samples)
    simple_evaluate, HFLM, TaskManager = _import_lm_eval()
    extra = _cast_model_args(extra)
    if extra.get("trust_remote_code"):
        raise invalid("model_args", "free of trust_remote_code=True", "trust_remote_code=True")
    device = _check_device(device)
    if manager is None:  # indexing lm-eval's built-in tasks takes seconds; a comparison does it once
        manager = _task_manager(TaskManager, names, include)
    return _Plan(path=path, tokenizer=tokenizer, names=names, manager=manager, device=device, dtype=dtype,
                 batch_size=batch_size, limit=limit, num_fewshot=num_fewshot, seed=seed, model_args=extra,
                 apply_chat_template=apply_chat_template, output=output, log_samples=log_samples,
                 lm_eval=(simple_evaluate, HFLM, TaskManager))


def _run(plan: _Plan) -> DownstreamResult:
    """Load the model, evaluate, and write lm-eval's files where asked."""
    simple_evaluate, HFLM, _ = plan.lm_eval
    path, device = plan.path, plan.device
    arguments: dict[str, Any] = dict(pretrained=str(path), device=device, dtype=plan.dtype,
                                     batch_size=plan.batch_size)
    if plan.tokenizer is not None:
        arguments["tokenizer"] = str(plan.tokenizer)
    arguments |= plan.model_args
    tracker = None
    if plan.output is not None:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=str(plan.output))
    start = time.perf_counter()
    try:
        model = HFLM(**arguments)
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        reason = first_line(err)[:200]
        extra = f" or --model-args {','.join(plan.model_args)}" if plan.model_args else ""
        raise ModelLoadError(f"lm-eval could not load the checkpoint {path} on {device!r} ({reason}); check "
                             f"the directory and the device (cpu, cuda, cuda:N){extra}") from None
    try:
        with _no_download_counts():
            # model_args is what lm-eval records as the run's configuration (results["config"], and the model
            # name its results file is filed under); the model itself is built above.
            raw = simple_evaluate(model=model, model_args=arguments, tasks=plan.names, task_manager=plan.manager,
                                  num_fewshot=plan.num_fewshot, limit=plan.limit, random_seed=plan.seed,
                                  numpy_random_seed=plan.seed, torch_random_seed=plan.seed,
                                  fewshot_random_seed=plan.seed, log_samples=True,
                                  apply_chat_template=plan.apply_chat_template, evaluation_tracker=tracker)
    except (ConnectionError, FileNotFoundError) as err:
        # datasets and huggingface_hub raise subclasses of these for a missing local file and for hub data
        # that cannot be reached (offline mode included).
        reason = first_line(err)[:200]
        raise CorpusError(f"a task's data could not be loaded ({reason}); point the task YAML at local files "
                          "(dataset_path: json with dataset_kwargs.data_files) or run once with network "
                          "access to fill the Hugging Face cache") from None
    seconds = time.perf_counter() - start
    table = tidy_results(raw)
    logger.info("evaluated %s on %s in %.1fs (%d metric rows)", path, ", ".join(plan.names), seconds, len(table))
    results_file, sample_files = None, ()
    if tracker is not None:
        results_file, sample_files = _save(tracker, raw, plan.output, plan.log_samples)
    return DownstreamResult(table=table, raw=raw, checkpoint=path, tasks=tuple(plan.names), seconds=seconds,
                            results_file=results_file, sample_files=sample_files)


def _save(tracker: Any, raw: dict[str, Any], output: Path, log_samples: bool) -> tuple[Path, tuple[Path, ...]]:
    """Write lm-eval's results JSON (and samples) exactly as ``lm-eval run --output_path`` does.

    lm-eval's tracker logs a failed write as a warning and carries on; here a missing file is an error.
    """
    results = {key: value for key, value in raw.items() if key != "samples"}  # its save mutates the dict
    samples = raw.get("samples", {})
    tracker.save_results_aggregated(results=results, samples=samples if log_samples else None)
    name = tracker.general_config_tracker.model_name_sanitized
    if output.suffix == ".json":
        results_file, folder = output.with_name(f"{output.stem}_{tracker.date_id}.json"), output.parent
    else:
        folder = output / str(name)
        results_file = folder / f"results_{tracker.date_id}.json"
    if not results_file.is_file():
        raise RunDirectoryError(f"lm-eval could not write its results to {results_file}; choose a writable "
                                "--output-path")
    sample_files = []
    if log_samples:
        for task in results["configs"]:
            if task not in samples:
                continue
            # lm-eval's writer rewrites fields of each sample in place; give it copies, keep raw intact.
            tracker.save_results_samples(task_name=task, samples=[dict(sample) for sample in samples[task]])
            written = folder / f"samples_{task}_{tracker.date_id}.jsonl"
            if not written.is_file():
                raise RunDirectoryError(f"lm-eval could not write the samples to {written}; choose a writable "
                                        "--output-path")
            sample_files.append(written)
    return results_file, tuple(sample_files)


@dataclass(frozen=True)
class DownstreamComparison:
    """A pruned checkpoint and its baseline, evaluated with the same settings (:func:`compare_downstream`).

    Attributes
    ----------
    table : pandas.DataFrame
        :data:`DOWNSTREAM_COMPARISON_COLUMNS`: per (task, metric, filter) the baseline's and the pruned
        checkpoint's value and stderr, ``difference`` = pruned - baseline, and ``n``.
    baseline, pruned : DownstreamResult
    """

    table: pd.DataFrame = field(repr=False)
    baseline: DownstreamResult
    pruned: DownstreamResult


def comparison_table(baseline: pd.DataFrame, pruned: pd.DataFrame) -> pd.DataFrame:
    """Two tidy tables (:data:`DOWNSTREAM_COLUMNS`) side by side; ``difference`` = pruned - baseline.

    Rows are matched on (task, metric, filter), in the pruned table's order; a row only one side has gets
    NaN on the other. ``n`` is the pruned side's (the baseline's where the pruned side lacks the row).
    """
    keys = ["task", "metric", "filter"]
    left = pruned.rename(columns={"value": "pruned", "stderr": "pruned_stderr", "n": "n_pruned"})
    right = baseline.rename(columns={"value": "baseline", "stderr": "baseline_stderr", "n": "n_baseline"})
    merged = left.merge(right, on=keys, how="outer", sort=False)
    merged["difference"] = merged["pruned"] - merged["baseline"]
    merged["n"] = merged["n_pruned"].fillna(merged["n_baseline"]).astype("Int64")
    return merged[list(DOWNSTREAM_COMPARISON_COLUMNS)].reset_index(drop=True)


def compare_downstream(checkpoint: str | Path, baseline: str | Path, tasks: Sequence[str],
                       **kwargs: Any) -> DownstreamComparison:
    """Evaluate a pruned checkpoint and its baseline (e.g. the unpruned model) with the same settings.

    Parameters
    ----------
    checkpoint : str or Path
        The pruned checkpoint directory (as for :func:`evaluate_downstream`).
    baseline : str or Path
        The model to compare against: a local checkpoint directory (e.g. the original model's) or a
        built-in model name such as ``tiny-olmoe``.
    tasks : sequence of str
    **kwargs
        Every other argument of :func:`evaluate_downstream`; both models get the same ones (and both write
        lm-eval's files under ``output_path``, each under its own model name).

    Returns
    -------
    DownstreamComparison
        Both results, and the comparison table (``difference`` = pruned - baseline).

    Both are checked before either model loads, so a typo in the baseline costs no evaluation.
    """
    pruned_plan = _plan(checkpoint, tasks, **_defaults(kwargs))
    baseline_plan = _plan(baseline, tasks, **_defaults(kwargs), what="baseline", manager=pruned_plan.manager)
    if baseline_plan.path == pruned_plan.path:
        raise invalid("baseline", "a different model than the checkpoint (e.g. the unpruned original)",
                      str(baseline))
    pruned = _run(pruned_plan)
    base = _run(baseline_plan)
    return DownstreamComparison(table=comparison_table(base.table, pruned.table), baseline=base, pruned=pruned)


def _defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """:func:`evaluate_downstream`'s keyword defaults, updated with ``kwargs`` (unknown names refused)."""
    defaults: dict[str, Any] = dict(include_path=None, limit=None, batch_size=1, device="cpu", dtype="float32",
                                    num_fewshot=None, seed=42, model_args=None, apply_chat_template=False,
                                    output_path=None, log_samples=False)
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"compare_downstream() got unexpected keyword argument(s) {', '.join(unknown)}")
    return defaults | kwargs
