"""The prune stage on a run directory: criteria vs random vs oracles, evaluated by masked pruning.

Reads ``expert_metrics`` (criteria), ``effects`` (the ΔNLL oracle), ``tokens`` (calibration windows for
the reconstruction oracle, held-out windows for evaluation); writes

``pruning.parquet``
    One row per (mode, criterion, ratio, seed, layer): ``criterion``, ``ratio``, ``seed`` (null for
    deterministic criteria), ``mode`` (``all_layers``: every MoE layer pruned at once, the row's ``layer``
    and ``kept`` / ``dropped`` describe one of its layers and the held-out values are the whole model's;
    ``single_layer``: only ``layer`` pruned), ``layer``, ``kept``, ``dropped`` (lists of expert ids),
    ``n_dropped``, ``num_experts``, ``heldout_nll``, ``heldout_ppl``, ``mean_kl`` (KL(unpruned ‖ pruned)
    per token), ``delta_nll`` (vs unpruned), ``unpruned_nll``, ``unpruned_ppl``, ``n_tokens``,
    ``random_percentile`` (share in % of the random draws of the same mode, ratio and layer with a lower
    held-out NLL, ties half; low = better than random; null for ``random`` rows), ``random_median_nll``,
    ``criterion_kind`` (``metric``, ``oracle``, ``random``), ``direction``, ``guard``, ``budget``,
    ``selection`` (``global``: each criterion's worst experts of the layer; ``group_balanced``: as many from each
    expert group of group-limited routing, the setting ``group_balanced``).
``jaccard.parquet``
    :func:`moeaudit.prune.jaccard.jaccard_table` for the all-layers dropped sets.
``pruning_domains.parquet``
    Per (mode, criterion, ratio, seed, layer, domain): ``n_tokens``, ``heldout_nll``, ``heldout_ppl``,
    ``mean_kl``, ``unpruned_nll`` (only when the corpus has domains; ``layer`` is null for all_layers).
``pruning_scores.parquet``
    The criterion scores per (layer, expert), oracles included.

The stage is :func:`run_prune`, a sequence of named steps; the work units and rows are in
:mod:`moeaudit.prune.units`, the summaries of these tables in :mod:`moeaudit.prune.summary`. Its settings
are the run's ``prune`` part (:class:`moeaudit.config.PruneConfig`), which keyword arguments override; the
settings in effect are recorded in the manifest under ``stages.prune.config``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from moeaudit.config import AuditConfig
from moeaudit.errors import RunDirectoryError, invalid
from moeaudit.options import RANDOM
from moeaudit.prune.criteria import (
    ORACLE_DELTA_NLL,
    ORACLE_RECONSTRUCTION,
    ORACLES,
    check_group_budget,
    check_ratios,
    criterion_scores,
    direction_of,
    dropped_experts,
    kept_from_dropped,
    layer_budgets,
    metric_criteria,
    oracle_delta_nll,
    prunable_experts,
    reconstruction_errors,
    resolve_criteria,
)
from moeaudit.prune.jaccard import jaccard_table
from moeaudit.prune.summary import (  # noqa: F401 (importable from here, as before the split)
    ALL_LAYERS,
    SINGLE_LAYER,
    PruningSummary,
    kept_from_table,
    pruning_summary,
)
from moeaudit.prune.units import (  # noqa: F401 (CONFIGS_PER_UNIT and prune_eval_unit: as before the split)
    CONFIGS_PER_UNIT,
    configurations_of,
    domain_rows,
    dropped_sets,
    evaluate_in_units,
    prune_eval_unit,
    pruning_rows,
    split_windows,
)
from moeaudit.rundir import RunDir
from moeaudit.tables import PRUNING_COLUMNS  # noqa: F401 (importable from here, as before the split)

logger = logging.getLogger(__name__)

#: Random draws per ratio by default: enough for a 5–95 % band (a 20-draw band is its 2nd and 19th value).
DEFAULT_RANDOM_SEEDS = 20
#: The windows of one split (the name tests and older callers import).
_windows = split_windows


def prune_settings(config: AuditConfig, **given: Any) -> dict[str, Any]:
    """The prune settings in effect: the run's ``prune`` part, each setting given here (not None) overriding it.

    Parameters
    ----------
    config : AuditConfig
        The run's configuration; its ``prune`` part gives the defaults.
    **given
        Settings of :class:`moeaudit.config.PruneConfig` by name (``ratios``, ``criteria``, ...); None = not given.

    Returns
    -------
    dict
        Every prune setting by name (validated by the stage as it uses them).
    """
    settings = config.prune.model_dump()
    settings.update({name: value for name, value in given.items() if value is not None})
    return settings


def _seeds(random_seeds: int | Sequence[int], base: int) -> list[int]:
    if isinstance(random_seeds, (int, np.integer)) and not isinstance(random_seeds, bool):
        if random_seeds < 0:
            raise invalid("random_seeds", "a non-negative number of draws or a list of seeds", random_seeds)
        return [int(base) + i for i in range(int(random_seeds))]
    try:
        seeds = [int(s) for s in random_seeds]
    except (TypeError, ValueError):
        raise invalid("random_seeds", "a non-negative number of draws or a list of integer seeds",
                      random_seeds) from None
    return list(dict.fromkeys(seeds))


def _read_inputs(run: RunDir, settings: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, list[int], list[int]]:
    """``expert_metrics`` and ``tokens``, the layers pruned and the random seeds; checks the settings that need
    no model and that held-out windows exist."""
    metrics = run.read("expert_metrics")
    tokens = run.read("tokens")
    if not isinstance(settings["single_layer"], bool):
        raise invalid("single_layer", "True or False", settings["single_layer"])
    seeds = _seeds(settings["random_seeds"], run.config.seed)
    if "split" not in tokens or not (tokens["split"] == "heldout").any():
        raise RunDirectoryError(f"tokens.parquet in {run.path} has no heldout windows; run observe with "
                                "observe_splits including 'heldout' (pruning is evaluated on held-out text)")
    layers = sorted(int(l) for l in metrics["layer"].unique())
    return metrics, tokens, layers, seeds


def _plan_budgets(ratios, num_experts, top_k, metrics, guard, budget_weights, name, identity):
    """The checked ratios, the protected experts (the guard and the identity experts), and per ratio the
    (all-layers, single-layer) drop counts of the experts with weights; validates everything."""
    real, guarded, protected = prunable_experts(metrics, num_experts, identity, guard)
    ratios = check_ratios(ratios, real, top_k, name)
    plan = {}
    for ratio in ratios:
        budgets = layer_budgets(ratio, real, top_k, weights=budget_weights, protected=guarded, context=name)
        uniform = budgets if budget_weights is None else layer_budgets(ratio, real, top_k,
                                                                         protected=guarded, context=name)
        plan[ratio] = (budgets, uniform)
    return ratios, protected, plan


def _identity_experts(run: RunDir, moe, layers: list[int]) -> dict[int, int]:
    """Identity experts per layer: the model's (:meth:`~moeaudit.models.FamilyAdapter.identity_experts`), else
    the manifest's record of them."""
    if moe is not None:
        return {l: moe.adapter.identity_experts(moe.layer(l)) for l in layers}
    recorded = (run.manifest.get("model") or {}).get("identity_experts") or {}
    return {l: int(recorded.get(str(l), 0)) for l in layers}


def _expert_groups(run: RunDir, moe, layers: list[int]) -> dict[int, int] | None:
    """Expert groups of group-limited routing per layer (``n_group``, 1 where a layer does not group): the
    model's (:meth:`moeaudit.models.FamilyAdapter.expert_groups`), else the manifest's record of them (None when
    the run predates that record)."""
    if moe is not None:
        return {l: moe.adapter.expert_groups(moe.layer(l)) for l in layers}
    recorded = (run.manifest.get("model") or {}).get("expert_groups")
    if not recorded or not all(str(l) in recorded for l in layers):
        return None
    return {l: int(recorded[str(l)]) for l in layers}


def _balanced_groups(groups: Mapping[int, int], budget_sets: Sequence[Mapping[int, int]],
                     num_experts: Mapping[int, int], protected: Mapping[int, list[int]], name: str) -> dict[int, int]:
    """``groups`` for the group-balanced selection, once every budget in ``budget_sets`` splits evenly over its
    layer's groups with the guard respected (:func:`moeaudit.prune.criteria.check_group_budget`); refused in
    one line for a model whose routing has no groups."""
    if all(n <= 1 for n in groups.values()):
        raise invalid("group_balanced", f"used with group-limited routing (n_group > 1); {name} routes without "
                      "expert groups, so the plain selection already exports exactly", True)
    for budgets in budget_sets:
        for layer, count in budgets.items():
            if groups[layer] > 1:
                check_group_budget(count, groups[layer], num_experts[layer], protected.get(layer, ()), layer)
    return dict(groups)


def _plan_sets(budget_plan, settings: dict[str, Any]) -> list[Mapping[int, int]]:
    """The budgets the stage draws selections for: all-layers, and single-layer ones when that mode is on."""
    return [b for budgets, uniform in budget_plan.values()
            for b in ((budgets, uniform) if settings["single_layer"] else (budgets,))]


def _load_and_plan(run: RunDir, moe, layers: list[int], metrics: pd.DataFrame, settings: dict[str, Any]):
    """The model (loaded only after the ratios, guard, budgets and a group-balanced selection's groups passed a
    check against the manifest's record of the model, when it has one), its sizes per layer, the checked
    ratios, protected experts, budgets, and the expert groups of a group-balanced selection (else None)."""
    from moeaudit.models.loading import model_from_config

    config = run.config
    num_experts, top_k = run.model_sizes()
    balanced = settings["group_balanced"]
    if not isinstance(balanced, bool):
        raise invalid("group_balanced", "True or False", balanced)
    if moe is None and all(l in num_experts and l in top_k for l in layers):
        # validate against the manifest before loading a large model
        _, protected, plan = _plan_budgets(settings["ratios"], num_experts, top_k, metrics, settings["guard"],
                                           settings["budget_weights"], config.model,
                                           _identity_experts(run, None, layers))
        recorded = _expert_groups(run, None, layers)
        if balanced and recorded is not None:
            _balanced_groups(recorded, _plan_sets(plan, settings), num_experts, protected, config.model)
    moe = moe or model_from_config(config)
    for layer in layers:
        moe.layer(layer)
    num_experts = {l: moe.layer(l).num_experts for l in layers}
    top_k = {l: moe.layer(l).top_k for l in layers}
    ratios, protected, budget_plan = _plan_budgets(settings["ratios"], num_experts, top_k, metrics, settings["guard"],
                                                   settings["budget_weights"], moe.name,
                                                   _identity_experts(run, moe, layers))
    groups = (_balanced_groups(_expert_groups(run, moe, layers), _plan_sets(budget_plan, settings), num_experts,
                               protected, moe.name) if balanced else None)
    return moe, num_experts, top_k, ratios, protected, budget_plan, groups


def _choose_criteria(run: RunDir, metrics: pd.DataFrame, tokens: pd.DataFrame, seeds: list[int],
                     settings: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The criteria to compare (requested, or all available) and why the missing ones are skipped."""
    available = metric_criteria(metrics)
    skipped: dict[str, str] = {}
    if run.has("effects"):
        available.append(ORACLE_DELTA_NLL)
    else:
        skipped[ORACLE_DELTA_NLL] = "no effects.parquet (run `moeaudit intervene`)"
    if (tokens["split"] == "calibration").any():
        available.append(ORACLE_RECONSTRUCTION)
    else:
        skipped[ORACLE_RECONSTRUCTION] = "no calibration windows in tokens.parquet"
    if seeds:
        available.append(RANDOM)
    else:
        skipped[RANDOM] = "random_seeds is 0"
    chosen = resolve_criteria(settings["criteria"], available)
    for criterion in chosen:
        if criterion != RANDOM:
            direction_of(criterion, settings["directions"])
    return chosen, skipped


class _Progress:
    """Progress over the stage's two phases: the reconstruction oracle's passes, then the evaluation."""

    def __init__(self, on_batch: Callable[[int, int], None] | None, oracle_steps: int):
        self.on_batch, self.oracle_steps, self.done_before = on_batch, oracle_steps, 0

    def phase(self, total_eval: int) -> Callable[[int, int], None] | None:
        if self.on_batch is None:
            return None

        def callback(done: int, total: int) -> None:
            self.on_batch(self.done_before + done, self.oracle_steps + total_eval)
        return callback


def _oracle_scores(run: RunDir, moe, chosen: list[str], skipped: dict[str, str], requested, num_experts,
                   calibration, layers: list[int], batch_size: int, progress) -> tuple[list, dict[str, Any]]:
    """The oracles' scores per (layer, expert) and what they were computed from; drops (or, when requested,
    refuses) the ΔNLL oracle when ``effects`` does not cover every layer."""
    extra, info = [], {}
    if ORACLE_DELTA_NLL in chosen:
        import pyarrow.parquet as pq

        wanted = ("layer", "seq", "pos", "expert", "kind", "scope", "delta_nll", "estimate", "shared", "j",
                  "selection")
        present = set(pq.read_schema(run.table_path("effects")).names)
        effects = run.read("effects", columns=[c for c in wanted if c in present])
        scores, oracle_info = oracle_delta_nll(effects, num_experts)
        del effects
        uncovered = [l for l, n in oracle_info["positions"].items() if n == 0]
        if uncovered:
            chosen.remove(ORACLE_DELTA_NLL)
            skipped[ORACLE_DELTA_NLL] = f"effects.parquet has no rows for layers {uncovered}"
            if requested is not None:
                raise RunDirectoryError(f"effects.parquet has no {oracle_info['kind']}/{oracle_info['scope']} rows "
                                        f"for layers {uncovered}; run `moeaudit intervene` on them or drop "
                                        f"{ORACLE_DELTA_NLL} from the criteria")
        else:
            extra.append(scores)
            info["oracle_delta_nll"] = {k: v for k, v in oracle_info.items() if k != "positions"}
    if ORACLE_RECONSTRUCTION in chosen:
        cal_ids, cal_mask, _ = calibration
        extra.append(reconstruction_errors(moe, cal_ids, cal_mask, layers=layers, batch_size=batch_size,
                                           on_batch=progress))
        info["oracle_reconstruction"] = {"windows": int(cal_ids.shape[0]), "tokens": int(cal_mask.sum())}
    return extra, info


def _settings_record(settings: dict[str, Any], ratios: list[float], seeds: list[int]) -> dict[str, Any]:
    """The prune settings in effect as the config tree spells them (JSON-ready), for the manifest."""
    random_seeds = settings["random_seeds"]
    weights, directions = settings["budget_weights"], settings["directions"]
    return dict(
        ratios=[float(r) for r in ratios],
        criteria=None if settings["criteria"] is None else list(settings["criteria"]),
        random_seeds=int(random_seeds) if isinstance(random_seeds, (int, np.integer)) else list(seeds),
        single_layer=settings["single_layer"],
        guard=int(settings["guard"]),
        budget_weights=None if weights is None else {str(k): float(v) for k, v in weights.items()},
        directions=None if directions is None else dict(directions),
        group_balanced=bool(settings["group_balanced"]),
    )


def run_prune(
    run: RunDir,
    *,
    moe=None,
    ratios: Sequence[float] | None = None,
    criteria: Sequence[str] | None = None,
    random_seeds: int | Sequence[int] | None = None,
    single_layer: bool | None = None,
    guard: int | None = None,
    budget_weights: Mapping[int, float] | None = None,
    directions: Mapping[str, str] | None = None,
    group_balanced: bool | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    executor=None,
) -> dict[str, Any]:
    """Prune by every criterion at every ratio, evaluate on the held-out windows, write the tables.

    The settings come from the run's ``prune`` part (``run.config.prune``, e.g. a ``[prune]`` table of the
    TOML file); each keyword argument given (not None) overrides its setting. The settings in effect are
    recorded in the manifest (``run.stage("prune")["config"]``). The evaluations run as resumable work units
    of :data:`CONFIGS_PER_UNIT` distinct pruned configurations each (``pruning_evals.parquet`` holds their
    results); a re-run with the same settings skips the finished ones.

    Parameters
    ----------
    run : RunDir
        Needs ``tokens`` (with a ``heldout`` split) and ``expert_metrics`` (its layers are the layers
        pruned); ``effects`` enables the ΔNLL oracle, a ``calibration`` split the reconstruction oracle.
    moe : MoEModel, optional
        The loaded model (default: loaded from the run's config).
    ratios : sequence of float, optional
        Shares of routed experts dropped per layer, each in (0, 1) and leaving at least top-k experts
        (default from the config: 0.125, 0.25, 0.5).
    criteria : sequence of str, optional
        Metric columns of ``expert_metrics``, ``oracle_delta_nll``, ``oracle_reconstruction`` and
        ``random``; None = the config's, by default all available (oracles skipped, with the reason
        recorded, when their input is missing).
    random_seeds : int or sequence of int, optional
        Random draws per ratio: a count (seeds ``config.seed``, ``config.seed + 1``, …) or explicit seeds
        (default from the config: 10).
    single_layer : bool, optional
        Also prune each layer alone (same dropped sets), to see where criteria matter (default: the
        run's ``prune.single_layer``, off).
    guard : int, optional
        Super-expert guard: the ``guard`` experts with the largest ``max_act`` per layer are never dropped
        (by any criterion, random included; default 0).
    budget_weights : mapping layer -> float, optional
        Non-uniform budgets for the all-layers mode (:func:`moeaudit.prune.criteria.layer_budgets`);
        single-layer mode always drops ``round(ratio * E)`` experts.
    directions : mapping criterion -> {"low", "high"}, optional
        Override which end of a criterion is pruned first (:data:`moeaudit.prune.criteria.DIRECTIONS`).
    group_balanced : bool, optional
        For group-limited routing (DeepSeek-V3 / R1 / V3.2, Mistral 4, Kimi-K2: ``n_group`` > 1): every
        criterion, random included, drops as many experts from each expert group, each group's first by the
        criterion (:func:`moeaudit.prune.criteria.dropped_experts`' ``groups``), so each evaluated
        configuration is one that :func:`moeaudit.prune.export_pruned` can write and the exported checkpoint
        scores exactly as evaluated here. Every ratio must drop a multiple of ``n_group`` per layer (checked
        before the model loads when the manifest records the groups). Default: the run's
        ``prune.group_balanced``, off (each criterion's worst experts of the whole layer).
    on_batch : callable(done, total), optional
        Progress over all forward passes of the stage.
    executor : optional
        Runs the evaluation units (default: from the config, on ``moe`` when local).

    Returns
    -------
    dict
        The counters recorded in the manifest under ``prune``.

    Examples
    --------
    >>> info = run_prune(RunDir("runs/olmoe"), ratios=[0.25], random_seeds=10)  # doctest: +SKIP
    >>> info["config"]["ratios"], info["criteria"]  # doctest: +SKIP
    ([0.25], ['frequency', ..., 'random'])
    """
    from moeaudit.prune.evaluate import _canonical

    started = time.perf_counter()
    settings = prune_settings(run.config, ratios=ratios, criteria=criteria, random_seeds=random_seeds,
                              single_layer=single_layer, guard=guard, budget_weights=budget_weights,
                              directions=directions, group_balanced=group_balanced)
    metrics, tokens, layers, seeds = _read_inputs(run, settings)
    moe, num_experts, top_k, ratios, protected, budget_plan, groups = _load_and_plan(run, moe, layers, metrics,
                                                                                     settings)
    chosen, skipped = _choose_criteria(run, metrics, tokens, seeds, settings)
    directions, weighted = settings["directions"], settings["budget_weights"] is not None

    pad_id = getattr(moe.config, "pad_token_id", None) or 0
    held = split_windows(tokens, "heldout", pad_id)
    calibration = split_windows(tokens, "calibration", pad_id) if ORACLE_RECONSTRUCTION in chosen else None
    batch_size = int(run.config.batch_size)
    held_batches = -(-held[0].shape[0] // batch_size)
    progress = _Progress(on_batch, (-(-calibration[0].shape[0] // batch_size) * len(layers)) if calibration else 0)
    n_draws = len(seeds) if RANDOM in chosen else 0
    upper_eval = held_batches * (1 + len(ratios) * (len(chosen) - (RANDOM in chosen) + n_draws)
                                 * (1 + (len(layers) if settings["single_layer"] else 0)))

    t_oracles = time.perf_counter()
    extra, info = _oracle_scores(run, moe, chosen, skipped, settings["criteria"], num_experts, calibration, layers,
                                 batch_size, progress.phase(upper_eval))
    progress.done_before = progress.oracle_steps
    seconds_oracles = time.perf_counter() - t_oracles
    scores = criterion_scores(metrics, extra=extra)
    deterministic = [c for c in chosen if c != RANDOM]
    draws = seeds if RANDOM in chosen else []

    dropped, single = dropped_sets(scores, deterministic, draws, budget_plan, num_experts=num_experts,
                                   protected=protected, directions=directions, weighted=weighted, groups=groups,
                                   single_layer=settings["single_layer"])
    configurations = configurations_of(dropped, single, num_experts, layers, settings["single_layer"])
    distinct = len({_canonical(moe, kept) for kept in configurations.values()})

    input_ids, attention_mask, domains = held
    if bool(attention_mask.all()):
        attention_mask = None
    t_eval = time.perf_counter()
    total_eval = held_batches * (1 + distinct)
    results, clean = evaluate_in_units(run, moe, configurations, input_ids, attention_mask, domains, batch_size,
                                       executor, progress.phase(total_eval))
    seconds_eval = time.perf_counter() - t_eval

    budget = "weighted" if weighted else "uniform"
    selection = "group_balanced" if groups is not None else "global"
    run.write_frame("pruning", pruning_rows(configurations, results, clean, dropped, single, num_experts,
                                            directions, settings["guard"], budget, selection))
    run.write_frame("jaccard", jaccard_table(dropped, num_experts, groups))
    run.write_frame("pruning_scores", scores)
    if domains is not None:
        run.write_frame("pruning_domains", domain_rows(configurations, results, clean))
    info.update(
        criteria=deterministic + ([RANDOM] if draws else []),
        skipped_criteria=skipped,
        ratios=list(ratios),
        random_seeds=len(draws),
        single_layer=settings["single_layer"],
        guard=int(settings["guard"]),
        selection=selection,
        expert_groups=None if groups is None else {str(l): n for l, n in groups.items()},
        protected={str(l): v for l, v in protected.items()},
        budget="uniform" if not weighted else {str(k): float(v) for k, v in settings["budget_weights"].items()},
        config=_settings_record(settings, ratios, seeds),
        layers=layers,
        configurations=len(configurations),
        distinct_configurations=distinct,
        forward_passes=total_eval,
        heldout_windows=int(input_ids.shape[0]),
        heldout_tokens=int(clean.n_tokens),
        unpruned_nll=clean.heldout_nll,
        unpruned_ppl=clean.heldout_ppl,
        seconds_oracles=round(seconds_oracles, 3),
        seconds_eval=round(seconds_eval, 3),
        seconds=round(time.perf_counter() - started, 3),
    )
    run.record_stage("prune", info)
    logger.info("pruned %d configurations (%d distinct) of %s in %.1f s; skipped criteria: %s", len(configurations),
                distinct, moe.name, info["seconds"], skipped or "none")
    return info


# ============================================================================ one pruning, for export
def select_kept(run: RunDir, criterion: str, ratio: float, *, moe=None, seed: int | None = None, guard: int = 0,
                directions: Mapping[str, str] | None = None, group_balanced: bool = False) -> dict[int, list[int]]:
    """The experts ``criterion`` keeps at ``ratio`` in every layer of ``run`` (uniform), without evaluating.

    For ``moeaudit prune RUN --export DIR --criterion reap --ratio 0.25``: validates the ratio (one line
    naming the allowed range) before anything is computed; oracle criteria need ``pruning_scores.parquet``
    (written by :func:`run_prune`), metric criteria only ``expert_metrics.parquet``; ``random`` needs
    ``seed``. The result feeds :func:`moeaudit.prune.export_pruned`.

    Parameters
    ----------
    run : RunDir
    criterion : str
    ratio : float
    moe : MoEModel, optional
        Gives each layer's expert count and top-k (default: read from the run's manifest).
    seed : int, optional
    guard : int
        Super-expert guard (:func:`moeaudit.prune.criteria.super_experts`).
    directions : mapping, optional
    group_balanced : bool
        Drop as many experts from each expert group of group-limited routing (DeepSeek-V3 / R1 / V3.2,
        Mistral 4: ``n_group`` > 1), each group's first by the criterion (:func:`dropped_experts`' ``groups``),
        so that the pruned checkpoint routes exactly as the masked model; the groups come from ``moe``, else
        from the manifest's record of the model. The prune stage evaluates the same selection when run with
        ``group_balanced=True``.
    """
    metrics = run.read("expert_metrics")
    layers = sorted(int(l) for l in metrics["layer"].unique())
    groups = _expert_groups(run, moe, layers) if group_balanced else None
    if group_balanced and groups is None:
        raise invalid("moe", "the loaded model, for a group-balanced selection (its routing's expert groups; the "
                      "run's manifest does not record them)", moe)
    if moe is not None:
        num_experts = {l: moe.layer(l).num_experts for l in layers}
        top_k = {l: moe.layer(l).top_k for l in layers}
        name = moe.name
    else:
        num_experts, top_k = run.model_sizes()
        if not all(l in num_experts and l in top_k for l in layers):
            raise RunDirectoryError(f"the manifest of {run.path} does not record expert counts; pass moe=")
        num_experts = {l: num_experts[l] for l in layers}
        top_k = {l: top_k[l] for l in layers}
        name = run.manifest.get("model", {}).get("name", "")
    real, guarded, protected = prunable_experts(metrics, num_experts, _identity_experts(run, moe, layers), guard)
    check_ratios([ratio], real, top_k, name)
    scores = run.read("pruning_scores") if run.has("pruning_scores") else criterion_scores(metrics)
    if criterion in ORACLES and criterion not in scores:
        raise RunDirectoryError(f"{criterion} scores are computed by the prune stage; run `moeaudit prune` on "
                                f"{run.path} first")
    budgets = layer_budgets(float(ratio), real, top_k, protected=guarded, context=name)
    if criterion == RANDOM and seed is None:
        raise invalid("seed", "an integer for the random criterion", seed)
    if groups is not None:
        groups = _balanced_groups(groups, [budgets], num_experts, protected, name)
    dropped = dropped_experts(scores, criterion, budgets, directions=directions, protected=protected, seed=seed,
                              num_experts=num_experts, groups=groups)
    return kept_from_dropped(dropped, num_experts)
