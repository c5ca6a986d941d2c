"""Gemma 3 text decoder (Gemma3ForCausalLM).

Differences from Llama: norms scale by ``1 + weight``; norms after attention and after the MLP as well as
before; GELU-tanh MLP; embeddings multiplied by sqrt(hidden) rounded to the model dtype; per-head q/k norm;
softmax scale ``query_pre_attn_scalar ** -0.5``; sliding-window layers use their own rope base
(``rope_local_base_freq``, no scaling); optional attention/final logit softcapping.
"""

from __future__ import annotations

import torch
from torch import nn

from fastinfer.models.attention_metadata import AttentionMetadata
from fastinfer.models.config import ModelConfig
from fastinfer.models.layers import Attention, GatedMLP, RMSNorm
from fastinfer.models.llama import LlamaForCausalLM


class Gemma3DecoderLayer(nn.Module):
    """x + post_norm(attn(pre_norm(x))), then x + post_ff_norm(mlp(pre_ff_norm(x)))."""

    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        c = config

        def norm() -> RMSNorm:
            return RMSNorm(c.hidden_size, eps=c.rms_norm_eps, offset=True, dtype=dtype, device=device)

        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        # Hugging Face's Gemma 3 ignores attn_logit_softcapping (released configs set none); the original
        # Gemma code applies it when set, and so do we.
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                   qkv_bias=c.attention_bias, o_bias=c.o_proj_bias, qk_norm=True,
                                   norm_eps=c.rms_norm_eps, norm_offset=True, scale=c.query_pre_attn_scalar ** -0.5,
                                   window=c.window(layer), softcap=c.attn_logit_softcapping, dtype=dtype,
                                   device=device)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, False, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), meta.prompt_rows))


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3 text model; same interface as LlamaForCausalLM."""

    layer_cls = Gemma3DecoderLayer
    norm_offset = True

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu") -> None:
        super().__init__(config, dtype, device)
        # sqrt(hidden) rounded to the model dtype first (e.g. 55.4256 -> 55.5 in bfloat16), as trained.
        self.embed_scale = torch.tensor(config.hidden_size ** 0.5, dtype=dtype, device=device)
