"""Held-out evaluation of pruned models, by masking the dropped experts out of routing.

A pruned model is the unpruned one with every dropped expert's router logit set to −inf at every token
and the top-k re-selected with the family's own rule (:class:`moeaudit.models.Ablation` with
``kind="reroute"`` and ``positions=None``): bit-for-bit what a checkpoint without those experts computes
(:func:`moeaudit.prune.export_pruned` writes one, and the tests check the two agree).

The outer loop runs over batches of windows and the inner one over pruned configurations, so the clean
next-token distribution of a batch is computed once and held only for that batch (the KL needs it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from moeaudit.models.hooks import Ablation
from moeaudit.models.moe_model import MoEModel, nll_from_logits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrunedEval:
    """Held-out quality of one pruned configuration.

    Attributes
    ----------
    heldout_nll : float
        Mean next-token NLL (nats) over the valid positions (a real next token, no padding).
    heldout_ppl : float
        ``exp(heldout_nll)``.
    mean_kl : float
        Mean over the same positions of KL(unpruned ‖ pruned) of the next-token distribution (nats).
    n_tokens : int
    by_domain : dict
        ``{domain: (n_tokens, heldout_nll, mean_kl)}`` (empty when no domains were given).
    """

    heldout_nll: float
    heldout_ppl: float
    mean_kl: float
    n_tokens: int
    by_domain: dict[str, tuple[int, float, float]] = field(default_factory=dict)


def pruning_ablations(moe: MoEModel, kept: Mapping[int, Sequence[int]]) -> list[Ablation]:
    """Reroute ablations that remove every expert not in ``kept[layer]`` at every token.

    Layers missing from ``kept`` stay unpruned. Validates layer indices and expert ids.
    """
    from moeaudit.errors import invalid

    ablations = []
    for layer, experts in kept.items():
        described = moe.layer(layer)
        keep = {int(e) for e in experts}
        bad = [e for e in keep if not 0 <= e < described.num_experts]
        if bad:
            raise invalid("kept", f"expert ids in [0, {described.num_experts - 1}]", bad[0], f"layer {layer}")
        if len(keep) < described.top_k:
            raise invalid("kept", f"at least top_k = {described.top_k} experts", sorted(keep), f"layer {layer}")
        dropped = sorted(set(range(described.num_experts)) - keep)
        if dropped:
            ablations.append(Ablation(layer=int(layer), experts=dropped, kind="reroute"))
    return ablations


def _canonical(moe: MoEModel, kept: Mapping[int, Sequence[int]]) -> tuple:
    """A hashable form of a configuration: the dropped experts per pruned layer."""
    out = []
    for layer in sorted(kept):
        dropped = tuple(sorted(set(range(moe.layer(layer).num_experts)) - {int(e) for e in kept[layer]}))
        if dropped:
            out.append((int(layer), dropped))
    return tuple(out)


class _Accumulator:
    """Sums of NLL and KL per domain code (the last slot holds positions without a domain)."""

    def __init__(self, n_domains: int):
        self.nll = np.zeros(n_domains + 1)
        self.kl = np.zeros(n_domains + 1)
        self.n = np.zeros(n_domains + 1, dtype=np.int64)

    def add(self, codes: torch.Tensor, nll: torch.Tensor, kl: torch.Tensor) -> None:
        size = len(self.n)
        self.nll += torch.bincount(codes, weights=nll.double(), minlength=size).cpu().numpy()
        self.kl += torch.bincount(codes, weights=kl.double(), minlength=size).cpu().numpy()
        self.n += torch.bincount(codes, minlength=size).cpu().numpy()

    def result(self, names: Sequence[str]) -> PrunedEval:
        n = int(self.n.sum())
        nll = float(self.nll.sum() / n) if n else float("nan")
        kl = float(self.kl.sum() / n) if n else float("nan")
        by_domain = {name: (int(self.n[i]), float(self.nll[i] / self.n[i]), float(self.kl[i] / self.n[i]))
                     for i, name in enumerate(names) if self.n[i]}
        return PrunedEval(nll, math.exp(nll) if n else float("nan"), kl, n, by_domain)


@torch.no_grad()
def evaluate_pruned(
    moe: MoEModel,
    input_ids: torch.Tensor,
    configurations: Mapping[Hashable, Mapping[int, Sequence[int]]],
    *,
    attention_mask: torch.Tensor | None = None,
    domains: np.ndarray | None = None,
    batch_size: int = 8,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[dict[Hashable, PrunedEval], PrunedEval]:
    """Held-out NLL, perplexity and KL to the unpruned model of every pruned configuration.

    Parameters
    ----------
    moe : MoEModel
    input_ids : LongTensor [B, T]
        Held-out windows.
    configurations : mapping key -> {layer: kept experts}
        Each value names the experts kept in each pruned layer (layers not named stay whole). Identical
        configurations under different keys are evaluated once.
    attention_mask : Tensor [B, T], optional
    domains : array of str or None, shape [B, T], optional
        Domain of each position, for per-domain results (None entries: no domain).
    batch_size : int
        Windows per forward pass.
    on_batch : callable(done, total), optional
        Progress, once per forward pass.

    Returns
    -------
    results : dict key -> PrunedEval
    clean : PrunedEval
        The unpruned model on the same positions (``mean_kl`` = 0).

    Notes
    -----
    Valid positions are those with a real next token; NLL_t = −log p(x_{t+1} | x_{≤t}) and
    KL_t = Σ_v p_clean(v) (log p_clean(v) − log p_pruned(v)), both averaged over valid positions.
    """
    from moeaudit.errors import invalid

    if not isinstance(batch_size, int) or batch_size < 1:
        raise invalid("batch_size", "a positive integer", batch_size)
    plans: dict[tuple, list] = {}
    keys_of: dict[tuple, list[Hashable]] = {}
    for key, kept in configurations.items():
        canon = _canonical(moe, kept)
        if canon not in plans:
            plans[canon] = pruning_ablations(moe, kept)
            keys_of[canon] = []
        keys_of[canon].append(key)
    names: list[str] = []
    codes_all = None
    if domains is not None:
        domains = np.asarray(domains, dtype=object)
        present = sorted({str(d) for d in domains.reshape(-1) if not pd.isna(d)})
        names = [str(d) for d in present]
        index = {d: i for i, d in enumerate(present)}
        codes_all = torch.as_tensor(np.vectorize(lambda d: len(present) if pd.isna(d) else index[str(d)],
                                                 otypes=[np.int64])(domains))
    clean_acc = _Accumulator(len(names))
    accs = {canon: _Accumulator(len(names)) for canon in plans}
    starts = list(range(0, input_ids.shape[0], batch_size))
    total = len(starts) * (1 + len(plans))
    done = 0
    device = moe.device
    for start in starts:
        ids = input_ids[start:start + batch_size].to(device)
        mask = None if attention_mask is None else attention_mask[start:start + batch_size].to(device)
        logits = moe.model(input_ids=ids, attention_mask=mask).logits.float()
        nll_clean = nll_from_logits(logits, ids, mask)
        valid = ~torch.isnan(nll_clean)
        targets = torch.zeros_like(ids)
        targets[:, :-1] = ids[:, 1:]
        targets = targets.unsqueeze(-1)  # [b, T, 1]: the next token at each position
        logp_clean = torch.log_softmax(logits, dim=-1)  # [b, T, V]
        del logits
        p_clean = logp_clean.exp()
        neg_entropy = (p_clean * logp_clean).sum(-1)  # Σ_v p log p
        del logp_clean
        codes = (codes_all[start:start + batch_size].to(device)[valid] if codes_all is not None
                 else torch.zeros(int(valid.sum()), dtype=torch.long, device=device))
        clean_acc.add(codes, nll_clean[valid], torch.zeros_like(nll_clean[valid]))
        done += 1
        if on_batch is not None:
            on_batch(done, total)
        for canon, ablations in plans.items():
            with moe.intervene(ablations, warn_unchanged=False):
                pruned = moe.model(input_ids=ids, attention_mask=mask).logits.float()
            # log q = z - logsumexp(z): NLL = lse - z[target], KL = Σ p log p - (Σ p z - lse) (Σ p = 1),
            # without materialising log q
            lse = torch.logsumexp(pruned, dim=-1)
            nll = lse - pruned.gather(-1, targets).squeeze(-1)
            kl = neg_entropy - (torch.linalg.vecdot(p_clean, pruned) - lse)
            del pruned
            accs[canon].add(codes, nll[valid], kl[valid])
            done += 1
            if on_batch is not None:
                on_batch(done, total)
    results = {}
    for canon, acc in accs.items():
        value = acc.result(names)
        for key in keys_of[canon]:
            results[key] = value
    return results, clean_acc.result(names)
