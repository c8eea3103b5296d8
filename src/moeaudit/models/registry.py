"""Which adapter serves which transformers ``model_type``."""

from __future__ import annotations

from moeaudit.models.axk1 import AXK1Adapter
from moeaudit.models.base import FamilyAdapter
from moeaudit.models.dbrx import DbrxAdapter
from moeaudit.models.deepseek_v2 import DeepseekV2Adapter
from moeaudit.models.deepseek_v4 import DeepseekV4Adapter
from moeaudit.models.ernie45_vl import Ernie45VLMoeAdapter
from moeaudit.models.gpt_oss import GptOssAdapter
from moeaudit.models.mixtral import MixtralAdapter
from moeaudit.models.gemma4 import Gemma4Adapter
from moeaudit.models.granitemoe import GraniteMoeAdapter, GraniteMoeSharedAdapter
from moeaudit.models.hunyuan_v1_moe import HunYuanMoeAdapter
from moeaudit.models.jetmoe import JetMoeAdapter
from moeaudit.models.olmoe import FlexOlmoAdapter, JambaAdapter, MellumAdapter, OlmoeAdapter
from moeaudit.models.llama4 import Llama4Adapter
from moeaudit.models.latent import MuseSparkAdapter, NemotronHAdapter
from moeaudit.models.longcat import LongcatFlashAdapter
from moeaudit.models.phimoe import PhimoeAdapter
from moeaudit.models.qwen2_moe import Qwen2MoeAdapter, Qwen3NextAdapter, Qwen35MoeAdapter, Qwen3VLMoeAdapter
from moeaudit.models.qwen3_moe import Qwen3MoeAdapter, Qwen3OmniMoeAdapter
from moeaudit.models.step3p7 import BeamAdapter, LagunaAdapter, MiniMaxM3Adapter, Step3p7Adapter
from moeaudit.models.scored import (AXK2Adapter, DeepseekV3Adapter, Ernie45MoeAdapter, Glm4vMoeAdapter,
                                    Glm5NextAdapter, HYV4Adapter, MiniMaxM2Adapter, Mistral4Adapter,
                                    MistralLarge4Adapter)

ADAPTERS: tuple[type[FamilyAdapter], ...] = (
    OlmoeAdapter,
    Qwen2MoeAdapter,
    DeepseekV2Adapter,
    MixtralAdapter,
    Qwen3MoeAdapter,
    GptOssAdapter,
    DeepseekV3Adapter,
    Mistral4Adapter,
    MiniMaxM2Adapter,
    Ernie45MoeAdapter,
    FlexOlmoAdapter,
    GraniteMoeAdapter,
    GraniteMoeSharedAdapter,
    HunYuanMoeAdapter,
    Qwen3NextAdapter,
    Qwen35MoeAdapter,
    Qwen3VLMoeAdapter,
    MellumAdapter,
    JambaAdapter,
    PhimoeAdapter,
    Llama4Adapter,
    NemotronHAdapter,
    Glm4vMoeAdapter,
    Gemma4Adapter,
    AXK1Adapter,
    Qwen3OmniMoeAdapter,
    Ernie45VLMoeAdapter,
    LongcatFlashAdapter,
    Step3p7Adapter,
    DbrxAdapter,
    DeepseekV4Adapter,
    MistralLarge4Adapter,
    Glm5NextAdapter,
    HYV4Adapter,
    AXK2Adapter,
    MiniMaxM3Adapter,
    LagunaAdapter,
    BeamAdapter,
    MuseSparkAdapter,
    JetMoeAdapter,
)

_BY_MODEL_TYPE = {mt: cls for cls in ADAPTERS for mt in cls.model_types}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(a for cls in ADAPTERS for a in cls.architectures)

#: Checkpoints that declare a model_type of their own (with remote code) but are a native transformers
#: architecture: Kimi-K2 / K2-Thinking ship DeepSeek-V3's (``architectures: DeepseekV3ForCausalLM``).
NATIVE_ALIASES: dict[str, str] = {"kimi_k2": "deepseek_v3"}

#: MoE families of transformers 5.23 without a hand-written adapter that the generic adapter
#: (:mod:`moeaudit.models.generic`) serves: layout discovered, routing rule inferred and verified at load; each
#: passes the adapter contract tests on a tiny model (``moeaudit.models.testing.FAMILIES``; the multimodal
#: wrappers: ``tests/models/test_generic.py``).
GENERIC_FAMILIES: dict[str, str] = {
    "flint": "sigmoid top-k without a bias, plain renormalisation; an ungated shared expert",
    "cohere2_moe": "top-k of the logits, softmax over the k; shared experts summed (averaging them is refused)",
    "hy_v3": "sigmoid + the block's correction bias, renormalised, times router_scaling_factor",
    "aria_text": "top-k of the logits, softmax over the k; Aria's text model",
    "aria": "Aria's rule in its language model (AriaForConditionalGeneration, audited on text)",
    "afmoe": "sigmoid + the block's expert_bias, renormalised, times route_scale; a norm after the MoE block",
    "lfm2_moe": "sigmoid + the block's expert_bias, renormalised (+1e-6), scaled; short convolutions",
    "bailing_hybrid": "DeepSeek-V3's group-limited sigmoid rule; KDA linear-attention layers",
    "kimi_linear": "DeepSeek-V3's group-limited sigmoid rule; KDA linear-attention layers",
    "kolibri1": "top-k of logits + the router's correction bias, sigmoid of the chosen logits, renormalised when "
                "norm_topk_prob; a norm after the MoE block",
    "deepseek_ocr2": "DeepSeek-V2's rule (softmax, greedy or group-limited by a group's best, scaled) in its "
                     "language model (DeepseekOcr2ForConditionalGeneration, audited on text)",
    "unlimited_ocr": "DeepSeek-V2's rule in its language model (UnlimitedOcrForConditionalGeneration, audited on "
                     "text)",
    "minimax": "Mixtral's rule (softmax, top-k, renormalised); Lightning linear-attention layers; the block enters "
               "the residual stream times mlp_beta_factor",
    "dots3_note": "DeepSeek-V3's group-limited sigmoid rule; indexer sparse attention (Dots3NoteForCausalLM, the "
                  "language model of the vision-language checkpoints)",
    "dots3_note_text": "DeepSeek-V3's group-limited sigmoid rule; indexer sparse attention",
    "qwen4_exp": "Qwen3-MoE's rule and a gated shared expert (Qwen4ExpForCausalLM); reference engine",
    "qwen4_exp_text": "Qwen3-MoE's rule and a gated shared expert; reference engine",
    "inkling2_text": "sigmoid + the router's bias, renormalised, times route_scale; reference engine",
    "inkling2": "Inkling-2's rule in its language model (Inkling2ForConditionalGeneration, audited on text); "
                "reference engine",
    "granitemoe_swa": "top-k of the logits, softmax over the k; Granite's multipliers, attention sinks, a shared "
                      "MLP beside the block",
}

#: MoE families transformers 5.23 knows and moeaudit does not adapt (yet), with the assumption that fails.
#: Used to word the refusal and by ``moeaudit inspect --supported``.
UNSUPPORTED_MOE: dict[str, str] = {
    "bailing_moe": "routing variant not adapted yet",
    "inkling": "a 4-tuple router over routed and shared experts with joint normalisation; short convolutions",
    "zaya": "a router with cross-layer state; convolutions inside attention",
    "doge": "product-key expert selection whose full-forward routing, in transformers 5.23, reads other tokens "
            "and other sequences of the batch (DogeCDMoE views its logits as two halves of the flat batch), so "
            "a token's loss depends on later tokens and no per-token removal is defined",
    "step3p5": "no causal-LM class (Step3p7TextConfig has a base model only), so no logits to audit",
    "switch_transformers": "an encoder-decoder model",
    "nllb_moe": "an encoder-decoder model",
}
KNOWN_UNSUPPORTED_MOE: tuple[str, ...] = tuple(UNSUPPORTED_MOE)


def adapter_for(model_type: str) -> FamilyAdapter | None:
    cls = _BY_MODEL_TYPE.get(model_type)
    return cls() if cls is not None else None


def resolve_adapter(model_type: str) -> FamilyAdapter | None:
    """The hand-written adapter of ``model_type``; else, unless the family is refused for a known reason
    (:data:`UNSUPPORTED_MOE`), the generic adapter that discovers the layout and infers the routing rule
    (:mod:`moeaudit.models.generic`); None for a refused family."""
    adapter = adapter_for(model_type)
    if adapter is not None or model_type in UNSUPPORTED_MOE:
        return adapter
    from moeaudit.models.generic import GenericAdapter

    return GenericAdapter(model_type)


def supported_families_text() -> str:
    return ", ".join(f"{cls.family} ({'/'.join(cls.architectures)})" for cls in ADAPTERS)


def family_support() -> list[tuple[str, str, str]]:
    """(model_type, status, note) for every MoE model_type moeaudit knows of that the installed transformers
    has: ``adapted`` (the adapter's family, or the generic adapter's rule), ``alias`` (loaded as a native family) or ``refused`` (why)."""
    from transformers import CONFIG_MAPPING

    known = set(CONFIG_MAPPING.keys())
    rows = [(mt, "adapted", f"{cls.family} adapter")
            for cls in ADAPTERS for mt in cls.model_types if mt in known]
    rows += [(mt, "adapted", f"generic adapter: {note}") for mt, note in GENERIC_FAMILIES.items() if mt in known]
    rows += [(alias, "alias", f"loaded as native {native} (no remote code)") for alias, native in NATIVE_ALIASES.items()]
    rows += [(mt, "refused", reason) for mt, reason in UNSUPPORTED_MOE.items() if mt in known]
    return sorted(rows, key=lambda row: (("adapted", "alias", "refused").index(row[1]), row[0]))
