"""`MoEModel`: a transformers causal LM seen through its family adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import nn

from moeaudit.errors import invalid
from moeaudit.models.base import ROUTING_RULE_DOC, FamilyAdapter, MoELayer
from moeaudit.models.hooks import Ablation, SharedAblation, Trace, intervene


@dataclass
class MoEModel:
    """A loaded MoE causal LM with every MoE layer exposed uniformly.

    Attributes
    ----------
    model : transformers.PreTrainedModel
        The library's own model; moeaudit never replaces its modules or weights, it only hooks them (Llama
        4's block forward is re-expressed through views of its own router and experts, checked at load to
        equal the library's bit for bit: :mod:`moeaudit.models.llama4`).
    adapter : FamilyAdapter
        The family's adapter (routing rule, module locations).
    layers : list of MoELayer
        The MoE layers in depth order (dense layers are not listed).
    name : str
        What the model was loaded from (hub id, path, or built-in name).
    tokenizer : transformers tokenizer or None

    Examples
    --------
    >>> moe = moeaudit.load_model("tiny-olmoe")  # doctest: +SKIP
    >>> [l.layer for l in moe.layers], moe.layers[0].num_experts, moe.layers[0].top_k  # doctest: +SKIP
    """

    model: nn.Module
    adapter: FamilyAdapter
    layers: list[MoELayer]
    name: str
    tokenizer: Any = None

    def __post_init__(self) -> None:
        self._by_index = {layer.layer: layer for layer in self.layers}

    # ------------------------------------------------------------------ description
    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def config(self):
        """The language model's config (a vision-language model's ``text_config``; the model's own else)."""
        return self.model.config.get_text_config()

    @property
    def moe_layer_indices(self) -> list[int]:
        return [layer.layer for layer in self.layers]

    @property
    def num_decoder_layers(self) -> int:
        return len(self.adapter.decoder_layers(self.model))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def experts_implementation(self) -> str:
        return str(self.model.config._experts_implementation)

    def layer(self, index: int) -> MoELayer:
        """The MoE layer with decoder-layer index ``index``; a clear error for dense or missing layers."""
        found = self._by_index.get(int(index))
        if found is None:
            indices = self.moe_layer_indices
            allowed = f"an MoE layer index, one of {indices}" if len(indices) <= 12 else (
                f"an MoE layer index in [{indices[0]}, {indices[-1]}]")
            raise invalid("layer", allowed, index, self.name)
        return found

    def parameter_counts(self) -> dict[str, int]:
        """Total, routed-expert, shared-expert and per-token active parameters."""
        total = sum(p.numel() for p in self.model.parameters())
        layers = [*self.layers, *(layer for layer, _ in self.adapter.unaudited_layers(self.model).values())]
        routed = sum(layer.expert_parameter_count() for layer in layers)
        shared = sum(sum(p.numel() for p in layer.shared.parameters()) for layer in layers
                     if layer.shared is not None)
        active_routed = sum(layer.expert_parameter_count() * layer.top_k // layer.num_experts for layer in layers)
        return {"total": total, "routed_experts": routed, "shared_experts": shared,
                "active_per_token": total - routed + active_routed}

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (what ``moeaudit inspect`` prints)."""
        config = self.model.config
        unaudited = self.adapter.unaudited_layers(self.model)
        return {
            "name": self.name,
            "family": self.family,
            "architecture": type(self.model).__name__,
            "model_type": config.model_type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "experts_implementation": self.experts_implementation,
            "attn_implementation": str(config._attn_implementation),
            "num_decoder_layers": self.num_decoder_layers,
            "hidden_size": int(self.config.hidden_size),
            "vocab_size": int(self.config.vocab_size),
            "parameters": self.parameter_counts(),
            "moe_layers": [
                {
                    "layer": layer.layer,
                    "num_experts": layer.num_experts,
                    "top_k": layer.top_k,
                    "num_shared": layer.num_shared,
                    "shared_gated": layer.shared_gated,
                    "routing_rule": layer.routing_rule,
                    "routing_parameters": layer.adapter.routing_parameters(layer) if layer.adapter else {},
                    "expert_parameters": layer.expert_parameter_count(),
                }
                for layer in self.layers
            ],
            "dense_layers": [i for i in range(self.num_decoder_layers)
                             if i not in self._by_index and i not in unaudited],
            "unaudited_moe_layers": {str(i): why for i, (_, why) in unaudited.items()},
            "routing_rules": {layer.routing_rule: ROUTING_RULE_DOC[layer.routing_rule] for layer in self.layers},
        }

    # ------------------------------------------------------------------ hooks
    def intervene(
        self,
        ablations: Sequence[Ablation | SharedAblation] = (),
        *,
        capture: Iterable[int] | Literal["all"] | None = None,
        keep_outputs: bool = False,
        blocks: Iterable[int] | Literal["all"] | None = None,
        residual: bool = False,
        warn_unchanged: bool = True,
    ):
        """Context manager: apply ``ablations`` and capture routing for forwards run inside it.

        Parameters
        ----------
        ablations : sequence of Ablation or SharedAblation
            Interventions; several on one layer combine (a slot removed by one is not removed twice).
        capture : iterable of int, "all", or None
            MoE layers whose routing to record: router logits, selected experts, raw gate, combine weight,
            and each selected expert's ungated output norm (and max |activation|).
        keep_outputs : bool
            Also keep the ungated outputs [N, k, H], the block input, the routed output and the block
            output (memory grows with tokens x k x hidden; for tests and small runs).
        blocks : iterable of int, "all", or None
            MoE layers whose block input and output hidden states to record (``trace.block_inputs[l]``,
            ``trace.block_outputs[l]``, one entry per call): cheap, nothing is recomputed.
        residual : bool
            Record the residual stream entering and leaving every decoder layer (``trace.layer_inputs[i]``,
            ``trace.layer_outputs[i]``, one entry per call).
        warn_unchanged : bool
            Warn (:class:`moeaudit.models.hooks.UnchangedWarning`) when the block's forwards ran but the
            routed-expert ablations removed no slot, i.e. the router did not select those experts there.

        Yields
        ------
        Trace
            Filled as forwards run; ``trace[layer]`` is the layer's record when it ran once, its tensors
            ``[batch, pos, ...]`` (``.rows`` flattens them), and ``trace.slots_changed[layer]`` counts the
            (token, slot) pairs the ablations removed.

        Examples
        --------
        >>> with moe.intervene([Ablation(layer=1, experts=3, kind="reroute")], capture="all") as trace:
        ...     out = moe.model(input_ids)  # doctest: +SKIP
        >>> trace[1].topk_idx[0, 17]  # the experts at position 17 of sequence 0  # doctest: +SKIP
        """
        return intervene(self, ablations, capture=capture, keep_outputs=keep_outputs, blocks=blocks,
                         residual=residual, warn_unchanged=warn_unchanged)

    def capture(self, layers: Iterable[int] | Literal["all"] = "all", *, keep_outputs: bool = False):
        """Shorthand for ``intervene((), capture=layers, keep_outputs=keep_outputs)``."""
        return intervene(self, (), capture=layers, keep_outputs=keep_outputs)

    @torch.no_grad()
    def next_token_nll(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position NLL of the next token, [B, T] float32, NaN at the last position and at padding."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        return nll_from_logits(logits, input_ids, attention_mask)


def nll_from_logits(logits: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """NLL_t = -log p(x_{t+1} | x_{<=t}) for every position t, [B, T]; NaN where there is no next token."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    out = torch.full(input_ids.shape, float("nan"), dtype=torch.float32, device=logits.device)
    out[:, :-1] = nll
    if attention_mask is not None:
        valid = attention_mask.bool()
        valid_next = torch.zeros_like(valid)
        valid_next[:, :-1] = valid[:, :-1] & valid[:, 1:]
        out = out.masked_fill(~valid_next, float("nan"))
    return out
