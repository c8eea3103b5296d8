"""Models: loading, one adapter per MoE family, and the capture/intervention hooks.

Public: :func:`load_model`, :func:`wrap_model`, :class:`MoEModel`, :class:`MoELayer`, :class:`Routing`,
:class:`Ablation`, :class:`SharedAblation`, :class:`Trace`, :class:`UnchangedWarning`.
"""

from moeaudit.models.base import ROUTING_RULE_DOC, FamilyAdapter, MoELayer, Routing
from moeaudit.models.hooks import ABLATION_KINDS, Ablation, LayerRecord, SharedAblation, Trace, UnchangedWarning
from moeaudit.models.loading import load_model, wrap_model
from moeaudit.models.moe_model import MoEModel, nll_from_logits
from moeaudit.models.registry import ADAPTERS, SUPPORTED_ARCHITECTURES, adapter_for

__all__ = [
    "ABLATION_KINDS", "ADAPTERS", "Ablation", "FamilyAdapter", "LayerRecord", "MoELayer", "MoEModel",
    "ROUTING_RULE_DOC", "Routing", "SUPPORTED_ARCHITECTURES", "SharedAblation", "Trace",
    "UnchangedWarning", "adapter_for",
    "load_model", "nll_from_logits", "wrap_model",
]
