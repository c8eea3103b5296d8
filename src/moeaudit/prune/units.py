"""The prune stage's work: which pruned configurations to evaluate, the resumable units that evaluate them,
and the rows of its tables (the columns are documented in :mod:`moeaudit.prune.stage`).

A *configuration* is keyed ``(mode, criterion, ratio, seed, pruned layer)`` (``pruned layer`` is -1 for
``all_layers``) and maps each layer to its kept experts. Identical configurations are evaluated once.
torch is imported only by the functions that run the model.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from moeaudit.options import RANDOM
from moeaudit.prune.criteria import ORACLES, direction_of, dropped_experts, kept_from_dropped
from moeaudit.prune.summary import ALL_LAYERS, SINGLE_LAYER
from moeaudit.tables import EVALS_SCHEMA, PRUNING_COLUMNS


def split_windows(tokens: pd.DataFrame, split: str, pad_id: int):
    """The windows of one split of ``tokens`` as (input_ids, attention_mask, domains or None); None when absent
    (:func:`moeaudit.rundir.token_windows`, the ids as tensors)."""
    import torch

    from moeaudit.rundir import token_windows

    chosen = tokens[tokens["split"] == split]
    if chosen.empty:
        return None
    windows = token_windows(chosen, pad_id)
    return torch.from_numpy(windows.token_ids), torch.from_numpy(windows.attention_mask), windows.domains


def percentile(value: float, draws: np.ndarray) -> float:
    """Share in % of ``draws`` below ``value``, ties counting half (nan without draws or value)."""
    if not len(draws) or not np.isfinite(value):
        return float("nan")
    return float(100.0 * (np.sum(draws < value) + 0.5 * np.sum(draws == value)) / len(draws))


def dropped_sets(scores: pd.DataFrame, deterministic: list[str], draws: list[int], budget_plan: Mapping, *,
                 num_experts: Mapping[int, int], protected: Mapping[int, list[int]],
                 directions: Mapping[str, str] | None, weighted: bool, groups: Mapping[int, int] | None = None,
                 single_layer: bool = True):
    """The dropped experts per layer of every (criterion, ratio, seed): for all layers at once (the planned
    budgets) and for single-layer pruning (uniform budgets; the same sets unless ``weighted``; not drawn when
    ``single_layer`` is off). ``groups``: the group-balanced selection (:func:`dropped_experts`)."""
    dropped: dict[tuple[str, float, int | None], dict[int, list[int]]] = {}
    single: dict[tuple[str, float, int | None], dict[int, list[int]]] = {}
    own = weighted and single_layer
    for ratio, (budgets, uniform) in budget_plan.items():
        keys = [(criterion, ratio, None) for criterion in deterministic] + [(RANDOM, ratio, seed) for seed in draws]
        for key in keys:
            criterion, _, seed = key
            extra = dict(num_experts=num_experts, seed=seed) if criterion == RANDOM else {}
            dropped[key] = dropped_experts(scores, criterion, budgets, directions=directions, protected=protected,
                                           groups=groups, **extra)
            single[key] = (dropped_experts(scores, criterion, uniform, directions=directions, protected=protected,
                                           groups=groups, **extra) if own else dropped[key])
    return dropped, single


def configurations_of(dropped, single, num_experts: Mapping[int, int], layers: list[int], single_layer: bool):
    """The kept experts of every configuration to evaluate, keyed ``(mode, criterion, ratio, seed, layer)``."""
    configurations: dict[tuple, dict[int, list[int]]] = {}
    for key, sets in dropped.items():
        configurations[(ALL_LAYERS, *key, -1)] = kept_from_dropped(sets, num_experts)
    if single_layer:
        for key, sets in single.items():
            for layer in layers:
                configurations[(SINGLE_LAYER, *key, layer)] = kept_from_dropped({layer: sets[layer]}, num_experts)
    return configurations


#: Distinct pruned configurations per work unit: each unit also runs the unpruned model once per batch
#: (for the KL), so larger units waste less; smaller ones lose less to an interruption.
CONFIGS_PER_UNIT = 16


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
    return UnitResult({"pruning_evals": pa.Table.from_pylist(rows, schema=EVALS_SCHEMA)})


def evaluate_in_units(run, moe, configurations, input_ids, attention_mask, domains, batch_size, executor,
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


def pruning_rows(configurations, results, clean, dropped, single, num_experts, directions, guard, budget,
                 selection: str = "global"):
    """``pruning.parquet``: one row per (configuration, layer), with the random reference of its group;
    ``selection`` is ``global`` or ``group_balanced`` (:func:`moeaudit.prune.criteria.dropped_experts`)."""
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
                guard=int(guard), budget=budget if mode == ALL_LAYERS else "uniform", selection=selection,
            ))
    table = pd.DataFrame(rows)
    table["seed"] = pd.array(table["seed"], dtype="Int64")
    # the random reference of each (mode, ratio, pruned layer): one value per seed
    group_layer = np.where(table["mode"] == ALL_LAYERS, -1, table["layer"])
    table["_group"] = list(zip(table["mode"], table["ratio"], group_layer))
    random_rows = table[table["criterion"] == RANDOM].drop_duplicates(["_group", "seed"])
    reference = {g: sub["heldout_nll"].to_numpy() for g, sub in random_rows.groupby("_group")}
    table["random_percentile"] = [
        np.nan if c == RANDOM else percentile(v, reference.get(g, np.array([])))
        for c, v, g in zip(table["criterion"], table["heldout_nll"], table["_group"])]
    table["random_median_nll"] = [float(np.median(reference[g])) if g in reference else np.nan for g in table["_group"]]
    return table.drop(columns="_group")[list(PRUNING_COLUMNS)]


def domain_rows(configurations, results, clean):
    """``pruning_domains.parquet``: the held-out values per domain of every configuration and the unpruned model."""
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
