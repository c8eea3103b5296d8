"""The adapter contract: one small class per MoE family, all exposing the same view of a model.

An adapter knows where its family keeps the router, the fused experts and the shared experts, and
re-implements the family's routing rule (:meth:`FamilyAdapter.route`) so that edited router logits can be
re-routed exactly as the library would. Everything else in moeaudit talks to :class:`MoELayer` and
:class:`Routing` only.

Facts relied on (transformers 5.13 – 5.23; checked at load time by :mod:`moeaudit.models.contract`):

* every router module returns ``(router_logits, topk_weights, topk_idx)``, with raw logits first;
* every experts module is called as ``experts(hidden[N, H], topk_idx[N, k], topk_weights[N, k])`` and
  stores its weights fused as 3-D parameters ``gate_up_proj`` and ``down_proj`` (no per-expert modules);
* the experts module multiplies each selected expert's output by its ``topk_weights`` entry and sums over
  the k slots, so calling its ``forward`` on one (token, slot) row with weight 1 yields the *ungated*
  expert output f_e(x).
"""

from __future__ import annotations

import abc
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator, Literal

import torch
from torch import nn
import torch.nn.functional as F

RoutingRule = Literal[
    "softmax_topk",
    "softmax_topk_renorm",
    "softmax_greedy_scaled",
    "softmax_group_limited_scaled",
    "topk_logits_softmax",
    "sigmoid_bias_group_scaled",
    "softmax_group_sum_scaled",
    "sigmoid_bias_renorm",
    "softmax_bias_renorm",
    "sparsemixer",
    "sigmoid_topk_logits_input",
    "softmax_topk_renorm_expert_scaled",
    "softmax_topk_pnorm",
    "sqrtsoftplus_bias_renorm_scaled",
    "softmax_group_sum_renorm_scaled",
]

ROUTING_RULE_DOC: dict[str, str] = {
    "softmax_topk": "softmax over all experts, top-k of the probabilities, weights not renormalised",
    "softmax_topk_renorm": "softmax over all experts, top-k, weights renormalised to sum to 1",
    "softmax_greedy_scaled": "softmax over all experts, greedy top-k, weights x routed_scaling_factor",
    "softmax_group_limited_scaled": (
        "softmax over all experts, top groups by max score, top-k inside them, x routed_scaling_factor"
    ),
    "topk_logits_softmax": "top-k of the raw logits (with bias), softmax over the k selected",
    "sigmoid_bias_group_scaled": (
        "sigmoid scores; top groups by the sum of their two best (score + correction bias), top-k of "
        "score + bias inside them; weights = scores, renormalised if norm_topk_prob, x routed_scaling_factor"
    ),
    "sigmoid_bias_group0_scaled": (
        "sigmoid scores; top groups by the sum of their two best (score + correction bias), the other groups' "
        "selection scores set to 0; top-k; weights = scores, renormalised if norm_topk_prob, x routed_scaling_factor"
    ),
    "sigmoid_bias_scaled": (
        "sigmoid scores; top-k of score + correction bias; weights = scores, renormalised if norm_topk_prob, "
        "x routed_scaling_factor"
    ),
    "sigmoid_bias_group_renorm": (
        "sigmoid scores; top groups by the sum of their two best (score + correction bias), top-k of score + bias "
        "inside them; weights = scores, renormalised if norm_topk_prob (the block scales the routed sum)"
    ),
    "softmax_group_sum_scaled": (
        "softmax scores; top groups by the sum of their two best, top-k inside them; weights renormalised if "
        "norm_topk_prob, x routed_scaling_factor"
    ),
    "softmax_group_sum_renorm_scaled": (
        "softmax scores of float32 logits; top groups by the sum of their two best, top-k inside them; weights "
        "renormalised (sum + 1e-20), x routed_scaling_factor"
    ),
    "sigmoid_bias_renorm": "sigmoid scores; top-k of score + correction bias; weights = scores renormalised",
    "sigmoid_bias_renorm_scaled": (
        "sigmoid scores of the router's logits (times its output multiplier); top-k of score + correction bias; "
        "weights = scores renormalised (sum + 1e-15), x routed_scaling_factor"
    ),
    "softmax_bias_renorm": (
        "softmax over all experts; top-k of probability + correction bias; weights = probabilities "
        "renormalised (sum clamped below)"
    ),
    "softmax_bias_scaled": (
        "softmax over all experts (identity experts included); top-k of probability + correction bias; weights "
        "= probabilities x routed_scaling_factor, not renormalised"
    ),
    "sigmoid_topk_logits_input": (
        "top-k of the raw logits; each chosen expert's weight is the sigmoid of its logit and scales the "
        "expert's input, not its output"
    ),
    "sqrtsoftplus_bias_renorm_scaled": (
        "sqrt(softplus) scores; top-k of score + correction bias; weights = scores renormalised (sum + 1e-20), "
        "x routed_scaling_factor"
    ),
    "softmax_topk_pnorm": (
        "softmax over all experts in the logits' dtype, top-k, weights divided by their p-norm "
        "(moe_normalize_expert_weights; p = 1 renormalises)"
    ),
    "softmax_topk_renorm_expert_scaled": (
        "softmax over all experts of logits read from the router's own RMS-normed, scaled input; top-k, weights "
        "renormalised to sum to 1, then x a learned per-expert scale"
    ),
    "inferred_scored_topk": (
        "a scored top-k rule inferred at load (score function, correction bias, groups, renormalisation, "
        "scaling: see the routing parameters) and verified bit for bit against the router module"
    ),
    "sparsemixer": (
        "two slots: the argmax logit, then the argmax of the rest; each weighted by a softmax over the logits "
        "within a relative gap of 2 x jitter_eps of that maximum"
    ),
}


#: How a group-limited router's group score is named in the routing parameters (``ScoredRule.group_score``).
GROUP_SCORE_LABELS: dict[str, str] = {"top2_sum": "sum of its 2 best", "max": "its best"}


@dataclass(frozen=True)
class Routing:
    """The routing decision for N tokens at one MoE layer.

    Attributes
    ----------
    router_logits : Tensor [N, E]
        Raw router logits (the router's first output).
    router_probs : Tensor [N, E], float32
        The family's router probabilities of all routed experts (:meth:`FamilyAdapter.router_probs`).
    topk_idx : Tensor [N, k], int64
        Selected experts, in the module's own slot order.
    raw_gate : Tensor [N, k], float32
        ``router_probs`` gathered at ``topk_idx`` (the paper's gate weight, arXiv 2606.10703 Sec. 3.1).
    combine_weight : Tensor [N, k]
        What the experts module multiplies each expert's output by, bit-identical to the library's.
    """

    router_logits: torch.Tensor
    router_probs: torch.Tensor
    topk_idx: torch.Tensor
    raw_gate: torch.Tensor
    combine_weight: torch.Tensor


def block_hidden(output) -> torch.Tensor:
    """The hidden states an MoE block or decoder layer returned.

    Most families return a tensor; GPT-OSS's MLP returns ``(hidden, router_scores)`` and some decoder
    layers a tuple whose first element is the hidden states.
    """
    return output[0] if isinstance(output, tuple) else output


@dataclass
class MoELayer:
    """One MoE layer of a model, described uniformly across families.

    Attributes
    ----------
    layer : int
        The model's own decoder-layer index (DeepSeek-V2-Lite's first MoE layer is 1).
    block, router, experts : nn.Module
        The library's MoE block, its router and its fused experts module.
    shared : nn.Module or None
        The shared-expert MLP (all shared experts fused into one module where the family does that).
    shared_gate : nn.Module or None
        The shared expert's gate (Qwen2-MoE: a sigmoid of a linear map); None when ungated.
    num_experts, top_k : int
        Routed experts and experts per token.
    num_shared : int
        Number of shared experts (0 when none).
    shared_intermediate : int
        Intermediate width of one shared expert (to ablate one of several fused shared experts).
    routing_rule : str
        One of :data:`ROUTING_RULE_DOC`.
    """

    layer: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    routing_rule: str
    shared: nn.Module | None = None
    shared_gate: nn.Module | None = None
    num_shared: int = 0
    shared_intermediate: int = 0
    adapter: "FamilyAdapter | None" = field(default=None, repr=False)

    @property
    def shared_gated(self) -> bool:
        return self.shared_gate is not None

    def route(self, router_logits: torch.Tensor, removed: torch.Tensor | None = None) -> Routing:
        """Re-route from (possibly edited) logits with the family's own rule; see FamilyAdapter.route."""
        assert self.adapter is not None
        return self.adapter.route(self, router_logits, removed)

    def call_router(self, hidden: torch.Tensor):
        """Call the router module on hidden states [N, H] as its block does (some take extra arguments)."""
        assert self.adapter is not None
        return self.adapter.call_router(self, hidden)

    def router_probs(self, router_logits: torch.Tensor) -> torch.Tensor:
        """The router probabilities p_e(x_t) of every routed expert, float32 [N, E]; see
        :meth:`FamilyAdapter.router_probs`. The one definition behind ``raw_gate`` and ``router_probs``."""
        assert self.adapter is not None
        return self.adapter.router_probs(self, router_logits)

    def ungated_outputs(self, hidden: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """f_e(x) for every (token, slot): hidden [N, H], topk_idx [N, k] -> [N, k, H].

        Calls the experts module's own ``forward`` (not ``__call__``, so no hooks fire) on one row per
        (token, slot) with weight 1, so the library's kernel computes the expert function itself.
        """
        n, k = topk_idx.shape
        rows = hidden.repeat_interleave(k, dim=0)
        return self._single_expert_rows(rows, topk_idx.reshape(-1)).reshape(n, k, -1)

    def _single_expert_rows(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.adapter is not None:
            return self.adapter.single_expert_rows(self, rows, index)
        return experts_forward_rows(self.experts, rows, index)

    @property
    def weights_scale_input(self) -> bool:
        """Whether a combine weight scales its expert's input (Llama 4), so the block is not linear in it."""
        return bool(self.adapter is not None and self.adapter.weights_scale_input)

    def weighted_terms(self, hidden: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each slot's term of the routed output: hidden [N, H], topk_idx and weights [N, k] -> [N, k, H].

        :math:`w_s f_{e_s}(x)` for every family but those whose weight scales the input (Llama 4), where it
        is :math:`f_{e_s}(w_s x)`; either way the routed output is the sum over slots (to rounding).
        """
        if not self.weights_scale_input:
            return weights.unsqueeze(-1) * self.ungated_outputs(hidden, topk_idx)
        n, k = topk_idx.shape
        rows = hidden.repeat_interleave(k, dim=0) * weights.reshape(-1, 1).to(hidden.dtype)
        return self._single_expert_rows(rows, topk_idx.reshape(-1)).reshape(n, k, -1)

    def expert_parameter_count(self) -> int:
        return sum(p.numel() for p in self.experts.parameters())

    def router_weight(self) -> torch.Tensor:
        """The router's linear map [E, H] (where the family keeps it)."""
        assert self.adapter is not None
        return self.adapter.router_weight(self)


def experts_forward_rows(experts: nn.Module, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """f_e(row) for one expert per row, ``rows`` [M, H], ``index`` [M] -> [M, H]: the experts module's own
    ``forward`` (not ``__call__``, so no hooks fire) with top-k 1 and weight 1."""
    ones = torch.ones((rows.shape[0], 1), dtype=rows.dtype, device=rows.device)
    return type(experts).forward(experts, rows, index.reshape(-1, 1), ones)


def attached_view(module: nn.Module, make_view: Callable[[], object], forward: Callable) -> object:
    """The view moeaudit reads ``module`` through (Llama 4's, A.X-K1's and ERNIE-4.5-VL's MoE blocks, Gemma 4's
    decoder layers), made once per module and kept in its ``__dict__`` (not registered, so the state dict
    stays the library's), with ``module``'s forward re-expressed through it: ``forward`` bound to the
    instance. Each family's load-time check requires that forward to equal the library's bit for bit."""
    view = module.__dict__.get("_moeaudit_view")
    if view is None:
        view = make_view()
        module.__dict__["_moeaudit_view"] = view
        module.forward = types.MethodType(forward, module)
    return view


def check_same_as_library(module: nn.Module, inputs: tuple, layer: int, what: str) -> None:
    """The forward :func:`attached_view` re-expressed for ``module`` equals its class's own ``forward`` bit for bit
    on ``inputs`` (every output tensor); a ContractError naming ``what`` otherwise."""
    from moeaudit.errors import ContractError

    with torch.no_grad():
        ours, theirs = module(*inputs), type(module).forward(module, *inputs)
    ours, theirs = (ours, theirs) if isinstance(ours, tuple) else ((ours,), (theirs,))
    if len(ours) != len(theirs) or not all(
            a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b))
            for a, b in zip(ours, theirs)):
        raise ContractError(f"layer {layer} ({type(module).__name__}): moeaudit's view of the {what} differs from "
                            "the library's forward; install the versions in moeaudit's constraints.txt "
                            "(transformers==5.23.0)")


class ExpertsView(nn.Module):
    """A library experts module seen through another call (Llama 4's dense batched experts, Step-3.7's scaled
    ones): ``inner`` is the library's module, a child of the view (which is not itself registered in the
    model), so the view's parameters are the library's and the fused weights are its."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.inner = experts
        self.num_experts = int(experts.num_experts)

    @property
    def gate_up_proj(self) -> nn.Parameter:
        return self.inner.gate_up_proj

    @property
    def up_proj(self) -> nn.Parameter:  # ungated experts (Nemotron-H's ReLU²)
        return self.inner.up_proj

    @property
    def down_proj(self) -> nn.Parameter:
        return self.inner.down_proj


class FamilyAdapter(abc.ABC):
    """Base adapter; a family subclasses it and sets the class attributes (and overrides what differs)."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    architectures: ClassVar[tuple[str, ...]]
    router_attr: ClassVar[str] = "gate"
    #: Attribute of the decoder layer that holds the MoE block (``mlp``; Granite: ``block_sparse_moe``).
    block_attr: ClassVar[str] = "mlp"
    shared_attr: ClassVar[str | None] = None
    shared_gate_attr: ClassVar[str | None] = None
    #: The combine weight scales the expert's input, not its output (Llama 4): see MoELayer.weighted_terms.
    weights_scale_input: ClassVar[bool] = False
    #: Why a pruned checkpoint of this family cannot be exported (None: it can), ending in what to do instead.
    export_refusal: ClassVar[str | None] = None
    #: Why the fast engine cannot replay this family's decoder layers (None: it can, or finds out itself); its
    #: interventions then run on the reference engine, with this reason logged.
    fast_refusal: ClassVar[str | None] = None
    #: Keyword arguments the family's backbone hands its decoder layers that :meth:`row_layer_arguments`
    #: supplies to the fast engine's rows (beyond those every family's rows get).
    replayed_layer_arguments: ClassVar[frozenset[str]] = frozenset()

    # ----------------------------------------------------------------- discovery
    def audited_config(self, config):
        """The config of the part of a composite checkpoint that is audited (the checkpoint's own by default;
        Qwen3-Omni-MoE: its thinker's, whose class loads from the whole checkpoint)."""
        return config

    def audited_model(self, model: nn.Module) -> nn.Module:
        """The part of an already-built composite model that is audited (:meth:`audited_config`'s model)."""
        return model

    def backbone(self, model: nn.Module) -> nn.Module:
        """The module that holds the decoder layers, the rotary embedding and the final norm (``model.model``;
        a vision-language model's ``model.model.language_model``)."""
        return model.model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.backbone(model).layers

    def is_moe_block(self, mlp: nn.Module) -> bool:
        return hasattr(mlp, "experts") and hasattr(mlp, self.router_attr)

    def find_layers(self, model: nn.Module) -> list[MoELayer]:
        found = []
        for index, decoder_layer in enumerate(self.decoder_layers(model)):
            mlp = getattr(decoder_layer, self.block_attr, None)
            if mlp is None or not self.is_moe_block(mlp):
                continue
            found.append(self.describe_layer(model.config.get_text_config(), index, mlp))
        return found

    def unaudited_layers(self, model: nn.Module) -> dict[int, tuple[MoELayer, str]]:
        """Decoder layers with routed experts that moeaudit does not audit, each described and with why
        (DeepSeek-V4's hash-routed layers); empty for every other family. ``describe`` lists them apart from
        the dense layers, and the parameter counts include their experts."""
        return {}

    def describe_layer(self, config, index: int, block: nn.Module) -> MoELayer:
        router = getattr(block, self.router_attr)
        shared = getattr(block, self.shared_attr, None) if self.shared_attr else None
        shared_gate = getattr(block, self.shared_gate_attr, None) if self.shared_gate_attr else None
        num_shared, shared_intermediate = self.shared_layout(config, shared)
        return MoELayer(
            layer=index,
            block=block,
            router=router,
            experts=block.experts,
            num_experts=int(router.num_experts),
            top_k=int(router.top_k),
            routing_rule=self.routing_rule(config),
            shared=shared,
            shared_gate=shared_gate,
            num_shared=num_shared,
            shared_intermediate=shared_intermediate,
            adapter=self,
        )

    def shared_layout(self, config, shared: nn.Module | None) -> tuple[int, int]:
        if shared is None:
            return 0, 0
        return 1, int(shared.intermediate_size)

    def check_block(self, layer: MoELayer, hidden: torch.Tensor) -> None:
        """Family-specific load-time check of the block on probe hidden states [N, H] (none by default)."""

    # ----------------------------------------------------------------- fast engine rows
    @contextmanager
    def recording_layer_extras(self, moe) -> Iterator[dict]:
        """Record, during the clean forward inside the block, the per-position inputs the backbone hands each
        decoder layer beside the residual stream (``{layer: Tensor [1, T, ...]}``, filled as the forward
        runs); nothing for a family without any."""
        yield {}

    def row_layer_arguments(self, moe, clean, position_ids: torch.Tensor,
                            first_layer: int) -> Callable[[int], dict] | None:
        """The extra keyword arguments of each decoder layer the fast engine's rows run from ``first_layer``
        (at positions ``position_ids`` [R, S] of the window ``clean``), as ``arguments(index)``; None for a
        family whose layers need none."""
        return None

    # ----------------------------------------------------------------- routing
    def router_weight(self, layer: MoELayer) -> torch.Tensor:
        return layer.router.weight

    def single_expert_rows(self, layer: MoELayer, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """f_e(row) for one expert per row (:func:`experts_forward_rows`; LongCat-Flash overrides it)."""
        return experts_forward_rows(layer.experts, rows, index)

    def identity_experts(self, layer: MoELayer) -> int:
        """How many of ``layer``'s experts, the last ones, return their input unchanged and hold no weights
        (LongCat-Flash's zero-computation experts); 0 for every other family."""
        return 0

    def exported_expert_counts(self, config, kept: list[int], layer: MoELayer) -> dict[str, int] | None:
        """The config fields a pruned export of ``layer`` keeping ``kept`` rewrites, with their values, where
        the family counts its experts in more than one field (LongCat-Flash: real and identity experts); None:
        every field equal to the expert count takes the kept count (:mod:`moeaudit.prune.export`)."""
        return None

    def expert_rows(self, layer: MoELayer) -> int:
        """How many consecutive leading-axis rows each expert owns in the experts module's parameters: 1 for
        fused 3-D weights [E, ., .]; DBRX's 2-D ``w1`` / ``v1`` / ``w2`` [E·F, H]: F. The pruned export slices
        whole experts' rows (:mod:`moeaudit.prune.export`)."""
        return 1

    def expert_count_config(self, text_config):
        """The (sub-)config that holds the routed-expert count fields: the text config itself; DBRX: its
        ``ffn_config``."""
        return text_config

    def call_router(self, layer: MoELayer, hidden: torch.Tensor):
        """Call ``layer.router`` on hidden states [N, H] as the family's block does."""
        return layer.router(hidden)

    def block_offset(self, layer: MoELayer) -> torch.Tensor | None:
        """A term the block adds to every token's output whatever the routing (JetMoE's learned bias), or None:
        neither an expert nor touched by a removal; the load-time check adds it to the block's expected sum."""
        return None

    def router_output_logits(self, layer: MoELayer, linear: torch.Tensor) -> torch.Tensor:
        """The logits the router returns, from its linear map ``linear`` [N, E]: the map itself but for a router
        that soft-caps it (Laguna) or scales it (Muse-Spark's ``output_multiplier``)."""
        return linear

    def router_linear_input(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        """What the router's linear map reads from the router's input ``hidden`` [N, H]: ``hidden`` itself but
        for a router that normalises its input first (Gemma 4)."""
        return hidden

    def experts_input(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        """What the experts module reads when the block's input (the router's) is ``hidden`` [N, H]: ``hidden``
        itself but for a block that normalises the experts' input separately (Gemma 4)."""
        return hidden

    def router_probs(self, layer: MoELayer, router_logits: torch.Tensor) -> torch.Tensor:
        """Router probabilities of all routed experts from raw logits, float32 [N, E].

        The default is the softmax over all routed experts, computed in float32: the score every family
        supported so far ranks its experts by (for GPT-OSS, which selects on the raw logits, it is the
        probability the full softmax would give). moeaudit's ``raw_gate`` is this gathered at the selected
        experts (arXiv 2606.10703, Sec. 3.1: the gate weight of an expert). A family that scores experts
        otherwise (a sigmoid router) overrides it.
        """
        return F.softmax(router_logits, dim=-1, dtype=torch.float32)

    def routing_parameters(self, layer: MoELayer) -> dict:
        """The parameters of the routing rule at ``layer`` (shown by ``moeaudit inspect``); JSON-ready."""
        return {}

    def group_limits(self, layer: MoELayer) -> tuple[int, int] | None:
        """(n_group, experts each group must keep at least) of ``layer``'s group-limited routing (from its
        routing parameters: a group scored by its two best experts needs two), or None where it does not group
        (one group, or greedy routing)."""
        params = self.routing_parameters(layer)
        n_group = params.get("n_group")
        if not n_group or int(n_group) <= 1:
            return None
        return int(n_group), 2 if params.get("group_score") == GROUP_SCORE_LABELS["top2_sum"] else 1

    def expert_groups(self, layer: MoELayer) -> int:
        """The number of equal consecutive expert groups ``layer``'s routing limits tokens to (``n_group``), 1
        where it does not group (:func:`moeaudit.prune.criteria.dropped_experts`' group-balanced selection)."""
        limits = self.group_limits(layer)
        return 1 if limits is None else limits[0]

    @abc.abstractmethod
    def routing_rule(self, config) -> str:
        """The name of the family's routing rule for this config (a key of ROUTING_RULE_DOC)."""

    def route(self, layer: MoELayer, router_logits: torch.Tensor, removed: torch.Tensor | None = None) -> Routing:
        """Select experts from router logits exactly as the library's router does.

        Parameters
        ----------
        layer : MoELayer
        router_logits : Tensor [N, E]
            Raw logits as the router returned them.
        removed : bool Tensor [N, E], optional
            Experts removed per token: their logit is set to -inf before routing (what a pruned model's
            router computes), so the softmax and the top-k see only the survivors.

        Returns
        -------
        Routing
            ``router_probs`` and ``raw_gate`` always come from the *unedited* logits' softmax for the
            experts that remain selected only when ``removed`` is None; with ``removed`` they are the
            softmax over the survivors, as a pruned router would produce.
        """
        logits = router_logits
        if removed is not None:
            logits = logits.masked_fill(removed, float("-inf"))
        return self._route(layer, router_logits, logits, removed)

    @abc.abstractmethod
    def _route(self, layer: MoELayer, router_logits: torch.Tensor, logits: torch.Tensor,
               removed: torch.Tensor | None) -> Routing:
        """Route from ``logits`` (the removed experts' logits already -inf); ``router_logits`` is kept as the
        record of the original. ``removed`` is for rules where a -inf logit does not exclude an expert (a
        selection score with a bias added after the scoring function)."""


class SoftmaxTopKAdapter(FamilyAdapter):
    """Families whose router is softmax -> top-k [-> renormalise] (OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral)."""

    def renormalises(self, config) -> bool:
        return bool(getattr(config, "norm_topk_prob", False))

    def routing_parameters(self, layer: MoELayer) -> dict:
        return {"renormalise": layer.routing_rule == "softmax_topk_renorm"}

    def routing_rule(self, config) -> str:
        return "softmax_topk_renorm" if self.renormalises(config) else "softmax_topk"

    def _route(self, layer, router_logits, logits, removed):
        # Mirrors e.g. OlmoeTopKRouter.forward op for op, so indices and weights are bit-identical.
        router_probs = self.router_probs(layer, logits)
        top_value, topk_idx = torch.topk(router_probs, layer.top_k, dim=-1)
        raw_gate = top_value
        if layer.routing_rule == "softmax_topk_renorm":
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        combine_weight = top_value.to(self.combine_dtype(router_logits))
        return Routing(router_logits, router_probs, topk_idx, raw_gate, combine_weight)

    def combine_dtype(self, router_logits: torch.Tensor) -> torch.dtype:
        return router_logits.dtype
