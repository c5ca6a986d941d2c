"""LLM end to end: greedy equals Hugging Face on random checkpoints and on the default model; the engine's
promises (chunked prefill, preemption, prefix caching, seeds, rejection) hold with a real model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from fastinfer import LLM, SamplingParams  # noqa: E402
from model_fixtures import default_model_or_skip, hf_model, hf_model_from_gguf  # noqa: E402

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]
PROMPTS = [[5, 17, 99, 3, 42, 8, 120, 7, 64], [11, 12, 13], [200, 150, 100, 50, 25, 12, 6, 3, 1, 77, 88, 99, 111]]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: a second thread only adds wake-ups (and this machine's cores are shared).
    import fastinfer

    before = torch.get_num_threads(), fastinfer.get_num_threads()
    torch.set_num_threads(1)
    fastinfer.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    fastinfer.set_num_threads(before[1])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for arch in ARCHS:
        model = hf_model(arch)
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path)
        out[arch] = (model, str(path))
    return out


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return ids[0, len(prompt):].tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(checkpoints, arch):
    model, path = checkpoints[arch]
    # Odd block size and a tiny token budget: prefills are chunked and mixed with other requests' decodes.
    llm = LLM(path, dtype="float32", block_size=3, max_num_batched_tokens=7, kv_cache_memory_bytes=1 << 22)
    outs = llm.generate(PROMPTS, greedy(10), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, 10), arch
        assert out.outputs[0].finish_reason == "length"


def test_preemption_under_tiny_cache_changes_nothing(checkpoints):
    _, path = checkpoints["qwen2"]
    prompts = [[(7 * i + j) % 250 + 3 for j in range(6 + i)] for i in range(6)]
    roomy = LLM(path, dtype="float32", block_size=4, kv_cache_memory_bytes=1 << 22)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, greedy(12), use_tqdm=False)]
    cfg = roomy.config
    block_bytes = 2 * cfg.num_hidden_layers * 4 * cfg.num_key_value_heads * cfg.head_dim * 4
    tight = LLM(path, dtype="float32", block_size=4, kv_cache_memory_bytes=8 * block_bytes)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, greedy(12), use_tqdm=False)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == want


def test_prefix_cache_hits_and_same_tokens(checkpoints):
    _, path = checkpoints["llama"]
    shared = list(range(3, 3 + 12))  # three full 4-token blocks
    prompts = [shared + [100], shared + [101, 102]]
    cached = LLM(path, dtype="float32", block_size=4, kv_cache_memory_bytes=1 << 22)
    first = cached.generate(prompts[:1], greedy(6), use_tqdm=False)
    second = cached.generate(prompts[1:], greedy(6), use_tqdm=False)
    assert second[0].num_cached_tokens == 12
    assert cached.engine.prefix_cache_stats.hits >= 12
    plain = LLM(path, dtype="float32", block_size=4, kv_cache_memory_bytes=1 << 22, enable_prefix_caching=False)
    want = plain.generate(prompts, greedy(6), use_tqdm=False)
    assert [first[0].outputs[0].token_ids, second[0].outputs[0].token_ids] == [o.outputs[0].token_ids for o in want]


def test_seeded_sampling_independent_of_batch(checkpoints):
    _, path = checkpoints["qwen3"]
    llm = LLM(path, dtype="float32", kv_cache_memory_bytes=1 << 22)
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], mine, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=5, ignore_eos=True)
    mixed = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others, mine, others], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    n3 = llm.generate([PROMPTS[0]], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True),
                      use_tqdm=False)[0]
    assert [c.index for c in n3.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in n3.outputs}) > 1  # n streams differ


def test_too_long_prompt_rejected_alone(checkpoints):
    _, path = checkpoints["llama"]
    llm = LLM(path, dtype="float32", max_model_len=16, kv_cache_memory_bytes=1 << 22)
    outs = llm.generate([PROMPTS[0], list(range(3, 40)), PROMPTS[1]], greedy(4), use_tqdm=False)
    assert outs[1].error and "16" in outs[1].error
    assert outs[1].outputs[0].token_ids == []
    assert [len(outs[i].outputs[0].token_ids) for i in (0, 2)] == [4, 4]


def test_stream_yields_progress_then_final(checkpoints):
    _, path = checkpoints["mistral"]
    llm = LLM(path, dtype="float32", kv_cache_memory_bytes=1 << 22)
    seen = [(o.request_id, len(o.outputs[0].token_ids), o.finished)
            for o in llm.stream([PROMPTS[0], PROMPTS[1]], greedy(5), request_ids=["a", "b"])]
    for rid in "ab":
        mine = [s for s in seen if s[0] == rid]
        assert [n for _, n, _ in mine] == [1, 2, 3, 4, 5]
        assert [f for _, _, f in mine] == [False] * 4 + [True]
    # Stopping early aborts what is left: the next call starts clean.
    it = llm.stream([PROMPTS[2]], greedy(50))
    next(it)
    it.close()
    assert not llm.engine.has_unfinished()


def test_bad_arguments(checkpoints):
    _, path = checkpoints["llama"]
    llm = LLM(path, dtype="float32", kv_cache_memory_bytes=1 << 22)
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([PROMPTS[0], PROMPTS[1]], [greedy(2)], use_tqdm=False)
    with pytest.raises(TypeError, match="prompt"):
        llm.generate([3.5], use_tqdm=False)
    with pytest.raises(ValueError, match="no tokenizer"):  # the tiny checkpoint has no tokenizer.json
        llm.generate("hello", use_tqdm=False)
    assert not llm.engine.has_unfinished()
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        LLM(path, dtype="float32", kv_cache_memory_bytes=10)


@pytest.fixture(scope="module")
def default_llm():
    default_model_or_skip()
    return LLM(None, dtype="float32", kv_cache_memory_bytes=1 << 26, quantization=None)  # as transformers: dequantised


def test_default_model_chat_and_greedy_match_transformers(default_llm):
    llm = default_llm
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    assert out.prompt == llm.get_tokenizer().apply_chat_template(conversation, add_generation_prompt=True)
    hf = hf_model_from_gguf(llm.model_path)
    prompts = ["The quick brown fox", "def fibonacci(n):", "Once upon a time, in a land far away,"]
    outs = llm.generate(prompts, greedy(32), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, o.prompt_token_ids, 32), p
        assert o.outputs[0].text == llm.get_tokenizer().decode(o.outputs[0].token_ids)
