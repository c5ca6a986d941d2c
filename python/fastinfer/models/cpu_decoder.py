"""A Llama-style decoder stack as one native call per step, on the CPU.

At decode sizes the Python between kernels (about ten calls per layer: checks, DLPack views, output
allocation) costs more than the small ops themselves. ``CpuDecoder`` hands the packed weights to
``fastinfer._C.CpuDecoder`` once (typed: a ``CpuDecoderConfig`` and one ``DecoderLayerWeights`` per layer,
each tensor checked by its field's name), binds the engine's KV caches once, and then runs every layer and
the final norm in C++ with the same kernels, in the same order, as the per-op path: results are identical.

``CpuDecoder.build(model)`` returns None where the stack has something the native loop does not do
(Gemma's extra norms, q/k norms, softcapping, several rotary tables, unpacked projections); the model
then keeps its per-op forward.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch

from fastinfer import _C
from fastinfer.kernels.arrays import kernel_view
from fastinfer.models.attention_metadata import AttentionMetadata
from fastinfer.models.layers import token_rows

# The parts of a pre-norm block the native loop runs; a layer with any other child module
# (Gemma's extra norms, say) is something else.
PRE_NORM_PARTS = frozenset({"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"})


class DecoderModel(Protocol):
    """What CpuDecoder reads of a Llama-style causal LM (fastinfer.models.llama.LlamaForCausalLM and
    its subclasses); taken by duck typing, so that this module does not import the model."""

    config: Any           # hidden_size, intermediate_size, rms_norm_eps
    dtype: torch.dtype
    model: Any            # .layers (pre-norm blocks), .norm (final RMSNorm, .scale32)
    embed_scale: Optional[torch.Tensor]
    norm_offset: bool
    rotaries: list        # distinct rotary tables
    layer_rotary: list    # the rotary table of each layer


def layer_weights(layer: Any) -> "_C.DecoderLayerWeights":
    """The typed hand-over of one pre-norm layer: its norms and packed projections, by name."""
    attn, mlp = layer.self_attn, layer.mlp
    return _C.DecoderLayerWeights(
        input_norm=layer.input_layernorm.scale32, post_norm=layer.post_attention_layernorm.scale32,
        qkv=attn.qkv_proj.packed, qkv_bias=attn.qkv_proj.bias, o=attn.o_proj.packed, o_bias=attn.o_proj.bias,
        gate_up=mlp.gate_up_proj.packed, gate_up_bias=mlp.gate_up_proj.bias,
        down=mlp.down_proj.packed, down_bias=mlp.down_proj.bias, window_left=attn.window[0])


class CpuDecoder:
    """Runs ``model.model.layers`` and the final norm of a packed Llama-style model in one call.

    ``__call__(x (T, hidden) embeddings, positions (T,), kv_caches, meta) -> (T, hidden)`` final hidden states;
    ``x`` is used as the residual stream (overwritten).
    """

    def __init__(self, model: DecoderModel) -> None:
        c = model.config
        first = model.model.layers[0].self_attn
        self.dtype = model.dtype
        self.rotary = model.layer_rotary[0]
        config = _C.CpuDecoderConfig(
            hidden=c.hidden_size, intermediate=c.intermediate_size, heads=first.heads, kv_heads=first.kv_heads,
            head_dim=first.head_dim, norm_eps=c.rms_norm_eps, softmax_scale=first.scale,
            act="gelu_tanh" if model.model.layers[0].mlp.gelu else "silu",
            dtype="bfloat16" if model.dtype == torch.bfloat16 else "float32")
        self.native = _C.CpuDecoder(config, model.model.norm.scale32,
                                    [layer_weights(layer) for layer in model.model.layers])
        self._bound: Optional[list] = None
        self._workspace = torch.empty(0, dtype=torch.uint8)

    @staticmethod
    def unsupported(model: DecoderModel) -> Optional[str]:
        """Why the native loop cannot run ``model`` (None if it can)."""
        if model.dtype not in (torch.float32, torch.bfloat16):
            return f"dtype {model.dtype}"
        if model.embed_scale is not None or model.norm_offset or len(model.rotaries) != 1:
            return "embedding scale, offset norms or several rotary tables"
        if model.model.norm.scale32 is None:
            return "weights not loaded"
        for i, layer in enumerate(model.model.layers):
            if {name for name, _ in layer.named_children()} != PRE_NORM_PARTS:
                return f"layer {i} is a {type(layer).__name__}, not a plain pre-norm block"
            attn, mlp = layer.self_attn, layer.mlp
            if attn.q_norm is not None or attn.softcap:
                return f"layer {i}: q/k norm or attention softcapping"
            if any(p.packed is None for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)):
                return f"layer {i}: a projection is not packed"
            if attn.window[1] not in (-1, 0):
                return f"layer {i}: window {attn.window}"
        return None

    @classmethod
    def build(cls, model: DecoderModel) -> Optional["CpuDecoder"]:
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
                            kernel_view(meta.block_table), kernel_view(meta.slot_mapping), kernel_view(self._workspace),
                            None if meta.prompt_rows is None else kernel_view(meta.prompt_rows))
        return out
