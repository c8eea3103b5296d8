"""REAP: router-weighted expert activation pruning saliency."""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from moeaudit.metrics._common import as_expert_index, as_values, group_mean

__all__ = ["REAP_GATES", "REAP_GATE_SETTINGS", "ReapGate", "ReapGateSetting", "gate_column", "reap",
           "resolve_reap_gate"]

ReapGate = Literal["combine", "renorm", "raw"]
#: Allowed values of ``reap_gate``, in the order used in messages and docs.
REAP_GATES: tuple[ReapGate, ...] = ("combine", "renorm", "raw")

ReapGateSetting = Literal["combine", "renorm", "raw", "reap-code"]
#: What a run's ``reap_gate`` may say: a gate, or ``reap-code``, REAP's own rule (:func:`resolve_reap_gate`).
REAP_GATE_SETTINGS: tuple[ReapGateSetting, ...] = ("combine", "renorm", "raw", "reap-code")

_GATE_COLUMN: dict[str, str] = {"combine": "combine_weight", "renorm": "renorm_gate", "raw": "raw_gate"}


def gate_column(gate: ReapGate) -> str:
    """Name of the ``routing`` column that holds the gate chosen by ``gate``."""
    return _GATE_COLUMN[gate]


def resolve_reap_gate(setting: ReapGateSetting, model_config: object) -> ReapGate:
    """The gate a ``reap_gate`` setting means for a model: itself, or for ``"reap-code"`` REAP's rule.

    REAP's released code (CerebrasResearch/reap, ``src/reap/main.py``, ``_setup_observer``) renormalises the
    softmax over the token's top-k only when the model config's ``norm_topk_prob`` is true, else it uses the
    raw softmax probability — whatever the architecture itself multiplies the expert output by. So
    ``"reap-code"`` is ``"renorm"`` when ``norm_topk_prob`` is set (Qwen3-MoE, where it equals the
    combine weight) and ``"raw"`` otherwise (Mixtral, which has no such field but renormalises in its
    router: there REAP's saliency differs from the one the model's own combine weight gives).

    Parameters
    ----------
    setting : {"combine", "renorm", "raw", "reap-code"}
    model_config : transformers.PretrainedConfig
        Its text config's ``norm_topk_prob`` decides ``"reap-code"``.

    Returns
    -------
    {"combine", "renorm", "raw"}
    """
    if setting not in REAP_GATE_SETTINGS:
        from moeaudit.errors import invalid

        raise invalid("reap_gate", "one of " + ", ".join(REAP_GATE_SETTINGS), setting)
    if setting != "reap-code":
        return setting
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return "renorm" if bool(getattr(text, "norm_topk_prob", False)) else "raw"


def reap(expert: ArrayLike, gate: ArrayLike, act_norm: ArrayLike, *, num_experts: int) -> NDArray[np.float64]:
    r"""REAP saliency: mean over active tokens of gate × activation norm.

    Parameters
    ----------
    expert : array_like of int, shape (n_rows,)
        Expert id of each routing row at one layer.
    gate : array_like of float, shape (n_rows,)
        The gate :math:`g_e(x_t)` of the row's expert: the combine weight, the renormalised gate or
        the raw gate (``compute_expert_metrics(reap_gate=...)`` picks the column).
    act_norm : array_like of float, shape (n_rows,)
        :math:`\lVert f_e(x_t) \rVert_2`, the ungated output norm.
    num_experts : int

    Returns
    -------
    ndarray of float64, shape (E,)
        :math:`S_e = \frac{1}{c_e} \sum_{t: e \in A(t)} g_e(x_t)\, \lVert f_e(x_t) \rVert_2`; NaN for
        experts never routed.

    Notes
    -----
    Matches CerebrasResearch/reap, ``src/reap/observer.py`` (``MoETransformerObserver._hook_factory``):
    ``reap[i] = (ean_norm * active_router_weights).mean()`` over the tokens whose top-k contains ``i``,
    aggregated across batches weighted by ``expert_frequency`` (so a mean over all active tokens).
    REAP's ``routing_weights`` are the softmax over all routed experts, divided by the token's top-k sum
    only when ``renormalize_router_weights`` is on. Its CLI default is on (``src/reap/args.py``,
    ``ObserverArgs.renormalize_router_weights=True``), but ``src/reap/main.py`` (``_setup_observer``)
    enables it only if ``model.config.norm_topk_prob`` is true. REAP therefore uses the model's own
    top-k weighting: the combine weight, apart from DeepSeek's ``routed_scaling_factor``, which REAP
    does not apply. That holds where the model's renormalisation follows ``norm_topk_prob`` (Qwen3-MoE:
    agreement to 1e-7 with REAP's code) but not for Mixtral, which renormalises in its router without
    such a field, so REAP's code uses the raw softmax there. moeaudit's default is ``"combine"`` (the
    weight the model really applies); a run's ``reap_gate = "reap-code"`` follows REAP's rule
    (:func:`resolve_reap_gate`); ``"renorm"`` and ``"raw"`` force either gate.

    References
    ----------
    .. [1] Lasby et al., "REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression",
       arXiv 2510.13999, Eq. 9.
    .. [2] CerebrasResearch/reap, ``src/reap/observer.py``, ``src/reap/main.py``, ``src/reap/args.py``.
    """
    e = as_expert_index(expert)
    g = as_values(gate, e.shape[0], "gate")
    a = as_values(act_norm, e.shape[0], "act_norm")
    return group_mean(e, g * a, num_experts)
