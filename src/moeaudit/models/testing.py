"""Tiny random-weight models of every supported family, for tests, benchmarks and examples.

Nothing is downloaded: each model is built from a small config. Weights are re-drawn with a spread large
enough that routing is decisive (transformers initialises routers near zero, which makes top-k ties).
"""

from __future__ import annotations

from typing import Any

import torch

FAMILIES: tuple[str, ...] = (
    "olmoe", "qwen2_moe", "deepseek_v2", "deepseek_v2_grouped", "mixtral", "qwen3_moe", "gpt_oss",
    "deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe", "mistral4", "minimax_m2", "ernie4_5_moe",
    "flex_olmo", "granitemoe", "hunyuan_v1_moe", "solar_open", "mimo_v2_flash", "mellum", "qwen3_next", "jamba",
    "qwen3_5_moe", "granitemoeshared", "granitemoehybrid", "qwen3_vl_moe",
    "phimoe", "llama4_text", "nemotron_h", "glm4v_moe", "flint", "cohere2_moe", "hy_v3", "aria_text",
    "afmoe", "lfm2_moe", "bailing_hybrid", "kimi_linear", "deepseek_v32", "glm_moe_dsa",
    "deepseek_v32_sparse", "kolibri1", "gemma4_text", "axk1", "qwen3_omni_moe",
    "ernie4_5_vl_moe", "longcat_flash", "step3p7", "minimax", "dbrx", "deepseek_v4",
    "mistral_large4", "dots3_note", "qwen4_exp", "inkling2", "granitemoe_swa", "glm5_next", "hy_v4", "axk2",
    "minimax_m3", "laguna", "beam", "nemotron_h_latent", "muse_spark", "jetmoe",
)

#: Families the fast engine cannot replay, with a phrase of the reason it gives: their interventions run on
#: the reference engine (found by :func:`moeaudit.intervene.engine.fast_unsupported_reason` or by the fast
#: engine's self-check, :mod:`moeaudit.intervene.spotcheck`). A norm after the MoE block (FlexOlmo, Kolibri-1,
#: A.X-K1, Gemma 4, AFMoE) is replayed: the rows restart at the block
#: (:func:`moeaudit.intervene.fast.restarts_at_block`).
REFERENCE_ONLY: dict[str, str] = {
    "deepseek_v32_sparse": "DeepseekV32Indexer",  # windows longer than index_topk: the selection changes
    "qwen4_exp": "gated-residual hyper-connections",  # several residual streams, n-gram embeddings, QSA indexer
    "inkling2": "short convolution before the residual stream",  # and block attention residuals
}
#: Families whose decoder layers mix tokens with recurrent or convolutional layers (conv / recurrent states,
#: :mod:`moeaudit.intervene.recurrent`), with the kind of layer.
RECURRENT_FAMILIES: dict[str, str] = {
    "qwen3_next": "Gated DeltaNet", "qwen3_5_moe": "Gated DeltaNet", "jamba": "Mamba",
    "granitemoehybrid": "Mamba-2", "nemotron_h": "Mamba-2", "nemotron_h_latent": "Mamba-2",
    "lfm2_moe": "short convolution",
    "bailing_hybrid": "KDA linear attention", "kimi_linear": "KDA linear attention", "glm5_next": "KDA linear attention",
    "minimax": "Lightning attention",
}
#: Families the fast engine replays exactly.
FAST_FAMILIES: tuple[str, ...] = tuple(f for f in FAMILIES if f not in REFERENCE_ONLY)

#: Multi-head latent attention fields of a tiny DeepSeek-style config.
_MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8,
            num_key_value_heads=4)

_COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(family: str, **overrides: Any):
    """A small config of ``family`` (one of :data:`FAMILIES`); ``overrides`` replace any field."""
    from transformers import (DeepseekV2Config, DeepseekV3Config, Dots1Config, Ernie4_5_MoeConfig, ExaoneMoeConfig,
                              Glm4MoeConfig, Glm4MoeLiteConfig, GptOssConfig, MiniMaxConfig, MiniMaxM2Config,
                              Mistral4Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig)
    from transformers import AfmoeConfig, AriaTextConfig, Cohere2MoeConfig, FlintConfig, HYV3Config, Lfm2MoeConfig
    from transformers import AXK1Config, Gemma4TextConfig
    from transformers import BailingHybridConfig, DeepseekV32Config, GlmMoeDsaConfig, KimiLinearConfig, Kolibri1Config
    from transformers import (Glm4vMoeConfig, GraniteMoeHybridConfig, GraniteMoeSharedConfig, Llama4TextConfig,
                              NemotronHConfig, PhimoeConfig, Qwen3OmniMoeThinkerConfig, Qwen3VLMoeConfig)
    from transformers import (DbrxConfig, DeepseekV4Config, Ernie4_5_VLMoeConfig, LongcatFlashConfig,
                              MistralLarge4Config, Step3p7Config)
    from transformers import JetMoeConfig, MuseSparkConfig
    from transformers import (AXK2Config, BeamConfig, Dots3NoteTextConfig, Glm5NextConfig, GraniteMoeSWAConfig,
                              HYV4Config, Inkling2TextConfig, LagunaConfig, MiniMaxM3VLConfig, Qwen4ExpTextConfig)
    from transformers import (FlexOlmoConfig, GraniteMoeConfig, HunYuanMoEV1Config, JambaConfig, MellumConfig,
                              MiMoV2FlashConfig, Qwen3_5MoeTextConfig, Qwen3NextConfig, SolarOpenConfig)

    # The DeepSeek-V3 router family: sigmoid scores + correction bias (drawn by tiny_model), group-limited.
    scored = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                  num_experts_per_tok=2, routed_scaling_factor=2.5, norm_topk_prob=True, n_group=2, topk_group=1)

    # Granite: residual, logit, embedding and attention multipliers (the fast engine must notice them).
    granite = dict(_COMMON, intermediate_size=16, num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2,
                   residual_multiplier=0.5, logits_scaling=2.0, embedding_multiplier=4.0, attention_multiplier=0.125)

    if family in ("olmoe", "flex_olmo"):  # FlexOlmo: OLMoE's layout plus a norm after the MoE block
        fields = dict(_COMMON, intermediate_size=16, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=False)
        cls = OlmoeConfig if family == "olmoe" else FlexOlmoConfig
    elif family == "qwen2_moe":
        fields = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                      mlp_only_layers=[1])
        cls = Qwen2MoeConfig
    elif family in ("deepseek_v2", "deepseek_v2_grouped"):
        grouped = family == "deepseek_v2_grouped"
        fields = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                      first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                      kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                      head_dim=8, num_key_value_heads=4, routed_scaling_factor=1.5,
                      topk_method="group_limited_greedy" if grouped else "greedy",
                      n_group=4 if grouped else None, topk_group=2 if grouped else None)
        cls = DeepseekV2Config
    elif family == "mixtral":
        fields = dict(_COMMON, intermediate_size=16, num_hidden_layers=3, num_local_experts=8,
                      num_experts_per_tok=2, sliding_window=None)
        cls = MixtralConfig
    elif family == "qwen3_moe":
        fields = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)
        cls = Qwen3MoeConfig
    elif family == "gpt_oss":
        fields = dict(_COMMON, intermediate_size=16, num_hidden_layers=2, num_local_experts=8,
                      num_experts_per_tok=2, head_dim=8, sliding_window=16,
                      layer_types=["sliding_attention", "full_attention"],
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cls = GptOssConfig
    elif family == "deepseek_v3":
        fields = dict(scored, **_MLA, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
                      rope_interleave=True)
        cls = DeepseekV3Config
    elif family in ("deepseek_v32", "deepseek_v32_sparse", "glm_moe_dsa"):  # DeepSeek-V3's MoE, MLA + DSA
        # Windows up to index_topk keep every key (the released models keep 2048; the fast engine runs them);
        # the sparse variant's 4 < the tests' windows, so its indexer really drops keys (reference engine).
        fields = dict(scored, **dict(_MLA, q_lora_rank=16), n_routed_experts=8, n_shared_experts=1,
                      index_topk=4 if family.endswith("_sparse") else 64, index_n_heads=2, index_head_dim=16)
        # GLM-5: odd layers reuse the top-k of the layer before (``prev_topk_indices``; set below)
        cls = DeepseekV32Config if family.startswith("deepseek_v32") else GlmMoeDsaConfig
    elif family == "axk1":  # DeepSeek-V3's MoE and MLA; the block normalises its output (post_mlp_layernorm)
        fields = dict(scored, **dict(_MLA, q_lora_rank=16), n_routed_experts=8, n_shared_experts=1,
                      rope_interleave=True)
        cls = AXK1Config
    elif family == "glm4_moe":
        fields = dict(scored, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                      topk_group=1, routed_scaling_factor=1.0, head_dim=8, use_qk_norm=True)
        cls = Glm4MoeConfig
    elif family == "glm4_moe_lite":
        fields = dict(scored, **_MLA, n_routed_experts=8, n_shared_experts=1, routed_scaling_factor=1.8,
                      mlp_layer_types=["dense", "sparse", "sparse"])
        cls = Glm4MoeLiteConfig
    elif family == "dots1":
        fields = dict(scored, n_routed_experts=8, n_shared_experts=2, first_k_dense_replace=1, norm_topk_prob=False,
                      head_dim=8, sliding_window=None)
        cls = Dots1Config
    elif family == "exaone_moe":
        fields = dict(scored, num_experts=8, num_shared_experts=1, head_dim=8, sliding_window=16,
                      mlp_layer_types=["dense", "sparse", "sparse"],
                      layer_types=["sliding_attention", "sliding_attention", "full_attention"])
        cls = ExaoneMoeConfig
    elif family == "mistral4":
        mla = {key: value for key, value in _MLA.items() if key != "head_dim"}  # derived: nope + rope
        fields = dict(scored, **mla, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
                      routed_scaling_factor=1.5)
        cls = Mistral4Config
    elif family == "minimax_m2":
        fields = dict(_COMMON, intermediate_size=16, num_hidden_layers=3, num_local_experts=8,
                      num_experts_per_tok=2, head_dim=8)
        cls = MiniMaxM2Config
    elif family == "minimax":  # Lightning (linear) and softmax attention layers, alpha/beta residual scales
        # blocks of 8 tokens: the tests' windows cross blocks of the chunked prefill; every residual scale apart from
        # 1, so replaying the block's output with the wrong coupling (beta) cannot pass
        fields = dict(_COMMON, intermediate_size=16, num_hidden_layers=3, num_local_experts=8,
                      num_experts_per_tok=2, head_dim=8, block_size=8, full_attn_alpha_factor=1.5,
                      full_attn_beta_factor=0.5, linear_attn_alpha_factor=0.8, linear_attn_beta_factor=1.2,
                      mlp_alpha_factor=1.3, mlp_beta_factor=0.7)
        cls = MiniMaxConfig
    elif family == "dbrx":  # routing in the block (p-norm 1), 2-D expert weights, clipped qkv, LayerNorms
        fields = dict(vocab_size=96, d_model=32, n_heads=4, n_layers=3, max_seq_len=256, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2,
                      attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
                      ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2,
                                      moe_normalize_expert_weights=1.0))
        cls = DbrxConfig
    elif family == "deepseek_v4":  # a hash-routed first layer, then sqrt-softplus top-k layers; 2 residual streams
        # sliding window 8 < the tests' windows; sliding, CSA (entries of 4 positions, every one kept up to 259
        # tokens) and HCA (of 8) layers, so the tests' windows close several blocks of each
        fields = dict(_COMMON, moe_intermediate_size=16, num_hidden_layers=3, num_key_value_heads=1, head_dim=16,
                      q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=8, n_shared_experts=1, hc_mult=2,
                      hc_sinkhorn_iters=3, sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=2,
                      index_head_dim=8, index_topk=64, num_nextn_predict_layers=0,
                      mlp_layer_types=["hash_moe", "moe", "moe"],
                      layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
                      compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8})
        cls = DeepseekV4Config
    elif family == "mistral_large4":  # MLA + indexer; layer 2 reuses layer 1's keys/values and key selection;
        # layer 3 without RoPE (every 4th); a dense first layer; 2 groups of 4 experts, the best group kept
        fields = dict(_COMMON, **dict(_MLA, num_key_value_heads=4), intermediate_size=48, moe_intermediate_size=16,
                      num_hidden_layers=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                      n_group=2, topk_group=1, routed_scaling_factor=1.5, index_topk=64, index_n_heads=2,
                      index_head_dim=16, first_k_dense_replace=1, kv_source_layers=[0, 1, 1, 3],
                      indexer_types=["full", "full", "shared", "full"])
        cls = MistralLarge4Config
    elif family == "ernie4_5_moe":
        fields = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                      moe_num_experts=8, moe_k=2, moe_num_shared_experts=2, moe_layer_start_index=1,
                      tie_word_embeddings=False)
        cls = Ernie4_5_MoeConfig
    elif family == "granitemoe":
        fields = dict(granite)
        cls = GraniteMoeConfig
    elif family in ("granitemoeshared", "granitemoehybrid"):
        fields = dict(granite, shared_intermediate_size=24)
        cls = GraniteMoeSharedConfig
        if family == "granitemoehybrid":
            fields.update(layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4, mamba_d_state=8,
                          mamba_d_head=16, mamba_chunk_size=16)
            cls = GraniteMoeHybridConfig
    elif family == "hunyuan_v1_moe":
        fields = dict(_COMMON, intermediate_size=16, num_hidden_layers=3, num_experts=8, moe_topk=2, head_dim=8)
        cls = HunYuanMoEV1Config
    elif family == "solar_open":
        fields = dict(scored, n_routed_experts=8, n_shared_experts=1, head_dim=8)
        cls = SolarOpenConfig
    elif family == "mimo_v2_flash":
        fields = dict(scored, n_routed_experts=8, n_group=1, head_dim=8,
                      mlp_layer_types=["dense", "sparse", "sparse"])
        cls = MiMoV2FlashConfig
    elif family == "mellum":
        fields = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_experts=8,
                      num_experts_per_tok=2, head_dim=8, sliding_window=6)
        cls = MellumConfig
    elif family == "qwen3_next":
        fields = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, head_dim=8, linear_key_head_dim=8,
                      linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                      layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])
        cls = Qwen3NextConfig
    elif family == "qwen3_5_moe":
        fields = dict(_COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_hidden_layers=4,
                      num_experts=8, num_experts_per_tok=2, head_dim=8, linear_key_head_dim=8,
                      linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                      layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])
        cls = Qwen3_5MoeTextConfig
    elif family == "qwen3_vl_moe":  # the text model's fields; the vision tower is built small below
        fields = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_experts=8,
                      num_experts_per_tok=2, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta":
                                                                          10000.0, "mrope_section": [1, 1, 2]})
        cls = Qwen3VLMoeConfig
    elif family == "qwen3_omni_moe":  # the thinker's text model (interleaved mRoPE, a dense layer); encoders below
        fields = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, mlp_only_layers=[0],
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                       "interleaved": True})
        cls = Qwen3OmniMoeThinkerConfig
    elif family == "ernie4_5_vl_moe":  # text and vision experts in each block; the vision tower is built below
        fields = dict(_COMMON, intermediate_size=48, moe_intermediate_size=[16, 8], num_hidden_layers=3,
                      moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, tie_word_embeddings=False)
        cls = Ernie4_5_VLMoeConfig
    elif family == "longcat_flash":  # 8 real + 4 identity experts; two attention sublayers, the MoE a shortcut
        fields = dict(_COMMON, **{**_MLA, "q_lora_rank": 16}, num_layers=3, ffn_hidden_size=48,
                      expert_ffn_hidden_size=16, n_routed_experts=8, zero_expert_num=4, moe_topk=3,
                      routed_scaling_factor=2.0)
        cls = LongcatFlashConfig
    elif family == "step3p7":  # sliding (2 heads) and full (4 heads) layers, a dense first layer; block scale
        fields = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, share_expert_dim=24,
                      num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, head_dim=8,
                      moe_router_scaling_factor=2.5, sliding_window=6, num_sliding_attention_heads=2)
        cls = Step3p7Config
    elif family == "jamba":
        fields = dict(_COMMON, intermediate_size=16, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2,
                      expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
                      use_mamba_kernels=False, mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4)
        cls = JambaConfig
    elif family == "phimoe":  # LayerNorm with biases, biased attention projections; sparsemixer's eps
        fields = dict(_COMMON, intermediate_size=16, num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2,
                      sliding_window=None, router_jitter_noise=0.3)
        cls = PhimoeConfig
    elif family == "llama4_text":  # chunked and full attention, rope-less every 4th layer, qk L2 norm
        fields = dict(_COMMON, intermediate_size=16, intermediate_size_mlp=48, num_hidden_layers=4,
                      num_local_experts=8, num_experts_per_tok=2, head_dim=8, interleave_moe_layer_step=2,
                      attention_chunk_size=8, no_rope_layer_interval=4)
        cls = Llama4TextConfig
    elif family in ("nemotron_h", "nemotron_h_latent"):  # Mamba-2, MoE, attention, MoE; ReLU² experts; the latent
        # variant's experts work on a 16-wide projection of the residual stream (Nemotron 3's latent MoE)
        fields = dict(scored, moe_shared_expert_intermediate_size=24, n_routed_experts=8, head_dim=8,
                      layers_block_type=["linear_attention", "moe", "full_attention", "moe"], ssm_state_size=8,
                      mamba_num_heads=4, mamba_head_dim=16, n_groups=1, chunk_size=16,
                      moe_latent_size=16 if family == "nemotron_h_latent" else None)
        fields.pop("num_hidden_layers")
        cls = NemotronHConfig
    elif family == "glm4v_moe":  # GLM-4.5's text fields; the vision tower is built small below
        fields = dict(scored, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                      topk_group=1, routed_scaling_factor=1.0, head_dim=8, partial_rotary_factor=0.5,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 0],
                                       "partial_rotary_factor": 0.5})
        cls = Glm4vMoeConfig
    elif family == "flint":  # sigmoid top-k without a bias, an always-added shared expert (generic adapter)
        fields = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, head_dim=8,
                      mlp_only_layers=[0])
        cls = FlintConfig
    elif family == "cohere2_moe":  # top-k of the logits, softmax over them; a parallel block (generic adapter)
        fields = dict(_COMMON, intermediate_size=16, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                      head_dim=8, num_shared_experts=1, shared_expert_combination_strategy="sum",
                      expert_selection_fn="softmax", layer_types=None)
        cls = Cohere2MoeConfig
    elif family == "hy_v3":  # sigmoid + the block's correction bias, renormalised, router_scaling_factor (generic)
        fields = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_experts=8,
                      num_experts_per_tok=2, num_shared_experts=1, head_dim=8, router_scaling_factor=2.5)
        cls = HYV3Config
    elif family == "aria_text":  # Aria's text model: top-k of the logits, softmax over the k (generic adapter)
        fields = dict(_COMMON, intermediate_size=16, num_hidden_layers=3, moe_num_experts=8, moe_topk=2,
                      moe_num_shared_experts=1, head_dim=8)
        cls = AriaTextConfig
    elif family == "kolibri1":  # top-k of logits + the router's bias, sigmoid of the chosen logits (generic)
        fields = dict(_COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_hidden_layers=3,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, sliding_window=6)
        cls = Kolibri1Config
    elif family == "afmoe":  # the router under mlp.router (a gate Linear), the block's expert_bias, route_scale
        fields = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_dense_layers=1,
                      num_experts=8, num_experts_per_tok=2, num_shared_experts=1, route_scale=2.0, head_dim=8,
                      sliding_window=6, global_attn_every_n_layers=2)
        cls = AfmoeConfig
    elif family == "lfm2_moe":  # short-convolution and attention layers; the block's expert_bias, eps 1e-6
        fields = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_dense_layers=1,
                      num_experts=8, num_experts_per_tok=2, routed_scaling_factor=1.5, norm_topk_prob=True,
                      use_expert_bias=True, layer_types=["conv", "full_attention", "conv"])
        cls = Lfm2MoeConfig
    elif family in ("bailing_hybrid", "kimi_linear"):  # KDA linear attention + MLA; DeepSeek-V3's rule (generic)
        fields = dict(_COMMON, **_MLA, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4,
                      num_experts=8, num_experts_per_token=2, num_shared_experts=1, linear_head_dim=8,
                      linear_num_heads=4, num_expert_group=2, topk_group=1, routed_scaling_factor=2.0,
                      first_k_dense_replace=1)
        if family == "bailing_hybrid":
            fields["layer_group_size"] = 2  # linear, full, linear, full
            cls = BailingHybridConfig
        else:
            fields["layer_types"] = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
            cls = KimiLinearConfig
    elif family == "gemma4_text":  # MoE beside a dense MLP in every layer; per-layer inputs, shared KV, softcap
        fields = dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4, head_dim=8,
                      enable_moe_block=True, num_experts=8, top_k_experts=2, sliding_window=6, global_head_dim=16,
                      num_global_key_value_heads=1, attention_k_eq_v=True, num_kv_shared_layers=2,
                      hidden_size_per_layer_input=8, final_logit_softcapping=30.0)
        cls = Gemma4TextConfig
    elif family == "dots3_note":  # DeepSeek-V3's MoE; MLA with a DSA indexer, sliding layers with their own heads
        fields = dict(scored, **dict(_MLA, q_lora_rank=16, head_dim=16), shared_experts_intermediate_size=24,
                      n_routed_experts=8, n_shared_experts=1, index_topk=64, index_n_heads=2, index_head_dim=16,
                      sliding_window=6, swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=16,
                      swa_kv_lora_rank=16, swa_head_dim=16, swa_qk_nope_head_dim=8)
        cls = Dots3NoteTextConfig
    elif family == "qwen4_exp":  # Gated DeltaNet + indexed attention, 4 hyper-connection streams, n-gram embeddings
        fields = dict(_COMMON, head_dim=8, num_hidden_layers=4, linear_key_head_dim=8, linear_value_head_dim=8,
                      linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2, hc_count=4,
                      hc_lowrank=8, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,
                      indexer_compress_ratio=2, ple_layer_ids=[2], ple_embed_dim=32, ngram_vocab_size_base=64,
                      make_ngram_vocab_size_divisible_by=8,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
        cls = Qwen4ExpTextConfig
    elif family == "inkling2":  # sliding and full hybrid layers, a short convolution after each MoE block
        fields = dict(_COMMON, unpadded_vocab_size=96, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                      swa_head_dim=8, sliding_window_size=8, d_rel=4, rel_extent=16, num_hidden_layers=4,
                      n_layers_per_attn_res_block=2, n_routed_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=16, route_scale=2.5)
        cls = Inkling2TextConfig
    elif family == "granitemoe_swa":  # Granite's multipliers; sliding layers with attention sinks; a shared MLP;
        # a rotary base per layer, one layer without (NoPE)
        fields = dict(granite, sliding_window=4, shared_intermediate_size=24)
        cls = GraniteMoeSWAConfig
    elif family == "glm5_next":  # KDA and indexed MLA (NoPE) layers, 4 hyper-connection streams, a dense first layer
        fields = dict(scored, num_key_value_heads=4, num_hidden_layers=4, n_routed_experts=8, n_shared_experts=1,
                      q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=0, qk_nope_head_dim=8, v_head_dim=8,
                      index_topk=128, index_kpool=2, index_head_dim=8, index_n_heads=2, linear_head_dim=8,
                      linear_num_heads=4, hc_mult=4)
        cls = Glm5NextConfig
    elif family == "hy_v4":  # DeepSeek-V3's router (one group), MLA + DSA, 2 hyper-connection streams
        fields = dict(scored, **dict(_MLA, q_lora_rank=16, num_key_value_heads=4), n_routed_experts=8,
                      n_shared_experts=1, n_group=1, topk_group=1, index_topk=64, index_n_heads=2, index_head_dim=16,
                      hc_mult=2, swiglu_limit=10.0)
        cls = HYV4Config
    elif family == "axk2":  # sigmoid + bias, 2 groups filled with 0 when dropped; MLA + DSA; a gated norm
        fields = dict(scored, **dict(_MLA, q_lora_rank=16, num_key_value_heads=4), n_routed_experts=8,
                      n_shared_experts=1, index_topk=64, index_n_heads=2, index_head_dim=16, gated_norm_rank=4)
        cls = AXK2Config
    elif family == "minimax_m3":  # block-scaled routed output; a sparse (indexer) attention layer between full ones;
        # 16 blocks of 4 keys kept per query: windows up to 64 tokens keep every key (the fast engine runs them)
        fields = dict(_COMMON, head_dim=8, intermediate_size=16, dense_intermediate_size=48,
                      shared_intermediate_size=16, rotary_dim=4, num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2,
                      routed_scaling_factor=2.0, index_n_heads=2, index_head_dim=8, index_block_size=4,
                      index_topk_blocks=16, index_local_blocks=1)
        cls = MiniMaxM3VLConfig
    elif family == "laguna":  # block-scaled routed output, soft-capped router logits, heads per layer
        fields = dict(_COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                      sliding_window=4, moe_routed_scaling_factor=2.5, moe_router_logit_softcapping=3.0)
        cls = LagunaConfig
    elif family == "beam":  # DeepSeek-V3's groups without the scale, which the block applies; depth-scaled residuals
        fields = dict(_COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                      num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                      norm_topk_prob=True, sliding_window=4)
        cls = BeamConfig
    elif family == "muse_spark":  # latent experts (16 wide), logit multipliers; sliding, sliding, full (NoPE)
        fields = dict(_COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16, moe_hidden_size=16,
                      num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2, sliding_window=4,
                      routed_scaling_factor=2.0)
        cls = MuseSparkConfig
    elif family == "jetmoe":  # routed MLPs and routed attention heads (2 of 8 per token: 4 heads = 2 kv x 2)
        fields = {k: v for k, v in _COMMON.items() if k != "num_attention_heads"}
        fields.update(num_key_value_heads=2, kv_channels=8, intermediate_size=16, num_hidden_layers=3,
                      num_local_experts=8, num_experts_per_tok=2)
        cls = JetMoeConfig
    else:
        raise ValueError(f"`family` must be one of {', '.join(FAMILIES)}; got {family!r}.")
    if family == "dbrx":  # DBRX's own names for the common fields (its attribute_map would leave ffn_config behind)
        aliases = dict(hidden_size="d_model", num_hidden_layers="n_layers", num_attention_heads="n_heads",
                       max_position_embeddings="max_seq_len")
        overrides = {aliases.get(name, name): value for name, value in overrides.items()}
    fields.update(overrides)
    if family == "qwen3_omni_moe":
        return cls(text_config=fields, vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                                                          out_hidden_size=fields["hidden_size"],
                                                          deepstack_visual_indexes=[0], num_position_embeddings=16),
                   audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=16,
                                     d_model=16, output_dim=fields["hidden_size"], downsample_hidden_size=8,
                                     n_window=4))
    if family == "step3p7":  # sliding, full, sliding, ...; a dense first layer; a rotary base per layer type
        n = fields["num_hidden_layers"]
        kinds = [("sliding_attention", "full_attention")[i % 2] for i in range(n)]
        fields.setdefault("layer_types", kinds)
        fields.setdefault("mlp_layer_types", ["dense"] + ["sparse"] * (n - 1))
        fields.setdefault("rope_theta", [10000.0 if kind == "sliding_attention" else 50000.0 for kind in kinds])
        return cls(text_config=fields, vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, image_size=28, patch_size=14))
    if family == "mistral_large4":  # a small Pixtral vision tower (audited on text)
        return cls(text_config=fields, vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, image_size=28, patch_size=14))
    if family == "ernie4_5_vl_moe":  # 3-D rotary sections (height, width, time) covering the head's rotary half
        half = fields["hidden_size"] // fields["num_attention_heads"] // 2
        fields.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [half // 4, half // 4, half - 2 * (half // 4)]})
        return cls(text_config=fields, vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2))
    if family in ("qwen3_vl_moe", "glm4v_moe"):
        vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=fields["hidden_size"])
        if family == "qwen3_vl_moe":
            vision["deepstack_visual_indexes"] = [0]
        return cls(text_config=fields, vision_config=vision)
    n_layers = fields.get("num_hidden_layers", len(fields.get("layers_block_type", ())))
    if family in ("glm4_moe_lite", "exaone_moe", "mimo_v2_flash", "deepseek_v32", "deepseek_v32_sparse",
                  "glm_moe_dsa", "axk1", "dots3_note", "hy_v4", "axk2", "beam", "glm5_next",
                  "minimax_m3") and "mlp_layer_types" not in overrides:
        fields["mlp_layer_types"] = ["dense"] + ["sparse"] * (n_layers - 1)
    if family == "hy_v4" and "indexer_types" not in overrides:  # full, full, shared, full, full, shared, ...
        fields["indexer_types"] = [("full", "full", "shared")[i % 3] for i in range(n_layers)]
    if family == "glm5_next":  # KDA, indexed, indexed (reusing the one before's selection), KDA, ...
        fields.setdefault("layer_types", [("linear_attention", "indexed_attention", "indexed_attention",
                                           "linear_attention")[i % 4] for i in range(n_layers)])
        fields.setdefault("indexer_types", ["shared" if i % 4 == 2 else "full" for i in range(n_layers)])
    if family == "minimax_m3" and "layer_types" not in overrides:  # full, sparse (indexer), full, ...
        fields["layer_types"] = [("full_attention", "minimax_m3_sparse")[i % 2] for i in range(n_layers)]
    if family == "laguna":  # sliding (4 heads), full (2 heads), sliding, ...
        fields.setdefault("layer_types", [("sliding_attention", "full_attention")[i % 2] for i in range(n_layers)])
        fields.setdefault("num_attention_heads_per_layer", [(4, 2)[i % 2] for i in range(n_layers)])
    if family == "inkling2" and "layer_types" not in overrides:  # hybrid sliding, hybrid, ...
        fields["layer_types"] = [("hybrid_sliding", "hybrid")[i % 2] for i in range(n_layers)]
    if family == "granitemoe_swa" and "layer_types" not in overrides:  # full, sliding, sliding, ...
        fields["layer_types"] = [("full_attention", "sliding_attention", "sliding_attention")[i % 3]
                                 for i in range(n_layers)]
    if family == "granitemoe_swa" and "layer_rope_theta" not in overrides:  # a rotary base per layer, 0: none
        fields["layer_rope_theta"] = [(10000.0, 0.0, 500000.0)[i % 3] for i in range(n_layers)]
    if family == "glm_moe_dsa" and "indexer_types" not in overrides:  # full, shared, full, ...
        fields["indexer_types"] = [("full", "shared")[i % 2] for i in range(n_layers)]
    if family == "exaone_moe" and "layer_types" not in overrides:  # every third layer full attention
        fields["layer_types"] = [("sliding_attention", "sliding_attention", "full_attention")[i % 3]
                                 for i in range(n_layers)]
    if family in ("qwen3_next", "qwen3_5_moe", "minimax") and "layer_types" not in overrides:  # linear, full, ...
        fields["layer_types"] = [("linear_attention", "full_attention")[i % 2] for i in range(n_layers)]
    if family == "granitemoehybrid" and "layer_types" not in overrides:  # mamba, attention, mamba, ...
        fields["layer_types"] = [("mamba", "attention")[i % 2] for i in range(n_layers)]
        if "mamba_d_head" not in overrides:  # heads x head dim = the Mamba width, 2 x hidden
            fields["mamba_d_head"] = 2 * fields["hidden_size"] // fields["mamba_n_heads"]
    if family == "lfm2_moe" and "layer_types" not in overrides:  # conv, attention, conv, ...
        fields["layer_types"] = [("conv", "full_attention")[i % 2] for i in range(n_layers)]
    if family == "gemma4_text" and "vocab_size_per_layer_input" not in overrides:  # per-layer embeddings per token
        fields["vocab_size_per_layer_input"] = fields["vocab_size"]
    if family in ("kolibri1", "gemma4_text") and "layer_types" not in overrides:  # sliding, full, sliding, ...
        fields["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(n_layers)]
    if family == "mimo_v2_flash" and "layer_types" not in overrides:  # sliding and full attention, 2 : 1
        fields["layer_types"] = [("sliding_attention", "sliding_attention", "full_attention")[i % 3]
                                 for i in range(n_layers)]
        fields["sliding_window"] = 6
    if family == "gpt_oss" and "layer_types" not in overrides:  # GPT-OSS alternates sliding and full attention
        fields["layer_types"] = [("sliding_attention", "full_attention")[i % 2]
                                 for i in range(fields["num_hidden_layers"])]
    if family == "muse_spark":  # small vision and audio towers (audited on text)
        return cls(text_config=fields, vision_config=dict(num_hidden_layers=1, hidden_size=16, intermediate_size=16,
                                                          num_attention_heads=2, pos_emb_height=4, pos_emb_width=4,
                                                          max_position_embeddings=16),
                   audio_config=dict(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1],
                                     out_hidden_size=fields["hidden_size"]),
                   out_hidden_size=16, projector_hidden_size=16, image_token_id=90, video_token_id=91,
                   audio_token_id=92)
    if family == "minimax_m3":  # a one-layer vision tower (audited on text)
        return cls(text_config=fields, vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, patch_size=14, spatial_merge_size=2),
                   projector_hidden_size=16, image_token_index=95, video_token_index=94)
    if family == "glm5_next":  # a one-block vision tower (audited on text)
        return cls(text_config=fields, vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                                                          out_hidden_size=fields["hidden_size"],
                                                          projection_intermediate_size=16))
    return cls(**fields)


def tiny_model(family: str, *, seed: int = 0, experts_implementation: str | None = "batched_mm",
               router_std: float = 1.0, weight_std: float = 0.2, **overrides: Any):
    """A randomly initialised tiny causal LM of ``family`` in fp32 eval mode (a transformers model)."""
    from moeaudit.models.loading import causal_lm_class

    config = tiny_config(family, **overrides)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    cls = causal_lm_class(config)
    model = (cls.from_config(config, dtype=torch.float32) if hasattr(cls, "from_config")
             else cls._from_config(config, dtype=torch.float32))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                continue
            is_router = (name.endswith(("gate.weight", "router.weight", "gate.wg.weight", "router.proj.weight",
                                        "router.layer.weight"))
                         and "shared_expert_gate" not in name)
            std = router_std if is_router else weight_std
            if param.dim() >= 2 or "bias" in name or "sinks" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif name.endswith(("router.per_expert_scale", "router.scale")):  # Gemma 4's router scales, ones at init
                param.copy_(1 + torch.randn(param.shape, generator=generator) * 0.3)
        for name, buffer in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):  # a load-balancing bias: changes selection
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.3)
            if name.endswith("tid2eid"):  # DeepSeek-V4's hash layers: k distinct experts per token id
                experts = int(config.get_text_config().n_routed_experts)
                buffer.copy_(torch.stack([torch.randperm(experts, generator=generator)[:buffer.shape[1]]
                                          for _ in range(buffer.shape[0])]))
    return model.eval()
