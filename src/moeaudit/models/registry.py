"""Which adapter serves which transformers ``model_type``."""

from __future__ import annotations

from moeaudit.models.base import FamilyAdapter
from moeaudit.models.deepseek_v2 import DeepseekV2Adapter
from moeaudit.models.gpt_oss import GptOssAdapter
from moeaudit.models.mixtral import MixtralAdapter
from moeaudit.models.granitemoe import GraniteMoeAdapter
from moeaudit.models.hunyuan_v1_moe import HunYuanMoeAdapter
from moeaudit.models.olmoe import FlexOlmoAdapter, JambaAdapter, MellumAdapter, OlmoeAdapter
from moeaudit.models.qwen2_moe import Qwen2MoeAdapter, Qwen3NextAdapter, Qwen35MoeAdapter
from moeaudit.models.qwen3_moe import Qwen3MoeAdapter
from moeaudit.models.scored import DeepseekV3Adapter, Ernie45MoeAdapter, MiniMaxM2Adapter, Mistral4Adapter

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
    HunYuanMoeAdapter,
    Qwen3NextAdapter,
    Qwen35MoeAdapter,
    MellumAdapter,
    JambaAdapter,
)

_BY_MODEL_TYPE = {mt: cls for cls in ADAPTERS for mt in cls.model_types}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(a for cls in ADAPTERS for a in cls.architectures)

# model_types of MoE families transformers knows but moeaudit does not (yet) adapt; used only to word
# the error ("unsupported MoE family" rather than "dense model").
KNOWN_UNSUPPORTED_MOE = (
    "granitemoeshared", "granitemoehybrid", "jetmoe", "phimoe", "dbrx",
    "switch_transformers", "nllb_moe", "minimax",
    "llama4", "bailing_moe", "longcat_flash", "qwen3_vl_moe", "qwen3_omni_moe",
)


def adapter_for(model_type: str) -> FamilyAdapter | None:
    cls = _BY_MODEL_TYPE.get(model_type)
    return cls() if cls is not None else None


def supported_families_text() -> str:
    return ", ".join(f"{cls.family} ({'/'.join(cls.architectures)})" for cls in ADAPTERS)
