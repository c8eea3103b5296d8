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
    ``criterion_kind`` (``metric``, ``oracle``, ``random``), ``direction``, ``guard``, ``budget``.
``jaccard.parquet``
    :func:`moeaudit.prune.jaccard.jaccard_table` for the all-layers dropped sets.
``pruning_domains.parquet``
    Per (mode, criterion, ratio, seed, layer, domain): ``n_tokens``, ``heldout_nll``, ``heldout_ppl``,
    ``mean_kl``, ``unpruned_nll`` (only when the corpus has domains; ``layer`` is null for all_layers).
``pruning_scores.parquet``
    The criterion scores per (layer, expert), oracles included.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from moeaudit.errors import InvalidParameterError, RunDirectoryError, invalid
from moeaudit.prune.criteria import (
    DEFAULT_RATIOS,
    ORACLE_DELTA_NLL,
    ORACLE_RECONSTRUCTION,
    ORACLES,
    RANDOM,
    check_ratios,
    criterion_scores,
    direction_of,
    dropped_experts,
    kept_from_dropped,
    layer_budgets,
    metric_criteria,
    oracle_delta_nll,
    reconstruction_errors,
    resolve_criteria,
    super_experts,
)
from moeaudit.prune.jaccard import jaccard_table, layer_jaccard_summary
from moeaudit.rundir import RunDir

logger = logging.getLogger(__name__)

ALL_LAYERS, SINGLE_LAYER = "all_layers", "single_layer"
#: Random draws per ratio by default: enough for a 5–95 % band (a 20-draw band is its 2nd and 19th value).
DEFAULT_RANDOM_SEEDS = 20

PRUNING_COLUMNS: tuple[str, ...] = (
    "criterion", "ratio", "seed", "mode", "layer", "kept", "dropped", "n_dropped", "num_experts",
    "heldout_nll", "heldout_ppl", "mean_kl", "delta_nll", "unpruned_nll", "unpruned_ppl", "n_tokens",
    "random_percentile", "random_median_nll", "criterion_kind", "direction", "guard", "budget",
)


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


def _windows(tokens: pd.DataFrame, split: str, pad_id: int):
    from moeaudit.intervene.stage import windows_from_tokens

    chosen = tokens[tokens["split"] == split]
    if chosen.empty:
        return None
    seqs, input_ids, attention_mask = windows_from_tokens(chosen, pad_id)
    domains = None
    if "domain" in chosen and chosen["domain"].notna().any():
        domains = np.full(tuple(input_ids.shape), None, dtype=object)
        row_of = {int(s): i for i, s in enumerate(seqs)}
        rows = chosen["seq"].map(row_of).to_numpy()
        domains[rows, chosen["pos"].to_numpy()] = chosen["domain"].astype(object).where(chosen["domain"].notna(),
                                                                                          None).to_numpy()
    return input_ids, attention_mask, domains


def _plan_budgets(ratios, num_experts, top_k, metrics, guard, budget_weights, name):
    """Protected experts, and per ratio the (all-layers, single-layer) drop counts; validates everything."""
    protected = super_experts(metrics, guard)
    plan = {}
    for ratio in ratios:
        budgets = layer_budgets(ratio, num_experts, top_k, weights=budget_weights, protected=protected, context=name)
        uniform = budgets if budget_weights is None else layer_budgets(ratio, num_experts, top_k,
                                                                         protected=protected, context=name)
        plan[ratio] = (budgets, uniform)
    return protected, plan


def _percentile(value: float, draws: np.ndarray) -> float:
    if not len(draws) or not np.isfinite(value):
        return float("nan")
    return float(100.0 * (np.sum(draws < value) + 0.5 * np.sum(draws == value)) / len(draws))


def run_prune(
    run: RunDir,
    *,
    moe=None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    criteria: Sequence[str] | None = None,
    random_seeds: int | Sequence[int] = DEFAULT_RANDOM_SEEDS,
    single_layer: bool = True,
    guard: int = 0,
    budget_weights: Mapping[int, float] | None = None,
    directions: Mapping[str, str] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    executor=None,
) -> dict[str, Any]:
    """Prune by every criterion at every ratio, evaluate on the held-out windows, write the tables.

    The evaluations run as resumable work units of :data:`CONFIGS_PER_UNIT` distinct pruned
    configurations each (``pruning_evals.parquet`` holds their results); a re-run with the same
    arguments skips the finished ones.

    Parameters
    ----------
    run : RunDir
        Needs ``tokens`` (with a ``heldout`` split) and ``expert_metrics`` (its layers are the layers
        pruned); ``effects`` enables the ΔNLL oracle, a ``calibration`` split the reconstruction oracle.
    moe : MoEModel, optional
        The loaded model (default: loaded from the run's config).
    ratios : sequence of float
        Shares of routed experts dropped per layer, each in (0, 1) and leaving at least top-k experts
        (default 0.125, 0.25, 0.5).
    criteria : sequence of str, optional
        Metric columns of ``expert_metrics``, ``oracle_delta_nll``, ``oracle_reconstruction`` and
        ``random``; None = all available (oracles skipped, with the reason recorded, when their input is
        missing).
    random_seeds : int or sequence of int
        Random draws per ratio: a count (seeds ``config.seed``, ``config.seed + 1``, …) or explicit seeds.
    single_layer : bool
        Also prune each layer alone (same dropped sets), to see where criteria matter.
    guard : int
        Super-expert guard: the ``guard`` experts with the largest ``max_act`` per layer are never dropped
        (by any criterion, random included).
    budget_weights : mapping layer -> float, optional
        Non-uniform budgets for the all-layers mode (:func:`moeaudit.prune.criteria.layer_budgets`);
        single-layer mode always drops ``round(ratio * E)`` experts.
    directions : mapping criterion -> {"low", "high"}, optional
        Override which end of a criterion is pruned first (:data:`moeaudit.prune.criteria.DIRECTIONS`).
    on_batch : callable(done, total), optional
        Progress over all forward passes of the stage.
    executor : optional
        Runs the evaluation units (default: from the config, on ``moe`` when local).

    Returns
    -------
    dict
        The counters recorded in the manifest under ``prune``.
    """
    from moeaudit.models.loading import model_from_config
    from moeaudit.prune.evaluate import _canonical

    started = time.perf_counter()
    config = run.config
    metrics = run.read("expert_metrics")
    tokens = run.read("tokens")
    if not isinstance(single_layer, bool):
        raise invalid("single_layer", "True or False", single_layer)
    seeds = _seeds(random_seeds, config.seed)
    if "split" not in tokens or not (tokens["split"] == "heldout").any():
        raise RunDirectoryError(f"tokens.parquet in {run.path} has no heldout windows; run observe with "
                                "observe_splits including 'heldout' (pruning is evaluated on held-out text)")
    layers = sorted(int(l) for l in metrics["layer"].unique())
    num_experts, top_k = run.model_sizes()
    if moe is None and all(l in num_experts and l in top_k for l in layers):
        # validate against the manifest before loading a large model
        _plan_budgets(check_ratios(ratios, num_experts, top_k, config.model), num_experts, top_k, metrics, guard,
                      budget_weights, config.model)
    moe = moe or model_from_config(config)
    for layer in layers:
        moe.layer(layer)
    num_experts = {l: moe.layer(l).num_experts for l in layers}
    top_k = {l: moe.layer(l).top_k for l in layers}
    ratios = check_ratios(ratios, num_experts, top_k, moe.name)
    protected, budget_plan = _plan_budgets(ratios, num_experts, top_k, metrics, guard, budget_weights, moe.name)

    # ---------------------------------------------------------------- which criteria
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
    requested = criteria
    chosen = resolve_criteria(requested, available)
    for criterion in chosen:
        if criterion != RANDOM:
            direction_of(criterion, directions)
    info: dict[str, Any] = {}
    extra = []
    pad_id = getattr(moe.config, "pad_token_id", None) or 0
    held = _windows(tokens, "heldout", pad_id)
    calibration = _windows(tokens, "calibration", pad_id) if ORACLE_RECONSTRUCTION in chosen else None

    # ---------------------------------------------------------------- progress over both phases
    done_before = [0]
    batch_size = int(config.batch_size)
    recon_steps = (-(-calibration[0].shape[0] // batch_size) * len(layers)) if calibration else 0

    held_batches = -(-held[0].shape[0] // batch_size)
    n_draws = len(seeds) if RANDOM in chosen else 0
    upper_eval = held_batches * (1 + len(ratios) * (len(chosen) - (RANDOM in chosen) + n_draws)
                                 * (1 + (len(layers) if single_layer else 0)))

    def progress(total_eval: int):
        def callback(done: int, total: int) -> None:
            if on_batch is not None:
                on_batch(done_before[0] + done, recon_steps + total_eval)
        return callback

    # ---------------------------------------------------------------- oracles
    t_oracles = time.perf_counter()
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
                                           on_batch=progress(upper_eval) if on_batch else None))
        info["oracle_reconstruction"] = {"windows": int(cal_ids.shape[0]), "tokens": int(cal_mask.sum())}
    done_before[0] = recon_steps
    seconds_oracles = time.perf_counter() - t_oracles
    scores = criterion_scores(metrics, extra=extra)
    deterministic = [c for c in chosen if c != RANDOM]
    draws = seeds if RANDOM in chosen else []

    # ---------------------------------------------------------------- dropped sets
    dropped: dict[tuple[str, float, int | None], dict[int, list[int]]] = {}
    single: dict[tuple[str, float, int | None], dict[int, list[int]]] = {}
    for ratio in ratios:
        budgets, uniform = budget_plan[ratio]
        for criterion in deterministic:
            dropped[(criterion, ratio, None)] = dropped_experts(scores, criterion, budgets, directions=directions,
                                                                protected=protected)
            single[(criterion, ratio, None)] = (dropped[(criterion, ratio, None)] if budget_weights is None else
                                                dropped_experts(scores, criterion, uniform, directions=directions,
                                                                protected=protected))
        for seed in draws:
            dropped[(RANDOM, ratio, seed)] = dropped_experts(scores, RANDOM, budgets, seed=seed, protected=protected,
                                                             num_experts=num_experts)
            single[(RANDOM, ratio, seed)] = (dropped[(RANDOM, ratio, seed)] if budget_weights is None else
                                             dropped_experts(scores, RANDOM, uniform, seed=seed, protected=protected,
                                                             num_experts=num_experts))

    configurations: dict[tuple, dict[int, list[int]]] = {}
    for key, sets in dropped.items():
        configurations[(ALL_LAYERS, *key, -1)] = kept_from_dropped(sets, num_experts)
    if single_layer:
        for key, sets in single.items():
            for layer in layers:
                configurations[(SINGLE_LAYER, *key, layer)] = kept_from_dropped({layer: sets[layer]}, num_experts)
    distinct = len({_canonical(moe, kept) for kept in configurations.values()})

    # ---------------------------------------------------------------- evaluation
    input_ids, attention_mask, domains = held
    if bool(attention_mask.all()):
        attention_mask = None
    t_eval = time.perf_counter()
    total_eval = held_batches * (1 + distinct)
    results, clean = _evaluate_in_units(run, moe, configurations, input_ids, attention_mask, domains,
                                        batch_size, executor, progress(total_eval) if on_batch else None)
    seconds_eval = time.perf_counter() - t_eval

    # ---------------------------------------------------------------- tables
    table = _pruning_rows(configurations, results, clean, dropped, single, num_experts, directions,
                          guard, "uniform" if budget_weights is None else "weighted")
    jaccard = jaccard_table(dropped, num_experts)
    run.write_frame("pruning", table)
    run.write_frame("jaccard", jaccard)
    run.write_frame("pruning_scores", scores)
    if domains is not None:
        run.write_frame("pruning_domains", _domain_rows(configurations, results, clean))
    info.update(
        criteria=deterministic + ([RANDOM] if draws else []),
        skipped_criteria=skipped,
        ratios=list(ratios),
        random_seeds=len(draws),
        single_layer=single_layer,
        guard=int(guard),
        protected={str(l): v for l, v in protected.items()},
        budget="uniform" if budget_weights is None else {str(k): float(v) for k, v in budget_weights.items()},
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


#: Distinct pruned configurations per work unit: each unit also runs the unpruned model once per batch
#: (for the KL), so larger units waste less; smaller ones lose less to an interruption.
CONFIGS_PER_UNIT = 16
EVALS_SCHEMA_FIELDS = (("config", "int32"), ("domain", "string"), ("n_tokens", "int64"), ("heldout_nll", "float64"),
                       ("heldout_ppl", "float64"), ("mean_kl", "float64"))


def _evals_schema():
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in EVALS_SCHEMA_FIELDS])


def prune_eval_unit(moe, payload: dict[str, Any]):
    """One prune work unit: held-out NLL / KL of a chunk of pruned configurations (and of the unpruned
    model, as ``config = -1``), overall (``domain`` null) and per domain."""
    import pyarrow as pa

    from moeaudit.prune.evaluate import evaluate_pruned
    from moeaudit.scale import UnitResult

    results, clean = evaluate_pruned(moe, payload["input_ids"], dict(zip(payload["indices"], payload["kept"])),
                                     attention_mask=payload["attention_mask"], domains=payload["domains"],
                                     batch_size=payload["batch_size"])
    rows = []
    for index, value in [(-1, clean), *sorted(results.items())]:
        rows.append(dict(config=index, domain=None, n_tokens=value.n_tokens, heldout_nll=value.heldout_nll,
                         heldout_ppl=value.heldout_ppl, mean_kl=value.mean_kl))
        for domain, (n, nll, kl) in value.by_domain.items():
            rows.append(dict(config=index, domain=domain, n_tokens=n, heldout_nll=nll, heldout_ppl=float("nan"),
                             mean_kl=kl))
    return UnitResult({"pruning_evals": pa.Table.from_pylist(rows, schema=_evals_schema())})


def _evaluate_in_units(run, moe, configurations, input_ids, attention_mask, domains, batch_size, executor,
                       on_batch):
    """``evaluate_pruned`` over ``configurations``, cut into resumable units of distinct configurations."""
    import hashlib
    import json

    from moeaudit.prune.evaluate import PrunedEval, _canonical
    from moeaudit.scale import WorkUnit, make_executor, run_units
    from moeaudit.scale.units import chunks

    distinct: dict[tuple, int] = {}
    index_of_key = {}
    kept_of = []
    for key, kept in configurations.items():
        canon = _canonical(moe, kept)
        if canon not in distinct:
            distinct[canon] = len(kept_of)
            kept_of.append({int(l): [int(e) for e in v] for l, v in kept.items()})
        index_of_key[key] = distinct[canon]
    held_batches = -(-input_ids.shape[0] // batch_size)
    units = []
    for start, stop in chunks(len(kept_of), CONFIGS_PER_UNIT):
        # The id carries a digest of the unit's configurations, so other criteria, ratios or seeds on a
        # re-run re-plan the stage instead of reusing results for other configurations.
        digest = hashlib.sha256(json.dumps(kept_of[start:stop], sort_keys=True).encode()).hexdigest()[:10]
        payload = dict(indices=list(range(start, stop)), kept=kept_of[start:stop], input_ids=input_ids,
                       attention_mask=attention_mask, domains=domains, batch_size=batch_size)
        units.append(WorkUnit(f"configs-{start:05d}-{stop - 1:05d}-{digest}", payload,
                              windows=held_batches * (stop - start)))
    own_executor = executor is None
    executor = executor or make_executor(run.config, moe)
    try:
        run_units(run, "prune", units, ("pruning_evals",), prune_eval_unit, executor,
                  on_unit=(lambda done, total: on_batch(done + held_batches, total + held_batches))
                  if on_batch else None)
    finally:
        if own_executor:
            executor.close()
    evals = run.read("pruning_evals")

    def value(config: int) -> PrunedEval:
        rows = evals[evals["config"] == config]
        overall = rows[rows["domain"].isna()].iloc[0]
        by_domain = {str(r.domain): (int(r.n_tokens), float(r.heldout_nll), float(r.mean_kl))
                     for r in rows[rows["domain"].notna()].itertuples()}
        return PrunedEval(float(overall.heldout_nll), float(overall.heldout_ppl), float(overall.mean_kl),
                          int(overall.n_tokens), by_domain)

    by_index = {index: value(index) for index in range(len(kept_of))}
    return {key: by_index[index] for key, index in index_of_key.items()}, value(-1)


def _pruning_rows(configurations, results, clean, dropped, single, num_experts, directions, guard, budget):
    rows = []
    for key, kept in configurations.items():
        mode, criterion, ratio, seed, pruned_layer = key
        result = results[key]
        sets = dropped[(criterion, ratio, seed)] if mode == ALL_LAYERS else single[(criterion, ratio, seed)]
        for layer in (sorted(kept) if mode == ALL_LAYERS else [pruned_layer]):
            rows.append(dict(
                criterion=criterion, ratio=float(ratio), seed=seed, mode=mode, layer=int(layer),
                kept=[int(e) for e in kept[layer]], dropped=[int(e) for e in sets[layer]],
                n_dropped=len(sets[layer]), num_experts=int(num_experts[layer]),
                heldout_nll=result.heldout_nll, heldout_ppl=result.heldout_ppl, mean_kl=result.mean_kl,
                delta_nll=result.heldout_nll - clean.heldout_nll, unpruned_nll=clean.heldout_nll,
                unpruned_ppl=clean.heldout_ppl, n_tokens=result.n_tokens,
                criterion_kind=("random" if criterion == RANDOM else "oracle" if criterion in ORACLES else "metric"),
                direction=None if criterion == RANDOM else direction_of(criterion, directions),
                guard=int(guard), budget=budget if mode == ALL_LAYERS else "uniform",
            ))
    table = pd.DataFrame(rows)
    table["seed"] = pd.array(table["seed"], dtype="Int64")
    # the random reference of each (mode, ratio, pruned layer): one value per seed
    group_layer = np.where(table["mode"] == ALL_LAYERS, -1, table["layer"])
    table["_group"] = list(zip(table["mode"], table["ratio"], group_layer))
    random_rows = table[table["criterion"] == RANDOM].drop_duplicates(["_group", "seed"])
    reference = {g: sub["heldout_nll"].to_numpy() for g, sub in random_rows.groupby("_group")}
    table["random_percentile"] = [
        np.nan if c == RANDOM else _percentile(v, reference.get(g, np.array([])))
        for c, v, g in zip(table["criterion"], table["heldout_nll"], table["_group"])]
    table["random_median_nll"] = [float(np.median(reference[g])) if g in reference else np.nan for g in table["_group"]]
    return table.drop(columns="_group")[list(PRUNING_COLUMNS)]


def _domain_rows(configurations, results, clean):
    rows = []
    for key in list(configurations) + [None]:
        result = clean if key is None else results[key]
        mode, criterion, ratio, seed, layer = key if key is not None else (ALL_LAYERS, "unpruned", 0.0, None, -1)
        for domain, (n, nll, kl) in result.by_domain.items():
            rows.append(dict(criterion=criterion, ratio=float(ratio), seed=seed, mode=mode,
                             layer=None if mode == ALL_LAYERS else int(layer), domain=domain, n_tokens=n,
                             heldout_nll=nll, heldout_ppl=float(np.exp(nll)), mean_kl=kl,
                             unpruned_nll=clean.by_domain[domain][1]))
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["seed"] = pd.array(frame["seed"], dtype="Int64")
        frame["layer"] = pd.array(frame["layer"], dtype="Int64")
    return frame


# ============================================================================ reading results back
def kept_from_table(table: pd.DataFrame, criterion: str, ratio: float, seed: int | None = None) -> dict[int, list[int]]:
    """The kept experts per layer of one all-layers pruning in ``pruning.parquet`` (e.g. to export it).

    ``seed`` is required for ``random`` and ignored otherwise.
    """
    rows = table[table["mode"] == ALL_LAYERS]
    criteria = list(dict.fromkeys(rows["criterion"]))
    if criterion not in criteria:
        raise InvalidParameterError(f"`criterion` must be one of {', '.join(criteria)} (criteria in "
                                    f"pruning.parquet); got {criterion!r}.")
    rows = rows[rows["criterion"] == criterion]
    ratios = sorted(set(rows["ratio"]))
    match = [r for r in ratios if abs(r - float(ratio)) < 1e-9]
    if not match:
        raise invalid("ratio", f"one of {ratios} (ratios pruned by {criterion})", ratio)
    rows = rows[rows["ratio"] == match[0]]
    if criterion == RANDOM:
        seeds = sorted(int(s) for s in rows["seed"].dropna().unique())
        if seed is None or int(seed) not in seeds:
            raise invalid("seed", f"one of the random seeds in pruning.parquet ({seeds[0]}..{seeds[-1]})", seed)
        rows = rows[rows["seed"] == int(seed)]
    return {int(l): [int(e) for e in kept] for l, kept in zip(rows["layer"], rows["kept"])}


def select_kept(run: RunDir, criterion: str, ratio: float, *, moe=None, seed: int | None = None, guard: int = 0,
                directions: Mapping[str, str] | None = None) -> dict[int, list[int]]:
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
    """
    metrics = run.read("expert_metrics")
    layers = sorted(int(l) for l in metrics["layer"].unique())
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
    check_ratios([ratio], num_experts, top_k, name)
    scores = run.read("pruning_scores") if run.has("pruning_scores") else criterion_scores(metrics)
    if criterion in ORACLES and criterion not in scores:
        raise RunDirectoryError(f"{criterion} scores are computed by the prune stage; run `moeaudit prune` on "
                                f"{run.path} first")
    protected = super_experts(metrics, guard)
    budgets = layer_budgets(float(ratio), num_experts, top_k, protected=protected, context=name)
    if criterion == RANDOM and seed is None:
        raise invalid("seed", "an integer for the random criterion", seed)
    dropped = dropped_experts(scores, criterion, budgets, directions=directions, protected=protected, seed=seed,
                              num_experts=num_experts)
    return kept_from_dropped(dropped, num_experts)


@dataclass(frozen=True)
class PruningSummary:
    """What the demo prints: held-out perplexity by criterion × ratio against the random band, per-layer agreement.

    Attributes
    ----------
    perplexity : DataFrame
        Index criterion (deterministic), columns ratio: held-out perplexity with all layers pruned.
    percentile : DataFrame
        Same shape: the criterion's percentile in the random distribution (low = better than random).
    random : DataFrame
        Index ratio: ``median``, ``p05``, ``p95`` of the random draws' perplexity, ``n_seeds``.
    unpruned_ppl : float
    layers : DataFrame
        Per (ratio, layer): Jaccard agreement of the criteria (:func:`layer_jaccard_summary`) and, from
        single-layer pruning, the range of the criteria's perplexity and the random 5–95 % band.
    """

    perplexity: pd.DataFrame
    percentile: pd.DataFrame
    random: pd.DataFrame
    unpruned_ppl: float
    layers: pd.DataFrame

    def to_text(self, digits: int = 2) -> str:
        """A plain-text rendering (two tables) for terminals and notes."""
        ratios = list(self.perplexity.columns) or list(self.random.index)
        width = max([len("random median [5-95%]")] + [len(str(c)) for c in self.perplexity.index]) + 2
        cell = 24
        head = "criterion".ljust(width) + "".join(f"ratio {r:g}".rjust(cell) for r in ratios)
        lines = [f"held-out perplexity, all MoE layers pruned (unpruned {self.unpruned_ppl:.{digits}f}); "
                 "(percentile of the random draws: low = better than random)", head]
        for criterion, values in self.perplexity.iterrows():
            cells = []
            for r in ratios:
                pct = self.percentile.loc[criterion, r] if r in self.percentile.columns else np.nan
                text = f"{values[r]:.{digits}f}" + (f" ({pct:.0f}%)" if np.isfinite(pct) else "")
                cells.append(text.rjust(cell))
            lines.append(str(criterion).ljust(width) + "".join(cells))
        if len(self.random):
            cells = []
            for r in ratios:
                if r in self.random.index:
                    row = self.random.loc[r]
                    cells.append(f"{row['median']:.{digits}f} [{row['p05']:.{digits}f}, {row['p95']:.{digits}f}]"
                                 .rjust(cell))
                else:
                    cells.append("".rjust(cell))
            lines.append("random median [5-95%]".ljust(width) + "".join(cells))
            lines.append(f"({int(self.random['n_seeds'].max())} random draws per ratio)")
        if len(self.layers):
            lines.append("")
            lines.append("per layer: Jaccard of the dropped sets between criteria (mean [min, max]) vs random "
                         "expectation; single-layer pruning: criteria's perplexity range vs random 5-95%")
            lines.append("ratio  layer   Jaccard criteria         vs random  E[random]   criteria ppl        "
                         "random ppl 5-95%")
            for _, row in self.layers.iterrows():
                crit = (f"{row['crit_ppl_min']:.{digits}f}-{row['crit_ppl_max']:.{digits}f}"
                        if np.isfinite(row.get("crit_ppl_min", np.nan)) else "-")
                rand = (f"{row['random_ppl_p05']:.{digits}f}-{row['random_ppl_p95']:.{digits}f}"
                        if np.isfinite(row.get("random_ppl_p05", np.nan)) else "-")
                jac = (f"{row['mean_jaccard']:.2f} [{row['min_jaccard']:.2f}, {row['max_jaccard']:.2f}]"
                       if np.isfinite(row.get("mean_jaccard", np.nan)) else "-")
                vs = f"{row['mean_jaccard_vs_random']:.2f}" if np.isfinite(row.get("mean_jaccard_vs_random", np.nan)) \
                    else "-"
                exp = f"{row['expected_random']:.2f}" if np.isfinite(row.get("expected_random", np.nan)) else "-"
                lines.append(f"{row['ratio']:<6g} {int(row['layer']):>5}   {jac:<24} {vs:>9}  {exp:>9}   "
                             f"{crit:<19} {rand}")
        return "\n".join(lines)


def pruning_summary(table: pd.DataFrame, jaccard: pd.DataFrame | None = None) -> PruningSummary:
    """Summarise ``pruning.parquet`` (and ``jaccard.parquet``) for printing.

    Parameters
    ----------
    table : DataFrame
        ``pruning.parquet`` as written by :func:`run_prune`.
    jaccard : DataFrame, optional
        ``jaccard.parquet``; without it the per-layer summary has only the single-layer columns.

    Returns
    -------
    PruningSummary

    Examples
    --------
    >>> summary = pruning_summary(run.read("pruning"), run.read("jaccard"))  # doctest: +SKIP
    >>> print(summary.to_text())  # doctest: +SKIP
    """
    whole = table[table["mode"] == ALL_LAYERS].drop_duplicates(["criterion", "ratio", "seed"])
    fixed = whole[whole["criterion"] != RANDOM]
    order = list(dict.fromkeys(fixed["criterion"]))
    perplexity = fixed.pivot(index="criterion", columns="ratio", values="heldout_ppl").reindex(order)
    percentile = fixed.pivot(index="criterion", columns="ratio", values="random_percentile").reindex(order)
    draws = whole[whole["criterion"] == RANDOM]
    random = draws.groupby("ratio")["heldout_ppl"].agg(
        median="median", p05=lambda v: float(np.quantile(v, 0.05)), p95=lambda v: float(np.quantile(v, 0.95)),
        n_seeds="count")
    unpruned = float(table["unpruned_ppl"].iloc[0]) if len(table) else float("nan")
    layers = layer_jaccard_summary(jaccard) if jaccard is not None and len(jaccard) else pd.DataFrame(
        columns=["ratio", "layer"])
    per_layer = table[table["mode"] == SINGLE_LAYER]
    if len(per_layer):
        rows = []
        for (ratio, layer), group in per_layer.groupby(["ratio", "layer"]):
            crit = group[group["criterion"] != RANDOM]["heldout_ppl"]
            rand = group[group["criterion"] == RANDOM]["heldout_ppl"]
            rows.append(dict(ratio=float(ratio), layer=int(layer),
                             crit_ppl_min=float(crit.min()) if len(crit) else np.nan,
                             crit_ppl_max=float(crit.max()) if len(crit) else np.nan,
                             random_ppl_median=float(rand.median()) if len(rand) else np.nan,
                             random_ppl_p05=float(np.quantile(rand, 0.05)) if len(rand) else np.nan,
                             random_ppl_p95=float(np.quantile(rand, 0.95)) if len(rand) else np.nan))
        single = pd.DataFrame(rows)
        layers = single if layers.empty else layers.merge(single, on=["ratio", "layer"], how="outer")
    layers = layers.sort_values(["ratio", "layer"]).reset_index(drop=True) if len(layers) else layers
    return PruningSummary(perplexity, percentile, random, unpruned, layers)
