"""A self-verifying generic adapter: find the MoE layers by introspection, infer the routing rule by probing.

For a ``model_type`` with no hand-written adapter (and not refused for a known reason), moeaudit does not
give up: it

1. **discovers** the layout (:func:`discover_layout`): the decoder layers are the shallowest
   ``nn.ModuleList`` whose items hold an MoE block; the block is the layer's child that holds an ``experts``
   module and a router (``gate`` or ``router``); shared experts are the block's ``shared_experts`` /
   ``shared_expert`` / ``shared_mlp``, gated where a ``shared_expert_gate`` sits beside them;
2. captures each router's real call with a forward pre-hook during one 4-token forward (some routers take
   a tensor of their block — a correction bias — or 3-D hidden states), and
3. **infers** each layer's routing rule (:meth:`GenericAdapter.infer`): every
   :class:`~moeaudit.models.scored.ScoredRule` the router's attributes allow (score function and its dtype,
   the correction bias where one is found, group limits where the router has ``num_group`` (a group scored
   by its two best experts or by its best),
   renormalisation and its guard, scaling where it has ``routed_scaling_factor``, sorted or not, selection
   on scores or on logits, the latter plus the router's correction bias where it has one: Kolibri-1) is
   run on probe hidden states — standard normal, the same times 30 (large norms), and the model's own
   token embeddings — and the first whose indices (in the module's order) and
   weights equal the router module's **bit for bit** on every probe is accepted. No candidate: refused in
   one line naming the closest candidate and how far it is.

Everything after that is the ordinary adapter contract: the load-time check
(:mod:`moeaudit.models.contract`), exact removal through the same hooks, the fast engine's self-check.
``moeaudit inspect`` shows the inferred parameters (``inferred: true``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import nn

from moeaudit.errors import UnsupportedModelError
from moeaudit.models.base import MoELayer
from moeaudit.models.scored import GROUP_SCORE_LABELS, ScoredRule, ScoredTopKAdapter, rule_bias, scored_route

ROUTER_NAMES: tuple[str, ...] = ("gate", "router")
SHARED_NAMES: tuple[str, ...] = ("shared_experts", "shared_expert", "shared_mlp")
SHARED_GATE_NAMES: tuple[str, ...] = ("shared_expert_gate",)
#: Config fields holding experts per token, first match wins (when the router does not say).
TOP_K_FIELDS: tuple[str, ...] = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k", "num_experts_per_token",
                                 "top_k_experts")
#: Router attributes that may hold the weights' scaling factor.
SCALE_ATTRS: tuple[str, ...] = ("routed_scaling_factor", "router_scaling_factor", "route_scale")
PROBE_TOKENS = 64

#: Generic families (:data:`moeaudit.models.registry.GENERIC_FAMILIES`) the fast engine must not run, with the
#: reason it logs (their interventions run on the reference engine, which runs the model's own forward). Set on
#: :class:`GenericAdapter` as ``fast_refusal``, checked first by
#: :func:`moeaudit.intervene.engine.fast_unsupported_reason`.
GENERIC_FAST_REFUSALS: dict[str, str] = {
    **dict.fromkeys(("qwen4_exp", "qwen4_exp_text"), (
        "Qwen4-Exp's decoder layers carry several residual streams that gated-residual hyper-connections mix "
        "(Qwen4ExpTextGatedResidual), with n-gram embeddings and a QSA indexer, which the fast engine's rows do "
        "not replay")),
    **dict.fromkeys(("inkling2", "inkling2_text"), (
        "Inkling-2 passes each MoE block's output through a causal short convolution before the residual stream "
        "and feeds blocks from block attention residuals, which the fast engine's rows do not replay")),
}


@dataclass(frozen=True)
class Layout:
    """Where a model keeps its MoE pieces (attribute paths)."""

    layers_path: str
    block_attr: str
    router_attr: str
    shared_attr: str | None = None
    shared_gate_attr: str | None = None


def _block_attrs(decoder_layer: nn.Module) -> tuple[str, str] | None:
    """(block attribute, router attribute) of the decoder layer's MoE block, or None for a dense layer."""
    for name, child in decoder_layer.named_children():
        experts = getattr(child, "experts", None)
        if not isinstance(experts, nn.Module) or not any(p.dim() >= 3 for p in experts.parameters()):
            continue
        router = next((r for r in ROUTER_NAMES if isinstance(getattr(child, r, None), nn.Module)), None)
        if router is not None:
            return name, router
    return None


def discover_layout(model: nn.Module) -> Layout | None:
    """The layout of ``model``'s MoE layers, or None when no decoder layer holds an MoE block."""
    best: tuple[int, str, nn.ModuleList, tuple[str, str]] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not path:
            continue
        hits = [attrs for attrs in map(_block_attrs, module) if attrs is not None]
        if not hits:
            continue
        candidate = (path.count("."), path, module, hits[0])
        if best is None or candidate[0] < best[0]:
            best = candidate
    if best is None:
        return None
    _, path, layers, (block_attr, router_attr) = best
    block = next(getattr(layer, block_attr) for layer in layers if _block_attrs(layer) is not None)
    shared = next((n for n in SHARED_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
    gate = next((n for n in SHARED_GATE_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
    return Layout(path, block_attr, router_attr, shared, gate if shared else None)


@dataclass(frozen=True)
class RouterCall:
    """How a block calls its router: hidden states with ``input_dim`` dimensions, then the block's own tensors
    named by ``args`` (positional) and ``kwargs`` (keyword: attribute), None where it passes None."""

    input_dim: int = 2
    args: tuple[str | None, ...] = ()
    kwargs: tuple[tuple[str, str | None], ...] = ()


def _block_tensors(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    tensors = [*block.named_buffers(recurse=False), *block.named_parameters(recurse=False)]
    tensors += [(name, value) for name, value in vars(block).items() if isinstance(value, torch.Tensor)]
    return tensors


def capture_router_calls(model: nn.Module, layers: list[MoELayer], family: str) -> dict[int, RouterCall]:
    """Each router's real call, seen by a forward pre-hook during one 4-token forward of the model."""
    calls: dict[int, RouterCall] = {}

    def source(layer: MoELayer, value) -> str | None:
        if value is None:
            return None
        name = next((n for n, t in _block_tensors(layer.block) if t is value), None)
        if name is None:
            raise UnsupportedModelError(
                f"the router of layer {layer.layer} ({type(layer.router).__name__}) of this '{family}' model receives "
                f"an argument ({type(value).__name__}) that is not a tensor of its block, which moeaudit cannot supply")
        return name

    def hook_for(layer: MoELayer):
        def pre(module, args, kwargs):
            if layer.layer not in calls:
                hidden = args[0] if args else next(iter(kwargs.values()))
                rest = dict(kwargs) if args else dict(list(kwargs.items())[1:])
                calls[layer.layer] = RouterCall(hidden.dim(), tuple(source(layer, v) for v in args[1:]),
                                                tuple((k, source(layer, v)) for k, v in rest.items()))
        return pre

    handles = [layer.router.register_forward_pre_hook(hook_for(layer), with_kwargs=True) for layer in layers]
    try:
        vocab = int(model.config.get_text_config().vocab_size)
        ids = (torch.arange(1, 5) % vocab).unsqueeze(0).to(next(model.parameters()).device)
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def candidate_rules(layer: MoELayer, call: RouterCall | None = None) -> list[ScoredRule]:
    """Every scored rule the router's attributes (and what its block passes it) allow, common forms first."""
    router, block = layer.router, layer.block
    passed = [name for name in (call.args if call else ()) if name is not None]
    passed += [name for _, name in (call.kwargs if call else ()) if name is not None]
    block_bias = next((n for n in passed if getattr(block, n).shape == (layer.num_experts,)), None)
    bias_attr = "e_score_correction_bias"
    if hasattr(router, "e_score_correction_bias"):
        biases = ["router"]
    elif block_bias is not None:
        biases, bias_attr = ["block", None], block_bias  # LFM2-MoE passes its bias only when it uses one
    elif hasattr(block, "e_score_correction_bias"):
        biases = ["block"]
    elif hasattr(router, "moe_statics"):
        biases = ["statics"]
    else:
        biases = [None]
    grouped = [True, False] if hasattr(router, "num_group") and hasattr(router, "topk_group") else [False]
    renorms = (["config"] if hasattr(router, "norm_topk_prob") else []) + ["always", "never"]
    # A bare sum and sum + 1e-20 give the same bits for any sum of scores not near 0: both are listed, the
    # bare sum first; the torch default sorted=True before sorted=False (on CPU the two orders coincide).
    guards = ["none", "eps", "eps6"] + (["clamp"] if hasattr(router, "norm_min") else [])
    scale_attr = next((a for a in SCALE_ATTRS if hasattr(router, a)), None)
    scaled = [True, False] if scale_attr else [False]
    rules: list[ScoredRule] = []
    for score, bias, group, renorm, guard, scale, sort, f32, cast in itertools.product(
            ("sigmoid", "softmax"), biases, grouped, renorms, guards, scaled, (True, False), (True, False),
            (False, True)):
        if renorm == "never" and guard != "none":
            continue  # the guard only matters when renormalising
        fills = [float("-inf"), 0.0] if score == "sigmoid" else [0.0, float("-inf")]
        group_choices = [(float("-inf"), "top2_sum", False)]
        if group:  # DeepSeek-V2 weighs the chosen experts by the group-filled selection scores
            group_choices = [(fill, group_score, from_selection)
                             for fill in fills for group_score in ("top2_sum", "max")
                             for from_selection in ((False, True) if bias is None and fill == 0.0 else (False,))]
        for fill, group_score, from_selection in group_choices:
            rules.append(ScoredRule("inferred_scored_topk", score=score, score_float32=f32, bias=bias, grouped=group,
                                    group_fill=fill, group_score=group_score, weights_from_selection=from_selection,
                                    sorted_topk=sort, renorm=renorm,
                                    renorm_guard="eps" if guard == "eps6" else guard,
                                    renorm_eps=1e-6 if guard == "eps6" else 1e-20,
                                    scaled=scale, weights_in_expert_dtype=cast,
                                    scale_attr=scale_attr or "routed_scaling_factor", bias_attr=bias_attr))
    logit_biases = [None] + (["router"] if hasattr(router, "e_score_correction_bias") else [])
    logit_renorms = ["never", "always"] + (["config"] if hasattr(router, "norm_topk_prob") else [])
    for score, bias, sort, f32, cast, renorm in itertools.product(
            ("softmax", "sigmoid"), logit_biases, (True, False), (True, False), (False, True),
            logit_renorms):  # on the logits (+ the router's bias: Kolibri-1)
        rules.append(ScoredRule("inferred_scored_topk", score=score, score_float32=f32, bias=bias, sorted_topk=sort,
                                renorm=renorm, renorm_guard="none", weights_in_expert_dtype=cast, select="logits"))
    return rules


def probe_hidden(model: nn.Module, layer: MoELayer, *, seed: int = 0) -> list[torch.Tensor]:
    """Probe hidden states [PROBE_TOKENS, H] for ``layer``: standard normal, times 30, the token embeddings."""
    weight = layer.adapter.router_weight(layer)
    hidden_size = weight.shape[-1]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    normal = torch.randn(PROBE_TOKENS, hidden_size, generator=generator)
    probes = [normal, normal * 30.0]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None \
            and embeddings.weight.shape[-1] == hidden_size:
        ids = torch.randint(0, embeddings.weight.shape[0], (PROBE_TOKENS,), generator=generator)
        probes.append(embeddings.weight.detach()[ids.to(embeddings.weight.device)].float().cpu())
    return [p.to(weight.device, weight.dtype) for p in probes]


class GenericAdapter(ScoredTopKAdapter):
    """The adapter of a family without a hand-written one: discovered layout, inferred rules (see module)."""

    family = "generic"
    model_types = ()
    architectures = ()

    def __init__(self, model_type: str):
        self.family = model_type
        #: Why the fast engine must not run this family (:data:`GENERIC_FAST_REFUSALS`).
        self.fast_refusal = GENERIC_FAST_REFUSALS.get(model_type)
        self.layout: Layout | None = None
        self.rules: dict[int, ScoredRule] = {}
        self.calls: dict[int, RouterCall] = {}

    # ----------------------------------------------------------------- discovery
    def backbone(self, model: nn.Module) -> nn.Module:
        self.decoder_layers(model)
        parent = self.layout.layers_path.rpartition(".")[0] if self.layout else ""
        return attrgetter(parent)(model) if parent else model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        if self.layout is None:
            self.layout = discover_layout(model)
        if self.layout is None:
            return nn.ModuleList()
        self.block_attr = self.layout.block_attr
        self.router_attr = self.layout.router_attr
        self.shared_attr = self.layout.shared_attr
        self.shared_gate_attr = self.layout.shared_gate_attr
        return attrgetter(self.layout.layers_path)(model)

    def describe_layer(self, config, index: int, block: nn.Module) -> MoELayer:
        router = getattr(block, self.router_attr)
        experts = block.experts
        num_experts = getattr(router, "num_experts", None) or getattr(experts, "num_experts", None)
        if num_experts is None:
            num_experts = next(p.shape[0] for p in experts.parameters() if p.dim() >= 3)
        top_k = getattr(router, "top_k", None) or next(
            (getattr(config, f) for f in TOP_K_FIELDS if getattr(config, f, None)), None)
        if top_k is None:
            raise UnsupportedModelError(f"layer {index} of this '{self.family}' model: neither its router nor its "
                                        f"config says how many experts a token uses ({', '.join(TOP_K_FIELDS)})")
        shared = getattr(block, self.shared_attr) if self.shared_attr else None
        gate = getattr(block, self.shared_gate_attr) if self.shared_gate_attr else None
        return MoELayer(layer=index, block=block, router=router, experts=experts, num_experts=int(num_experts),
                        top_k=int(top_k), routing_rule="inferred_scored_topk", shared=shared, shared_gate=gate,
                        num_shared=0 if shared is None else 1,
                        shared_intermediate=0 if shared is None else _intermediate(shared), adapter=self)

    def routing_rule(self, config) -> str:
        return "inferred_scored_topk"

    def router_weight(self, layer: MoELayer) -> torch.Tensor:
        """The router's ``weight``, else that of its one linear map with a row per expert (Hunyuan's ``gate.wg``)."""
        weight = getattr(layer.router, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight
        for module in layer.router.modules():
            if isinstance(module, nn.Linear) and module.out_features == layer.num_experts:
                return module.weight
        raise UnsupportedModelError(f"the router of layer {layer.layer} ({type(layer.router).__name__}) of this "
                                    f"'{self.family}' model has no linear map with a row per expert")

    def rule_for(self, layer: MoELayer) -> ScoredRule:
        rule = self.rules.get(layer.layer)
        if rule is None:
            raise UnsupportedModelError(f"layer {layer.layer}: the routing rule of this '{self.family}' model has not "
                                        "been inferred (load it with moeaudit.load_model or wrap_model)")
        return rule

    def routing_parameters(self, layer: MoELayer) -> dict:
        rule = self.rule_for(layer)
        params = {"inferred": True, **super().routing_parameters(layer)}
        params.update(sorted_topk=rule.sorted_topk, score_in_float32=rule.score_float32)
        return params

    # ----------------------------------------------------------------- inference
    def infer(self, model: nn.Module, layers: list[MoELayer]) -> None:
        """Accept, per layer, the first candidate rule that reproduces the router bit for bit on the probes."""
        previous: ScoredRule | None = None
        self.calls = capture_router_calls(model, layers, self.family)
        for layer in layers:
            probes = probe_hidden(model, layer)
            with torch.no_grad():
                outputs = [self._router_output(layer, hidden) for hidden in probes]
            candidates = candidate_rules(layer, self.calls.get(layer.layer))
            if previous is not None:
                candidates.insert(0, previous)
            closest: tuple[int, ScoredRule] | None = None
            for rule in candidates:
                wrong = self._mismatches(layer, rule, outputs)
                if wrong == 0:
                    self.rules[layer.layer] = previous = rule
                    break
                if closest is None or wrong < closest[0]:
                    closest = (wrong, rule)
            else:
                detail = ""
                if closest is not None:
                    wrong, rule = closest
                    detail = (f"; the closest ({_describe(rule)}) differs on {wrong} of "
                              f"{PROBE_TOKENS * len(outputs)} probe tokens")
                raise UnsupportedModelError(
                    f"no routing rule moeaudit knows reproduces the router of layer {layer.layer} "
                    f"({type(layer.router).__name__}) of this '{self.family}' model bit for bit{detail}")

    def call_router(self, layer: MoELayer, hidden: torch.Tensor):
        """Call the router on hidden states [N, H] as its block does (:class:`RouterCall`, captured at load)."""
        call = self.calls.get(layer.layer, RouterCall())
        block = layer.block
        args = [None if name is None else getattr(block, name) for name in call.args]
        kwargs = {key: None if name is None else getattr(block, name) for key, name in call.kwargs}
        return layer.router(hidden.unsqueeze(0) if call.input_dim == 3 else hidden, *args, **kwargs)

    def _router_output(self, layer: MoELayer, hidden: torch.Tensor):
        output = self.call_router(layer, hidden)
        if not (isinstance(output, tuple) and len(output) == 3):
            raise UnsupportedModelError(
                f"the router of layer {layer.layer} ({type(layer.router).__name__}) of this '{self.family}' model "
                f"returns {_shape_of(output)}, not (router_logits, topk_weights, topk_idx)")
        return output

    def _mismatches(self, layer: MoELayer, rule: ScoredRule, outputs) -> int:
        """Probe tokens on which ``rule`` gives other indices or weights than the router (0: accepted)."""
        try:
            bias = rule_bias(rule, layer)
            wrong = 0
            for router_logits, weights, idx in outputs:
                routing = scored_route(rule, layer, router_logits, router_logits, None, bias)
                if routing.combine_weight.dtype != weights.dtype:
                    return PROBE_TOKENS * len(outputs)
                ours = routing.combine_weight
                equal = (ours == weights) | (ours.isnan() & weights.isnan())  # 0/0 where every score underflows
                same = (routing.topk_idx == idx).all(dim=-1) & equal.all(dim=-1)
                wrong += int((~same).sum())
            return wrong
        except (RuntimeError, AttributeError, TypeError):
            return PROBE_TOKENS * len(outputs)



def _shape_of(output) -> str:
    return f"a {len(output)}-tuple" if isinstance(output, tuple) else f"a {type(output).__name__}"


def _intermediate(shared: nn.Module) -> int:
    down = getattr(shared, "down_proj", None)
    if isinstance(down, nn.Linear):
        return int(down.in_features)
    return int(getattr(shared, "intermediate_size", 0) or 0)


def _describe(rule: ScoredRule) -> str:
    parts = [f"{rule.score} scores", f"selected on {rule.select}"]
    if rule.bias:
        parts.append(f"{rule.bias} bias")
    if rule.grouped:
        parts.append(f"group-limited (a group scored by {GROUP_SCORE_LABELS[rule.group_score]})")
    parts.append({"config": "renormalised per config", "always": "renormalised", "never": "not renormalised"}[rule.renorm])
    if rule.scaled:
        parts.append("scaled")
    return ", ".join(parts)
