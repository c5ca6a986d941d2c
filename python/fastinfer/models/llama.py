"""Decoder-only transformer for Llama, SmolLM, TinyLlama, Mistral, Qwen2 and Qwen3.

The families differ only in flags of ModelConfig: q/k/v bias (Qwen2), per-head q/k norm (Qwen3),
sliding-window layers (Mistral, Qwen with use_sliding_window), tied head, rope scaling.
Gemma 3 (gemma3.py) subclasses this with its own layer and embedding scale. Which checkpoints map to these
classes, and how their tensors are named, is in registry.py; ``load_weights`` is weights.py's.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastinfer.ops

from fastinfer.models.attention_metadata import AttentionMetadata
from fastinfer.models.config import ModelConfig
from fastinfer.models.cpu_decoder import CpuDecoder
from fastinfer.models.layers import Attention, GatedMLP, Linear, RMSNorm, RotaryEmbedding, empty_param, \
    use_cpu_kernels
from fastinfer.models.weights import load_weights

class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                   qkv_bias=c.attention_bias, o_bias=c.o_proj_bias, qk_norm=c.qk_norm,
                                   norm_eps=c.rms_norm_eps, norm_offset=False, scale=c.head_dim ** -0.5,
                                   window=c.window(layer), softcap=None, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype, device=device)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, c.mlp_bias, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        h, x = self.post_attention_layernorm.add_and_norm(h, x)  # may update x in place
        return x + self.mlp(h, meta.prompt_rows)


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm (Hugging Face's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig, layer_cls: type, dtype: torch.dtype, device, norm_offset: bool) -> None:
        super().__init__()
        c = config
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = empty_param(c.vocab_size, c.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(layer_cls(c, i, dtype, device) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, offset=norm_offset, dtype=dtype, device=device)


class LlamaForCausalLM(nn.Module):
    """Causal LM over a paged KV cache.

    ``forward(input_ids (T,), positions (T,), kv_caches, meta) -> hidden (T, hidden)`` (after the final norm);
    ``compute_logits(hidden (N, hidden)) -> (N, vocab)`` float32.
    """

    layer_cls: type = LlamaDecoderLayer
    norm_offset = False

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu") -> None:
        super().__init__()
        self.config, self.dtype = config, dtype
        self.model = LlamaModel(config, self.layer_cls, dtype, device, self.norm_offset)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Module()
            self.lm_head.weight = empty_param(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.head_proj = None  # the output head as a packed Linear, once pack_for_cpu() ran
        self.cpu_decoder = None  # the layers as one native call per step (CpuDecoder), once pack_for_cpu() ran
        self.embed_scale = None  # multiplier of the embeddings in the model dtype (Gemma)
        # Rotary tables per layer; sliding layers have their own only where their base differs (Gemma 3).
        full = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling, dtype, device)
        local = full if config.rope_local_base_freq is None else \
            RotaryEmbedding(config.head_dim, config.rope_local_base_freq, None, dtype, device)
        self.layer_rotary = [full if kind == "full_attention" else local for kind in config.layer_types]
        self.rotaries = list(dict.fromkeys(self.layer_rotary))

    def pack_for_cpu(self) -> bool:
        """Move every projection, the output head included, to fastinfer's CPU linear (see
        ``Linear.pack``). The tied head keeps the embedding table and packs a copy of it (a quantised
        table is shared, not copied)."""
        if not all(m.pack() for m in self.modules() if isinstance(m, Linear)):
            return False
        self.head_proj = self._quantized_head()
        if self.head_proj is None:
            self.head_proj = Linear.from_weight(self.head_weight())
            self.head_proj.pack(free_weight=False)
            if not self.config.tie_word_embeddings:
                self.lm_head.weight.data = torch.empty(0, dtype=self.lm_head.weight.dtype)
        self.cpu_decoder = CpuDecoder.build(self)
        return True

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def _quantized_head(self) -> Linear | None:
        """The output head over its quantised weight (the embedding's when tied), or None if it is a float one."""
        owner = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        q = getattr(owner, "qweight", None)
        return None if q is None else Linear.from_quantized(q, self.dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) token ids -> (T, hidden) embeddings in the model dtype (quantised rows dequantised on lookup)."""
        q = getattr(self.model.embed_tokens, "qweight", None)
        if q is not None:
            return fastinfer.ops.dequantize_rows(q, input_ids).to(self.dtype)
        return F.embedding(input_ids, self.model.embed_tokens.weight)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions : (T,) int64 of the flattened batch; kv_caches[i] = (k, v) of layer i, each
        (num_blocks, block_size, kv_heads, head_dim). Writes this step's keys/values, returns (T, hidden)."""
        x = self.embed(input_ids)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        if len(kv_caches) != len(self.model.layers):
            raise ValueError(f"kv_caches: {len(kv_caches)} (k, v) pairs for {len(self.model.layers)} layers")
        if self.cpu_decoder is not None and use_cpu_kernels(x) and x.dtype == self.cpu_decoder.dtype:
            return self.cpu_decoder(x, positions, kv_caches, meta)
        tables = {rope: rope(positions) for rope in self.rotaries}  # cos/sin once per table, not per layer
        for layer, rope, kv in zip(self.model.layers, self.layer_rotary, kv_caches):
            x = layer(x, *tables[rope], kv, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor, prompt_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden (N, hidden) -> logits (N, vocab) float32, final softcapping applied if configured.

        prompt_rows : (N,) bool or None: rows that are prompt tokens; a quantised head keeps their
            activations float (the first token after a prompt is the dequantised model's) and quantises
            the others' to int8, as the decoder's projections do (``AttentionMetadata.prompt_rows``).
        """
        if self.head_proj is None:
            self.head_proj = self._quantized_head()
        head = self.head_proj
        # The packed head writes float32 directly: the unrounded sums (transformers rounds logits to
        # the model dtype first; greedy picks can differ only where two logits tie after rounding).
        if head is None:
            logits = F.linear(hidden, self.head_weight()).float()
        else:
            logits = head(hidden, out_float32=True, float_rows=prompt_rows)
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the (fused) parameters; see ``load_weights``."""
        load_weights(self, named_tensors)

