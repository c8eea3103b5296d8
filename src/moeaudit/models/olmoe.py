"""OLMoE (``OlmoeForCausalLM``): 64 routed experts, top-8, no shared expert, ``norm_topk_prob=False``."""

from __future__ import annotations

from moeaudit.models.base import SoftmaxTopKAdapter


class OlmoeAdapter(SoftmaxTopKAdapter):
    family = "olmoe"
    model_types = ("olmoe",)
    architectures = ("OlmoeForCausalLM",)


class FlexOlmoAdapter(SoftmaxTopKAdapter):
    """FlexOlmo (``FlexOlmoForCausalLM``): OLMoE's router and experts, with a norm after the MoE block
    (``post_feedforward_layernorm``) before the residual add. The fast engine's self-check sees that the
    block output does not enter the residual unchanged, and its rows restart at the intervened layer with the
    block's output replaced (:func:`moeaudit.intervene.fast.restarts_at_block`)."""

    family = "flex_olmo"
    model_types = ("flex_olmo",)
    architectures = ("FlexOlmoForCausalLM",)


class MellumAdapter(SoftmaxTopKAdapter):
    """Mellum (``MellumForCausalLM``): softmax top-k, renormalised when ``norm_topk_prob``; sliding and full
    attention layers with rotary embeddings per layer type."""

    family = "mellum"
    model_types = ("mellum",)
    architectures = ("MellumForCausalLM",)


class JambaAdapter(SoftmaxTopKAdapter):
    """Jamba (``JambaForCausalLM``): softmax top-k, not renormalised, in the decoder layer's
    ``feed_forward`` with a ``router``; Mamba and attention layers, so interventions run on the reference
    engine."""

    family = "jamba"
    model_types = ("jamba",)
    architectures = ("JambaForCausalLM",)
    block_attr = "feed_forward"
    router_attr = "router"
