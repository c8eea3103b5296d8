"""One validated configuration tree per run, stored whole in the run's manifest.

:class:`AuditConfig` is composed of typed parts, one per concern:

================  ==============================================================================
part              settings
================  ==============================================================================
(root)            ``model``, ``corpus``, ``seed``, ``preset``: what is audited
``observe``       :class:`ObserveConfig`: the corpus windows, splits, layers, dtype
``intervene``     :class:`InterveneSettings`: the measured intervention (kind, scope, sample)
``audit``         :class:`AuditPart`: the statistical tests (sample, designs, correction, CI)
``prune``         :class:`PruneConfig`: the pruning experiment (ratios, criteria, random draws)
``calibration``   :class:`CalibrationConfig`: how much the metric rankings depend on the calibration data
``interactions``  :class:`InteractionsConfig`: joint removals, interactions and Shapley values
``execution``     :class:`ExecutionConfig`: how the work runs (batching, device, units, executor)
================  ==============================================================================

The CLI only builds an :class:`AuditConfig`; a TOML file (a table per part: ``[observe]``,
``[intervene]``, ...) or a manifest gives the same object. Every setting has one name, unique across the
tree, so the flat spelling of earlier versions (``AuditConfig(max_len=512)``, a flat TOML file, an old
manifest) still works and reads as ``config.max_len``; :data:`FLAT_PATHS` maps each name to its part.
The fingerprint that guards a run directory covers everything but ``execution`` (how a run executes never
changes its tables), ``prune`` (each pruning run rewrites its own tables; its work units carry a digest
of their settings, and the manifest records the settings of the last one) and ``calibration`` (each
``moeaudit calibration`` run rewrites ``calibration.parquet``, which records its settings in its columns and
the manifest's stage record), and ``interactions`` likewise. Defaults cite where they come from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moeaudit.errors import InvalidParameterError, RunDirectoryError
from moeaudit.options import (
    DESIGNS,
    AblationKind,
    CIMethod,
    ClusterBy,
    Correction,
    Design,
    Dtype,
    Engine,
    MixedModel,
    Scope,
    Split,
    canonical_dtype,
)


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ObserveConfig(_Part):
    """What the observe stage reads: the corpus windows every later stage reuses.

    Attributes
    ----------
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
    router_logits_layers : list of int or "all" or None
        Layers whose full router-logit matrix is kept (float32; for the ``paper_code_*`` metrics of
        :mod:`moeaudit.metrics.papercode`). None, the default, keeps none.
    dtype : str
        Compute dtype; float32 is the exact reference on CPU. ``auto`` loads the checkpoint's own dtype;
        ``fp32``, ``bf16``, ``fp16`` are read as float32, bfloat16, float16.
    experts_implementation : str or None
        transformers' experts kernel; None keeps the library default.
    min_chars : int or None
        Keep only documents longer than this many characters (the paper: 50).
    first_docs : int or None
        Keep the first N documents in corpus order, after ``min_chars`` (the paper: 100). Unlike
        ``max_docs`` (a seeded sample), this is positional.
    truncate : bool
        One window per document (its first ``max_len`` tokens) instead of cutting it into many.
    paper_code_padding : bool
        Also record routing at the padding positions of the observed windows right-padded to the longest
        one, and pool them into every metric, as the released scripts of arXiv 2606.10703 did
        (:func:`moeaudit.observe.forward.observe_padding`; ``engmann2026-code``). Default False: metrics
        describe real tokens only.
    in_sample : bool
        Compute metrics and effects on the same windows, as the paper did (default: metrics on the
        calibration split, effects on held-out).
    text_field, domain_field : str or None
        The field (``.jsonl``) or column (``.parquet``, hub dataset) holding each document's text and its
        domain label (:class:`~moeaudit.data.local.LocalFileSource`, :class:`~moeaudit.data.hub.HubDataset`).
        None, the default, reads ``text`` and ``domain``; the built-in corpus and ``.txt`` files have no
        fields, so setting one for them is refused.
    """

    max_len: int = Field(256, ge=2, le=131072)
    max_docs: int | None = Field(None, ge=1)
    split_seed: int = 0
    observe_splits: list[Split] = Field(default_factory=lambda: ["calibration", "heldout"])
    max_windows: int | None = Field(None, ge=1)
    layers: list[int] | None = None
    router_probs_layers: list[int] | Literal["all"] | None = "all"
    router_logits_layers: list[int] | Literal["all"] | None = None
    dtype: Dtype = "float32"

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        return canonical_dtype(value)
    experts_implementation: Literal["eager", "batched_mm", "grouped_mm"] | None = None
    min_chars: int | None = Field(None, ge=0)
    first_docs: int | None = Field(None, ge=1)
    truncate: bool = False
    paper_code_padding: bool = False
    in_sample: bool = False
    text_field: str | None = Field(None, min_length=1)
    domain_field: str | None = Field(None, min_length=1)

    @field_validator("observe_splits")
    @classmethod
    def _nonempty_splits(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("a non-empty list of splits (train, calibration, heldout)")
        return value


class InterveneSettings(_Part):
    """The intervention the intervene stage measures (and the audit tests).

    Attributes
    ----------
    kind, scope : str
        Intervention whose effects the audit tests (arXiv 2606.10703, Sec. 3.2: ``zero`` in ``sequence``
        scope; moeaudit's census default is the exact per-token effect, ``token`` scope).
    intervene_n : int or None
        Target positions per layer for the interventions (every active expert at each; None = census).
    position_sets : {"per_layer", "paper_code"}
        ``per_layer``: ``intervene_n`` positions per layer from ``default_rng(seed)``, and the audit samples
        ``audit_n`` of them per layer for every metric. ``paper_code``: the released scripts of arXiv
        2606.10703 — one set of ``intervene_n`` positions per audit metric, drawn in turn from numpy's
        legacy stream seeded with ``seed`` over the padded global numbering, the same sets at every layer
        (:func:`moeaudit.audit.papercode.paper_code_positions`); the paired design tests metric i on set i.
    progressive : bool
        Also run progressive ablation (remove the top-j experts by gate, j = 1..k-1) at ``audit_n``
        sampled positions per layer, for the redundancy profile.
    noise_positions : int
        Positions per window and MoE layer for the null intervention that measures the noise floor.
    intervene_layers : list of int or None
        MoE layers the intervene stage intervenes at (None = every observed layer): observe and metrics
        may cover every layer (for pruning) while the costly census covers a few.
    intervene_windows : int or None
        At most this many windows (the first, in ``seq`` order) of the split the effects are measured on
        (None = all of them).
    """

    kind: AblationKind = "zero"
    scope: Scope = "token"
    intervene_layers: list[int] | None = None
    intervene_windows: int | None = Field(None, ge=1)
    intervene_n: int | None = Field(None, ge=1)
    position_sets: Literal["per_layer", "paper_code"] = "per_layer"
    progressive: bool = True
    noise_positions: int = Field(16, ge=0)


class AuditPart(_Part):
    """The statistical tests of the audit stage (:class:`moeaudit.audit.AuditSettings` is built from it).

    Attributes
    ----------
    audit_n : int or None
        Token positions per audit cell (arXiv 2606.10703, Sec. 3.3: 200); None = census.
    correction, alpha : str, float
        Family-wise correction over metrics x layers and its level (the paper: Bonferroni, 0.05).
    audit_metrics : list of str or None
        Metrics the audit tests (None = every metric column).
    designs : list of Design
        The test designs (every one by default).
    ci, equivalence_bound, n_permutations
        As in :class:`moeaudit.audit.AuditSettings` (the CI of d_z, the TOST bound, the expert-level
        permutations).
    reap_gate : {"combine", "renorm", "raw", "reap-code"}
        The gate in REAP's saliency (the metrics stage; :func:`moeaudit.metrics.reap.resolve_reap_gate`):
        the weight the model applies (default), forced renormalised or raw, or REAP's released code's rule.
    audit_cluster, audit_mixed
        :class:`moeaudit.audit.AuditSettings` ``cluster`` and ``mixed``: the unit of replication of the
        token-level tests (``auto``: documents whenever a cell holds several tokens of one document) and the
        mixed-effects view of clustered paired cells.
    dz_ddof : {0, 1}
        ddof of the sd in d_z: 1 (the sample sd); 0 replays the paper's released scripts.
    """

    audit_n: int | None = Field(200, ge=3)
    correction: Correction = "bonferroni"
    alpha: float = Field(0.05, gt=0, lt=1)
    audit_metrics: list[str] | None = None
    designs: list[Design] = Field(default_factory=lambda: list(DESIGNS))
    ci: CIMethod = "analytic"
    equivalence_bound: float = Field(0.2, gt=0)
    n_permutations: int = Field(9999, ge=1)
    reap_gate: Literal["combine", "renorm", "raw", "reap-code"] = "combine"
    audit_cluster: ClusterBy = "auto"
    audit_mixed: MixedModel = "document"
    dz_ddof: Literal[0, 1] = 1

    @field_validator("designs")
    @classmethod
    def _nonempty_designs(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("a non-empty list of designs (" + ", ".join(DESIGNS) + ")")
        return value


class PruneConfig(_Part):
    """The pruning experiment (:func:`moeaudit.prune.run_prune`).

    Attributes
    ----------
    ratios : list of float
        Shares of routed experts dropped per layer, each in (0, 1) and leaving at least top-k experts.
    criteria : list of str or None
        Criteria to compare (metric columns, ``oracle_delta_nll``, ``oracle_reconstruction``, ``random``);
        None = all available.
    random_seeds : int or list of int
        Random draws per ratio: a count (seeds ``seed``, ``seed + 1``, ...) or explicit seeds (10 by
        default, a 5-95 % band from 10 draws; 20 or more for a steadier band).
    single_layer : bool
        Also prune each layer alone (off by default: it multiplies the configurations by the number of
        MoE layers; ``moeaudit prune --single-layer`` turns it on).
    guard : int
        Never prune the ``guard`` experts with the largest max activation per layer (super experts).
    budget_weights : dict of layer -> float, or None
        Non-uniform budgets for the all-layers mode.
    directions : dict of criterion -> {"low", "high"}, or None
        Which end of a criterion is pruned first, where it differs from the default.
    group_balanced : bool
        For group-limited routing (``n_group`` > 1: DeepSeek-V3 / R1 / V3.2, Kimi-K2, Mistral 4): every
        selection drops as many experts from each expert group, so each evaluated configuration can be
        exported and scores as evaluated (off: each criterion's worst experts of the whole layer).
    """

    ratios: list[float] = Field(default_factory=lambda: [0.125, 0.25, 0.5])
    criteria: list[str] | None = None
    random_seeds: int | list[int] = Field(10)
    single_layer: bool = False
    guard: int = Field(0, ge=0)
    budget_weights: dict[int, float] | None = None
    directions: dict[str, Literal["low", "high"]] | None = None
    group_balanced: bool = False

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < r < 1 for r in value):
            raise ValueError("a non-empty list of shares in (0, 1) such as [0.125, 0.25, 0.5]")
        return value

    @field_validator("random_seeds")
    @classmethod
    def _seeds(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int) and value < 0:
            raise ValueError("a count >= 0 or a list of seeds")
        return value


class CalibrationConfig(_Part):
    """The calibration-sensitivity analysis (:func:`moeaudit.calibration.run_calibration`).

    How much does each metric's expert ranking depend on which, and how many, calibration tokens were used?
    The analysis resamples the calibration split and recomputes the metrics; it never runs the model.

    Attributes
    ----------
    resamples : int
        Bootstrap resamples of the calibration documents (drawn with replacement; 200 gives a stable mean
        and 5th percentile of Kendall's τ).
    flip_ratio : float
        Share of each layer's experts a metric prunes (its lowest-ranked ``round(ratio * E)``, as the prune
        stage would) when counting how many prune/keep decisions a resample flips; REAP's 25 %.
    tau_target : float
        The τ to the full-calibration ranking that the learning curve asks for ("tokens until τ ≥ 0.9").
    curve_points, curve_repeats : int
        Calibration sizes on the learning curve (geometric, 1 document to half the split) and the nested
        random orders averaged at each size.
    resample_unit : {"document", "window"}
        What is resampled: whole documents (their windows together, the default; a document's windows are
        not independent) or single windows.
    """

    resamples: int = Field(200, ge=2)
    flip_ratio: float = Field(0.25, gt=0, lt=1)
    tau_target: float = Field(0.9, gt=0, le=1)
    curve_points: int = Field(6, ge=1)
    curve_repeats: int = Field(10, ge=1)
    resample_unit: Literal["document", "window"] = "document"


class InteractionsConfig(_Part):
    """Joint removals inside the active set (:func:`moeaudit.interactions.run_interactions`).

    Attributes
    ----------
    interactions_n : int or None
        Held-out target tokens per MoE layer (seeded by ``seed``); None: every held-out token.
    interactions_layers : list of int or None
        MoE layers to measure (None: the intervened layers).
    interactions_kind : {"zero", "renorm", "reroute", "mean"} or None
        How an expert is removed (None: the run's ``kind``).
    shapley_exact_players : int
        Active sets of at most this many experts get exact Shapley values (2^k removals per token; 256
        for top-8); larger ones a permutation estimate.
    shapley_permutations : int
        Orderings per token for the permutation estimate.
    """

    interactions_n: int | None = Field(500, ge=1)
    interactions_layers: list[int] | None = None
    interactions_kind: AblationKind | None = None
    shapley_exact_players: int = Field(10, ge=1, le=10)
    shapley_permutations: int = Field(200, ge=2)


class ExecutionConfig(_Part):
    """How a run executes; never what it computes, so a run may be resumed with other values.

    Attributes
    ----------
    batch_size : int
        Windows per forward pass.
    device : str
        Compute device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA if present, else MPS, else
        the CPU); one this machine lacks is refused before the model loads.
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
    engine : {"fast", "reference"}
        Intervention engine; both are exact, ``fast`` recomputes only what an intervention can change. (The
        intervene units name their engine, so switching engines recomputes that stage instead of mixing.)
    rows_per_call, reference_batch, max_logit_elements : int
        Token-scope interventions per call of the fast engine, interventions per full forward of the
        reference engine, and the cap on one fast-engine call's logits (rows x vocabulary in token scope,
        rows x positions x vocabulary in sequence scope; 2**25 float32 elements are 128 MiB).
    max_state_bytes : int or None
        Cap on the recurrent states one fast-engine call's rows carry on a hybrid model (None: half the
        clean pass's record, a census within about twice its memory; raise it where memory allows).
    """

    batch_size: int = Field(8, ge=1)
    device: str = "cpu"
    unit_windows: int = Field(16, ge=1)
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    workers: int | None = Field(None, ge=1)
    engine: Engine = "fast"
    rows_per_call: int = Field(256, ge=1)
    reference_batch: int = Field(1, ge=1)
    max_logit_elements: int = Field(1 << 25, ge=1)
    max_state_bytes: int | None = Field(None, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|auto|mps|cuda(:\d+)?", value):
            raise ValueError("cpu, cuda, cuda:N, mps or auto")
        return value


#: The parts of the tree, by the attribute (and TOML table) that holds each.
PARTS: dict[str, type[_Part]] = {"observe": ObserveConfig, "intervene": InterveneSettings, "audit": AuditPart,
                                 "prune": PruneConfig, "calibration": CalibrationConfig,
                                 "interactions": InteractionsConfig, "execution": ExecutionConfig}
#: Settings held by the root itself.
ROOT_FIELDS = ("model", "corpus", "seed", "preset", "preset_overrides")
#: Every setting's part, by its (unique) name: the flat spelling ``max_len`` is ``observe.max_len``.
FLAT_PATHS: dict[str, str] = {name: part for part, cls in PARTS.items() for name in cls.model_fields}
#: Parts left out of the run directory's fingerprint (see the module docstring).
UNFINGERPRINTED = frozenset({"execution", "prune", "calibration", "interactions"})
#: The execution settings by name (a run may be resumed with other values).
EXECUTION_FIELDS = frozenset(ExecutionConfig.model_fields)


class _Unset:
    """What ``--set NAME=none`` gives a setting that may be unset (:func:`unsets`): None once the settings are
    merged (:func:`unset_to_none`). A sentinel, not None itself, because every layer of settings drops None as
    "not given" (TOML has no null either)."""

    def __repr__(self) -> str:
        return "none"


UNSET = _Unset()


def unsets(name: str) -> bool:
    """Whether a bare ``none`` (or ``null``) given to setting ``name`` (its flat name, ``intervene_n``) unsets it:
    its type admits None and offers no ``"none"`` choice of its own (``cluster_by = "none"`` stays that choice)."""
    import typing

    cls = PARTS[FLAT_PATHS[name]] if name in FLAT_PATHS else AuditConfig if name in ROOT_FIELDS else None
    if cls is None:
        return False

    def leaves(annotation):
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is Literal:
            return list(args)
        return [annotation] if not args else [leaf for arg in args for leaf in leaves(arg)]

    found = leaves(cls.model_fields[name].annotation)
    return type(None) in found and "none" not in found


def unset_to_none(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every :data:`UNSET` as None (the settings' last step before they merge)."""
    return {name: None if value is UNSET else value for name, value in values.items()}


def nest(values: dict[str, Any]) -> dict[str, Any]:
    """Route flat settings (``max_len``) into their part (``observe``); nested ones pass through.

    A flat setting overrides the same setting given nested (flags win over a stored manifest). An old
    TOML file that held the whole flat configuration under ``[audit]`` is read as flat settings.
    """
    out: dict[str, Any] = {}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key == "audit" and isinstance(value, dict) and any(k not in AuditPart.model_fields for k in value):
            flat.update(value)  # the pre-tree layout: every setting in one [audit] table
        elif key in PARTS and isinstance(value, dict):
            out[key] = dict(out.get(key, {}), **value)
        elif key in FLAT_PATHS:
            flat[key] = value
        else:
            out[key] = value
    for key, value in flat.items():
        if key in FLAT_PATHS:
            part = out.setdefault(FLAT_PATHS[key], {})
            if isinstance(part, dict):
                part[key] = value
        else:
            out[key] = value
    return out


def merge_values(*layers: dict[str, Any]) -> dict[str, Any]:
    """Merge settings given as (flat or nested) dicts, later ones winning setting by setting."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in nest(layer).items():
            if key in PARTS and isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = dict(merged[key], **value)
            else:
                merged[key] = value
    return merged


class AuditConfig(_Part):
    """Settings of one audit run: a tree of typed parts (see the module docstring).

    Attributes
    ----------
    model : str
        Built-in name, local checkpoint directory or hub id.
    corpus : str
        ``builtin``, a local ``.txt``/``.jsonl``/``.parquet`` file, or ``hf:NAME:CONFIG:SPLIT``-style hub name.
    seed : int
        Seed for every sampled quantity downstream (the paper's sampling seed, 42).
    preset : str or None
        The preset these settings came from, for the record.
    preset_overrides : dict
        The settings in which this run departs from its preset, ``{name: {"preset": value, "used": value}}``
        (:meth:`departing_from`), so that a run never claims a protocol it does not follow. Derived from the
        other settings, so not part of the fingerprint.
    observe, intervene, audit, prune, calibration, interactions, execution
        The parts; each setting may also be read flat (``config.max_len`` is ``config.observe.max_len``).

    Examples
    --------
    >>> config = AuditConfig(model="tiny-olmoe", max_len=64)        # flat, as on the command line
    >>> config.observe.max_len == config.max_len == 64
    True
    """

    model: str = "tiny-olmoe"
    corpus: str = "builtin"
    seed: int = 42
    preset: str | None = None
    preset_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    observe: ObserveConfig = Field(default_factory=ObserveConfig)
    intervene: InterveneSettings = Field(default_factory=InterveneSettings)
    audit: AuditPart = Field(default_factory=AuditPart)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    interactions: InteractionsConfig = Field(default_factory=InteractionsConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_settings(cls, values: Any) -> Any:
        return nest(values) if isinstance(values, dict) else values

    def __getattr__(self, name: str) -> Any:
        part = FLAT_PATHS.get(name)
        if part is not None:
            return getattr(getattr(self, part), name)
        return super().__getattr__(name)  # type: ignore[misc]

    def replace(self, **changes: Any) -> "AuditConfig":
        """A copy with some settings changed (flat or nested names), validated like any other."""
        return build_config(merge_values(self.model_dump(), changes))

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> "AuditConfig":
        """pydantic's copy, except that ``update`` takes flat or nested names and is validated.

        pydantic's own ``model_copy(update=...)`` neither validates nor knows the parts, so a flat
        name such as ``max_len`` would be set beside the tree instead of in ``observe``.
        """
        if not update:
            return super().model_copy(deep=deep)
        return self.replace(**dict(update))

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name (JSON-ready), e.g. for a report's provenance table."""
        dumped = self.model_dump(mode="json")
        out = {name: dumped[name] for name in ROOT_FIELDS}
        for part in PARTS:
            out.update(dumped[part])
        return out

    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings that decide the content of the run directory's tables, flat by name."""
        flat = self.flat()
        return {name: value for name, value in flat.items()
                if FLAT_PATHS.get(name) not in UNFINGERPRINTED and name != "preset_overrides"}

    def departing_from(self, base: "AuditConfig") -> "AuditConfig":
        """This configuration with ``preset_overrides`` updated for the settings that differ from ``base``.

        ``base`` is the preset's own configuration (or a stored one made from it, with its overrides so
        far). Every setting but the model, the preset itself and the execution settings (which never change
        a number) is compared; a setting changed back to the preset's value is no longer an override.
        Without a preset this configuration is returned unchanged.
        """
        if self.preset is None:
            return self
        ignored = {"model", "preset", "preset_overrides"} | set(EXECUTION_FIELDS)
        overrides = dict(base.preset_overrides)
        before, after = base.flat(), self.flat()
        for name, value in after.items():
            if name in ignored or value == before.get(name):
                continue
            preset_value = overrides.get(name, {}).get("preset", before.get(name))
            if value == preset_value:
                overrides.pop(name, None)
            else:
                overrides[name] = {"preset": preset_value, "used": value}
        return self.model_copy(update={"preset_overrides": dict(sorted(overrides.items()))})

    @classmethod
    def from_toml(cls, path: str | Path) -> "AuditConfig":
        return build_config(read_toml(path))

    @classmethod
    def from_manifest(cls, path: str | Path) -> "AuditConfig":
        """The configuration stored in a run's ``manifest.json`` (a damaged one: :func:`manifest_data`)."""
        data = manifest_data(path)
        try:
            return build_config(data["config"])
        except InvalidParameterError as err:
            raise RunDirectoryError(f"{path} holds a configuration this version cannot read ({err}); remove the run "
                                    "directory or pass --overwrite") from None


def manifest_data(path: str | Path) -> dict[str, Any]:
    """The JSON object of a run's manifest; one that is not JSON or holds no configuration is a one-line
    :class:`~moeaudit.errors.RunDirectoryError` naming the remedy."""
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError):
        raise RunDirectoryError(f"{path} is not valid JSON; remove the run directory or pass --overwrite") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise RunDirectoryError(f"{path} holds no run configuration; remove the run directory or pass --overwrite")
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    """The settings of a TOML file (tables per part, or the flat layout of earlier versions)."""
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidParameterError(f"no such config file: {path}; pass an existing TOML file") from None
    except IsADirectoryError:
        raise InvalidParameterError(f"{path} is a directory, not a config file; pass a TOML file") from None
    except PermissionError:
        raise InvalidParameterError(f"cannot read the config file {path} (permission denied)") from None
    except UnicodeDecodeError:
        raise InvalidParameterError(f"{path} is not UTF-8 text; a TOML config file must be (re-save it as UTF-8)"
                                    ) from None
    except tomllib.TOMLDecodeError as err:
        raise InvalidParameterError(f"{path} is not valid TOML: {err}") from None
    return nest(data)


def build_config(values: dict[str, Any]) -> AuditConfig:
    """Validate ``values`` (flat or nested) into an AuditConfig; the first problem becomes one house line."""
    if not isinstance(values, dict):
        raise InvalidParameterError(f"the configuration must be a table of settings; got {values!r}")
    flat_given = {key for key in values if key in FLAT_PATHS}
    try:
        return AuditConfig(**values)
    except ValidationError as err:
        raise config_error(err.errors()[0], flat_given) from None


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
    "dict_type": "a table",
    "model_type": "a table of settings",
    "missing": "given",
}
#: Fields whose type error reads better as a description than as "a list".
_DESCRIBED = {
    "layers": "a list of MoE layer indices such as [0, 4, 7]",
    "router_probs_layers": 'a list of MoE layer indices or "all"',
    "router_logits_layers": 'a list of MoE layer indices or "all"',
    "audit_metrics": 'a list of metric names such as ["reap", "frequency"]',
    "observe_splits": "a list of splits (train, calibration, heldout)",
    "criteria": 'a list of criteria such as ["reap", "random"]',
    "random_seeds": "a count >= 0 or a list of seeds",
    "budget_weights": "a table of layer -> weight",
    "directions": 'a table of criterion -> "low" or "high"',
}


def config_error(error: dict[str, Any], flat_given: set[str] = frozenset()) -> InvalidParameterError:
    """One pydantic error as the house message: parameter, allowed values, bad value, what to do.

    "`max_len` must be at least 2; got 1. Change it on the command line or in the config file."  A setting
    is named as the user spelled it: flat (``max_len``) when given flat, else with its part
    (``observe.max_len``).
    """
    loc = [part for part in error["loc"] if isinstance(part, str)]
    if loc and loc[0] in PARTS and len(loc) > 1:
        leaf = loc[1]
        name = leaf if leaf in flat_given else f"{loc[0]}.{leaf}"
    else:
        leaf = loc[0] if loc else "config"
        name = leaf
    kind = error["type"]
    if kind == "extra_forbidden":
        import difflib

        names = list(PARTS[loc[0]].model_fields) if loc and loc[0] in PARTS and len(loc) > 1 else \
            [*ROOT_FIELDS[:2], *FLAT_PATHS, *ROOT_FIELDS[2:]]
        close = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
        if close:
            return InvalidParameterError(f"unknown setting `{name}`; did you mean `{close[0]}`?")
        if loc and loc[0] in PARTS and len(loc) > 1:
            allowed = ", ".join(PARTS[loc[0]].model_fields)
            return InvalidParameterError(f"unknown setting `{name}`; allowed in [{loc[0]}]: {allowed}.")
        allowed = ", ".join(names)
        return InvalidParameterError(f"unknown setting `{name}`; allowed settings are: {allowed} (flat, or in "
                                     f"the tables {', '.join(f'[{p}]' for p in PARTS)}).")
    ctx = error.get("ctx") or {}
    if kind == "literal_error":
        allowed = "one of " + ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
    elif kind == "value_error":
        allowed = str(ctx.get("error", error["msg"]))
    else:
        allowed = _ALLOWED.get(kind, error["msg"].removeprefix("Input should be ").rstrip("."))
        allowed = allowed.format(**ctx) if ctx else allowed
    if any(isinstance(part, int) for part in error["loc"]) and kind != "value_error":
        allowed = f"a list whose items are each {allowed}"
    if kind in ("list_type", "string_type", "int_type", "int_parsing", "dict_type") and leaf in _DESCRIBED:
        allowed = _DESCRIBED[leaf]
    return InvalidParameterError(f"`{name}` must be {allowed}; got {error.get('input')!r}. Change it on the command "
                                 "line or in the config file.")
