"""One validated configuration object per run, stored whole in the run's manifest.

The CLI only builds an :class:`AuditConfig`; a TOML file or a manifest gives the same object. Defaults
cite where they come from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moeaudit.errors import InvalidParameterError
from moeaudit.options import AblationKind, Correction, Engine, Scope, Split

#: Settings that say how a run is executed, not what it computes: a run may be resumed with other values.
#: (Both intervention engines are exact; the intervene units name their engine, so switching engines
#: recomputes that stage instead of mixing the two.)
EXECUTION_FIELDS = frozenset({"batch_size", "device", "unit_windows", "executor", "ray_address", "workers",
                              "engine"})


class AuditConfig(BaseModel):
    """Settings of one audit run.

    Attributes
    ----------
    model : str
        Built-in name, local checkpoint directory or hub id.
    corpus : str
        ``builtin``, a local ``.txt``/``.jsonl``/``.parquet`` file, or ``hf:NAME:CONFIG:SPLIT``-style hub name.
    max_len : int
        Window length in tokens (the paper truncated to 512).
    max_docs : int or None
        Cap on documents read from the corpus (seeded selection).
    split_seed : int
        Seed of the by-document train/calibration/held-out split. The built-in models were trained with
        the split of seed 0.
    observe_splits : list of Split
        Splits the observe stage runs on: metrics are computed on ``calibration``, effects measured on
        ``heldout`` (the paper computed both in-sample; moeaudit defaults to held-out).
    max_windows : int or None
        Cap on windows per observed split (first windows in ``seq`` order).
    layers : list of int or None
        MoE layers to observe (None = all).
    router_probs_layers : list of int or "all" or None
        Layers whose full router-probability matrix is kept (for routing entropy and Gini).
    batch_size : int
        Windows per forward pass.
    dtype, device : str
        Compute dtype and device; float32 is the exact reference on CPU.
    experts_implementation : str or None
        transformers' experts kernel; None keeps the library default.
    seed : int
        Seed for every sampled quantity downstream.
    kind, scope : str
        Intervention whose effects the audit tests (paper: ``zero`` in ``sequence`` scope; moeaudit's
        census default is the exact per-token effect, ``token`` scope).
    audit_n : int or None
        Token positions per audit cell (paper: 200); None = census.
    correction, alpha : str, float
        Family-wise correction over metrics × layers and its level (paper: Bonferroni, 0.05).
    audit_metrics : list of str or None
        Metrics the audit tests (None = every metric column).
    engine : {"fast", "reference"}
        Intervention engine; both are exact, ``fast`` recomputes only what an intervention can change.
    progressive : bool
        Also run progressive ablation (remove the top-j experts by gate, j = 1..k-1) at ``audit_n``
        sampled positions per layer, for the redundancy profile.
    min_chars : int or None
        Keep only documents longer than this many characters (the paper: 50).
    first_docs : int or None
        Keep the first N documents in corpus order, after ``min_chars`` (the paper: 100). Unlike
        ``max_docs`` (a seeded sample), this is positional.
    truncate : bool
        One window per document (its first ``max_len`` tokens) instead of cutting it into many.
    in_sample : bool
        Compute metrics and effects on the same windows, as the paper did (default: metrics on the
        calibration split, effects on held-out).
    intervene_n : int or None
        Target positions per layer for the interventions (every active expert at each; None = census).
    preset : str or None
        The preset these settings came from, for the record.
    unit_windows : int
        Windows per work unit of the observe and intervene stages: each unit is written atomically and
        marked done in the manifest, so a killed run resumes after its last finished unit.
    executor : {"local", "ray"}
        ``local`` runs the units in this process; ``ray`` runs them as Ray tasks, one model replica per
        worker (``pip install "moeaudit[ray]"``).
    ray_address : str or None
        Address of a running Ray cluster (``auto``: the one this machine belongs to); None starts a local one.
    workers : int or None
        Model replicas for the ``ray`` executor (default: one per GPU with ``--device cuda``, else one per CPU).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "tiny-olmoe"
    corpus: str = "builtin"
    max_len: int = Field(256, ge=2, le=131072)
    max_docs: int | None = Field(None, ge=1)
    split_seed: int = 0
    observe_splits: list[Split] = Field(default_factory=lambda: ["calibration", "heldout"])
    max_windows: int | None = Field(None, ge=1)
    layers: list[int] | None = None
    router_probs_layers: list[int] | Literal["all"] | None = "all"
    batch_size: int = Field(8, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    experts_implementation: Literal["eager", "batched_mm", "grouped_mm"] | None = None
    seed: int = 42  # the paper's sampling seed (PAPER.md, "Data")
    kind: AblationKind = "zero"
    scope: Scope = "token"
    audit_n: int | None = Field(200, ge=3)
    correction: Correction = "bonferroni"
    alpha: float = Field(0.05, gt=0, lt=1)
    audit_metrics: list[str] | None = None
    engine: Engine = "fast"
    progressive: bool = True
    min_chars: int | None = Field(None, ge=0)
    first_docs: int | None = Field(None, ge=1)
    truncate: bool = False
    in_sample: bool = False
    intervene_n: int | None = Field(None, ge=1)
    preset: str | None = None
    unit_windows: int = Field(16, ge=1)
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    workers: int | None = Field(None, ge=1)

    @field_validator("observe_splits")
    @classmethod
    def _nonempty_splits(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("a non-empty list of splits (train, calibration, heldout)")
        return value

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that decide the content of the tables (batching, device and executor excluded)."""
        return self.model_dump(exclude=EXECUTION_FIELDS)

    @classmethod
    def from_toml(cls, path: str | Path) -> "AuditConfig":
        import tomllib

        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InvalidParameterError(f"no such config file: {path}; pass an existing TOML file") from None
        except tomllib.TOMLDecodeError as err:
            raise InvalidParameterError(f"{path} is not valid TOML: {err}") from None
        return build_config(data.get("audit", data))

    @classmethod
    def from_manifest(cls, path: str | Path) -> "AuditConfig":
        data = json.loads(Path(path).read_text())
        return build_config(data["config"])


def build_config(values: dict[str, Any]) -> AuditConfig:
    """Validate ``values`` into an AuditConfig; the first problem becomes one line in the house form."""
    try:
        return AuditConfig(**values)
    except ValidationError as err:
        raise config_error(err.errors()[0]) from None


#: What each pydantic error type means, in the house wording (``{…}`` filled from the error's context).
_ALLOWED = {
    "greater_than_equal": "at least {ge}",
    "greater_than": "greater than {gt}",
    "less_than_equal": "at most {le}",
    "less_than": "less than {lt}",
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "missing": "given",
}


#: Fields whose type error reads better as a description than as "a list".
_LISTS = {
    "layers": "a list of MoE layer indices such as [0, 4, 7]",
    "router_probs_layers": 'a list of MoE layer indices or "all"',
    "audit_metrics": "a list of metric names such as [\"reap\", \"frequency\"]",
    "observe_splits": "a list of splits (train, calibration, heldout)",
}


def config_error(error: dict[str, Any]) -> InvalidParameterError:
    """One pydantic error as the house message: parameter, allowed values, bad value, what to do.

    "`max_len` must be at least 2 (an integer); got 1. Fix it on the command line or in the config file."
    """
    loc = [part for part in error["loc"] if isinstance(part, str) and part in AuditConfig.model_fields]
    name = loc[0] if loc else ".".join(str(part) for part in error["loc"]) or "config"
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(AuditConfig.model_fields)
        return InvalidParameterError(f"unknown setting `{name}`; allowed settings are: {allowed}.")
    ctx = error.get("ctx") or {}
    if kind == "literal_error":
        allowed = "one of " + ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
    elif kind == "value_error":
        allowed = str(ctx.get("error", error["msg"]))
    else:
        allowed = _ALLOWED.get(kind, error["msg"].removeprefix("Input should be ").rstrip("."))
        allowed = allowed.format(**ctx) if ctx else allowed
    if len(error["loc"]) > 1 and isinstance(error["loc"][1], int):
        allowed = f"a list whose items are each {allowed}"
    got = values_of(error)
    if kind in ("list_type", "string_type") and name in _LISTS:
        allowed = _LISTS[name]
    return InvalidParameterError(f"`{name}` must be {allowed}; got {got!r}. Change it on the command line or in the "
                                 "config file.")


def values_of(error: dict[str, Any]) -> Any:
    """The offending value (for a list item, the item)."""
    return error.get("input")
