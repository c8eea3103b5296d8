"""The metrics stage on a run directory: ``routing`` (+ weights) -> ``expert_metrics``.

Metrics are computed on the ``calibration`` split when the run observed it (held-out support: effects are
then measured on other windows); otherwise on every observed window, which the manifest records as
``in_sample``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeaudit.metrics.compute import compute_expert_metrics, compute_expert_metrics_by_domain
from moeaudit.metrics.distribution import routing_gini
from moeaudit.metrics.reap import resolve_reap_gate
from moeaudit.metrics.weights import LayerWeights
from moeaudit.models.moe_model import MoEModel
from moeaudit.rundir import RunDir


def layer_weights(moe: MoEModel) -> dict[int, LayerWeights]:
    """Fused expert weights and router rows per MoE layer, for the weight-only metrics.

    The model's own tensors, not copies: the metrics convert one expert at a time
    (:func:`moeaudit.metrics.weights.aimer`), so a bfloat16 model is never held again in float32 (that copy
    was twice the model's size: 27 GB for OLMoE-1B-7B). Identity experts (LongCat-Flash's zero-computation
    experts, :meth:`~moeaudit.models.FamilyAdapter.identity_experts`) hold no weights: the expert tensors stop
    before them (LongCat-Flash's ``gate_up_proj`` keeps unused rows for them).
    """
    out = {}
    for layer in moe.layers:
        identity = moe.adapter.identity_experts(layer)
        real = layer.num_experts - identity
        experts = tuple(getattr(layer.experts, name).detach()[:real]
                        for name in ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
                        if getattr(layer.experts, name, None) is not None)
        out[layer.layer] = LayerWeights(experts=experts, router=layer.router_weight().detach(), identity=identity)
    return out


def run_metrics(run: RunDir, *, moe: MoEModel | None = None) -> dict[str, Any]:
    from moeaudit.observe.forward import read_router_logits, read_router_probs
    from moeaudit.models.loading import model_from_config

    routing = run.read("routing")
    tokens = run.read("tokens", columns=["seq", "pos", "domain", "split"])
    routing = routing.astype({"layer": "int64", "seq": "int64", "pos": "int64", "expert": "int64"})
    calibration = np.unique(tokens.loc[tokens["split"] == "calibration", "seq"].to_numpy())
    seqs = calibration if len(calibration) and not run.config.in_sample else None
    moe = moe or model_from_config(run.config)
    num_experts = {layer.layer: layer.num_experts for layer in moe.layers if layer.layer in set(routing["layer"])}
    probs = read_router_probs(run.table_path("router_probs")) if run.has("router_probs") else {}
    logits = read_router_logits(run.table_path("router_logits")) if run.has("router_logits") else {}
    if run.config.paper_code_padding:  # the released scripts pooled padding positions into every metric
        routing, probs, logits = _with_padding(run, routing, probs, logits)
    weights = layer_weights(moe)
    reap_gate = resolve_reap_gate(run.config.reap_gate, moe.model.config)
    table = compute_expert_metrics(routing, num_experts, router_probs=probs or None, weights=weights, seqs=seqs,
                                   router_logits=logits or None, reap_gate=reap_gate)
    run.write_frame("expert_metrics", table)
    domains = tokens[["seq", "domain"]].drop_duplicates("seq")
    if domains["domain"].notna().any():  # corpora without domain labels have no breakdown
        with_domain = routing.merge(domains, on="seq", how="left")
        by_domain = compute_expert_metrics_by_domain(with_domain, num_experts, router_probs=probs or None,
                                                     weights=weights, seqs=seqs, router_logits=logits or None,
                                                     reap_gate=reap_gate)
        run.write_frame("expert_metrics_by_domain", by_domain)
    dead = table.groupby("layer")["count"].apply(lambda c: int((c == 0).sum())).to_dict()
    info = {
        "split": "calibration" if seqs is not None else "in_sample",
        "windows": int(len(calibration)) if seqs is not None else int(tokens["seq"].nunique()),
        "layers": sorted(num_experts),
        "dead_experts": {str(k): v for k, v in dead.items()},
        "reap_gate": reap_gate,
        "metrics": [c for c in table.columns if c not in ("layer", "expert")],
    }
    run.record_stage("metrics", info)
    return info


def _with_padding(run: RunDir, routing, probs: dict, logits: dict):
    """``routing`` and the router matrices with the padding rows of ``paper_code_padding`` appended.

    Tokens are ordered by (seq, pos) in both parts (padding positions follow a window's last token), so the
    matrices stay aligned with the routing rows' tokens: each padding matrix is placed after the real
    one and the whole re-ordered by (seq, pos), as :func:`compute_expert_metrics` numbers tokens.
    """
    import pandas as pd

    from moeaudit.observe.forward import read_router_logits, read_router_probs

    if not run.has("padding_routing"):
        from moeaudit.errors import RunDirectoryError

        raise RunDirectoryError(f"{run.path} has paper_code_padding set but no padding_routing.parquet; re-run "
                                "`moeaudit observe` with --overwrite")
    padding = run.read("padding_routing").astype({"layer": "int64", "seq": "int64", "pos": "int64",
                                                  "expert": "int64"})
    merged = pd.concat([routing, padding], ignore_index=True).sort_values(["layer", "seq", "pos", "slot"],
                                                                          kind="stable", ignore_index=True)
    out = []
    for name, reader, real in (("padding_router_probs", read_router_probs, probs),
                               ("padding_router_logits", read_router_logits, logits)):
        extra = reader(run.table_path(name)) if real and run.has(name) else {}
        combined = {}
        for layer, matrix in real.items():
            keys = _token_keys(routing, layer)
            pad_keys = _token_keys(padding, layer)
            rows = np.concatenate([matrix, extra.get(layer, np.zeros((0, matrix.shape[1]), matrix.dtype))])
            order = np.lexsort((np.concatenate([keys[:, 1], pad_keys[:, 1]]),
                                np.concatenate([keys[:, 0], pad_keys[:, 0]])))
            combined[layer] = rows[order]
        out.append(combined)
    return merged, out[0], out[1]


def _token_keys(routing, layer: int) -> np.ndarray:
    """(seq, pos) of each distinct token of ``layer`` in the routing table, in table order."""
    rows = routing[routing["layer"] == layer]
    return rows[["seq", "pos"]].drop_duplicates().to_numpy()


def layer_summary(table, top: int = 3) -> "Any":
    """Per layer: dead experts, load imbalance (max/mean frequency, Gini of frequency), top experts by REAP."""
    import pandas as pd

    rows = []
    for layer, group in table.groupby("layer"):
        freq = group["frequency"].to_numpy()
        gini = float(routing_gini(freq[:, None])[0])  # the Gini of the load vector, as for routing columns
        best = group.nlargest(top, "reap")
        rows.append({
            "layer": int(layer),
            "experts": len(freq),
            "dead": int((group["count"] == 0).sum()),
            "max/mean load": float(freq.max() / freq.mean()) if freq.mean() > 0 else np.nan,
            "load gini": gini,
            "top experts by REAP": ", ".join(str(int(e)) for e in best["expert"]),
        })
    return pd.DataFrame(rows)
