"""fastinfer's model implementations against transformers, the checkpoint loader's failures, the tokenizer.

Each architecture is a tiny random-weight transformers model saved with save_pretrained and loaded back
with load_model. Low-precision tolerances follow flash-attention's tests: our bf16 error against a float64
reference may be at most twice transformers' own bf16 error (plus a small floor).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import types

import pytest
import torch

from fastinfer.models import ConfigError, WeightError
from fastinfer.loading import LoadError, load_model
from fastinfer.loading.tokenizer import Tokenizer

sys.path.insert(0, os.path.dirname(__file__))
from model_fixtures import VOCAB, PagedDriver, hf_model  # noqa: E402

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
_SAVED: dict = {}


@pytest.fixture(autouse=True)
def _inference():
    # Tiny models: one torch thread avoids thread hand-offs that cost more than the arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(threads)


def saved(arch: str, tmp_path_factory, sharded: bool = False):
    """(transformers model, folder it was saved to), built once per architecture and layout."""
    pytest.importorskip("transformers")
    key = (arch, sharded)
    if key not in _SAVED:
        model = hf_model(arch)
        folder = tmp_path_factory.mktemp(f"{arch}_{'sharded' if sharded else 'single'}")
        with torch.inference_mode(False):
            model.save_pretrained(folder, max_shard_size="40KB" if sharded else "5GB")
        _SAVED[key] = (model, folder)
    return _SAVED[key]


def prompts(n: int, lengths: tuple, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length,), generator=g).tolist() for length in lengths[:n]]


def hf_logits(model, ids: list[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """transformers' logits for one sequence, computed on a copy in ``dtype`` (the saved model stays float32)."""
    return copy.deepcopy(model).to(dtype)(torch.tensor([ids])).logits[0].double()


@pytest.mark.parametrize("arch,sharded", [(a, False) for a in ARCHS] + [("qwen2", True), ("gemma3", True)])
def test_prefill_fp32_matches_transformers(arch, sharded, tmp_path_factory):
    hf, folder = saved(arch, tmp_path_factory, sharded)
    if sharded:
        assert (folder / "model.safetensors.index.json").exists()
    loaded = load_model(str(folder), dtype="float32")
    assert loaded.model.dtype == torch.float32 and loaded.config.architecture == arch
    seqs = prompts(2, (13, 7))
    out = PagedDriver(loaded.model).step([(i, s) for i, s in enumerate(seqs)])  # both prompts in one forward
    for got, ids in zip(out, seqs):
        ref = hf_logits(hf, ids)
        assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_bf16_within_transformers_own_error(arch, tmp_path_factory):
    hf, folder = saved(arch, tmp_path_factory)
    model = load_model(str(folder), dtype="bfloat16").model
    assert model.dtype == torch.bfloat16 and model.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.bfloat16
    ids = prompts(1, (16,), seed=3)[0]
    got = PagedDriver(model).step([(0, ids)])[0].double()
    ref = hf_logits(hf, ids)
    hf_err = (hf_logits(hf, ids, torch.bfloat16) - ref).abs().max()
    assert (got - ref).abs().max() <= 2 * hf_err + 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_and_batched_decode_match_full_prefill(arch, tmp_path_factory):
    """Prompts split into chunks, decodes of other sequences in the same forward, block size 3 (odd, so
    chunks and blocks never line up); every row's logits equal transformers' on the whole sequence."""
    hf, folder = saved(arch, tmp_path_factory)
    driver = PagedDriver(load_model(str(folder), dtype="float32").model, block_size=3)
    a, b, c = prompts(3, (17, 12, 9), seed=7)
    got = {0: [], 1: [], 2: []}

    def run(chunks):
        for (seq, _), logits in zip(chunks, driver.step(chunks)):
            got[seq].append(logits)

    run([(0, a[:5]), (1, b[:8])])
    run([(0, a[5:11]), (1, b[8:9])])                  # prefill chunk + a decode
    run([(1, b[9:10]), (0, a[11:12]), (2, c[:4])])   # decode, decode, new prompt's first chunk
    run([(2, c[4:9]), (1, b[10:11]), (0, a[12:13])])
    for i in range(13, 17):
        run([(0, a[i:i + 1]), (1, b[11:12])] if i == 13 else [(0, a[i:i + 1])])
    for seq, ids in ((0, a), (1, b), (2, c)):
        ours = torch.cat(got[seq]).double()
        ref = hf_logits(hf, ids)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max(), f"sequence {seq}"


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_matches_generate(arch, tmp_path_factory):
    hf, folder = saved(arch, tmp_path_factory)
    driver = PagedDriver(load_model(str(folder), dtype="float32").model, block_size=3)
    prompt = prompts(1, (6,), seed=11)[0]
    steps = 12
    expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                           pad_token_id=0)[0, len(prompt):].tolist()
    assert driver.greedy(0, prompt, steps) == expected
    assert len(set(expected)) > 1  # the check means something only if the model does not repeat one token


def test_sliding_window_drops_old_keys(tmp_path_factory):
    """With a window smaller than the sequence, the sliding layers must differ from full attention."""
    hf, folder = saved("mistral", tmp_path_factory)
    model = load_model(str(folder), dtype="float32").model
    ids = prompts(1, (12,), seed=5)[0]
    windowed = PagedDriver(model).step([(0, ids)])[0]
    for layer in model.model.layers:
        assert layer.self_attn.window == (4, 0)  # window 5 keeps q_pos - k_pos <= 4
        layer.self_attn.window = (-1, -1)
    full = PagedDriver(model).step([(0, ids)])[0]
    assert torch.allclose(windowed[:5], full[:5], atol=1e-5)  # positions < window see every key either way
    assert (windowed[5:] - full[5:]).abs().max() > 1e-2


def test_gemma3_config_reads_hf_fields(tmp_path_factory):
    _, folder = saved("gemma3", tmp_path_factory)
    cfg = load_model(str(folder)).config
    assert cfg.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.query_pre_attn_scalar) == (10_000.0, 100.0, 24.0)
    assert cfg.window(0) == 5 and cfg.window(1) is None and cfg.final_logit_softcapping == 15.0
    assert cfg.tie_word_embeddings and cfg.qk_norm


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])
def test_gemma3_image_text_checkpoint_loads_text_decoder(prefix, tmp_path_factory, tmp_path):
    """Gemma3ForConditionalGeneration folders (transformers 5 and 4.x tensor names): the text decoder is
    loaded from text_config, the vision tensors are skipped."""
    from safetensors.torch import load_file, save_file

    _, folder = saved("gemma3", tmp_path_factory)
    dest = tmp_path / "mm"
    dest.mkdir()
    text = json.loads((folder / "config.json").read_text())
    dtype = text.pop("dtype")
    del text["architectures"]
    (dest / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "dtype": dtype,
        "text_config": text, "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8}}))
    state = {prefix + k.removeprefix("model."): v for k, v in load_file(folder / "model.safetensors").items()}
    state["model.vision_tower.vision_model.post_layernorm.weight" if prefix.startswith("model.")
          else "vision_tower.vision_model.post_layernorm.weight"] = torch.ones(8)
    save_file(state, dest / "model.safetensors")
    ids = prompts(1, (9,))[0]
    got = PagedDriver(load_model(str(dest)).model).step([(0, ids)])[0]
    want = PagedDriver(load_model(str(folder)).model).step([(0, ids)])[0]
    assert torch.equal(got, want)


SMOLLM2_CONFIG = {  # HuggingFaceTB/SmolLM2-135M-Instruct config.json (transformers 4.x spelling)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536, "max_position_embeddings": 8192,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
    "num_key_value_heads": 3, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 49152}


def test_config_from_older_spellings():
    from fastinfer.models import ModelConfig

    c = ModelConfig.from_hf_dict(SMOLLM2_CONFIG)
    assert (c.architecture, c.head_dim, c.rope_theta, c.rope_scaling, c.tie_word_embeddings) == \
        ("llama", 64, 100000.0, None, True)
    assert c.eos_token_id == [2] and c.torch_dtype == "bfloat16" and c.window(0) is None
    qwen = {**SMOLLM2_CONFIG, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False,
            "sliding_window": 32768, "max_window_layers": 21, "eos_token_id": [151645, 151643]}
    c = ModelConfig.from_hf_dict(qwen)
    assert c.attention_bias and not c.o_proj_bias and c.sliding_window is None and c.eos_token_id == [151645, 151643]
    c = ModelConfig.from_hf_dict({**qwen, "use_sliding_window": True})
    assert c.layer_types[20] == "full_attention" and c.layer_types[21] == "sliding_attention"
    c = ModelConfig.from_hf_dict({**SMOLLM2_CONFIG, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ConfigError, match="rope scaling 'dynamic' is not supported"):
        ModelConfig.from_hf_dict({**SMOLLM2_CONFIG, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        ModelConfig.from_hf_dict({**SMOLLM2_CONFIG, "num_key_value_heads": 4})
    sparse = {"architectures": ["Gemma3ForConditionalGeneration"], "torch_dtype": "bfloat16", "eos_token_id": [1, 106],
              "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                              "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                              "sliding_window": 1024}}  # google/gemma-3-4b-it: everything else is a default
    c = ModelConfig.from_hf_dict(sparse)
    assert (c.architecture, c.num_attention_heads, c.head_dim, c.vocab_size, c.query_pre_attn_scalar) == \
        ("gemma3", 8, 256, 262_208, 256.0)
    assert c.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",) and c.window(0) == 1024
    assert (c.rope_theta, c.rope_local_base_freq, c.rope_scaling["factor"]) == (1e6, 1e4, 8.0)
    assert c.eos_token_id == [1, 106] and c.torch_dtype == "bfloat16"


@pytest.mark.parametrize("scaling", [
    None, {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16,
     "mscale": 0.707, "mscale_all_dim": 1.0}], ids=["default", "linear", "llama3", "yarn", "yarn-mscale"])
def test_rope_frequencies_match_transformers(scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from fastinfer.models import ModelConfig
    from fastinfer.models.layers import _inv_freq

    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=50_000.0,
                                  max_position_embeddings=512, rope_scaling=scaling)
    ours = ModelConfig.from_hf_dict(hf.to_dict())
    inv, attn = _inv_freq(ours.head_dim, ours.rope_theta, ours.rope_scaling)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        ref, ref_attn = 1.0 / (50_000.0 ** (torch.arange(0, 128, 2).float() / 128)), 1.0
    else:
        ref, ref_attn = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    torch.testing.assert_close(inv, ref, rtol=1e-6, atol=0)
    assert attn == pytest.approx(ref_attn, rel=1e-7)


# ---------------------------------------------------------------- loader failures


def _copy(folder, dest):
    import shutil

    shutil.copytree(folder, dest)
    return dest


def test_missing_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LoadError, match=r"config\.json: file not found"):
        load_model(str(tmp_path))


def test_unknown_architecture(tmp_path_factory, tmp_path):
    _, folder = saved("llama", tmp_path_factory)
    dest = _copy(folder, tmp_path / "m")
    cfg = json.loads((dest / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["FalconForCausalLM"], "falcon"
    (dest / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported model: architectures=\['FalconForCausalLM'\]"):
        load_model(str(dest))


def _rewrite_weights(folder, dest, edit):
    from safetensors.torch import load_file, save_file

    dest = _copy(folder, dest)
    state = load_file(dest / "model.safetensors")
    edit(state)
    save_file(state, dest / "model.safetensors")
    return dest


def test_missing_tensor(tmp_path_factory, tmp_path):
    _, folder = saved("qwen2", tmp_path_factory)
    dest = _rewrite_weights(folder, tmp_path / "m", lambda s: s.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(WeightError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
        load_model(str(dest))


def test_wrong_shape_and_unexpected_tensor_reported_together(tmp_path_factory, tmp_path):
    _, folder = saved("qwen3", tmp_path_factory)

    def edit(state):
        state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)
        state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)

    dest = _rewrite_weights(folder, tmp_path / "m", edit)
    with pytest.raises(WeightError) as err:
        load_model(str(dest))
    shape = "model.layers.0.mlp.up_proj.weight: shape (95, 64) in the checkpoint, model expects (96, 64)"
    assert shape in str(err.value)
    assert "unexpected tensor 'model.layers.0.self_attn.extra.weight'" in str(err.value)
    assert str(dest) in str(err.value)


def test_truncated_safetensors(tmp_path_factory, tmp_path):
    _, folder = saved("llama", tmp_path_factory)
    dest = _copy(folder, tmp_path / "m")
    data = (dest / "model.safetensors").read_bytes()
    (dest / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"model\.safetensors: corrupt or truncated safetensors file"):
        load_model(str(dest))


def test_missing_shard(tmp_path_factory, tmp_path):
    _, folder = saved("gemma3", tmp_path_factory, sharded=True)
    dest = _copy(folder, tmp_path / "m")
    shard = sorted(dest.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(LoadError, match=f"listed but not present: {shard.name}"):
        load_model(str(dest))


def test_pickle_refused_unless_allowed(tmp_path_factory, tmp_path):
    from safetensors.torch import load_file

    hf, folder = saved("mistral", tmp_path_factory)
    dest = _copy(folder, tmp_path / "m")
    torch.save(load_file(dest / "model.safetensors"), dest / "pytorch_model.bin")
    (dest / "model.safetensors").unlink()
    with pytest.raises(LoadError, match=r"pytorch_model\.bin: PyTorch pickle checkpoints .* allow_pickle=True"):
        load_model(str(dest))
    model = load_model(str(dest), allow_pickle=True).model
    ids = prompts(1, (6,))[0]
    ref = load_model(str(folder)).model
    assert torch.equal(PagedDriver(model).step([(0, ids)])[0], PagedDriver(ref).step([(0, ids)])[0])


def test_hf_cache_id(tmp_path_factory, tmp_path, monkeypatch):
    _, folder = saved("llama", tmp_path_factory)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with pytest.raises(LoadError, match="not a folder, a .gguf file, or a model in the local Hugging Face cache") \
            as err:
        load_model("tiny-org/tiny-llama")
    assert str(tmp_path / "hub" / "models--tiny-org--tiny-llama") in str(err.value)
    assert str(tmp_path / "home" / "hub" / "models--tiny-org--tiny-llama") in str(err.value)
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    _copy(folder, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    loaded = load_model("tiny-org/tiny-llama")
    assert loaded.path == str(repo / "snapshots" / "abc123") and loaded.config.architecture == "llama"


def test_dtype_auto_honours_checkpoint(tmp_path_factory, tmp_path):
    _, folder = saved("qwen3", tmp_path_factory)
    dest = _copy(folder, tmp_path / "m")
    cfg = json.loads((dest / "config.json").read_text())
    cfg["dtype"] = "float16"
    (dest / "config.json").write_text(json.dumps(cfg))
    model = load_model(str(dest)).model
    assert model.dtype == torch.float16
    assert torch.isfinite(PagedDriver(model).step([(0, prompts(1, (5,))[0])])[0]).all()
    assert load_model(str(dest), dtype="bfloat16").model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        load_model(str(dest), dtype="int8")


def test_gguf_goes_to_gguf_reader(tmp_path_factory, tmp_path, monkeypatch):
    """A .gguf path is read by fastinfer.loading.gguf.read_gguf; the model is built from what it returns."""
    from safetensors.torch import load_file

    _, folder = saved("llama", tmp_path_factory)
    fake = tmp_path / "tiny.gguf"
    fake.write_bytes(b"GGUF")
    calls = []

    def read_gguf(path):
        calls.append(path)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("dtype")
        return cfg, iter(load_file(folder / "model.safetensors").items()), None, {"eos_token_id": 2}

    monkeypatch.setitem(sys.modules, "fastinfer.loading.gguf", types.SimpleNamespace(read_gguf=read_gguf))
    loaded = load_model(str(fake))
    assert calls == [str(fake)] and loaded.generation_config == {"eos_token_id": 2}
    assert loaded.model.dtype == torch.bfloat16  # no dtype in a GGUF config: bfloat16
    with pytest.raises(LoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "absent.gguf"))


# ---------------------------------------------------------------- tokenizer

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["Hello world, how are you today?", "The quick brown fox jumps over the lazy dog.",
              "Ünïcödé text and émojis 🙂 are bytes too", "def f(x):\n    return x * 2\n"] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    folder = tmp_path_factory.mktemp("tok")
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
        "unk_token": "<unk>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1]}))
    return folder


TEXTS = ["Hello world, how are you?", "  leading spaces and\ttabs\n", "Ünïcödé 🙂 日本語", "<s>literal special</s>",
         ""]


def test_tokenizer_matches_transformers(tokenizer_folder):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder))
    tok = Tokenizer.from_hf_folder(tokenizer_folder)
    assert tok.eos_token_ids == [3, 1] and tok.vocab_size == len(ref)
    for text in TEXTS:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert tok.encode("hi")[0] == tok.bos_token_id == 1


def test_chat_template_globals(tokenizer_folder):
    """strftime_now, loop controls and {% generation %} (transformers' extensions) are available."""
    import datetime

    tok = Tokenizer.from_hf_folder(tokenizer_folder)
    tok.chat_template = ("{{ strftime_now('%Y') }}|{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                         "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}|{{ eos_token }}")
    text = tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert text == f"{datetime.datetime.now():%Y}|a|<|im_end|>"


def test_corrupt_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json: cannot be read by tokenizers"):
        Tokenizer.from_hf_folder(tmp_path)


def test_decode_joins_split_utf8_bytes(tokenizer_folder):
    tok = Tokenizer.from_hf_folder(tokenizer_folder)
    ids = tok.encode("🙂日本", add_special_tokens=False)
    assert len(ids) > 2  # characters outside the merges are several byte-level tokens each
    assert tok.decode(ids) == "🙂日本"


def test_chat_template_matches_transformers(tokenizer_folder):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder))
    tok = Tokenizer.from_hf_folder(tokenizer_folder)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello 🙂"}]
    for gen in (True, False):
        text = tok.apply_chat_template(chat, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
        ids = tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
        assert ids == ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
    tools = [{"name": "f", "description": "<b>&"}]
    assert tok.apply_chat_template(chat, tools=tools) == ref.apply_chat_template(
        chat, tools=tools, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<s><|im_start|>system\n")
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
