"""How the fast engine calls the model's own parts: rotary embeddings, decoder layers, final norm, scales.

The fast engine (:mod:`moeaudit.intervene.fast`) and the recurrent-state sweep
(:mod:`moeaudit.intervene.recurrent`) run a model's decoder layers outside its own forward; this module
holds where each family keeps the parts that forward uses around them, and the factors it applies, so
both call them the same way.
"""

from __future__ import annotations

import functools
import inspect

import torch

from moeaudit.models.moe_model import MoEModel

#: Where transformers' backbones keep their rotary embedding: ``rotary_emb`` (most families), ``pos_emb``
#: (LFM2, ``models/lfm2_moe/modeling_lfm2_moe.py``). Jamba, Nemotron-H and Kimi-Linear have none.
ROTARY_NAMES = ("rotary_emb", "pos_emb")
#: Where they keep the norm before the LM head: ``norm`` (most), ``norm_f`` (Nemotron-H),
#: ``final_layernorm`` (Jamba), ``embedding_norm`` (LFM2).
FINAL_NORM_NAMES = ("norm", "norm_f", "final_layernorm", "embedding_norm")
#: Where a backbone whose decoder layers carry several residual streams (hyper-connections, [B, S, N, H])
#: keeps the module that collapses them into one before the final norm: ``hc_head`` (Hy4's ``HYV4HyperHead``,
#: GLM-5.3-Next's ``Glm5NextTextHyperHead``, DeepSeek-V4's ``DeepseekV4HyperHead``).
STREAM_HEAD_NAMES = ("hc_head",)


def rotary_module(moe: MoEModel):
    """The backbone's rotary embedding module, or None for a family without one."""
    inner = moe.adapter.backbone(moe.model)
    return next((getattr(inner, name) for name in ROTARY_NAMES if getattr(inner, name, None) is not None), None)


def final_norm(moe: MoEModel):
    """The backbone's norm before the LM head, or None when it has none under a known name."""
    inner = moe.adapter.backbone(moe.model)
    return next((getattr(inner, name) for name in FINAL_NORM_NAMES if getattr(inner, name, None) is not None), None)


def stream_head(moe: MoEModel):
    """The backbone's module that collapses its residual streams into one before the final norm
    (:data:`STREAM_HEAD_NAMES`), or None for a family with a single residual stream."""
    inner = moe.adapter.backbone(moe.model)
    return next((getattr(inner, name) for name in STREAM_HEAD_NAMES if getattr(inner, name, None) is not None), None)


def final_hidden(moe: MoEModel, hidden: torch.Tensor) -> torch.Tensor:
    """The last decoder layer's output [R, S, H] (or [R, S, N, H] with N residual streams) as the LM head
    reads it: the streams collapsed by :func:`stream_head` where there are several (``HYV4Model.forward``:
    ``self.norm(self.hc_head(hidden_states))``), then the final norm."""
    head = stream_head(moe)
    return final_norm(moe)(hidden if head is None else head(hidden))


def residual_scale(moe: MoEModel) -> float:
    """The factor a decoder layer applies to its MoE block's output before adding it to the residual
    stream: Granite's ``residual_multiplier`` (``models/granitemoe/modeling_granitemoe.py``,
    ``granitemoehybrid``, ``granitemoeshared``), MiniMax's ``mlp_beta_factor`` (``residual * mlp_alpha_factor +
    block * mlp_beta_factor``, ``models/minimax/modeling_minimax.py``), 1 for every other family. A change Δy
    of the MoE output changes the layer's output by ``residual_scale * Δy``."""
    decoder = moe.adapter.decoder_layers(moe.model)[moe.moe_layer_indices[0]]
    for name in ("residual_multiplier", "mlp_beta_factor"):
        if getattr(decoder, name, None) is not None:
            return float(getattr(decoder, name))
    return 1.0


def scaled_logits(moe: MoEModel, logits: torch.Tensor) -> torch.Tensor:
    """The LM head's output scaled as the model's own forward scales it: divided by Granite's
    ``logits_scaling``, multiplied by Cohere's ``logit_scale`` (``models/cohere2_moe/modeling_cohere2_moe.py``),
    soft-capped by Gemma 4's ``final_logit_softcapping`` (``models/gemma4/modeling_gemma4.py``), after
    Muse-Spark's ``output_multiplier`` (``MuseSparkForConditionalGeneration.forward``).

    In place: ``logits`` is the caller's fresh LM-head output, and a scaled copy would be a second
    rows x vocabulary tensor at the call's peak (autograd allows it: a linear layer's backward does not read
    its output)."""
    model = moe.model
    if getattr(model, "logits_scaling", None) is not None:
        return logits.div_(model.config.logits_scaling)
    if getattr(model, "logit_scale", None) is not None:
        return logits.mul_(model.logit_scale)
    cap = getattr(moe.config, "final_logit_softcapping", None)
    if cap is not None:  # Gemma 4: cap * tanh(logits / cap), ``Gemma4ForCausalLM.forward``'s three steps
        multiplier = getattr(moe.config, "output_multiplier", None)  # Muse-Spark multiplies first
        if logits.requires_grad:  # the gradient estimate: tanh's backward reads its output
            if multiplier is not None:
                logits = logits * multiplier
            return torch.tanh(logits / cap) * cap
        if multiplier is not None:
            logits.mul_(multiplier)
        return logits.div_(cap).tanh_().mul_(cap)
    return logits


def layer_position_embeddings(moe: MoEModel, hidden: torch.Tensor, position_ids: torch.Tensor,
                              n_layers: int) -> list:
    """The rotary embeddings each decoder layer receives, as the model's own forward computes them: one per
    layer type where ``rotary_emb`` takes a ``layer_type`` (Mellum, MiMo-V2-Flash: sliding and full layers
    rotate with different bases; None for a type whose ``rope_parameters`` entry is None, Beam's NoPE full
    attention; rope parameters keyed by rope type instead, DeepSeek-V4's ``main`` / ``compress``: all of them
    to every layer) or per layer base (``layer_rope_theta``: Granite-SWA's rotary module per base,
    Muse-Spark's one; a base of 0 gives the layer none), else one shared by every layer; None per layer for a
    family without rotary embeddings. The rotary module is the backbone's
    (:meth:`moeaudit.models.FamilyAdapter.backbone`: a vision-language model's language model)."""
    rotary = rotary_module(moe)
    if rotary is None:
        return [None] * n_layers
    thetas = getattr(moe.config, "layer_rope_theta", None)
    if thetas is not None:  # a base per layer, 0 for none (NoPE): Granite-SWA, Muse-Spark
        backbone = moe.adapter.backbone(moe.model)
        own = {emb.config.rope_parameters["rope_theta"]: emb for emb in getattr(backbone, "rotary_embs", ())}
        computed: dict = {}
        for theta in dict.fromkeys(t for t in thetas[:n_layers] if t):
            computed[theta] = (own[theta] if own else rotary)(hidden, position_ids)  # Muse-Spark: one rotary
        return [computed[t] if t else None for t in thetas[:n_layers]]
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        types = list(moe.config.layer_types)
        parameters = getattr(moe.config, "rope_parameters", None) or {}
        if parameters and not set(types) & set(parameters) and all(isinstance(v, dict) for v in parameters.values()):
            # keyed by rope type, not layer type (DeepSeek-V4: main, compress): every layer gets them all and picks
            # its own, as ``DeepseekV4Model.forward`` hands them
            every = {kind: rotary(hidden, position_ids, kind) for kind in parameters}
            return [every] * n_layers
        by_type = {kind: None if kind in parameters and parameters[kind] is None  # Beam: no rotary on this type
                   else rotary(hidden, position_ids, kind) for kind in dict.fromkeys(types)}
        return [by_type[kind] for kind in types]
    return [rotary(hidden, position_ids)] * n_layers


def call_decoder_layer(moe: MoEModel, index: int, hidden: torch.Tensor, position_ids: torch.Tensor,
                       position_embeddings, cache=None, *, rotary: bool = True,
                       extra: dict | None = None) -> torch.Tensor:
    """Decoder layer ``index`` on rows ``hidden`` [R, S, H], called as the model's own forward calls it
    (no mask: the rows' attention and the recurrent states carry causality; ``cache`` holds the recurrent
    layers' states, :func:`moeaudit.intervene.recurrent.row_cache`). ``rotary`` False (a family without
    rotary embeddings, :func:`rotary_module`) passes no ``position_embeddings``, as its own forward; ``extra``
    are the family's own arguments (:meth:`moeaudit.models.FamilyAdapter.row_layer_arguments`)."""
    kwargs = {"position_embeddings": position_embeddings} if rotary else {}
    layer = moe.adapter.decoder_layers(moe.model)[index]
    kwargs = {"attention_mask": None, **kwargs, **indexer_arguments(layer, hidden), **(extra or {})}
    out = layer(hidden, position_ids=position_ids, past_key_values=cache, use_cache=False, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def indexer_arguments(layer, hidden: torch.Tensor) -> dict:
    """What a decoder layer with DeepSeek Sparse Attention's indexer needs on rows ``hidden`` [R, S, H] beyond
    the usual arguments; nothing for every other layer.

    * ``attention_mask``: causal within each row's own S positions, [R, 1, S, S] bool (the indexer scores
      keys through it);
    * ``prev_topk_indices`` where the layer takes it (GLM-5 ``GlmMoeDsaDecoderLayer``: its "shared" layers
      reuse an earlier layer's selection): every key, [R, S, S].

    The rows' attention reads neither the mask nor a selection: the fast engine runs such a model only on
    windows where every query keeps every key (:func:`moeaudit.intervene.engine.fallback_reason`; the clean
    pass checks it again, :meth:`moeaudit.intervene.attention.AttentionState.record`), where the selection
    is every key."""
    if not hasattr(getattr(layer, "self_attn", None), "indexer"):  # None on GLM-5's "shared" layers
        return {}
    rows, span = hidden.shape[:2]
    causal = torch.ones(span, span, dtype=torch.bool, device=hidden.device).tril()
    arguments = {"attention_mask": causal.expand(rows, 1, span, span)}
    if _takes_prev_topk(type(layer)):
        every_key = torch.arange(span, dtype=torch.int32, device=hidden.device)
        arguments["prev_topk_indices"] = every_key.expand(rows, span, span)
    return arguments


@functools.cache
def _takes_prev_topk(layer_type: type) -> bool:
    """Whether a decoder layer class takes ``prev_topk_indices`` (read once per class, not per rows call)."""
    return "prev_topk_indices" in inspect.signature(layer_type.forward).parameters
