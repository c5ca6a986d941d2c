"""Shared inputs of the structured-output, logit_bias and prompt_logprobs tests: a tiny random-weight Llama with a
Hugging Face tokenizer.json (the other tokenizer bridge: the default model's is rebuilt from GGUF metadata), and
the schema suite."""

from __future__ import annotations

import json
import re

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_tiny_llama(path) -> None:
    """A 2-layer Llama (random weights, float32) with a byte-level BPE tokenizer.json trained here (every byte is a
    token, so any text can be written), a chat template and EOS "</s>"."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ['{"name": "Bob", "age": 33, "tags": ["a", "b"]}', "the quick brown fox jumps over the lazy dog",
              "red green blue yes no 0123456789", '[{"k": "x", "v": 1}, {"k": "y", "v": -2}] true false null']
    tok.train_from_iterator(corpus * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE}))
    vocab, hidden, inter, layers, heads, kv_heads, head_dim = tok.get_vocab_size(), 64, 128, 2, 4, 2, 16
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "max_position_embeddings": 512,
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


def _object(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": required if required is not None
            else list(properties), "additionalProperties": False}


# Every schema bounds its output's size (string lengths, item counts, number ranges), so a sample always closes.
SCHEMAS = {
    "nested": _object({"person": _object({
        "name": {"type": "string", "maxLength": 12},
        "address": _object({"city": {"type": "string", "maxLength": 12},
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})}),
    "enums": _object({"color": {"enum": ["red", "green", "blue"]},
                      "size": {"type": "string", "enum": ["S", "M", "L"]}, "ok": {"type": "boolean"}}),
    "arrays": _object({"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                "minItems": 2, "maxItems": 4},
                       "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                                  "minItems": 1, "maxItems": 3}}),
    "required": _object({"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                         "note": {"type": "string", "maxLength": 16},
                         "flag": {"type": "boolean"}}, required=["id"]),
    "numbers": _object({"age": {"type": "integer", "minimum": 18, "maximum": 65},
                        "temp": {"type": "number", "minimum": -10.5, "maximum": 40},
                        "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}),
    "patterns": _object({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                         "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}),
    "list": {"type": "array", "items": _object({"k": {"type": "string", "maxLength": 6},
                                                 "v": {"type": "integer", "minimum": -5, "maximum": 5}}),
             "minItems": 1, "maxItems": 3},
}

# (regex, the same language as a Python regex for re.fullmatch)
REGEXES = [(r"\d{3}-\d{4}", r"\d{3}-\d{4}"), (r"(cat|dog|bird)s?", r"(cat|dog|bird)s?"),
           (r"[A-Z][a-z]{1,6} [A-Z][a-z]{1,6}", r"[A-Z][a-z]{1,6} [A-Z][a-z]{1,6}"),
           (r"(yes|no), because [a-z ]{1,12}\.", r"(yes|no), because [a-z ]{1,12}\.")]
CHOICES = [["red", "green", "blue sky"], ["positive", "negative", "neutral"], ["A", "B", "C", "D"]]
# (Lark or GBNF grammar, the same language as a Python regex)
GRAMMARS = [('start: "(" expr ")"\nexpr: NUM | NUM "+" NUM\nNUM: /[0-9]{1,3}/', r"\((\d{1,3}|\d{1,3}\+\d{1,3})\)"),
            ('root ::= ("on" | "off") " " [0-9] [0-9]?', r"(on|off) \d\d?")]


def fullmatch(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text) is not None
