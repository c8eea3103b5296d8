"""Gemma 4 (``Gemma4ForCausalLM``, ``Gemma4ForConditionalGeneration``; gemma-4-26B-A4B): every decoder layer
runs a dense MLP and a routed MoE branch side by side, inline in the layer, with no MoE block module
(``transformers/models/gemma4/modeling_gemma4.py``, ``Gemma4TextRouter``, ``Gemma4TextExperts`` and
``Gemma4TextDecoderLayer.forward``)::

    r  = residual stream after attention
    y1 = post_feedforward_layernorm_1(mlp(pre_feedforward_layernorm(r)))
    y2 = post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(r), router(r)))
    h  = r + post_feedforward_layernorm(y1 + y2)        (then per-layer input, then x layer_scalar)

The router reads the residual stream itself: its own scale-free RMS norm, a learned scale and
``hidden_size ** -0.5``, then a linear map to logits z; ``softmax(z)`` -> top-k -> renormalised to sum to 1
-> times a learned ``per_expert_scale`` of each chosen expert. It returns the softmax probabilities, not z.

Three things differ from moeaudit's contract; the adapter bridges them without touching a weight:

* **No block module.** The adapter gives each MoE decoder layer a view, :class:`Gemma4MoEView`, computing
  ``y = experts(pre_feedforward_layernorm_2(r), router(r))`` with the layer's own modules op for op, and
  re-expresses the layer's forward through it (:func:`gemma4_decoder_forward`, bound to the layer instance as
  Llama 4's block forward is, :mod:`moeaudit.models.llama4`). The view is moeaudit's MoE block: its input
  is r (what the router reads), its output y, the experts' weighted sum, as every family's
  (contract check 5, with the experts reading :meth:`Gemma4Adapter.experts_input`). The load-time check
  (:meth:`Gemma4Adapter.check_block`) requires the re-expressed layer forward to equal the library's
  ``Gemma4TextDecoderLayer.forward`` bit for bit on a probe.
* **The router returns probabilities.** :class:`Gemma4RouterView` returns ``(z, topk_weights, topk_idx)``,
  the weights and indices being the library router's own output and z recomputed with the router's own
  modules (checked: ``softmax(z)`` equals the router's probabilities bit for bit).
* **The block's output reaches the residual stream through two norms and beside the dense MLP**, so a
  change of y does not add to the layer's output: the fast engine's rows restart at the intervened layer with
  the view's output replaced (:func:`moeaudit.intervene.fast.restarts_at_block`), and they get what the
  backbone hands every layer (:meth:`Gemma4Adapter.row_layer_arguments`: the per-layer inputs recorded in the
  clean pass, the shared keys/values of ``num_kv_shared_layers``); the final logit soft-capping is replayed
  (:func:`moeaudit.intervene.replay.scaled_logits`).

The dense MLP is not a shared expert: it is summed with the MoE output after norms of its own, so it is left
out of the audit (no ``SharedAblation``). Removing an expert masks its logit to -inf: the softmax then runs
over the survivors and the top-k never chooses it, what a router without that row computes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from moeaudit.errors import ContractError
from moeaudit.models.base import FamilyAdapter, MoELayer, Routing, attached_view

_FIX = "install the versions in moeaudit's constraints.txt (transformers==5.23.0)"


class Gemma4RouterView(nn.Module):
    """``Gemma4TextRouter`` seen through moeaudit's router contract: ``(router_logits, topk_weights, topk_idx)``.

    The library's router selects and weights (so its output recorders see it run); the logits are
    recomputed from its own modules exactly as its forward computes them. Only the router's per-expert
    tensors are registered here (``proj``, ``per_expert_scale``), so what the pruned export slices is
    exactly what has an expert axis.
    """

    def __init__(self, router: nn.Module, top_k: int):
        super().__init__()
        self.__dict__["inner"] = router  # not registered: its norm scale has no expert axis
        self.proj = router.proj
        self.per_expert_scale = router.per_expert_scale
        self.num_experts = int(router.proj.out_features)
        self.top_k = int(top_k)

    @property
    def weight(self) -> torch.Tensor:
        return self.proj.weight

    def linear_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What the router's linear map reads: ``norm(x) * scale * hidden_size ** -0.5`` (its own ops)."""
        inner = self.inner
        hidden_states = inner.norm(hidden_states)
        return hidden_states * inner.scale * inner.scalar_root_size

    def forward(self, hidden_states: torch.Tensor):
        _, topk_weights, topk_idx = self.inner(hidden_states)
        return self.proj(self.linear_input(hidden_states)), topk_weights, topk_idx


class Gemma4MoEView(nn.Module):
    """The routed part of a ``Gemma4TextDecoderLayer``'s MoE branch as a block: r [B, T, H] -> y [B, T, H].

    ``experts(pre_feedforward_layernorm_2(r), router(r))``, the layer's own modules in the layer's own order
    (the router and the experts on the flattened rows); the layer normalises y afterwards
    (``post_feedforward_layernorm_2``).
    """

    def __init__(self, decoder_layer: nn.Module, router: Gemma4RouterView):
        super().__init__()
        self.router = router
        self.experts = decoder_layer.experts
        self.__dict__["decoder_layer"] = decoder_layer  # not registered: the view owns no weights

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        layer = self.decoder_layer
        flat = residual.reshape(-1, residual.shape[-1])
        _, topk_weights, topk_idx = self.router(flat)
        routed = layer.pre_feedforward_layernorm_2(flat)
        routed = self.experts(routed, topk_idx, topk_weights)
        return routed.reshape(residual.shape)


def gemma4_decoder_forward(self, hidden_states: torch.Tensor, per_layer_input: torch.Tensor | None = None,
                           shared_kv_states=None, position_embeddings: torch.Tensor | None = None,
                           attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                           past_key_values=None, **kwargs) -> torch.Tensor:
    """``Gemma4TextDecoderLayer.forward`` with its MoE branch computed by the layer's
    :class:`Gemma4MoEView` (bound to an MoE decoder layer as its ``forward``)."""
    residual = hidden_states

    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        position_embeddings=position_embeddings,
        attention_mask=attention_mask,
        shared_kv_states=shared_kv_states,
        position_ids=position_ids,
        past_key_values=past_key_values,
        **kwargs,
    )
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = residual + hidden_states

    residual = hidden_states
    hidden_states = self.pre_feedforward_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    routed = self.post_feedforward_layernorm_2(self.__dict__["_moeaudit_view"](residual))
    hidden_states = self.post_feedforward_layernorm_1(hidden_states) + routed
    hidden_states = self.post_feedforward_layernorm(hidden_states)
    hidden_states = residual + hidden_states

    if self.hidden_size_per_layer_input:
        residual = hidden_states
        hidden_states = self.per_layer_input_gate(hidden_states)
        hidden_states = self.act_fn(hidden_states)
        hidden_states = hidden_states * per_layer_input
        hidden_states = self.per_layer_projection(hidden_states)
        hidden_states = self.post_per_layer_input_norm(hidden_states)
        hidden_states = residual + hidden_states

    hidden_states *= self.layer_scalar
    return hidden_states


class Gemma4Adapter(FamilyAdapter):
    family = "gemma4"
    model_types = ("gemma4_text", "gemma4")
    architectures = ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")
    router_attr = "router"
    #: ``shared_kv_states`` is supplied by :meth:`row_layer_arguments`; ``labels`` is what
    #: ``Gemma4ForConditionalGeneration.forward`` hands down through its text model's keyword arguments (None on a
    #: forward without labels), which no layer reads.
    replayed_layer_arguments = frozenset({"shared_kv_states", "labels"})

    def backbone(self, model: nn.Module) -> nn.Module:
        inner = model.model
        return getattr(inner, "language_model", inner)  # Gemma4ForConditionalGeneration: the text model

    def find_layers(self, model: nn.Module) -> list[MoELayer]:
        config = model.config.get_text_config()
        rotary = self.backbone(model).rotary_emb
        found = []
        for index, decoder_layer in enumerate(self.decoder_layers(model)):
            if not getattr(decoder_layer, "enable_moe_block", False):
                continue
            view = attached_view(decoder_layer, lambda: Gemma4MoEView(
                decoder_layer, Gemma4RouterView(decoder_layer.router, config.top_k_experts)), gemma4_decoder_forward)
            view.__dict__["probe"] = (rotary, config, index)
            found.append(MoELayer(layer=index, block=view, router=view.router, experts=view.experts,
                                  num_experts=view.router.num_experts, top_k=view.router.top_k,
                                  routing_rule=self.routing_rule(config), adapter=self))
        return found

    def routing_rule(self, config) -> str:
        return "softmax_topk_renorm_expert_scaled"

    # ----------------------------------------------------------------- fast engine rows
    @contextmanager
    def recording_layer_extras(self, moe) -> Iterator[dict]:
        """Each decoder layer's per-layer input (``per_layer_input`` [1, T, P], Gemma 4's per-layer embeddings,
        which its backbone computes from the token ids and hands every layer beside the residual stream)."""
        recorded: dict = {}
        if not moe.config.hidden_size_per_layer_input:
            yield recorded
            return

        def hook(index):
            def record(module, args, kwargs):
                value = args[1] if len(args) > 1 else kwargs.get("per_layer_input")
                recorded[index] = value.detach()

            return record

        handles = [layer.register_forward_pre_hook(hook(index), with_kwargs=True)
                   for index, layer in enumerate(self.decoder_layers(moe.model))]
        try:
            yield recorded
        finally:
            for handle in handles:
                handle.remove()

    def row_layer_arguments(self, moe, clean, position_ids: torch.Tensor,
                            first_layer: int) -> Callable[[int], dict]:
        """Each layer's per-layer input at the rows' positions (from the clean pass: it depends on the token ids
        alone), and one ``shared_kv_states`` for the whole call. A layer that reuses an earlier layer's keys
        and values (``num_kv_shared_layers``) reads them there: its producer, when the rows run it, writes the
        rows' own; when the rows start after the producer, they are the clean ones at the rows' positions
        (an intervention does not change a position before its layer)."""
        config = moe.config
        shared: dict = {}
        modes = config.kv_sharing_modes
        for index, mode in enumerate(modes[:first_layer]):
            if mode == "store" and any(m == "reuse" for m in modes[first_layer:]):
                cache = clean.caches[index]  # [Hkv, T, D]
                shared[config.layer_types[index]] = (cache.key[:, position_ids].transpose(0, 1),
                                                     cache.value[:, position_ids].transpose(0, 1))

        def arguments(index: int) -> dict:
            extra = clean.layer_extras.get(index)
            return {"per_layer_input": None if extra is None else extra[position_ids], "shared_kv_states": shared}

        return arguments

    def routing_parameters(self, layer: MoELayer) -> dict:
        return {"score": "softmax", "renormalise": True, "per_expert_scale": True,
                "router_input": "scale-free RMS norm x learned scale x hidden_size ** -0.5"}

    def router_linear_input(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        return layer.router.linear_input(hidden)

    def experts_input(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        return layer.block.decoder_layer.pre_feedforward_layernorm_2(hidden)

    def _route(self, layer: MoELayer, router_logits: torch.Tensor, logits: torch.Tensor,
               removed: torch.Tensor | None) -> Routing:
        # Mirrors Gemma4TextRouter.forward op for op (softmax in float32, top-k, renormalise, x per-expert scale).
        router_probs = self.router_probs(layer, logits)
        top_value, topk_idx = torch.topk(router_probs, layer.top_k, dim=-1)
        combine_weight = top_value / top_value.sum(dim=-1, keepdim=True)
        combine_weight = combine_weight * layer.router.per_expert_scale[topk_idx]
        return Routing(router_logits, router_probs, topk_idx, top_value, combine_weight)

    def check_block(self, layer: MoELayer, hidden: torch.Tensor) -> None:
        """The router's logits are the ones its probabilities came from, and the re-expressed decoder layer
        forward equals the library's ``Gemma4TextDecoderLayer.forward`` bit for bit on ``hidden``."""
        view = layer.block
        router = layer.router
        with torch.no_grad():
            probs, _, _ = router.inner(hidden)
            logits, _, _ = router(hidden)
            if not torch.equal(torch.softmax(logits, dim=-1, dtype=torch.float32), probs):
                raise ContractError(f"layer {layer.layer} (Gemma4TextRouter): moeaudit's router logits are not the "
                                    f"ones the router's probabilities come from; {_FIX}")
            decoder = view.decoder_layer
            arguments = self._probe_arguments(view, hidden)
            ours = decoder(hidden.unsqueeze(0), **arguments())
            theirs = type(decoder).forward(decoder, hidden.unsqueeze(0), **arguments())
        if not torch.equal(ours, theirs):
            raise ContractError(f"layer {layer.layer} ({type(decoder).__name__}): moeaudit's view of the Gemma 4 "
                                f"decoder layer differs from the library's forward; {_FIX}")

    @staticmethod
    def _probe_arguments(view: Gemma4MoEView, hidden: torch.Tensor):
        """Fresh keyword arguments for one probe call of the view's decoder layer on ``hidden`` [N, H]: its
        layer type's rotary embedding, a random per-layer input, and random shared keys/values where the
        layer reuses an earlier layer's."""
        rotary, config, index = view.probe
        decoder = view.decoder_layer
        attention = decoder.self_attn
        tokens = hidden.shape[0]
        generator = torch.Generator(device="cpu").manual_seed(index)

        def draw(*shape):
            return torch.randn(*shape, generator=generator).to(hidden.device, hidden.dtype)

        position_ids = torch.arange(tokens, device=hidden.device)[None]
        embeddings = rotary(hidden.unsqueeze(0), position_ids, config.layer_types[index])
        per_layer = draw(1, tokens, decoder.hidden_size_per_layer_input) if decoder.hidden_size_per_layer_input \
            else None
        shared = {}
        if attention.is_kv_shared_layer:
            heads = config.per_layer_config[index].num_key_value_heads
            shared[attention.layer_type] = (draw(1, heads, tokens, attention.head_dim),
                                            draw(1, heads, tokens, attention.head_dim))

        def arguments():
            return {"per_layer_input": per_layer, "shared_kv_states": dict(shared),
                    "position_embeddings": embeddings, "attention_mask": None, "position_ids": position_ids}

        return arguments
