"""Weight-only metrics: computed from an expert's parameters, no calibration tokens needed.

Expert tensors may be numpy arrays or torch tensors (any dtype, any device). Only the leading axis
matters (it indexes experts): transformers ≥ 5 stores ``gate_up_proj`` as [E, 2I, H] and ``down_proj``
as [E, H, I], but a family that stores them transposed gives the same results, because each expert's
weights are flattened.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["LayerWeights", "aimer", "router_row_norm"]

#: Keys of a weights mapping that hold the router matrix rather than an expert tensor.
ROUTER_KEYS: tuple[str, ...] = ("router", "router_weight")


def _to_numpy(x: Any) -> NDArray[np.float64]:
    """float64 numpy copy of an array or (possibly bf16, possibly GPU) torch tensor."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass(frozen=True)
class LayerWeights:
    """The parameters of one MoE layer that weight-only metrics read.

    Parameters
    ----------
    experts : tuple of array-like, each shape (E, ...)
        Every tensor that holds expert parameters, experts on the leading axis (e.g. ``gate_up_proj``
        [E, 2I, H] and ``down_proj`` [E, H, I]). Empty when only the router is known.
    router : array-like of shape (E, H), optional
        The router (gate) weight matrix, one row per routed expert.
    identity : int
        Trailing experts that return their input unchanged and hold no weights (LongCat-Flash's
        zero-computation experts): the expert tensors cover the first E − ``identity`` experts, and the
        weight-only metrics of the others are NaN.
    """

    experts: tuple[Any, ...] = ()
    router: Any | None = None
    identity: int = 0

    @classmethod
    def from_mapping(cls, tensors: Mapping[str, Any]) -> LayerWeights:
        """Build from ``{"gate_up_proj": ..., "down_proj": ..., "router": ...}``.

        Every key except ``router`` / ``router_weight`` is taken as an expert tensor; ``None`` values
        are skipped.
        """
        router = next((tensors[k] for k in ROUTER_KEYS if tensors.get(k) is not None), None)
        experts = tuple(v for k, v in tensors.items() if k not in ROUTER_KEYS and v is not None)
        return cls(experts=experts, router=router)

    def num_experts(self) -> set[int]:
        """Leading sizes of all tensors given (one element when consistent)."""
        sizes = {int(t.shape[0]) + self.identity for t in self.experts}
        if self.router is not None:
            sizes.add(int(self.router.shape[0]))
        return sizes


def aimer(*expert_tensors: Any) -> NDArray[np.float64]:
    r"""AIMER: absolute mean over root mean square of each expert's weights.

    Parameters
    ----------
    *expert_tensors : array-like, each shape (E, ...)
        Every tensor holding expert parameters, experts on the leading axis (``gate_up_proj``,
        ``down_proj``; torch tensors accepted).

    Returns
    -------
    ndarray of float64, shape (E,)
        With :math:`w` the concatenation of all of expert e's parameters (n entries),
        :math:`\mathrm{AIMER}_e = \dfrac{\frac{1}{n}\sum_i |w_i|}{\sqrt{\frac{1}{n}\sum_i w_i^2}} \in (0, 1]`;
        NaN for an all-zero expert. Scale-free: 1 when all weights have equal magnitude, small when a
        few large weights dominate (Gaussian weights give :math:`\sqrt{2/\pi} \approx 0.80`).

    Notes
    -----
    Direction: the AIMER release prunes the experts with the *highest* score ("Higher AIMER scores are
    treated as more removable", ZongfangLiu/AIMER ``README.md``), the opposite of the activation
    metrics. The score here pools all of an expert's matrices into one vector, as in the acronym; we
    could not read the reference implementation (``src/reap/calib_free_prune.py``), so whether the
    paper pools or averages per-matrix scores is unconfirmed.

    References
    ----------
    .. [1] Liu, Tang, Shen, Wang, Yuan, "AIMER: Calibration-Free Task-Agnostic MoE Pruning",
       arXiv 2603.18492; code github.com/ZongfangLiu/AIMER.
    """
    if not expert_tensors:
        raise ValueError("`aimer` needs at least one expert tensor; got none.")
    sizes = {int(t.shape[0]) for t in expert_tensors}
    if len(sizes) != 1:
        raise ValueError(f"expert tensors must share their leading (expert) size; got sizes {sorted(sizes)}.")
    n_experts = sizes.pop()
    out = np.full(n_experts, np.nan)
    for e in range(n_experts):  # one expert at a time: a float64 copy of a whole layer can be GBs
        abs_sum = sq_sum = 0.0
        n = 0
        for t in expert_tensors:
            w = _to_numpy(t[e]).reshape(-1)
            abs_sum += float(np.abs(w).sum())
            sq_sum += float(np.dot(w, w))
            n += w.size
        if n and sq_sum > 0:
            out[e] = (abs_sum / n) / np.sqrt(sq_sum / n)
    return out


def router_row_norm(router_weight: Any) -> NDArray[np.float64]:
    r"""L2 norm of each expert's row of the router weight matrix.

    Parameters
    ----------
    router_weight : array-like, shape (E, H)
        Router (gate) weight, one row per routed expert (torch tensors accepted).

    Returns
    -------
    ndarray of float64, shape (E,)
        :math:`\lVert W^{\mathrm{router}}_{e,:} \rVert_2`.

    References
    ----------
    .. [1] Jaiswal et al., "Finding Fantastic Experts in MoEs", arXiv 2504.05586 (Router Weight Norm).
    """
    w = _to_numpy(router_weight)
    if w.ndim != 2:
        raise ValueError(f"`router_weight` must be a 2-D array [num_experts, hidden]; got shape {w.shape}.")
    return np.linalg.norm(w, axis=1)
