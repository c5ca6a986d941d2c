"""logit_bias, allowed_token_ids and prompt_logprobs (issue 19): -100 bans a token and +100 forces it, the output
stays inside allowed_token_ids, prompt logprobs match a float64 forward of the same weights through chunked prefill,
prefix-cache hits, n > 1 and preemption; bad values are ValueErrors naming the field, raised before anything runs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

pytest.importorskip("transformers")

from fastinfer import LLM, SamplingParams  # noqa: E402
from fastinfer.engine.outputs import Logprob  # noqa: E402
from model_fixtures import default_model_or_skip, hf_model  # noqa: E402

PROMPTS = ["The capital of France is", "Here is a list of fruits: apples,", "def add(a, b):\n   "]


@pytest.fixture(scope="module")
def default_llm():
    return LLM(default_model_or_skip(), kv_cache_memory_bytes=128 << 20)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 3-layer Llama (transformers) saved as a checkpoint, and the model itself for the reference."""
    import fastinfer

    model = hf_model("llama")
    path = tmp_path_factory.mktemp("llama_prompt_logprobs")
    model.save_pretrained(path)
    before = torch.get_num_threads(), fastinfer.get_num_threads()
    torch.set_num_threads(1)
    fastinfer.set_num_threads(1)
    yield model, str(path)
    torch.set_num_threads(before[0])
    fastinfer.set_num_threads(before[1])


def sample(llm: LLM, n: int = 8, max_tokens: int = 8, **kw) -> list[list[int]]:
    params = [SamplingParams(temperature=1.0, seed=50 + i, n=n, max_tokens=max_tokens, **kw)
              for i in range(len(PROMPTS))]
    return [c.token_ids for out in llm.generate(PROMPTS, params, use_tqdm=False) for c in out.outputs]


# ----------------------------------------------------------------------------------------------- logit_bias


def test_minus_100_bans_a_token(default_llm):
    """The tokens sampled most often without a bias never appear with -100 on them (temperature 1.0, 24 samples)."""
    free = Counter(t for seq in sample(default_llm) for t in seq)
    banned = [t for t, _ in free.most_common(5)]
    biased = sample(default_llm, logit_bias={t: -100 for t in banned})
    assert not {t for seq in biased for t in seq} & set(banned)
    assert sum(len(seq) for seq in biased) > 0


def test_plus_100_forces_a_token(default_llm):
    for token in (28, 4649, 260):  # ',', ' France', ' the'
        for seq in sample(default_llm, n=4, max_tokens=6, ignore_eos=True, logit_bias={token: 100}):
            assert seq == [token] * 6


def test_small_bias_shifts_without_forcing(default_llm):
    """+5 on a token makes it more frequent; the others still occur (the bias is added, not a mask)."""
    token = 28  # ","
    before = sum(seq.count(token) for seq in sample(default_llm, n=8, max_tokens=12))
    after_seqs = sample(default_llm, n=8, max_tokens=12, logit_bias={token: 5.0})
    after = sum(seq.count(token) for seq in after_seqs)
    assert after > before and any(t != token for seq in after_seqs for t in seq)


# ---------------------------------------------------------------------------------------------- allowed_token_ids


def test_allowed_token_ids_confine_the_output(default_llm):
    tok = default_llm.get_tokenizer()
    allowed = sorted({t for w in (" yes", " no", " maybe", ".", "!") for t in tok.encode(w, add_special_tokens=False)})
    seqs = sample(default_llm, max_tokens=10, allowed_token_ids=allowed)
    assert all(set(seq) <= set(allowed) for seq in seqs)
    assert all(len(seq) == 10 for seq in seqs)  # EOS is not allowed either: every output runs to max_tokens
    # with EOS allowed, it may end earlier; still nothing outside the set
    eos = tok.eos_token_ids[0]
    seqs = sample(default_llm, max_tokens=10, allowed_token_ids=allowed + [eos])
    assert all(set(seq) <= set(allowed) | {eos} for seq in seqs)


def test_allowed_token_ids_and_bias_leave_free_requests_untouched(default_llm):
    free = SamplingParams(temperature=1.0, seed=9, max_tokens=10, ignore_eos=True)
    alone = default_llm.generate([PROMPTS[0]], free, use_tqdm=False)[0].outputs[0].token_ids
    mixed = default_llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [
        SamplingParams(temperature=1.0, seed=1, max_tokens=10, allowed_token_ids=[13, 28]), free,
        SamplingParams(temperature=1.0, seed=2, max_tokens=10, logit_bias={13: 50, 28: -100})], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,field", [
    ({"logit_bias": {5: 101}}, "logit_bias"),
    ({"logit_bias": {5: float("nan")}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"logit_bias": [5]}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
    ({"allowed_token_ids": 5}, "allowed_token_ids"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 1.5}, "prompt_logprobs"),
])
def test_bad_values_are_value_errors_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    ({"logit_bias": {49152: 1.0}}, "logit_bias"),
    ({"allowed_token_ids": [3, 10**6]}, "allowed_token_ids"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),  # more than max_logprobs (20)
])
def test_ids_outside_the_vocabulary_raise_before_anything_runs(default_llm, kwargs, field):
    with pytest.raises(ValueError, match=field):
        default_llm.generate(PROMPTS, [SamplingParams(max_tokens=2), SamplingParams(max_tokens=2, **kwargs),
                                       SamplingParams(max_tokens=2)], use_tqdm=False)
    assert not default_llm.engine.requests  # nothing was queued


# --------------------------------------------------------------------------------------------- prompt_logprobs


def reference_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """float64 log-softmax of the transformers model's logits at every prompt position."""
    ref = model.to(torch.float64)
    try:
        with torch.no_grad():
            return ref(torch.tensor([prompt])).logits[0].log_softmax(-1)
    finally:
        model.to(torch.float32)


def check_prompt_logprobs(entries, prompt: list[int], ref: torch.Tensor, k: int) -> None:
    assert len(entries) == len(prompt) and entries[0] is None
    for pos in range(1, len(prompt)):
        entry, row, token = entries[pos], ref[pos - 1], prompt[pos]
        assert token in entry and all(isinstance(lp, Logprob) for lp in entry.values())
        expected_rank = int((row > row[token]).sum()) + 1
        assert entry[token].rank == expected_rank
        top = row.topk(k)
        assert set(entry) == set(top.indices.tolist()) | {token}
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(float(row[t]), abs=2e-4), (pos, t)
            if t != token or lp.rank <= k:
                assert lp.rank == int((row > row[t]).sum()) + 1


def test_prompt_logprobs_match_a_float64_forward(tiny_llama):
    """Chunked prefill (a 7-token budget), odd blocks, the same prompt again (a prefix-cache hit it must not use),
    n = 2, and prompt_logprobs=0 (the prompt token alone)."""
    model, path = tiny_llama
    llm = LLM(path, dtype="float32", block_size=3, max_num_batched_tokens=7, kv_cache_memory_bytes=1 << 22)
    prompts = [[5, 17, 99, 3, 42, 8, 120, 7, 64, 200, 150, 100, 50, 25, 12, 6], [11, 12, 13, 14]]
    refs = [reference_logprobs(model, p) for p in prompts]
    first = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=4), use_tqdm=False)
    again = llm.generate(prompts[:1], SamplingParams(temperature=1.0, seed=1, n=2, max_tokens=3, prompt_logprobs=4),
                         use_tqdm=False)
    for out, prompt, ref in zip(first, prompts, refs):
        check_prompt_logprobs(out.prompt_logprobs, prompt, ref, 4)
    check_prompt_logprobs(again[0].prompt_logprobs, prompts[0], refs[0], 4)
    zero = llm.generate(prompts[:1], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert all(set(e) == {t} for e, t in zip(zero.prompt_logprobs[1:], prompts[0][1:]))
    plain = llm.generate(prompts[:1], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None
    one = llm.generate([[7]], SamplingParams(max_tokens=1, prompt_logprobs=3), use_tqdm=False)[0]
    assert one.prompt_logprobs == [None]


def test_prompt_logprobs_survive_preemption(tiny_llama):
    """A cache of 12 blocks of 3 tokens for 4 sequences: they are preempted and recomputed; every prompt
    logprob is recorded once and matches the reference."""
    model, path = tiny_llama
    per_block = 3 * 2 * 2 * 16 * 4 * 3  # block_size x (k, v) x kv heads x head_dim x float32 x layers
    llm = LLM(path, dtype="float32", block_size=3, max_num_batched_tokens=16, kv_cache_memory_bytes=12 * per_block)
    prompts = [[(7 * i + j) % 250 + 3 for j in range(10)] for i in range(4)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=2),
                        use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for out, prompt in zip(outs, prompts):
        check_prompt_logprobs(out.prompt_logprobs, prompt, reference_logprobs(model, prompt), 2)


def test_prompt_logprobs_have_decoded_tokens(default_llm):
    out = default_llm.generate(PROMPTS[0], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    tok = default_llm.get_tokenizer()
    for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert entry[token].decoded_token == tok.decode([token], skip_special_tokens=False)


def test_structured_outputs_need_a_tokenizer(tiny_llama):
    from fastinfer import StructuredOutputsParams

    _, path = tiny_llama  # a checkpoint without tokenizer.json
    llm = LLM(path, dtype="float32", kv_cache_memory_bytes=1 << 22)
    with pytest.raises(ValueError, match="^prompt 0: structured_outputs: needs the model's tokenizer"):
        llm.generate([[5, 6, 7]], SamplingParams(structured_outputs=StructuredOutputsParams(regex="a")),
                     use_tqdm=False)
    assert not llm.engine.requests
