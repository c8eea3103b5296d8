"""`compute_effects`: the causal effect of every selected intervention, as an ``effects`` table.

Per window: one clean pass (:mod:`moeaudit.intervene.clean`), a plan from the selection
(:mod:`moeaudit.intervene.selection`), then every kind × scope through the chosen engine
(:mod:`moeaudit.intervene.fast` or :mod:`moeaudit.intervene.reference`), a null intervention for the noise
floor, and optionally the gradient estimate (:mod:`moeaudit.intervene.estimate`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from moeaudit.errors import invalid
from moeaudit.intervene.attention import SUPPORTED_NATIVE, UnsupportedAttention
from moeaudit.intervene.clean import CleanWindow, capture_clean, valid_next_mask
from moeaudit.intervene.delta import gap_statistics, routed_delta, routed_output_after, shared_delta
from moeaudit.intervene.estimate import nll_gradients, zero_estimates
from moeaudit.intervene.fast import (outcome_buffers, restarts_at_block, run_sequence_rows, run_token_rows,
                                    token_outcomes)
from moeaudit.intervene.reference import reference_logits
from moeaudit.intervene.selection import Plan, Selection, gate_ranks, plan_layer, sample_targets
from moeaudit.intervene.spotcheck import fast_disagreement, near_ties
from moeaudit.models.edits import mean_refusal
from moeaudit.models.moe_model import MoEModel
from moeaudit.options import ABLATION_KINDS, ENGINES, SCOPES, Engine, Scope, one_of  # noqa: F401 (Scope re-exported)
from moeaudit.scale.memory import trim_heap
from moeaudit.scale.units import window_done, windows_not_counted
from moeaudit.tables import EFFECT_COLUMNS, single_expert_rows  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

#: Noise floor (nats) above which a warning is logged.
NOISE_WARNING = 1e-4


@dataclass(frozen=True)
class InterveneConfig:
    """How to run the interventions (one validated object, stored whole in the manifest).

    Attributes
    ----------
    kinds : tuple of {"zero", "renorm", "reroute", "mean"}
        Intervention kinds (:data:`moeaudit.options.ABLATION_KINDS`); ``zero`` is the paper's removal
        (arXiv 2606.10703, Sec. 3.2).
    scopes : tuple of {"token", "sequence"}
        ``token``: only at the target position; ``sequence``: wherever the expert is active in the window.
    engine : {"fast", "reference"}
        ``fast`` recomputes only what can change (exact); ``reference`` runs a full forward per
        intervention. A model the fast engine cannot replay exactly falls back to ``reference`` with the
        reason in the stats.
    estimate : bool
        Also compute the gradient (attribution-patching) estimate of the token-scope ``zero`` effect for
        every active expert at the selection's target positions (routed selections only; it needs the
        fast engine's row machinery and is skipped, with a warning, on a fallback).
    rows_per_call : int
        Token-scope interventions batched per call of the fast engine.
    reference_batch : int
        Interventions stacked as batch rows per full forward of the reference engine.
    max_logit_elements : int
        Cap on the logits of one fast-engine call (memory): rows x vocabulary in token scope, rows x
        positions x vocabulary in sequence scope. 2**25 elements are 128 MiB of float32.
    noise_positions : int
        Positions per window and MoE layer for the null intervention that measures the noise floor.
    max_state_bytes : int or None
        Cap on the recurrent states one fast-engine call's rows carry through the later recurrent layers
        (each row its own conv and recurrent states, counted with the decode step's temporaries) on a
        hybrid model. None: half the clean pass's record, which keeps a token census within about twice
        the clean pass's memory (:meth:`moeaudit.intervene.recurrent.CleanStates.rows_per_call`); raise it
        where memory allows (real Qwen3-Next carries about 72 MiB of state per row).
    """

    kinds: tuple[str, ...] = ("zero",)
    scopes: tuple[str, ...] = ("token",)
    engine: Engine = "fast"
    estimate: bool = False
    rows_per_call: int = 256
    reference_batch: int = 1
    max_logit_elements: int = 1 << 25
    noise_positions: int = 16
    max_state_bytes: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("kinds", ABLATION_KINDS), ("scopes", SCOPES)):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value)
            bad = [v for v in value if v not in allowed]
            if bad or not value:
                raise invalid(name, "a non-empty subset of " + ", ".join(allowed), bad[0] if bad else value)
            object.__setattr__(self, name, tuple(dict.fromkeys(value)))
        if self.engine not in ENGINES:
            raise invalid("engine", one_of(ENGINES), self.engine)
        for name in ("rows_per_call", "reference_batch", "max_logit_elements"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise invalid(name, "a positive integer", value)
        if not isinstance(self.noise_positions, int) or self.noise_positions < 0:
            raise invalid("noise_positions", "a non-negative integer", self.noise_positions)
        if self.max_state_bytes is not None and (not isinstance(self.max_state_bytes, int)
                                                 or isinstance(self.max_state_bytes, bool) or self.max_state_bytes < 1):
            raise invalid("max_state_bytes", "a positive integer or None", self.max_state_bytes)


@dataclass(frozen=True)
class InterveneStats:
    """Counters of one :func:`compute_effects` call, for the run manifest.

    Attributes
    ----------
    engine : str
        Engine that produced the exact rows (``fast``, ``reference``, or ``fast+reference`` when a
        fallback happened part-way).
    requested_engine : str
    fallback_reason : str or None
        Why the fast engine was not used (None when it was).
    windows, interventions, estimates : int
        Windows processed, exact effect rows, gradient-estimate rows.
    skipped : dict str -> int
        Interventions not run, by reason: ``no_next_token`` (last position), ``padding``.
    seconds, seconds_clean, seconds_exact, seconds_estimate, seconds_noise : float
    noise_floor : float
        Max |ΔNLL| (nats) of null interventions (Δy = 0) through the engine used; NaN when none ran.
    noise_interventions : int
    near_ties : dict int -> int
        Per MoE layer, clean routing decisions (valid positions of the windows) that a rounding-sized change
        of the router logits would flip (:func:`moeaudit.intervene.spotcheck.near_ties`); a later layer's
        routing flipped there by an upstream intervention may be rounding, not an effect.
    near_tie_positions : int
        Routing decisions examined per MoE layer (the valid positions).
    estimate_spearman : float or None
        Spearman correlation between estimated and exact token-scope ``zero`` effects (when both exist).
    estimate_spearman_by_layer : dict int -> float
    """

    engine: str
    requested_engine: str
    fallback_reason: str | None
    windows: int
    interventions: int
    estimates: int
    skipped: dict[str, int]
    seconds: float
    seconds_clean: float
    seconds_exact: float
    seconds_estimate: float
    seconds_noise: float
    noise_floor: float
    noise_interventions: int
    estimate_spearman: float | None = None
    estimate_spearman_by_layer: dict[int, float] = field(default_factory=dict)
    near_ties: dict[int, int] = field(default_factory=dict)
    near_tie_positions: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EffectsResult:
    """What :func:`compute_effects` returns: the ``effects`` table and the counters."""

    effects: pd.DataFrame
    stats: InterveneStats

    def _repr_html_(self) -> str:
        from moeaudit.tables import html_summary

        frame = self.effects[~self.effects["estimate"]] if len(self.effects) else self.effects
        summary = (frame.groupby(["layer", "selection", "kind", "scope"])
                   .agg(interventions=("delta_nll", "size"), mean_delta_nll=("delta_nll", "mean"),
                        p95_delta_nll=("delta_nll", lambda v: v.quantile(0.95)), mean_kl=("kl", "mean"),
                        top1_flips=("top1_flip", "mean")).reset_index() if len(frame) else None)
        stats = self.stats
        notes = [f"{stats.interventions:,} exact interventions in {stats.seconds:.1f} s with the {stats.engine} engine; "
                 f"noise floor {stats.noise_floor:.1e} nats"
                 + (f"; fallback: {stats.fallback_reason}" if stats.fallback_reason else "")]
        return html_summary("effects of removing experts (ΔNLL in nats)", summary, notes)


def fast_unsupported_reason(moe: MoEModel) -> str | None:
    """Why the fast engine cannot replay ``moe`` exactly, or None when it can (checked before loading data)."""
    model = moe.model
    if moe.adapter.fast_refusal is not None:
        return moe.adapter.fast_refusal
    native = str(model.config._attn_implementation)
    if native not in SUPPORTED_NATIVE:
        return (f"attention implementation {native!r} is not replayed by the fast engine; load the model with "
                f"attn_implementation='sdpa' or 'eager'")
    from moeaudit.intervene.replay import final_norm
    from moeaudit.intervene.recurrent import mixer_layout

    try:
        inner = moe.adapter.backbone(model)
    except AttributeError:
        inner = None
    if inner is None or final_norm(moe) is None:
        return f"{type(model).__name__} does not expose a final norm beside its decoder layers"
    if model.get_output_embeddings() is None:
        return f"{type(model).__name__} has no output embeddings (LM head)"
    if model.training:
        return "the model is in training mode (dropout); call model.eval()"
    both = mixer_layout(moe).both
    if both:
        return (f"decoder layer {both[0]} holds keys/values and a recurrent state in one layer, which the fast "
                "engine does not replay")
    return None


def indexer_key_budget(indexer: torch.nn.Module) -> int | None:
    """The window length up to which ``indexer`` keeps every key for every query, or None for a selection rule
    moeaudit does not know (Qwen4-Exp's QSA indexer).

    * DeepSeek Sparse Attention (``DeepseekV32Indexer``, GLM-5's, A.X-K2's; arXiv 2512.02556): each query keeps
      its ``index_topk`` best keys (``topk = min(index_topk, T)``), so every key up to ``index_topk``;
    * MiniMax-M3's Lightning Indexer (``MiniMaxM3VLIndexer``): each query keeps its ``topk_blocks`` best blocks
      of ``block_size`` keys (``topk = min(topk_blocks, ceil(T / block_size))``), so every key up to
      ``topk_blocks * block_size``;
    * DeepSeek-V4's Lightning Indexer (``DeepseekV4Indexer``, in its CSA compressor): each query keeps its
      ``index_topk`` best compressed entries of ``compress_rate`` positions, so every entry up to
      ``(index_topk + 1) * compress_rate - 1`` positions (its sliding-window keys are not selected);
    * GLM-5.3-Next's pooled indexer (``Glm5NextTextIndexer``): each query keeps its ``index_topk / index_kpool``
      best complete pools of ``index_kpool`` keys plus, with ``index_kpool_always_select_tail``, the incomplete
      pool it sits in, so every key up to ``index_topk + index_kpool - 1``; without the tail a query never keeps
      the keys of its own incomplete pool (None).
    """
    rate = getattr(indexer, "compress_rate", None)
    if rate is not None and getattr(indexer, "index_topk", None) is not None:
        return (int(indexer.index_topk) + 1) * int(rate) - 1
    kpool = getattr(indexer, "index_kpool", None)
    if kpool is not None:
        return int(indexer.index_topk) + int(kpool) - 1 if getattr(indexer, "index_kpool_always_select_tail",
                                                                   False) else None
    if getattr(indexer, "index_topk", None) is not None:
        return int(indexer.index_topk)
    if getattr(indexer, "topk_blocks", None) is not None and getattr(indexer, "block_size", None) is not None:
        return int(indexer.topk_blocks) * int(indexer.block_size)
    return None


def _sparse_attention_reason(moe: MoEModel, seq_len: int) -> str | None:
    """Why windows of ``seq_len`` tokens cannot run fast through an indexer's sparse attention, or None.

    An indexer (DeepSeek Sparse Attention, MiniMax-M3's block indexer: :func:`indexer_key_budget`) scores every
    key and lets each query attend to the keys it selects. A row whose hidden state an intervention changed has
    new indexer queries and keys, so on a window longer than the indexer's budget the clean pass's selection
    does not carry over to it, and the fast engine does not redo the selection. On a window within the budget
    (2048 tokens in the released DeepSeek-V3.2 and MiniMax-M3 checkpoints) every query keeps every key: the
    attention is the dense causal one, which the fast engine replays exactly."""
    for index, layer in enumerate(moe.adapter.decoder_layers(moe.model)):
        attention = getattr(layer, "self_attn", None)
        indexer = getattr(attention, "indexer", None)
        if indexer is None:  # DeepSeek-V4: inside its CSA layers' compressor
            indexer = getattr(getattr(attention, "compressor", None), "indexer", None)
        if not isinstance(indexer, torch.nn.Module):
            continue
        budget = indexer_key_budget(indexer)
        if budget is None:
            return (f"decoder layer {index}'s attention selects keys with an indexer ({type(indexer).__name__}) "
                    "whose per-row key selection the fast engine does not replay")
        if seq_len > budget:
            return (f"windows of {seq_len} tokens exceed the {budget} tokens up to which decoder layer {index}'s "
                    f"indexer ({type(indexer).__name__}) keeps every key for every query, whose per-row key "
                    f"selection the fast engine does not replay; windows of at most {budget} tokens (--max-len) "
                    "run fast")
    return None


# ---------------------------------------------------------------------------- public entry point
def compute_effects(
    moe: MoEModel,
    input_ids: torch.Tensor,
    selection: Selection | None = None,
    *,
    config: InterveneConfig | None = None,
    attention_mask: torch.Tensor | None = None,
    mean_output: Mapping[int, torch.Tensor] | None = None,
    seq_offset: int = 0,
) -> EffectsResult:
    """Measure the causal effect of removing experts, one row per intervention.

    Parameters
    ----------
    moe : MoEModel
    input_ids : LongTensor [B, T]
        Corpus windows; window b is ``seq = seq_offset + b`` in the table.
    selection : Selection, optional
        What to intervene on; default :meth:`Selection.census` (every active expert at every position
        with a next token, at every MoE layer).
    config : InterveneConfig, optional
        Kinds, scopes, engine, estimate, batching; default: ``zero``, ``token``, fast engine.
    attention_mask : Tensor [B, T], optional
        1 for real tokens, 0 for padding; padded positions (and positions whose next token is padding)
        are skipped and counted.
    mean_output : mapping layer -> Tensor [E, H], optional
        Replacement outputs for kind ``mean``; when missing they are estimated on ``input_ids`` itself
        (mean ungated output of each expert over the tokens routed to it; zero for unused experts).
    seq_offset : int
        Added to the window index in the ``seq`` column (for sharded runs).

    Returns
    -------
    EffectsResult
        ``effects``: a DataFrame with :data:`EFFECT_COLUMNS`:

        ``layer, seq, pos, expert, kind, scope``
            The intervention (``expert`` = -1 for "all shared experts", the shared index for one;
            progressive rows name the j-th removed expert).
        ``delta_nll``
            NLL_t(intervened) - NLL_t(clean) of the true next token at the target t, nats.
        ``kl``
            KL(clean ‖ intervened) of the next-token distribution at t, nats.
        ``top1_flip``
            Whether the argmax next token at t changed.
        ``raw_gate``, ``combine_weight``, ``gate_rank``
            The expert's router probability at t, its clean combine weight (0 when inactive) and its rank
            by raw gate in A_ℓ(t) (0 = largest; -1 when inactive or shared).
        ``delta_nll_later_sum``
            Sequence scope: Σ of ΔNLL over positions after t that have a next token (NaN for token scope).
        ``gap_norm``, ``compensation_cos``
            ‖y_t - y_t^(-e)‖ of layer ℓ's MoE output at t, and cos(y_t - y_t^(-e), y_t^(-e)) (NaN when
            either is zero).
        ``estimate``
            True for gradient-estimate rows (kind ``zero``, scope ``token``, engine ``gradient``; ``kl``,
            ``gap_norm`` and ``compensation_cos`` NaN, ``top1_flip`` False); exact rows are False.
        ``j``, ``role``, ``shared``, ``nll_clean``, ``selection``, ``engine``
            Experts removed (progressive j; 1 otherwise), ``high``/``low`` for contrasts, shared-expert
            rows, clean NLL at t, the selection's name, the engine that produced the row.

        ``stats``: :class:`InterveneStats` (counters, seconds, noise floor, fallback reason).

    Notes
    -----
    Token scope changes only layer ℓ's MoE output at t; sequence scope changes it at every position where
    a removed expert is active in the clean routing of the window (for ``reroute`` the logits are masked
    only there: a pruned router would also renormalise p at positions where e was not selected).
    The last position of each window has no next token and is skipped (counted in ``skipped``), so a
    census has Σ_{ℓ, t < T-1} |A_ℓ(t)| rows per window.

    Both engines give the same numbers to float32 rounding (tested ≤ 1e-5 nats on every family);
    ``stats.noise_floor`` measures that rounding on the data at hand with null interventions.

    References
    ----------
    .. [1] Engmann, Medeiros Adriano, Giese, "From Observation to Intervention: A Causal Audit of Expert
       Importance in Mixture-of-Experts Models", arXiv 2606.10703 (2026): the ``zero`` kind, the
       single-position outcome ΔL_e(t), progressive ablation and the gap norm.

    Examples
    --------
    >>> result = compute_effects(moe, input_ids)  # doctest: +SKIP
    >>> result.effects.groupby("layer").delta_nll.mean()  # doctest: +SKIP
    >>> result.stats.noise_floor  # doctest: +SKIP
    """
    config = config or InterveneConfig()
    selection = selection or Selection.census()
    input_ids, attention_mask = _check_inputs(moe, input_ids, attention_mask)
    layers = _check_selection(moe, selection, config, input_ids)
    if "mean" in config.kinds:
        for index in layers:
            if moe.layer(index).weights_scale_input:
                raise mean_refusal(moe.layer(index))
        mean_output = _check_mean_output(moe, layers, mean_output, input_ids, attention_mask)
    started = time.perf_counter()
    run = _Run(moe, selection, config, layers, mean_output or {}, seq_offset)
    run.fallback_reason = fallback_reason(moe, input_ids, attention_mask, config)
    valid = valid_next_mask(input_ids, attention_mask)
    targets = sample_targets(selection, layers, valid)
    for b in range(input_ids.shape[0]):
        mask_b = None if attention_mask is None else attention_mask[b:b + 1]
        run.window(b, input_ids[b:b + 1], mask_b, valid[b], targets)
        window_done()
    effects = run.table()
    stats = run.stats(effects, time.perf_counter() - started, input_ids.shape[0])
    if stats.noise_floor > NOISE_WARNING:
        logger.warning("noise floor %.1e nats exceeds %.0e: effects below it are rounding, not causal (low "
                       "precision or an ill-conditioned model)", stats.noise_floor, NOISE_WARNING)
    return EffectsResult(effects, stats)


def fallback_reason(moe: MoEModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    config: InterveneConfig) -> str | None:
    """Why the run must use the reference engine (logged), or None when the requested engine runs: the fast
    engine cannot replay the model (:func:`fast_unsupported_reason`), these windows' sparse attention
    (:func:`_sparse_attention_reason`) or their padding (:func:`_padding_reason`), or disagrees with the
    reference on the first window (:func:`moeaudit.intervene.spotcheck.fast_disagreement`)."""
    if config.engine != "fast":
        return None
    reason = (fast_unsupported_reason(moe) or _sparse_attention_reason(moe, input_ids.shape[1])
              or _padding_reason(moe, attention_mask))
    if reason is None:
        with windows_not_counted():  # the check's windows are not the run's
            reason = fast_disagreement(moe, input_ids, attention_mask, compute_effects, config)
    if reason:
        logger.warning("fast engine unavailable, using the reference engine: %s", reason)
    return reason


def _padding_reason(moe: MoEModel, attention_mask: torch.Tensor | None) -> str | None:
    """Why windows padded before a real token (left padding, or a gap) cannot run fast on ``moe``, or None.

    A recurrent layer's clean pass masks its padded inputs (transformers' ``apply_mask_to_padding_states``),
    while the fast engine sweeps its states over the recorded inputs unmasked
    (:class:`moeaudit.intervene.recurrent.CleanStates`): after a padded position the states differ (up to
    0.5 nats on the tiny hybrids). Right padding is never swept (no row starts after it); moeaudit's own
    windows are right-padded (:func:`moeaudit.data.windows.pad_token_rows`).
    """
    if attention_mask is None:
        return None
    real = attention_mask.bool()
    padded_before = torch.cummax((~real).int(), dim=1).values.bool()
    if not (padded_before & real).any():
        return None
    from moeaudit.intervene.recurrent import mixer_layout

    layout = mixer_layout(moe)
    if not layout.recurrent:
        return None
    return (f"a window is padded before a real token (left padding) and decoder layers {list(layout.recurrent)} "
            "carry recurrent states, which the fast engine sweeps over unmasked inputs; pad on the right to "
            "run it")


def clean_window(moe: MoEModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 fast: bool) -> tuple[CleanWindow, str | None]:
    """The clean pass of one window ([1, T]), with the attention record the fast engine needs when ``fast``;
    an attention the fast engine cannot record falls back (the reason is returned and logged)."""
    if fast:
        try:
            return capture_clean(moe, input_ids, attention_mask, record_attention=True), None
        except UnsupportedAttention as err:
            logger.warning("fast engine unavailable, using the reference engine: %s", err)
            return capture_clean(moe, input_ids, attention_mask, record_attention=False), str(err)
    return capture_clean(moe, input_ids, attention_mask, record_attention=False), None


def removal_outcomes(moe: MoEModel, clean: CleanWindow, layer: int, positions, removed: torch.Tensor, *,
                     kind: str = "zero", engine: str = "fast", config: InterveneConfig | None = None,
                     mean_output: Mapping[int, torch.Tensor] | None = None,
                     attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Token-scope outcomes of removing arbitrary sets of routed experts at positions of one window.

    The same computation as :func:`compute_effects`' token scope (the same Δy, rows and outcomes), for
    callers that remove sets no :class:`Selection` names (joint removals, the subsets of a Shapley game:
    :mod:`moeaudit.interactions`).

    Parameters
    ----------
    moe : MoEModel
    clean : CleanWindow
        The window's clean pass (:func:`clean_window`; with the attention record for ``engine="fast"``).
    layer : int
        MoE layer (decoder-layer index).
    positions : sequence of int [N]
        Target positions (each with a real next token).
    removed : bool Tensor [N, E]
        The experts removed at each target (an empty row is a null intervention).
    kind : {"zero", "renorm", "reroute", "mean"}
    engine : {"fast", "reference"}
    config : InterveneConfig, optional
        Batching (``rows_per_call``, ``max_logit_elements``, ``max_state_bytes``, ``reference_batch``).
    mean_output : mapping layer -> Tensor [E, H], optional
        Required for ``mean``.
    attention_mask : Tensor [1, T], optional

    Returns
    -------
    dict of tensors [N]
        ``delta_nll``, ``kl``, ``top1_flip``, ``gap_norm``, ``compensation_cos`` (float64; bool flip).
    """
    config = config or InterveneConfig()
    num_experts = moe.layer(layer).num_experts
    if removed.dim() != 2 or removed.shape[1] != num_experts or removed.shape[0] != len(positions):
        raise invalid("removed", f"a bool tensor [{len(positions)}, {num_experts}]", tuple(removed.shape))
    plan = Plan()
    for pos, row in zip(positions, removed.cpu().numpy()):
        experts = tuple(int(e) for e in np.flatnonzero(row))
        plan.add(int(pos), experts[0] if experts else -1, experts, len(experts), None, -1)
    context = _Context(moe, config, engine, mean_output or {})
    out, _ = _Job(context, clean, layer, plan, kind, attention_mask).token()
    return out


# ---------------------------------------------------------------------------- validation
def _check_inputs(moe, input_ids, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise invalid("input_ids", "a LongTensor of shape [B, T]",
                      getattr(input_ids, "shape", type(input_ids).__name__))
    if input_ids.shape[1] < 2:
        raise invalid("input_ids", "windows of at least 2 tokens", tuple(input_ids.shape))
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise invalid("attention_mask", f"of shape {tuple(input_ids.shape)}", tuple(attention_mask.shape))
    device = moe.device
    return input_ids.to(device), None if attention_mask is None else attention_mask.to(device)


def _check_selection(moe: MoEModel, selection: Selection, config: InterveneConfig, input_ids) -> list[int]:
    layers = list(selection.layers) if selection.layers is not None else moe.moe_layer_indices
    for layer in layers:
        moe.layer(layer)  # one-line error for a dense / missing layer
    batch, seq_len = input_ids.shape
    if selection.what == "explicit":
        for layer, seq, pos, expert in selection.items:
            num_experts = moe.layer(layer).num_experts
            if not 0 <= seq < batch:
                raise invalid("items", f"seq in [0, {batch - 1}]", (layer, seq, pos, expert))
            if not 0 <= pos < seq_len:
                raise invalid("items", f"pos in [0, {seq_len - 1}]", (layer, seq, pos, expert))
            if not 0 <= expert < num_experts:
                raise invalid("items", f"expert in [0, {num_experts - 1}] at layer {layer}", (layer, seq, pos, expert))
    if selection.what == "contrast" and selection.metric_values is not None:
        for layer in layers:
            missing = [e for e in range(moe.layer(layer).num_experts) if (layer, e) not in selection.metric_values]
            if missing:
                raise invalid("metric_table", f"a value of {selection.metric!r} for every expert of layer {layer}",
                              f"none for expert {missing[0]}")
    if selection.what == "shared":
        for layer in layers:
            described = moe.layer(layer)
            if described.shared is None:
                raise invalid("layers", "MoE layers with shared experts for a shared selection", layer, moe.name)
            if selection.shared_index is not None and not 0 <= selection.shared_index < described.num_shared:
                raise invalid("index", f"in [0, {described.num_shared - 1}]", selection.shared_index,
                              f"layer {layer}")
        if config.kinds != ("zero",):
            raise invalid("kinds", "('zero',) for a shared-expert selection", config.kinds)
    return layers


def _check_mean_output(moe, layers, mean_output, input_ids, attention_mask):
    if mean_output is None:
        logger.info("kind 'mean': estimating each expert's mean output on the %d windows given (in-sample)",
                    input_ids.shape[0])
        return expert_mean_outputs(moe, input_ids, attention_mask=attention_mask, layers=layers)
    for layer in layers:
        described = moe.layer(layer)
        value = mean_output.get(layer)
        hidden = moe.config.hidden_size
        if value is None or tuple(value.shape) != (described.num_experts, hidden):
            raise invalid("mean_output", f"a [{described.num_experts}, {hidden}] tensor for layer {layer}",
                          None if value is None else tuple(value.shape))
    return mean_output


@torch.no_grad()
def expert_mean_outputs(moe: MoEModel, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                        layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """Each expert's mean ungated output f_e(x) over the (non-padding) tokens routed to it.

    Returns
    -------
    dict layer -> Tensor [E, H] float32 (zeros for an expert never selected)
    """
    layers = layers or moe.moe_layer_indices
    sums = {l: torch.zeros(moe.layer(l).num_experts, moe.config.hidden_size, dtype=torch.float64) for l in layers}
    counts = {l: torch.zeros(moe.layer(l).num_experts, dtype=torch.float64) for l in layers}
    for b in range(input_ids.shape[0]):
        with moe.capture(layers, keep_outputs=True) as trace:
            moe.model(input_ids=input_ids[b:b + 1],
                      attention_mask=None if attention_mask is None else attention_mask[b:b + 1])
        real = (torch.ones(input_ids.shape[1], dtype=torch.bool) if attention_mask is None
                else attention_mask[b].bool().cpu())
        for layer in layers:
            record = trace[layer].rows
            idx = record.topk_idx.cpu()[real].reshape(-1)
            out = record.ungated.cpu()[real].reshape(idx.shape[0], -1).double()
            sums[layer].index_add_(0, idx, out)
            counts[layer].index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
    return {l: (sums[l] / counts[l].clamp(min=1)[:, None]).float().to(moe.device) for l in layers}


# ---------------------------------------------------------------------------- the run
class _Run:
    """Accumulates rows and counters over the windows of one :func:`compute_effects` call."""

    def __init__(self, moe, selection, config, layers, mean_output, seq_offset):
        self.moe, self.selection, self.config = moe, selection, config
        self.layers, self.mean_output, self.seq_offset = layers, mean_output, seq_offset
        self.columns: dict[str, list] = defaultdict(list)
        self.skipped: Counter = Counter()
        self.seconds: Counter = Counter()
        self.noise: list[float] = []
        self.near_ties: Counter = Counter()
        self.near_tie_positions = 0
        self.fallback_reason: str | None = None
        self.engines_used: set[str] = set()

    @property
    def engine(self) -> str:
        return "reference" if self.fallback_reason or self.config.engine == "reference" else "fast"

    def context(self) -> _Context:
        return _Context(self.moe, self.config, self.engine, self.mean_output, self.selection.what == "shared",
                        self.selection.shared_index)

    # ------------------------------------------------------------------ one window
    def window(self, b: int, input_ids, attention_mask, valid, targets) -> None:
        tick = time.perf_counter()
        clean, reason = clean_window(self.moe, input_ids, attention_mask, self.engine == "fast")
        self.fallback_reason = self.fallback_reason or reason
        self.seconds["clean"] += time.perf_counter() - tick
        rows = valid.reshape(-1)
        self.near_tie_positions += int(rows.sum())
        for layer in self.moe.layers:
            ties = near_ties(layer, clean.records[layer.layer].router_logits[rows], self.moe.dtype)
            self.near_ties[layer.layer] += int(ties.sum())

        plans = {layer: self.plan(b, layer, clean, valid, targets) for layer in self.layers}
        picks = self.noise_positions(valid)
        tick = time.perf_counter()
        remaining = list(plans)
        for i, (layer, plan) in enumerate(plans.items()):
            if clean.states is not None:  # snapshots no remaining layer's rows read: freed for the logits
                clean.states.release(below=min(remaining[i:]) + 1)
            trim_heap()  # the previous layer's freed blocks back to the system, not kept resident
            for kind in self.config.kinds:
                if len(plan):
                    job = _Job(self.context(), clean, layer, plan, kind, attention_mask)
                    for scope in self.config.scopes:
                        out, later = job.token() if scope == "token" else job.sequence()
                        self.append_exact(b, clean, job, scope, out, later)
            if picks is not None and self.engine == "fast":
                # the layer's null rows while the states its census swept are still kept (not swept again)
                noise_tick = time.perf_counter()
                self.null_token_rows(clean, layer, picks)
                self.seconds["noise"] += time.perf_counter() - noise_tick
                tick += time.perf_counter() - noise_tick
        self.seconds["exact"] += time.perf_counter() - tick

        tick = time.perf_counter()
        self.noise_floor(clean, valid, attention_mask, picks)
        self.seconds["noise"] += time.perf_counter() - tick

        if self.config.estimate and self.selection.what != "shared":
            tick = time.perf_counter()
            if self.engine == "fast":
                self.run_estimate(b, clean, plans)
            elif b == 0:
                logger.warning("gradient estimate skipped: it needs the fast engine (%s)", self.fallback_reason)
            self.seconds["estimate"] += time.perf_counter() - tick

    def plan(self, b: int, layer: int, clean: CleanWindow, valid: torch.Tensor, targets) -> Plan:
        """The window's interventions at ``layer``; positions without a next token are counted as skipped."""
        described = self.moe.layer(layer)
        record = clean.records[layer]
        valid_np = valid.cpu().numpy()
        runs = len(self.config.kinds) * len(self.config.scopes)
        if self.selection.what == "explicit":
            explicit = []
            for item_layer, seq, pos, expert in self.selection.items:
                if item_layer == layer and seq == b:
                    if valid_np[pos]:
                        explicit.append((pos, expert))
                    else:
                        self.skipped[_skip_reason(pos, valid_np)] += runs
            return plan_layer(self.selection, described, record, np.zeros(0, dtype=int), explicit)
        if targets is not None:  # a seeded sample, drawn among valid positions only
            chosen = targets[layer]
            return plan_layer(self.selection, described, record, chosen[chosen[:, 0] == b][:, 1])
        per_position = {"active": described.top_k, "progressive": described.top_k - 1, "contrast": 2}.get(
            self.selection.what, 1)
        for pos in np.nonzero(~valid_np)[0]:
            self.skipped[_skip_reason(int(pos), valid_np)] += per_position * runs
        return plan_layer(self.selection, described, record, np.nonzero(valid_np)[0])

    # ------------------------------------------------------------------ rows
    def append_exact(self, b, clean: CleanWindow, job: "_Job", scope: str, out, later) -> None:
        plan = job.plan
        self.append(b, clean, job.layer, job.positions, np.asarray(plan.expert), kind=job.kind, scope=scope,
                    out=out, later=later, gate_rank=np.asarray(plan.gate_rank), j=np.asarray(plan.j),
                    role=np.array(plan.role, dtype=object), shared=job.shared, engine=self.engine)
        self.engines_used.add(self.engine)

    def append(self, b, clean: CleanWindow, layer: int, positions: torch.Tensor, experts: np.ndarray, *, kind, scope,
               out, later, gate_rank, j, role, shared: bool, engine: str, estimate: bool = False) -> None:
        """Add rows; ``out`` maps outcome names to tensors [n] (missing ones become NaN / False)."""
        record = clean.records[layer]
        n = len(experts)
        if shared:
            raw_gate = weight = np.full(n, np.nan)
        else:
            expert_t = torch.as_tensor(experts, dtype=torch.long, device=positions.device)
            probs = record.router_probs[positions]
            raw_gate = probs.gather(-1, expert_t[:, None])[:, 0].cpu().numpy()
            active = record.topk_idx[positions] == expert_t[:, None]
            weight = (record.combine_weight[positions].float() * active).sum(-1).cpu().numpy()
        columns = {
            "layer": np.full(n, layer), "seq": np.full(n, self.seq_offset + b), "pos": positions.cpu().numpy(),
            "expert": experts, "kind": np.full(n, kind, dtype=object), "scope": np.full(n, scope, dtype=object),
            "raw_gate": raw_gate, "gate_rank": gate_rank, "delta_nll_later_sum": later,
            "estimate": np.full(n, estimate), "j": j, "role": role, "shared": np.full(n, shared),
            "combine_weight": weight, "nll_clean": clean.nll[positions].double().cpu().numpy(),
            "selection": np.full(n, self.selection.name, dtype=object), "engine": np.full(n, engine, dtype=object),
        }
        for name in ("delta_nll", "kl", "gap_norm", "compensation_cos"):
            columns[name] = out[name].double().numpy() if name in out else np.full(n, np.nan)
        columns["top1_flip"] = out["top1_flip"].numpy() if "top1_flip" in out else np.zeros(n, dtype=bool)
        for name, value in columns.items():
            self.columns[name].append(value)

    # ------------------------------------------------------------------ noise floor
    def noise_positions(self, valid: torch.Tensor) -> torch.Tensor | None:
        """The window's positions for null token-scope rows (``noise_positions`` spread evenly over the
        positions with a next token); None when there are none."""
        count = self.config.noise_positions
        candidates = torch.nonzero(valid)[:, 0]
        if count == 0 or candidates.numel() == 0:
            return None
        return candidates[torch.linspace(0, candidates.numel() - 1, min(count, candidates.numel())).long()]

    def null_token_rows(self, clean: CleanWindow, layer: int, picks: torch.Tensor) -> None:
        """Null token-scope rows (Δy = 0) of the fast engine at MoE layer ``layer``; their |ΔNLL| join the
        noise floor."""
        zero = clean.layer_output[layer].new_zeros(len(picks), clean.layer_output[layer].shape[-1])
        with torch.no_grad():
            out = run_token_rows(self.moe, clean, layer, picks, lambda rows: zero[:len(rows)],
                                 rows_per_call=self.config.rows_per_call,
                                 max_logit_elements=self.config.max_logit_elements,
                                 max_state_bytes=self.config.max_state_bytes)
        self.noise.extend(out["delta_nll"].abs().tolist())

    def noise_floor(self, clean: CleanWindow, valid: torch.Tensor, attention_mask, picks: torch.Tensor | None) -> None:
        """Null interventions (Δy = 0) through the engine used; the max |ΔNLL| is the noise floor. The fast
        engine's token-scope null rows run per layer in :meth:`window` (:meth:`null_token_rows`); here its
        sequence-scope null row, or the reference engine's null forward."""
        if picks is None:
            return
        candidates = torch.nonzero(valid)[:, 0]
        first = self.layers[0]
        with torch.no_grad():
            if self.engine == "reference":  # a full forward with an ablation that removes nothing
                removal = [torch.zeros(clean.seq_len, self.moe.layer(first).num_experts, dtype=torch.bool)]
                for _, logits, _ in reference_logits(self.moe, clean, first, "zero", removal,
                                                     attention_mask=attention_mask):
                    self.noise.extend(token_outcomes(logits[candidates], clean, candidates)[0].abs().tolist())
                return
            if "sequence" in self.config.scopes:
                zero = clean.layer_output[first].new_zeros(len(candidates), clean.layer_output[first].shape[-1])
                (dn, _, _), = run_sequence_rows(self.moe, clean, first, [(candidates, zero)],
                                                max_logit_elements=self.config.max_logit_elements,
                                                max_state_bytes=self.config.max_state_bytes)
                self.noise.extend(dn.abs().tolist())

    # ------------------------------------------------------------------ gradient estimate
    def run_estimate(self, b, clean: CleanWindow, plans: dict[int, Plan]) -> None:
        """Estimate rows for every active expert at every target position of the window's plans."""
        positions = sorted({p for plan in plans.values() for p in plan.pos})
        layers = [layer for layer in self.layers if len(plans[layer])]
        if not positions:
            return
        pos = torch.tensor(positions, dtype=torch.long, device=clean.input_ids.device)
        grads = nll_gradients(self.moe, clean, layers, pos, rows_per_call=self.config.rows_per_call,
                              max_logit_elements=self.config.max_logit_elements,
                              max_state_bytes=self.config.max_state_bytes)
        for layer in layers:
            record = clean.records[layer]
            k = record.topk_idx.shape[1]
            with torch.no_grad():
                est = zero_estimates(grads[layer], record, pos).cpu()  # [N, k]
            n = est.numel()
            self.append(b, clean, layer, pos.repeat_interleave(k), record.topk_idx[pos].reshape(-1).cpu().numpy(),
                        kind="zero", scope="token", out={"delta_nll": est.reshape(-1)}, later=np.full(n, np.nan),
                        gate_rank=gate_ranks(record.raw_gate[pos]).reshape(-1).cpu().numpy(),
                        j=np.ones(n, dtype=int), role=np.full(n, None, dtype=object), shared=False,
                        engine="gradient", estimate=True)

    # ------------------------------------------------------------------ results
    def table(self) -> pd.DataFrame:
        if not self.columns:
            return pd.DataFrame({name: pd.Series(dtype=object) for name in EFFECT_COLUMNS})
        frame = pd.DataFrame({name: np.concatenate(self.columns[name]) for name in EFFECT_COLUMNS})
        for name in ("layer", "seq", "pos", "expert", "gate_rank", "j"):
            frame[name] = frame[name].astype(np.int64)
        for name in ("top1_flip", "estimate", "shared"):
            frame[name] = frame[name].astype(bool)
        return frame

    def stats(self, effects: pd.DataFrame, seconds: float, windows: int) -> InterveneStats:
        estimates = int(effects["estimate"].sum()) if len(effects) else 0
        spearman, by_layer = estimate_correlation(effects) if estimates else (None, {})
        return InterveneStats(
            engine="+".join(sorted(self.engines_used)) if self.engines_used else self.engine,
            requested_engine=self.config.engine,
            fallback_reason=self.fallback_reason,
            windows=windows,
            interventions=int(len(effects) - estimates),
            estimates=estimates,
            skipped=dict(self.skipped),
            seconds=seconds,
            seconds_clean=self.seconds["clean"],
            seconds_exact=self.seconds["exact"],
            seconds_estimate=self.seconds["estimate"],
            seconds_noise=self.seconds["noise"],
            noise_floor=float(max(self.noise)) if self.noise else float("nan"),
            noise_interventions=len(self.noise),
            estimate_spearman=spearman,
            estimate_spearman_by_layer=by_layer,
            near_ties={layer.layer: int(self.near_ties[layer.layer]) for layer in self.moe.layers},
            near_tie_positions=self.near_tie_positions,
        )


@dataclass(frozen=True)
class _Context:
    """What a :class:`_Job` needs from its caller: the model, the engine settings and the engine in use."""

    moe: MoEModel
    config: InterveneConfig
    engine: str
    mean_output: Mapping[int, torch.Tensor]
    shared: bool = False
    shared_index: int | None = None


class _Job:
    """The interventions of one window at one MoE layer with one kind, run in either scope by either engine."""

    def __init__(self, run: _Context, clean: CleanWindow, layer: int, plan: Plan, kind: str, attention_mask):
        self.run, self.clean, self.layer, self.plan, self.kind = run, clean, layer, plan, kind
        self.attention_mask = attention_mask
        self.described = run.moe.layer(layer)
        self.record = clean.records[layer]
        self.shared = run.shared
        self.shared_index = run.shared_index
        self.mean = run.mean_output.get(layer)
        self.positions = torch.tensor(plan.pos, dtype=torch.long, device=clean.input_ids.device)
        self.removed = _removed_mask(plan, self.described.num_experts, self.positions.device)

    @property
    def fast(self) -> bool:
        return self.run.engine == "fast"

    def delta(self, positions: torch.Tensor, removed: torch.Tensor | None) -> torch.Tensor:
        """Δy of layer ℓ's MoE output at ``positions`` (``removed`` [n, E] for routed interventions)."""
        with torch.no_grad():
            if self.shared:
                return shared_delta(self.described, self.record, positions, self.shared_index)
            return routed_delta(self.described, self.record, positions, removed, self.kind, self.mean)

    def output(self, positions: torch.Tensor, removed: torch.Tensor | None) -> torch.Tensor:
        """Layer ℓ's intervened MoE output at ``positions``, formed from its remaining parts (what the fast
        engine's rows put in place of the block's output where they restart at the block:
        :func:`moeaudit.intervene.fast.restarts_at_block`)."""
        record = self.record
        with torch.no_grad():
            if self.shared:
                remaining = record.routed_output[positions]
                if self.shared_index is None:
                    return remaining
                return remaining + (record.shared_output[positions] + self.delta(positions, removed))
            routed = routed_output_after(self.described, record, positions, removed, self.kind, self.mean)
            return routed if record.shared_output is None else routed + record.shared_output[positions]

    def reference(self, removal: list[torch.Tensor]):
        return reference_logits(self.run.moe, self.clean, self.layer, self.kind, removal, shared=self.shared,
                                shared_index=self.shared_index, mean_output=self.mean,
                                attention_mask=self.attention_mask, batch=self.run.config.reference_batch)

    # ------------------------------------------------------------------ token scope
    def token(self):
        """Outcomes at each target with only layer ℓ's output at the target changed; ``later`` is NaN."""
        n = len(self.plan)
        later = np.full(n, np.nan)
        if self.fast:
            with torch.no_grad():
                out = run_token_rows(self.run.moe, self.clean, self.layer, self.positions,
                                     lambda rows: self.delta(self.positions[rows], self.removed[rows]),
                                     rows_per_call=self.run.config.rows_per_call,
                                     max_logit_elements=self.run.config.max_logit_elements,
                                     max_state_bytes=self.run.config.max_state_bytes,
                                     make_output=lambda rows: self.output(self.positions[rows], self.removed[rows]))
            return out, later
        seq_len = self.clean.seq_len
        removal = []
        for i, pos in enumerate(self.plan.pos):
            mask = torch.zeros((seq_len,) if self.shared else (seq_len, self.described.num_experts), dtype=torch.bool)
            mask[pos] = True if self.shared else self.removed[i].cpu()
            removal.append(mask)
        out = outcome_buffers(n)
        for i, logits, moe_output in self.reference(removal):
            pos = self.positions[i:i + 1]
            dn, kl, flip = token_outcomes(logits[pos], self.clean, pos)
            # the gap is read from the reference forward's own MoE output
            gap_norm, cosine = gap_statistics(self.record, pos, moe_output[pos] - self.record.moe_output[pos])
            for name, value in zip(out, (dn, kl, flip, gap_norm, cosine)):
                out[name][i] = value[0].to("cpu", out[name].dtype)
        return out, later

    # ------------------------------------------------------------------ sequence scope
    def sequence(self):
        """One pass per distinct removed set (removed wherever any of its experts is active), outcomes at
        each target, and Σ ΔNLL over later positions."""
        clean, record = self.clean, self.record
        seq_len, device = clean.seq_len, self.positions.device
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, experts in enumerate(self.plan.removed):
            groups[experts].append(i)
        changes = []  # per group: positions where layer ℓ's output changes, and the removal mask there
        for experts in groups:
            if self.shared:
                changes.append((torch.arange(seq_len, device=device), None))
                continue
            mask_row = torch.zeros(self.described.num_experts, dtype=torch.bool, device=device)
            mask_row[list(experts)] = True
            where = torch.nonzero(mask_row[record.topk_idx].any(dim=-1))[:, 0]
            changes.append((where, mask_row.expand(len(where), -1)))
        if self.fast:
            deltas = [(where, self.delta(where, mask)) for where, mask in changes]
            outputs = [self.output(where, mask) for where, mask in changes] if restarts_at_block(self.run.moe) \
                else None
            with torch.no_grad():
                per_group = run_sequence_rows(self.run.moe, clean, self.layer, deltas,
                                              max_logit_elements=self.run.config.max_logit_elements,
                                              max_state_bytes=self.run.config.max_state_bytes, outputs=outputs)
        else:
            per_group = self._sequence_reference(changes)
        n = len(self.plan)
        out = outcome_buffers(n, ("delta_nll", "kl", "top1_flip"))
        later = np.full(n, np.nan)
        changed_at_target = torch.zeros(n, dtype=torch.bool)
        for (dn, kl, flip), members, (where, _) in zip(per_group, groups.values(), changes):
            after = torch.flip(torch.cumsum(torch.flip(dn, [0]), 0), [0])  # Σ_{t' >= t} ΔNLL_t'
            where = set(where.tolist())
            for i in members:
                pos = self.plan.pos[i]
                out["delta_nll"][i], out["kl"][i], out["top1_flip"][i] = dn[pos], kl[pos], flip[pos]
                later[i] = float(after[pos + 1]) if pos + 1 < seq_len else 0.0
                changed_at_target[i] = pos in where
        # the MoE-output gap at the target equals the token-scope one (layer ℓ's input is unchanged) where
        # the intervention acts at the target, and is 0 where it does not (e.g. an inactive expert)
        delta = self.delta(self.positions, self.removed)
        delta = delta * changed_at_target.to(delta.device, delta.dtype)[:, None]
        out["gap_norm"], out["compensation_cos"] = (v.cpu() for v in gap_statistics(record, self.positions, delta))
        return out, later

    def _sequence_reference(self, changes):
        clean = self.clean
        seq_len = clean.seq_len
        removal = []
        for where, mask in changes:
            if self.shared:
                removal.append(torch.ones(seq_len, dtype=torch.bool))
            else:
                full = torch.zeros(seq_len, self.described.num_experts, dtype=torch.bool)
                full[where.cpu()] = mask.cpu()
                removal.append(full)
        valid = clean.valid_next
        safe = torch.arange(seq_len, device=valid.device).clamp(max=seq_len - 2)
        results = []
        for _, logits, _ in self.reference(removal):
            dn, kl, flip = token_outcomes(logits[safe], clean, safe)
            zero = torch.zeros_like(dn)
            results.append((torch.where(valid, dn, zero).cpu().double(), torch.where(valid, kl, zero).cpu().double(),
                            (flip & valid).cpu()))
        return results


def _skip_reason(pos: int, valid_np) -> str:
    return "no_next_token" if pos == len(valid_np) - 1 else "padding"


def _removed_mask(plan: Plan, num_experts: int, device) -> torch.Tensor:
    """bool [N, E]: the experts each planned intervention removes."""
    rows = [i for i, experts in enumerate(plan.removed) for _ in experts]
    cols = [e for experts in plan.removed for e in experts]
    mask = torch.zeros(len(plan), num_experts, dtype=torch.bool)
    mask[rows, cols] = True
    return mask.to(device)


def estimate_correlation(effects: pd.DataFrame) -> tuple[float | None, dict[int, float]]:
    """Spearman correlation of gradient estimates with exact token-scope ``zero`` effects.

    Pairs rows on (layer, seq, pos, expert) among single-expert routed removals. Returns
    (overall rho or None when fewer than 3 pairs, {layer: rho}).
    """
    from scipy.stats import spearmanr

    if not len(effects):
        return None, {}
    keys = ["layer", "seq", "pos", "expert"]
    single = (effects["kind"] == "zero") & (effects["scope"] == "token") & (effects["j"] == 1) & ~effects["shared"]
    exact = effects[single & ~effects["estimate"]].drop_duplicates(keys)
    est = effects[single & effects["estimate"]]
    pairs = exact[keys + ["delta_nll"]].merge(est[keys + ["delta_nll"]], on=keys, suffixes=("_exact", "_estimate"))
    if len(pairs) < 3:
        return None, {}

    def rho(frame) -> float:
        if len(frame) < 3:
            return float("nan")
        return float(spearmanr(frame["delta_nll_exact"], frame["delta_nll_estimate"]).statistic)

    return rho(pairs), {int(layer): rho(group) for layer, group in pairs.groupby("layer")}
