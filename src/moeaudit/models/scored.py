"""Scored top-k routing: one parameterised rule for the routers of most MoE families since DeepSeek-V3.

Each router in transformers 5.23 that follows it computes, from the router logits z [N, E]:

1. scores s = f(z), f = sigmoid, softmax or sqrt(softplus) (:attr:`ScoredRule.score`; the last DeepSeek-V4's);
2. a selection score c = s + b, with a load-balancing correction bias b where the family has one
   (arXiv 2412.19437, Sec. 2.1.2: the bias steers selection only, never the weights);
3. optionally group-limited selection: experts split into ``n_group`` consecutive groups, a group's score
   is the sum of its two best c (DeepSeek-V3, arXiv 2412.19437 Sec. 2.1.2) or its best c (DeepSeek-V2's
   ``group_limited_greedy``, arXiv 2405.04434 Sec. 2.2.2), the ``topk_group`` best groups stay and the
   others' c are filled (with -inf or 0);
4. the top-k of c (sorted or not);
5. weights w = s at the chosen experts, optionally renormalised to sum to 1 (with an eps, a clamp, or
   plain), times a scaling factor.

:class:`ScoredRule` holds the choices; an adapter per family group declares its rule and where its
router keeps the pieces. The route below mirrors each router's ``forward`` op for op, so indices and
weights are bit-identical (checked at load time by :mod:`moeaudit.models.contract`).

Removing an expert masks its logit (-inf: a softmax renormalises over the survivors, as a router without
that expert does) *and* its selection score (-inf): masking the logit alone would leave
sigmoid(-inf) + b = b as its selection score, and a large bias could still win the removed expert a slot.
Where dropped groups are filled with 0 rather than -inf (Mistral 4, A.X-K2), the removed experts are masked
again after the fill, which would otherwise give one of a dropped group a selection score of 0.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.nn.functional as F

from moeaudit.models.base import GROUP_SCORE_LABELS, FamilyAdapter, MoELayer, Routing


@dataclass(frozen=True)
class ScoredRule:
    """The parameters of a scored top-k router (see the module docstring for the steps).

    Attributes
    ----------
    name : str
        The rule's name, a key of :data:`moeaudit.models.base.ROUTING_RULE_DOC`.
    score : {"sigmoid", "softmax", "sqrtsoftplus"}
        f: the scoring function, applied in the logits' dtype (the routers compute it there);
        ``sqrtsoftplus`` is sqrt(log(1 + exp(z))) (DeepSeek-V4, transformers' ``SqrtSoftplusActivation``).
    score_float32 : bool
        Cast the logits to float32 before f (sigmoid routers of MiniMax-M2; DeepSeek-V3's logits already
        are float32).
    bias : {None, "router", "block", "statics"}
        Where the correction bias ``e_score_correction_bias`` lives: on the router, on the MoE block
        (MiniMax-M2 passes it to the router), or in the router's ``moe_statics`` module (ERNIE-4.5).
    grouped : bool
        Group-limited selection (``router.num_group`` groups, ``router.topk_group`` kept).
    group_fill : float
        The selection score of experts in dropped groups (DeepSeek-V3: -inf, Mistral 4: 0).
    group_score : {"top2_sum", "max"}
        A group's score: the sum of its two best selection scores (DeepSeek-V3, Mistral 4) or its best one
        (DeepSeek-V2's ``group_limited_greedy``, as in DeepSeek-OCR-2's language model).
    weights_from_selection : bool
        The weights are the top-k values of the group-filled selection scores (DeepSeek-V2's router: an
        expert of a dropped group chosen on a tie at 0 weighs 0), not the scores gathered at the chosen
        experts (DeepSeek-V3, Mistral 4).
    sorted_topk : bool
        ``torch.topk(..., sorted=...)`` of the selection.
    renorm : {"never", "config", "always"}
        Renormalise the k weights: never, when ``router.norm_topk_prob``, or always.
    renorm_guard : {"eps", "clamp", "none"}
        Denominator sum + 1e-20 (DeepSeek-V3), max(sum, ``router.norm_min``) (ERNIE-4.5), or the bare sum.
    scaled : bool
        Multiply the weights by ``router.routed_scaling_factor``.
    weights_in_expert_dtype : bool
        Cast the weights to the experts' dtype (ERNIE-4.5 returns them in the hidden states' dtype).
    scale_attr : str
        The router's attribute holding the scaling factor (Hunyuan-V3: ``router_scaling_factor``).
    bias_attr : str
        The block's attribute holding a block-held correction bias (AFMoE, LFM2-MoE: ``expert_bias``).
    renorm_eps : float
        The eps of the ``eps`` guard (1e-20; LFM2-MoE: 1e-6).
    select : {"score", "logits"}
        What the top-k ranks: the (biased) scores, or the logits (GPT-OSS, Granite: the weights are then f
        of the chosen logits only — a softmax over the k, or each one's sigmoid). With a correction bias,
        the top-k ranks logits + bias and the weights are f of the chosen raw logits (Kolibri-1,
        ``models/kolibri1/modeling_kolibri1.py``).
    """

    name: str
    score: Literal["sigmoid", "softmax", "sqrtsoftplus"]
    score_float32: bool = False
    bias: Literal["router", "block", "statics"] | None = None
    grouped: bool = False
    group_fill: float = float("-inf")
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    weights_from_selection: bool = False
    sorted_topk: bool = False
    renorm: Literal["never", "config", "always"] = "config"
    renorm_guard: Literal["eps", "clamp", "none"] = "eps"
    scaled: bool = False
    weights_in_expert_dtype: bool = False
    select: Literal["score", "logits"] = "score"
    scale_attr: str = "routed_scaling_factor"
    bias_attr: str = "e_score_correction_bias"
    renorm_eps: float = 1e-20


class ScoredTopKAdapter(FamilyAdapter):
    """A family whose router follows :class:`ScoredRule`; subclasses set ``rule`` and the class attributes."""

    rule: ScoredRule
    shared_attr = "shared_experts"
    #: Config fields that may hold the number of fused shared experts, first match wins.
    shared_count_fields: tuple[str, ...] = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")

    def routing_rule(self, config) -> str:
        return self.rule.name

    def rule_for(self, layer: MoELayer) -> ScoredRule:
        """The rule of ``layer`` (one per family; the generic adapter infers one per layer)."""
        return self.rule

    def shared_layout(self, config, shared):
        if shared is None:
            return 0, 0
        count = next((getattr(config, f) for f in self.shared_count_fields if getattr(config, f, None)), 1)
        return int(count), int(config.moe_intermediate_size)

    def router_probs(self, layer: MoELayer, router_logits: torch.Tensor) -> torch.Tensor:
        """The family's expert scores f(z) as float32 [N, E]; the correction bias is not part of them (a
        sigmoid router's scores are each in (0, 1) and need not sum to 1). A rule that selects on the logits
        (GPT-OSS's) scores every expert by the softmax over all of them, in float32."""
        rule = self.rule_for(layer)
        if rule.select == "logits" and rule.score == "softmax":
            return F.softmax(router_logits, dim=-1, dtype=torch.float32)
        return _scores(rule, router_logits).float()

    def correction_bias(self, layer: MoELayer) -> torch.Tensor | None:
        """The correction bias b [E] the rule adds to the scores to select, or None."""
        return rule_bias(self.rule_for(layer), layer)

    def routing_parameters(self, layer: MoELayer) -> dict:
        rule, router = self.rule_for(layer), layer.router
        params: dict = {"score": rule.score, "correction_bias": rule.bias or "none"}
        if rule.bias == "block" and rule.bias_attr != "e_score_correction_bias":
            params["correction_bias_attribute"] = rule.bias_attr
        if rule.select == "logits":
            params["selects_on"] = "logits"
        if rule.grouped:
            params.update(n_group=int(router.num_group), topk_group=int(router.topk_group),
                          group_score=GROUP_SCORE_LABELS[rule.group_score],
                          dropped_groups_filled_with=str(rule.group_fill))
            if rule.weights_from_selection:
                params["weights_from"] = "the group-filled selection scores"
        renormalised = rule.renorm == "always" or (rule.renorm == "config" and bool(router.norm_topk_prob))
        params["renormalise"] = renormalised
        if renormalised:
            params["renormalise_denominator"] = {"eps": f"sum + {rule.renorm_eps:g}", "clamp": "max(sum, norm_min)",
                                                 "none": "sum"}[rule.renorm_guard]
        if rule.scaled:
            params[rule.scale_attr] = float(getattr(router, rule.scale_attr))
        return params

    def call_router(self, layer: MoELayer, hidden: torch.Tensor):
        if self.rule_for(layer).bias == "block":  # MiniMax-M2's block hands its bias to the router
            return layer.router(hidden, self.correction_bias(layer))
        return layer.router(hidden)

    def _route(self, layer: MoELayer, router_logits: torch.Tensor, logits: torch.Tensor,
               removed: torch.Tensor | None) -> Routing:
        return scored_route(self.rule_for(layer), layer, router_logits, logits, removed,
                            self.correction_bias(layer))


def rule_bias(rule: ScoredRule, layer: MoELayer) -> torch.Tensor | None:
    """The correction bias b [E] that ``rule`` adds to the scores at ``layer`` (where the rule says it lives)."""
    if rule.bias is None:
        return None
    if rule.bias == "router":
        return layer.router.e_score_correction_bias
    if rule.bias == "block":
        return getattr(layer.block, rule.bias_attr)
    return layer.router.moe_statics.e_score_correction_bias.squeeze()


def _scores(rule: ScoredRule, logits: torch.Tensor) -> torch.Tensor:
    z = logits.float() if rule.score_float32 else logits
    if rule.score == "sqrtsoftplus":
        return F.softplus(z).sqrt()
    return z.sigmoid() if rule.score == "sigmoid" else F.softmax(z, dim=-1, dtype=z.dtype)


def scored_route(rule: ScoredRule, layer: MoELayer, router_logits: torch.Tensor, logits: torch.Tensor,
                 removed: torch.Tensor | None, bias: torch.Tensor | None) -> Routing:
    """Route with ``rule`` from ``logits`` (removed experts' logits already -inf); mirrors the routers op for op.

    ``router_logits`` is the unedited record; ``bias`` the correction bias (or None).
    """
    router = layer.router
    if rule.select == "logits":  # GPT-OSS, Granite: the top-k of the logits, f of the chosen ones
        z = logits.float() if rule.score_float32 else logits
        if bias is None:
            top_value, topk_idx = torch.topk(z, layer.top_k, dim=-1, sorted=rule.sorted_topk)
        else:  # Kolibri-1: the top-k of logits + bias (a removed expert's -inf stays -inf), f of its logits
            topk_idx = torch.topk(z + bias, layer.top_k, dim=-1, sorted=rule.sorted_topk)[1]
            top_value = z.gather(1, topk_idx)
        if rule.score == "softmax":
            weights = F.softmax(top_value, dim=-1, dtype=top_value.dtype)
            router_probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        else:
            weights = top_value.sigmoid()
            router_probs = z.sigmoid().float()
        return Routing(router_logits, router_probs, topk_idx, router_probs.gather(-1, topk_idx),
                       _finish_weights(rule, layer, weights))
    scores = _scores(rule, logits)
    choice = scores if bias is None else scores + bias
    if removed is not None:
        choice = choice.masked_fill(removed, float("-inf"))
    if rule.grouped:
        n_group = int(router.num_group)
        per_group = layer.num_experts // n_group
        grouped_choice = choice.view(-1, n_group, per_group)
        group_scores = (grouped_choice.max(dim=-1).values if rule.group_score == "max"
                        else grouped_choice.topk(2, dim=-1)[0].sum(dim=-1))
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, per_group).reshape(-1, layer.num_experts)
        choice = choice.masked_fill(~score_mask.bool(), rule.group_fill)
        if removed is not None and rule.group_fill != float("-inf"):
            # a fill of 0 would make a removed expert of a dropped group selectable again; the router
            # without it never selects it
            choice = choice.masked_fill(removed, float("-inf"))
    top_value, topk_idx = torch.topk(choice, k=layer.top_k, dim=-1, sorted=rule.sorted_topk)
    raw_gate = scores.gather(1, topk_idx)
    weights = top_value if rule.weights_from_selection else raw_gate
    return Routing(router_logits, scores.float(), topk_idx, raw_gate.float(), _finish_weights(rule, layer, weights))


def _finish_weights(rule: ScoredRule, layer: MoELayer, weights: torch.Tensor) -> torch.Tensor:
    """Renormalise, scale and cast the chosen experts' weights as ``rule`` says."""
    router = layer.router
    if rule.renorm == "always" or (rule.renorm == "config" and router.norm_topk_prob):
        total = weights.sum(dim=-1, keepdim=True)
        if rule.renorm_guard == "eps":
            total = total + rule.renorm_eps
        elif rule.renorm_guard == "clamp":
            total = torch.clamp(total, min=router.norm_min)
        weights = weights / total
    if rule.scaled:
        weights = weights * getattr(router, rule.scale_attr)
    if rule.weights_in_expert_dtype:
        weights = weights.to(layer.experts.down_proj.dtype)
    return weights


class DeepseekV3Adapter(ScoredTopKAdapter):
    """DeepSeek-V3 / R1 and the families that share its router code in transformers 5.23: GLM-4.5 / 4.6 /
    4.7 (``glm4_moe``), GLM-4.7-Flash (``glm4_moe_lite``), dots.llm1 (``dots1``), EXAONE-MoE (``exaone_moe``),
    Solar Open (``solar_open``), MiMo-V2-Flash (``mimo_v2_flash``, no shared experts), and the two with
    DeepSeek Sparse Attention beside that MoE block: DeepSeek-V3.2 (``deepseek_v32``) and GLM-5
    (``glm_moe_dsa``; the fast engine runs them on windows up to ``index_topk``, where every key is kept:
    :func:`moeaudit.intervene.engine.fallback_reason`).
    Sigmoid scores of float32 logits, router-held bias, groups filled with -inf, renormalised when
    ``norm_topk_prob`` (+1e-20), scaled; fused shared experts."""

    family = "deepseek_v3"
    model_types = ("deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe", "solar_open", "mimo_v2_flash",
                   "deepseek_v32", "glm_moe_dsa")
    architectures = ("DeepseekV3ForCausalLM", "Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM", "Dots1ForCausalLM",
                     "ExaoneMoeForCausalLM", "SolarOpenForCausalLM", "MiMoV2FlashForCausalLM",
                     "DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM")
    rule = ScoredRule("sigmoid_bias_group_scaled", score="sigmoid", bias="router", grouped=True, scaled=True)


class Mistral4Adapter(ScoredTopKAdapter):
    """Mistral 4 (``mistral4``): DeepSeek-V3's group-limited routing on softmax scores (in the logits' dtype),
    no correction bias, dropped groups filled with 0; renormalised when ``norm_topk_prob`` (+1e-20), scaled."""

    family = "mistral4"
    model_types = ("mistral4",)
    architectures = ("Mistral4ForCausalLM",)
    rule = ScoredRule("softmax_group_sum_scaled", score="softmax", grouped=True, group_fill=0.0, scaled=True)


class MistralLarge4Adapter(ScoredTopKAdapter):
    """Mistral-Large-4 (``MistralLarge4ForConditionalGeneration``), audited as a language model on text: Mistral 4's
    group-limited softmax routing on float32 logits, always renormalised (+1e-20), scaled
    (``MistralLarge4TextTopkRouter``, ``models/mistral_large4/modeling_mistral_large4.py``); its decoder layers
    under ``model.language_model``. Its attention passes compressed keys/values from a "store" layer to later
    "reuse" layers (``shared_kv_states``, ``config.kv_sharing_modes``) and the indexer's selection to the next
    layer. The fast engine's rows carry both: the clean pass records each store layer's latents
    (:meth:`recording_layer_extras`) and the rows hand a reuse layer those at their positions, or the rows' own
    where the rows run the store layer (:meth:`row_layer_arguments`); the selection is every key on windows
    within ``index_topk`` (:func:`moeaudit.intervene.replay.indexer_arguments`)."""

    family = "mistral_large4"
    model_types = ("mistral_large4",)
    architectures = ("MistralLarge4ForConditionalGeneration",)
    rule = ScoredRule("softmax_group_sum_renorm_scaled", score="softmax", grouped=True, group_fill=0.0,
                      renorm="always", scaled=True)
    replayed_layer_arguments = frozenset({"shared_kv_states"})

    def backbone(self, model):
        return model.model.language_model

    @staticmethod
    def _stores(moe) -> dict[int, str]:
        """The store layers (``kv_sharing_modes`` "store"), each with its ``shared_kv_states`` key ("rope" or
        "nope", as ``MistralLarge4TextAttention.forward`` files it)."""
        layers = moe.adapter.decoder_layers(moe.model)
        return {index: "rope" if layers[index].self_attn.use_rope else "nope"
                for index, mode in enumerate(moe.config.kv_sharing_modes) if mode == "store"}

    @contextmanager
    def recording_layer_extras(self, moe) -> Iterator[dict]:
        """Each store layer's shared latents, ``k_pass`` [1, 1, T, kv_lora_rank] and ``k_rot`` [1, 1, T, r]
        concatenated on the last axis ([1, 1, T, kv_lora_rank + r]), read from the ``shared_kv_states`` it was
        handed once it has run."""
        recorded: dict = {}
        layers = self.decoder_layers(moe.model)

        def hook(index, key):
            def record(module, args, kwargs, output):
                k_pass, k_rot = kwargs["shared_kv_states"][key]
                recorded[index] = torch.cat([k_pass, k_rot], dim=-1).detach()

            return record

        handles = [layers[index].register_forward_hook(hook(index, key), with_kwargs=True)
                   for index, key in self._stores(moe).items()]
        try:
            yield recorded
        finally:
            for handle in handles:
                handle.remove()

    def row_layer_arguments(self, moe, clean, position_ids: torch.Tensor, first_layer: int):
        """One ``KVSharingDict`` for the whole call: a store layer before ``first_layer`` files its clean latents at
        the rows' positions ([R, 1, S, .]: an intervention does not change a position before its layer), one the
        rows run files the rows' own as it runs, and each reuse layer reads them there."""
        from transformers.cache_utils import KVSharingDict

        shared = KVSharingDict()
        rank = int(moe.config.kv_lora_rank)
        for index, key in self._stores(moe).items():
            if index < first_layer:
                latents = clean.layer_extras[index][:, position_ids].transpose(0, 1)  # [1, T, D] -> [R, 1, S, D]
                shared[key] = (latents[..., :rank], latents[..., rank:])
        return lambda index: {"shared_kv_states": shared}


class Glm5NextAdapter(DeepseekV3Adapter):
    """GLM-5.3-Next (``Glm5NextForConditionalGeneration``), audited as a language model on text: DeepSeek-V3's
    router verbatim (``Glm5NextTextTopkRouter``, ``models/glm5_next/modeling_glm5_next.py``), fused shared
    experts, decoder layers under ``model.language_model``. Its layers carry ``hc_mult`` residual streams mixed by
    learned, input-dependent weights (manifold-constrained hyper-connections), beside Kimi Delta Attention and
    indexed MLA layers without rotary embeddings that hand their key selection on. The fast engine's rows carry
    the streams (restarting at the intervened block: :func:`moeaudit.intervene.fast.restarts_at_block`), the
    KDA states (:mod:`moeaudit.intervene.recurrent`) and, on windows within the indexer's ``index_topk``, the
    dense selection (:func:`moeaudit.intervene.replay.indexer_arguments`)."""

    family = "glm5_next"
    model_types = ("glm5_next",)
    architectures = ("Glm5NextForConditionalGeneration",)
    replayed_layer_arguments = frozenset({"input_ids"})

    def backbone(self, model):
        return model.model.language_model

    def row_layer_arguments(self, moe, clean, position_ids: torch.Tensor, first_layer: int):
        """What ``Glm5NextTextModel.forward`` hands every decoder layer, at the rows' positions: the token ids
        (an intervention changes no token: the window's) and its attention mask, which in this family is the
        [B, S] padding mask (``create_recurrent_attention_mask``, all True without padding; the indexer applies
        causality itself, ``Glm5NextTextIndexer.get_visible_tokens``): all True, as a window's rows hold no
        padding."""
        arguments = {"input_ids": clean.input_ids[position_ids],
                     "attention_mask": torch.ones(position_ids.shape, dtype=torch.bool, device=position_ids.device)}
        return lambda index: arguments


class HYV4Adapter(DeepseekV3Adapter):
    """Hy4 / Hunyuan-V4 (``hy_v4``): DeepSeek-V3's router verbatim (``HYV4TopkRouter``,
    ``models/hy_v4/modeling_hy_v4.py``; one group by default), fused shared experts. Its layers carry
    ``hc_mult`` residual streams (hyper-connections), which the fast engine's rows carry (restarting at the
    intervened block: :func:`moeaudit.intervene.fast.restarts_at_block`), and shared sparse-attention layers
    reuse the previous layer's key selection, dense on windows within ``index_topk``
    (:func:`moeaudit.intervene.replay.indexer_arguments`)."""

    family = "hy_v4"
    model_types = ("hy_v4",)
    architectures = ("HYV4ForCausalLM",)


_AXK2_GROUPED = ScoredRule("sigmoid_bias_group0_scaled", score="sigmoid", bias="router", grouped=True,
                           group_fill=0.0, scaled=True)
_AXK2_FLAT = ScoredRule("sigmoid_bias_scaled", score="sigmoid", bias="router", scaled=True)


class AXK2Adapter(ScoredTopKAdapter):
    """A.X-K2 (``axk2``): sigmoid scores of float32 logits, the router's correction bias, renormalised when
    ``norm_topk_prob`` (+1e-20), scaled; group-limited only when ``n_group`` is set (the Light checkpoints
    route over all experts), and then the dropped groups' selection scores are filled with 0, not -inf
    (``AXK2TopkRouter.apply_group_scoring``, ``models/axk2/modeling_axk2.py``): with a negative correction bias
    an expert of a dropped group can win a slot. Fused shared experts; MLA with a DSA indexer, run by the fast
    engine on windows up to ``index_topk``."""

    family = "axk2"
    model_types = ("axk2",)
    architectures = ("AXK2ForCausalLM",)
    rule = _AXK2_GROUPED

    def rule_for(self, layer: MoELayer) -> ScoredRule:
        return _AXK2_FLAT if layer.router.num_group is None else _AXK2_GROUPED

    def routing_rule(self, config) -> str:
        return (_AXK2_FLAT if getattr(config, "n_group", None) is None else _AXK2_GROUPED).name


class MiniMaxM2Adapter(ScoredTopKAdapter):
    """MiniMax-M2 (``minimax_m2``): sigmoid scores of float32 logits, the block's correction bias (passed to
    the router), plain top-k, always renormalised (bare sum), no scaling, no shared experts."""

    family = "minimax_m2"
    model_types = ("minimax_m2",)
    architectures = ("MiniMaxM2ForCausalLM",)
    shared_attr = None
    rule = ScoredRule("sigmoid_bias_renorm", score="sigmoid", score_float32=True, bias="block", renorm="always",
                      renorm_guard="none")


class Ernie45MoeAdapter(ScoredTopKAdapter):
    """ERNIE-4.5 MoE (``ernie4_5_moe``): softmax of float32 logits, the bias of ``gate.moe_statics`` steers
    selection, sorted top-k, weights renormalised by max(sum, ``moe_norm_min``); fused shared experts
    (``moe_num_shared_experts``)."""

    family = "ernie4_5_moe"
    model_types = ("ernie4_5_moe",)
    architectures = ("Ernie4_5_MoeForCausalLM",)
    rule = ScoredRule("softmax_bias_renorm", score="softmax", score_float32=True, bias="statics", sorted_topk=True,
                      renorm="always", renorm_guard="clamp", weights_in_expert_dtype=True)


class Glm4vMoeAdapter(DeepseekV3Adapter):
    """GLM-4.5V / GLM-4.6V (``Glm4vMoeForConditionalGeneration``), audited as a language model on text: GLM-4.5's
    text model (DeepSeek-V3's router, fused shared experts) with its decoder layers under
    ``model.language_model`` (the backbone whose rotary embedding and norm the fast engine replays; text
    positions are the same on all three mRoPE axes)."""

    family = "glm4v_moe"
    model_types = ("glm4v_moe",)
    architectures = ("Glm4vMoeForConditionalGeneration",)

    def backbone(self, model):
        return model.model.language_model
