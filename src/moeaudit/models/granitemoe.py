"""Granite-MoE (``GraniteMoeForCausalLM``; Granite 3.x MoE): the block is the decoder layer's
``block_sparse_moe`` with a ``router``; GPT-OSS's rule (top-k of the float32 logits, softmax over the k),
the weights cast to the hidden states' dtype. Granite scales the residual branch (``residual_multiplier``)
and the logits (``logits_scaling``); the fast engine's self-check sees both and measures with the
reference engine."""

from __future__ import annotations

from moeaudit.models.gpt_oss import GptOssAdapter
from moeaudit.models.scored import ScoredRule


class GraniteMoeAdapter(GptOssAdapter):
    family = "granitemoe"
    model_types = ("granitemoe",)
    architectures = ("GraniteMoeForCausalLM",)
    block_attr = "block_sparse_moe"

    #: GraniteMoeTopKRouter: GPT-OSS's rule, the weights cast to the hidden states' (the experts') dtype.
    rule = ScoredRule("topk_logits_softmax", score="softmax", select="logits", sorted_topk=True, renorm="never",
                      weights_in_expert_dtype=True)


class GraniteMoeSharedAdapter(GraniteMoeAdapter):
    """Granite-MoE with a shared MLP (``GraniteMoeSharedForCausalLM``) and the Granite-4 hybrids with Mamba-2
    layers (``GraniteMoeHybridForCausalLM``): the same block and router. The shared MLP (``shared_mlp``)
    sits in the decoder layer beside the MoE block, not in it, so moeaudit treats it as part of the dense
    path: routed experts are measured exactly, the shared MLP is not ablatable (``num_shared`` is 0)."""

    family = "granitemoe_shared"
    model_types = ("granitemoeshared", "granitemoehybrid")
    architectures = ("GraniteMoeSharedForCausalLM", "GraniteMoeHybridForCausalLM")
