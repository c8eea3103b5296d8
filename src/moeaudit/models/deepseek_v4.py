"""DeepSeek-V4 (``DeepseekV4ForCausalLM``; DeepSeek-V4-Flash, V4-Pro): the learned-router MoE layers, audited on
the fast engine.

What transformers 5.23 implements (``transformers/models/deepseek_v4/modeling_deepseek_v4.py``):

* **Two kinds of MoE layer** (``config.mlp_layer_types``). The first layers (``hash_moe``) route by token id:
  ``DeepseekV4HashRouter`` looks the experts up in a frozen table ``tid2eid[input_ids]`` and weights them by
  their scores. The others (``moe``) use ``DeepseekV4TopKRouter``: scores :math:`s = \\sqrt{\\mathrm{softplus}(z)}`,
  the top-k of :math:`s + b` (a correction bias, unsorted), weights :math:`s` renormalised (+1e-20) times
  ``routed_scaling_factor`` — :class:`~moeaudit.models.scored.ScoredRule` with the ``sqrtsoftplus`` score.
  Both add one shared expert; the experts are fused and clamp their SwiGLU (``swiglu_limit``).
* **Manifold-constrained hyper-connections** (``hc_mult`` residual streams mixed in and out of every block)
  and compressed sparse attention with its own caches.

What moeaudit audits, and why not more:

* The top-k layers, exactly as every scored family: observation, metrics, every intervention kind, pruning
  by masking (a router without the dropped experts' rows).
* Not the hash-routed layers (``moeaudit inspect`` lists them): their selection is a table lookup, so a
  removed expert has no next-best replacement (``reroute``) and a pruned layer no defined routing; moeaudit's
  routing contract (re-routing from the logits) does not hold there.
* Interventions run on the fast engine: its rows carry the ``hc_mult`` residual streams (restarting at the
  intervened block, :func:`moeaudit.intervene.fast.restarts_at_block`), the hash layers' token ids
  (:meth:`DeepseekV4Adapter.row_layer_arguments`) and the compressed attention's entries, recomputed per row
  where its own positions close a block (:mod:`moeaudit.intervene.compressed`); windows longer than the CSA
  indexer keeps every entry for, ``(index_topk + 1) * 4 - 1`` = 2,051 tokens in the released configs, run on
  the reference engine.
* The pruned checkpoint is not exported: the hash layers keep every expert, and the config has one expert
  count for all layers (:attr:`DeepseekV4Adapter.export_refusal`).
"""

from __future__ import annotations

from torch import nn

from moeaudit.models.base import MoELayer
from moeaudit.models.scored import ScoredRule, ScoredTopKAdapter


class DeepseekV4Adapter(ScoredTopKAdapter):
    family = "deepseek_v4"
    model_types = ("deepseek_v4",)
    architectures = ("DeepseekV4ForCausalLM",)
    rule = ScoredRule("sqrtsoftplus_bias_renorm_scaled", score="sqrtsoftplus", bias="router", renorm="always",
                      scaled=True)
    #: The hash-routed layers read the token ids: :meth:`row_layer_arguments` hands the rows theirs.
    replayed_layer_arguments = frozenset({"input_ids"})
    export_refusal = ("DeepSeek-V4's hash-routed layers keep every expert (moeaudit does not prune them) and its "
                      "config holds one expert count for all layers, so the pruned model has no checkpoint form; "
                      "use the masked evaluation of `moeaudit prune` (pruning.parquet)")

    def is_moe_block(self, mlp: nn.Module) -> bool:
        return super().is_moe_block(mlp) and not getattr(mlp, "is_hash", False)

    def unaudited_layers(self, model: nn.Module) -> dict[int, tuple[MoELayer, str]]:
        config = model.config.get_text_config()
        blocks = {index: getattr(layer, self.block_attr) for index, layer in enumerate(self.decoder_layers(model))}
        return {index: (self.describe_layer(config, index, block), "hash-routed (experts fixed per token id)")
                for index, block in blocks.items() if getattr(block, "is_hash", False)}

    def row_layer_arguments(self, moe, clean, position_ids, first_layer: int):
        """The rows' token ids (``DeepseekV4Model.forward`` hands ``input_ids`` to every decoder layer; the hash
        router looks its experts up by them): an intervention changes no token, so the window's."""
        ids = clean.input_ids[position_ids]
        return lambda index: {"input_ids": ids}
