"""A Llama-style decoder stack as one native call per step, on the CPU.

At decode sizes the Python between kernels (about ten calls per layer: checks, DLPack views, output
allocation) costs more than the small ops themselves. ``CpuDecoder`` hands the packed weights to
``fastinfer._C.CpuDecoder`` once, binds the engine's KV caches once, and then runs every layer and the
final norm in C++ with the same kernels, in the same order, as the per-op path: results are identical.

``CpuDecoder.build(model)`` returns None where the stack has something the native loop does not do
(Gemma's extra norms, q/k norms, softcapping, several rotary tables, unpacked projections); the model
then keeps its per-op forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from fastinfer import _C
from fastinfer._arrays import kernel_view
from fastinfer.models.attention_metadata import AttentionMetadata
from fastinfer.models.layers import token_rows

if TYPE_CHECKING:
    from fastinfer.models.llama import LlamaForCausalLM


class CpuDecoder:
    """Runs ``model.model.layers`` and the final norm of a packed Llama-style model in one call.

    ``__call__(x (T, hidden) embeddings, positions (T,), kv_caches, meta) -> (T, hidden)`` final hidden states;
    ``x`` is used as the residual stream (overwritten).
    """

    def __init__(self, model: "LlamaForCausalLM") -> None:
        c = model.config
        layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(dict(
                input_norm=layer.input_layernorm.scale32, post_norm=layer.post_attention_layernorm.scale32,
                qkv=attn.qkv_proj.packed, qkv_bias=attn.qkv_proj.bias, o=attn.o_proj.packed, o_bias=attn.o_proj.bias,
                gate_up=mlp.gate_up_proj.packed, gate_up_bias=mlp.gate_up_proj.bias,
                down=mlp.down_proj.packed, down_bias=mlp.down_proj.bias, window_left=attn.window[0]))
        first = model.model.layers[0].self_attn
        self.dtype = model.dtype
        self.rotary = model.layer_rotary[0]
        self.native = _C.CpuDecoder(
            c.hidden_size, c.intermediate_size, first.heads, first.kv_heads, first.head_dim, c.rms_norm_eps,
            first.scale, "gelu_tanh" if model.model.layers[0].mlp.gelu else "silu", model.model.norm.scale32,
            layers)
        self._bound: Optional[list] = None
        self._workspace = torch.empty(0, dtype=torch.uint8)

    @staticmethod
    def unsupported(model: "LlamaForCausalLM") -> Optional[str]:
        """Why the native loop cannot run ``model`` (None if it can)."""
        from fastinfer.models.llama import LlamaDecoderLayer

        if model.dtype not in (torch.float32, torch.bfloat16):
            return f"dtype {model.dtype}"
        if model.embed_scale is not None or model.norm_offset or len(model.rotaries) != 1:
            return "embedding scale, offset norms or several rotary tables"
        if model.model.norm.scale32 is None:
            return "weights not loaded"
        for i, layer in enumerate(model.model.layers):
            if type(layer) is not LlamaDecoderLayer:
                return f"layer {i} is a {type(layer).__name__}"
            attn, mlp = layer.self_attn, layer.mlp
            if attn.q_norm is not None or attn.softcap:
                return f"layer {i}: q/k norm or attention softcapping"
            if any(p.packed is None for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)):
                return f"layer {i}: a projection is not packed"
            if attn.window[1] not in (-1, 0):
                return f"layer {i}: window {attn.window}"
        return None

    @classmethod
    def build(cls, model: "LlamaForCausalLM") -> Optional["CpuDecoder"]:
        """The native stack for ``model``, or None where it does not apply (see ``unsupported``)."""
        return None if cls.unsupported(model) is not None else cls(model)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 meta: AttentionMetadata) -> torch.Tensor:
        if kv_caches is not self._bound:
            self.native.bind_caches([(kernel_view(k), kernel_view(v)) for k, v in kv_caches])
            self._bound = kv_caches
        t = x.shape[0]
        need = self.native.workspace_bytes(t)
        if self._workspace.numel() < need:
            self._workspace = torch.empty(need, dtype=torch.uint8)
        cos, sin = self.rotary(positions)
        out = torch.empty_like(x)
        self.native.forward(kernel_view(x), kernel_view(out), kernel_view(cos.view(t, -1)), kernel_view(sin.view(t, -1)),
                            kernel_view(token_rows(t)), kernel_view(meta.cu_seqlens_q), kernel_view(meta.cu_seqlens_k),
                            kernel_view(meta.block_table), kernel_view(meta.slot_mapping), kernel_view(self._workspace))
        return out
