"""Exact joint removals inside a token's active set: pairwise interactions, Shapley values, pruning sets.

:func:`measure_interactions` samples target tokens per MoE layer, evaluates the removal cost v(S) of the
coalitions it needs through the intervention engine (:func:`moeaudit.intervene.engine.removal_outcomes`:
the fast engine's rows, or full forwards on a fallback — the same numbers either way), and assembles three
tables (:data:`moeaudit.tables.INTERACTION_COLUMNS`, :data:`~moeaudit.tables.SHAPLEY_COLUMNS`,
:data:`~moeaudit.tables.INTERACTION_SET_COLUMNS`). The game and its formulas: :mod:`moeaudit.interactions.games`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from moeaudit.errors import invalid
from moeaudit.interactions.games import (
    MAX_EXACT_PLAYERS,
    all_masks,
    exact_shapley,
    pair_masks,
    permutation_masks,
    permutation_shapley,
    popcount,
)
from moeaudit.intervene.clean import valid_next_mask
from moeaudit.intervene.engine import (
    InterveneConfig,
    _check_inputs,
    _check_mean_output,
    clean_window,
    fallback_reason,
    removal_outcomes,
)
from moeaudit.intervene.selection import Selection, gate_ranks, sample_targets
from moeaudit.models.edits import mean_refusal
from moeaudit.models.moe_model import MoEModel
from moeaudit.options import ABLATION_KINDS, one_of
from moeaudit.tables import INTERACTION_COLUMNS, INTERACTION_SET_COLUMNS, SHAPLEY_COLUMNS, empty_frame

logger = logging.getLogger(__name__)

#: Columns a ``sets`` frame must have (the ``pruning`` table has them: one row per configuration and layer).
SET_KEY = ("criterion", "ratio", "seed")


@dataclass(frozen=True)
class InteractionsStats:
    """Counters of one :func:`measure_interactions` call.

    Attributes
    ----------
    engine, fallback_reason : str, str or None
        The engine that ran (``fast`` or ``reference``) and why the fast engine was not used.
    tokens : dict int -> int
        Target tokens per MoE layer.
    removals : int
        Joint removals evaluated (coalitions × tokens, null removals included).
    exact_tokens, estimated_tokens : int
        Tokens whose Shapley values are exact (k ≤ ``max_exact_players``) or permutation estimates.
    noise_floor : float
        Max |v(∅)| (nats): the null removal of every target token through the engine, i.e. the rounding of
        a row against the clean pass; NaN when no token was measured.
    seconds, seconds_clean : float
    """

    engine: str
    fallback_reason: str | None
    tokens: dict[int, int]
    removals: int
    exact_tokens: int
    estimated_tokens: int
    noise_floor: float
    seconds: float
    seconds_clean: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InteractionsResult:
    """What :func:`measure_interactions` returns.

    Attributes
    ----------
    pairs : DataFrame
        :data:`moeaudit.tables.INTERACTION_COLUMNS`: every pair of every target token's active set.
    shapley : DataFrame
        :data:`moeaudit.tables.SHAPLEY_COLUMNS`: every active expert of every target token.
    sets : DataFrame
        :data:`moeaudit.tables.INTERACTION_SET_COLUMNS`: each given removal set at every target token
        (empty without ``sets``).
    stats : InteractionsStats
    """

    pairs: pd.DataFrame
    shapley: pd.DataFrame
    sets: pd.DataFrame
    stats: InteractionsStats

    def _repr_html_(self) -> str:
        from moeaudit.interactions.summary import interaction_summary
        from moeaudit.tables import html_summary

        stats = self.stats
        notes = [f"{stats.removals:,} exact joint removals in {stats.seconds:.1f} s with the {stats.engine} engine; "
                 f"noise floor {stats.noise_floor:.1e} nats; {stats.estimated_tokens:,} tokens with estimated "
                 "Shapley values"]
        summary = interaction_summary(self.pairs, self.shapley) if len(self.shapley) else None
        return html_summary("experts removed together: interactions and Shapley values per layer", summary, notes)


def measure_interactions(
    moe: MoEModel,
    input_ids: torch.Tensor,
    *,
    layers: list[int] | None = None,
    n: int | None = 500,
    seed: int = 0,
    kind: str = "zero",
    config: InterveneConfig | None = None,
    attention_mask: torch.Tensor | None = None,
    mean_output: Mapping[int, torch.Tensor] | None = None,
    sets: pd.DataFrame | None = None,
    max_exact_players: int = MAX_EXACT_PLAYERS,
    permutations: int = 200,
    seq_offset: int = 0,
    windows: tuple[int, int] | None = None,
) -> InteractionsResult:
    """Pairwise joint removals, Shapley values of the active set and pruning sets at sampled tokens.

    Parameters
    ----------
    moe : MoEModel
    input_ids : LongTensor [B, T]
        Windows; window b is ``seq = seq_offset + b`` in the tables.
    layers : list of int, optional
        MoE layers (default: every MoE layer).
    n : int or None
        Target tokens per layer, drawn as :meth:`moeaudit.intervene.Selection.sample` draws them (uniformly
        among positions with a real next token, one generator, layers ascending); None: every such token.
    seed : int
        Seed of the token sample and of the permutation estimate.
    kind : {"zero", "renorm", "reroute", "mean"}
        How a removed expert is removed (:mod:`moeaudit.intervene.delta`).
    config : InterveneConfig, optional
        Engine and batching (``engine``, ``rows_per_call``, ``max_logit_elements``, ``max_state_bytes``,
        ``reference_batch``); ``kinds`` and ``scopes`` are not used (always token scope).
    attention_mask : Tensor [B, T], optional
    mean_output : mapping layer -> Tensor [E, H], optional
        For ``kind="mean"`` (estimated on ``input_ids`` when missing, as :func:`compute_effects` does).
    sets : DataFrame, optional
        Removal sets to measure jointly: columns ``criterion``, ``ratio``, ``seed`` (a configuration, e.g.
        the ``pruning`` table's), ``layer`` and ``dropped`` (the experts removed at that layer). At each
        target token the set's active members are removed together.
    max_exact_players : int
        Active sets of at most this many experts get exact Shapley values (all 2^k coalitions); larger ones
        a permutation estimate (``estimate=True`` rows with a standard error).
    permutations : int
        Orderings per token for the permutation estimate (drawn per window: a generator seeded by ``seed`` and
        the window's index in ``input_ids``).
    seq_offset : int
    windows : (start, stop), optional
        Measure only windows ``start .. stop - 1`` of ``input_ids``. The targets are drawn over every window
        and each window's orderings from its own generator, so the pieces of a run cut into windows
        (the interactions stage's work units) are the rows one call over every window gives.

    Returns
    -------
    InteractionsResult

    Notes
    -----
    Every coalition is a token-scope removal at layer ℓ only, so v(S) for |S| = 1 equals the census's
    ``delta_nll`` of the same expert and token, and a joint removal equals the reference engine's forward
    with both experts removed (tested to 1e-5 nats in float32).

    Examples
    --------
    >>> result = measure_interactions(moe, input_ids, n=200)  # doctest: +SKIP
    >>> result.pairs.groupby("layer").interaction.mean()  # doctest: +SKIP
    """
    config = config or InterveneConfig()
    if kind not in ABLATION_KINDS:
        raise invalid("kind", one_of(ABLATION_KINDS), kind)
    if not isinstance(max_exact_players, int) or not 1 <= max_exact_players <= MAX_EXACT_PLAYERS:
        raise invalid("max_exact_players", f"an integer in [1, {MAX_EXACT_PLAYERS}]", max_exact_players)
    if not isinstance(permutations, int) or permutations < 2:
        raise invalid("permutations", "an integer of at least 2", permutations)
    input_ids, attention_mask = _check_inputs(moe, input_ids, attention_mask)
    layers = list(layers) if layers is not None else list(moe.moe_layer_indices)
    for layer in layers:
        moe.layer(layer)
    set_table = _check_sets(sets, layers)
    if kind == "mean":
        for layer in layers:
            if moe.layer(layer).weights_scale_input:
                raise mean_refusal(moe.layer(layer))
        mean_output = _check_mean_output(moe, layers, mean_output, input_ids, attention_mask)
    started = time.perf_counter()
    reason = fallback_reason(moe, input_ids, attention_mask, config)
    valid = valid_next_mask(input_ids, attention_mask)
    selection = Selection.sample(n, seed=seed, layers=layers) if n is not None else Selection.census(layers)
    targets = sample_targets(selection, layers, valid)
    start, stop = (0, input_ids.shape[0]) if windows is None else windows
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= input_ids.shape[0]):
        raise invalid("windows", f"(start, stop) with 0 <= start <= stop <= {input_ids.shape[0]}", windows)
    parts: dict[str, list[pd.DataFrame]] = {"pairs": [], "shapley": [], "sets": []}
    counts = {"removals": 0, "exact": 0, "estimated": 0}
    tokens: dict[int, int] = {layer: 0 for layer in layers}
    noise: list[float] = []
    seconds_clean = 0.0
    for b in range(start, stop):
        rng = np.random.default_rng([seed, 0x5A, b])  # the window's orderings, whichever windows run with it
        chosen = {layer: _window_targets(targets, layer, b, valid) for layer in layers}
        if not any(len(pos) for pos in chosen.values()):
            continue
        mask_b = None if attention_mask is None else attention_mask[b:b + 1]
        tick = time.perf_counter()
        clean, late = clean_window(moe, input_ids[b:b + 1], mask_b, reason is None)
        reason = reason or late
        seconds_clean += time.perf_counter() - tick
        engine = "reference" if reason else config.engine
        for layer in layers:
            positions = chosen[layer]
            if not len(positions):
                continue
            tokens[layer] += len(positions)
            game = _LayerGames(moe, clean, layer, positions, set_table, max_exact_players, permutations, rng)
            outcomes = removal_outcomes(moe, clean, layer, game.row_positions(), game.removed(), kind=kind,
                                        engine=engine, config=config, mean_output=mean_output,
                                        attention_mask=mask_b)
            game.fill(outcomes)
            noise.extend(game.null_values())
            counts["removals"] += game.rows
            counts["exact" if game.exact else "estimated"] += len(positions)
            key = dict(layer=layer, seq=seq_offset + b, kind=kind)
            parts["pairs"].append(game.pair_table(**key))
            parts["shapley"].append(game.shapley_table(**key))
            if set_table is not None:
                parts["sets"].append(game.set_table(**key))
    stats = InteractionsStats(
        engine="reference" if reason else config.engine, fallback_reason=reason, tokens=tokens,
        removals=counts["removals"], exact_tokens=counts["exact"], estimated_tokens=counts["estimated"],
        noise_floor=float(max(noise)) if noise else float("nan"), seconds=time.perf_counter() - started,
        seconds_clean=seconds_clean)
    return InteractionsResult(_concat(parts["pairs"], INTERACTION_COLUMNS),
                              _concat(parts["shapley"], SHAPLEY_COLUMNS),
                              _concat(parts["sets"], INTERACTION_SET_COLUMNS), stats)


# ---------------------------------------------------------------------------- helpers
def _check_sets(sets: pd.DataFrame | None, layers: list[int]) -> pd.DataFrame | None:
    if sets is None:
        return None
    missing = [c for c in (*SET_KEY, "layer", "dropped") if c not in sets.columns]
    if missing:
        raise invalid("sets", "a table with columns criterion, ratio, seed, layer, dropped (the pruning table)",
                      f"columns {list(sets.columns)}")
    table = sets[list(SET_KEY) + ["layer", "dropped"]].copy()
    table["seed"] = table["seed"].astype("Int64")
    table["dropped"] = [tuple(sorted(int(e) for e in dropped)) for dropped in table["dropped"]]
    table = table[table["layer"].isin(layers)]
    table = table.drop_duplicates(subset=[*SET_KEY, "layer", "dropped"])
    duplicated = table.duplicated(subset=[*SET_KEY, "layer"])
    if duplicated.any():
        first = table[duplicated].iloc[0]
        raise invalid("sets", "one dropped set per (criterion, ratio, seed, layer)",
                      f"several for {first['criterion']} {first['ratio']} seed {first['seed']} layer {first['layer']}")
    return table.reset_index(drop=True)


def _window_targets(targets, layer: int, b: int, valid: torch.Tensor) -> np.ndarray:
    if targets is None:
        return torch.nonzero(valid[b])[:, 0].cpu().numpy()
    chosen = targets[layer]
    return chosen[chosen[:, 0] == b][:, 1]


def _concat(frames: list[pd.DataFrame], columns) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return empty_frame(columns)
    return pd.concat(frames, ignore_index=True)[list(columns)]


class _LayerGames:
    """The games of one window's target tokens at one MoE layer: the coalitions to evaluate, then the tables.

    Players of a token are its active experts in descending raw-gate order (player 0 = top gate). Each
    token needs v on: every coalition (exact Shapley), or the singles, pairs, full set and the prefixes of
    its sampled orderings (estimate); plus its active part of every removal set, and the null removal.
    """

    def __init__(self, moe, clean, layer, positions, set_table, max_exact, permutations, rng):
        self.layer = layer
        self.positions = np.asarray(positions, dtype=np.int64)
        record = clean.records[layer]
        pos = torch.as_tensor(self.positions, device=record.topk_idx.device)
        topk = record.topk_idx[pos].cpu().numpy()
        ranks = gate_ranks(record.raw_gate[pos]).cpu().numpy()
        order = np.argsort(ranks, axis=1, kind="stable")  # slots in descending gate order
        rows = np.arange(len(pos))[:, None]
        self.experts = topk[rows, order]  # [n, k] players' experts
        self.raw_gate = record.raw_gate[pos].float().cpu().numpy()[rows, order].astype(np.float64)
        self.combine = record.combine_weight[pos].float().cpu().numpy()[rows, order].astype(np.float64)
        self.num_experts = moe.layer(layer).num_experts
        self.k = self.experts.shape[1]
        self.exact = self.k <= max_exact
        n, k = len(self.positions), self.k
        self.pair_a, self.pair_b, pair_mask = pair_masks(k)
        self.full = np.int64((1 << k) - 1)
        self.set_keys, self.set_masks = self._set_masks(set_table)  # [n, S]
        if self.exact:
            needed = [np.concatenate([[0], all_masks(k)])] * n
            self.orderings = None
        else:
            self.orderings = [permutation_masks(k, permutations, rng) for _ in range(n)]
            singles = np.int64(1) << np.arange(k, dtype=np.int64)
            needed = [np.unique(np.concatenate([[0, self.full], singles, pair_mask, o[:, :, 1].ravel(),
                                                self.set_masks[i]]))
                      for i, o in enumerate(self.orderings)]
        self.masks = needed
        self.offsets = np.concatenate([[0], np.cumsum([len(m) for m in needed])])
        self.rows = int(self.offsets[-1])
        self.values = self.kl = self.flip = self.single = None

    def _set_masks(self, set_table) -> tuple[pd.DataFrame | None, np.ndarray]:
        n = len(self.positions)
        if set_table is None:
            return None, np.zeros((n, 0), dtype=np.int64)
        here = set_table[set_table["layer"] == self.layer].reset_index(drop=True)
        masks = np.zeros((n, len(here)), dtype=np.int64)
        for j, dropped in enumerate(here["dropped"]):
            hit = np.isin(self.experts, np.asarray(dropped, dtype=np.int64))  # [n, k]
            masks[:, j] = (hit.astype(np.int64) << np.arange(self.k, dtype=np.int64)).sum(axis=1)
        return here, masks

    # ------------------------------------------------------------------ the rows
    def row_positions(self) -> np.ndarray:
        return np.repeat(self.positions, np.diff(self.offsets))

    def removed(self) -> torch.Tensor:
        masks = np.concatenate(self.masks)
        token = np.repeat(np.arange(len(self.positions)), np.diff(self.offsets))
        bits = ((masks[:, None] >> np.arange(self.k, dtype=np.int64)[None, :]) & 1).astype(bool)  # [R, k]
        removed = np.zeros((len(masks), self.num_experts), dtype=bool)
        rows, slots = np.nonzero(bits)
        removed[rows, self.experts[token[rows], slots]] = True
        return torch.from_numpy(removed)

    def fill(self, outcomes) -> None:
        self.values = outcomes["delta_nll"].numpy().astype(np.float64)
        self.kl = outcomes["kl"].numpy().astype(np.float64)
        self.flip = outcomes["top1_flip"].numpy().astype(bool)
        singles = np.int64(1) << np.arange(self.k, dtype=np.int64)
        self.single = np.stack([self.lookup(i, singles) for i in range(len(self.positions))])  # [n, k]: v({e})

    def lookup(self, i: int, masks, what=None) -> np.ndarray:
        """v (or ``what``: kl, flip) of token i at ``masks``; v(∅) is 0 by definition (the clean pass)."""
        what = self.values if what is None else what
        masks = np.asarray(masks, dtype=np.int64)
        index = np.searchsorted(self.masks[i], masks)
        if (index >= len(self.masks[i])).any() or (self.masks[i][np.minimum(index, len(self.masks[i]) - 1)] != masks).any():
            raise AssertionError("a coalition was read that was never evaluated")  # a planning bug, never data
        found = what[self.offsets[i] + index]
        return np.where(masks == 0, np.zeros_like(found), found)

    def null_values(self) -> list[float]:
        return [abs(float(self.values[self.offsets[i]])) for i in range(len(self.positions))]

    # ------------------------------------------------------------------ tables
    def pair_table(self, **key) -> pd.DataFrame:
        n = len(self.positions)
        pairs = len(self.pair_a)
        single = self.single
        mask = (np.int64(1) << self.pair_a) | (np.int64(1) << self.pair_b)
        joint = np.stack([self.lookup(i, mask) for i in range(n)]) if pairs else np.zeros((n, 0))
        kl = np.stack([self.lookup(i, mask, self.kl) for i in range(n)]) if pairs else np.zeros((n, 0))
        flip = np.stack([self.lookup(i, mask, self.flip) for i in range(n)]) if pairs else np.zeros((n, 0), bool)
        a, b = self.pair_a, self.pair_b
        frame = pd.DataFrame({
            "pos": np.repeat(self.positions, pairs),
            "expert_a": self.experts[:, a].ravel(), "expert_b": self.experts[:, b].ravel(),
            "gate_rank_a": np.tile(a, n), "gate_rank_b": np.tile(b, n),
            "delta_nll_a": single[:, a].ravel(), "delta_nll_b": single[:, b].ravel(),
            "delta_nll_joint": joint.ravel(), "kl_joint": kl.ravel(), "top1_flip_joint": flip.ravel().astype(bool),
        })
        frame["interaction"] = frame["delta_nll_joint"] - frame["delta_nll_a"] - frame["delta_nll_b"]
        return _keyed(frame, key)

    def shapley_table(self, **key) -> pd.DataFrame:
        n, k = len(self.positions), self.k
        single = self.single
        everything = np.array([self.lookup(i, [self.full])[0] for i in range(n)])
        if self.exact:
            dense = np.stack([self.lookup(i, np.arange(1 << k, dtype=np.int64)) for i in range(n)])
            phi, se = exact_shapley(dense), np.full((n, k), np.nan)
        else:
            phi, se = np.empty((n, k)), np.empty((n, k))
            for i, orderings in enumerate(self.orderings):
                prefix = self.lookup(i, orderings[:, :, 1].ravel()).reshape(orderings.shape[:2])
                phi[i], se[i] = permutation_shapley(orderings, prefix)
        frame = pd.DataFrame({
            "pos": np.repeat(self.positions, k), "expert": self.experts.ravel(),
            "gate_rank": np.tile(np.arange(k), n), "raw_gate": self.raw_gate.ravel(),
            "combine_weight": self.combine.ravel(), "delta_nll_single": single.ravel(), "shapley": phi.ravel(),
            "shapley_se": se.ravel(), "delta_nll_all": np.repeat(everything, k), "n_players": np.full(n * k, k),
            "estimate": np.full(n * k, not self.exact),
        })
        return _keyed(frame, key)

    def set_table(self, **key) -> pd.DataFrame:
        here = self.set_keys
        n, count = len(self.positions), 0 if here is None else len(here)
        if not count:
            return pd.DataFrame()
        k = self.k
        single = self.single
        joint = np.stack([self.lookup(i, self.set_masks[i]) for i in range(n)])  # [n, S]
        bits = ((self.set_masks[:, :, None] >> np.arange(k, dtype=np.int64)) & 1).astype(bool)  # [n, S, k]
        summed = (bits * single[:, None, :]).sum(axis=2)
        frame = pd.DataFrame({
            "criterion": np.tile(here["criterion"].to_numpy(), n), "ratio": np.tile(here["ratio"].to_numpy(), n),
            "seed": pd.array(np.tile(here["seed"].to_numpy(), n), dtype="Int64"),
            "pos": np.repeat(self.positions, count), "n_removed": popcount(self.set_masks).ravel(),
            "delta_nll_joint": joint.ravel(), "delta_nll_sum": summed.ravel(),
        })
        return _keyed(frame, key)


def _keyed(frame: pd.DataFrame, key: dict) -> pd.DataFrame:
    for name, value in key.items():
        frame[name] = value
    return frame
