"""`fastinfer serve` through the official openai client against one real server process (issue 16): chat and
completions in every prompt form, streaming with and without usage, n, seed, logprobs, vLLM's extra fields, usage and
prefix-cache hits, /tokenize, /detokenize, /version; greedy output identical to LLM.generate; 24 concurrent streams."""

from __future__ import annotations

import asyncio
import math

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
pytest.importorskip("httpx")

from serve_fixtures import MODEL, sse_events, start_server  # noqa: E402

MAX_MODEL_LEN = 512
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is 2+2?"}]
GREEDY = dict(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def server():
    s = start_server("--max-waiting", "64")
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def llm():
    """The offline engine with the server's settings: the reference for greedy output."""
    import torch

    from fastinfer import LLM

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # leave the cores to the server
    yield LLM(None, dtype="float32", kv_cache_memory_bytes=1 << 26, max_model_len=MAX_MODEL_LEN)
    torch.set_num_threads(before)


def greedy_ref(llm, prompt, max_tokens, chat=False, **extra):
    from fastinfer import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, **extra)
    out = (llm.chat(prompt, sp, use_tqdm=False) if chat else llm.generate([prompt], sp, use_tqdm=False))[0]
    return out.outputs[0]


# -- process, health, models, version -----------------------------------------------------------------------------


def test_listening_line_then_health_503_while_loading_then_200(server):
    assert server.host == "127.0.0.1" and server.port > 0
    lines = [ln for ln in server.log().splitlines() if ln.startswith("fastinfer serve: listening on")]
    assert lines == [f"fastinfer serve: listening on http://127.0.0.1:{server.port}"]
    assert server.first_health == 503
    assert server.http.get("/health").status_code == 200


def test_models_lists_the_served_name(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    raw = server.http.get("/v1/models").json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "model"


def test_version(server):
    r = server.http.get("/version")
    assert r.status_code == 200
    v = r.json()["version"]
    assert isinstance(v, str) and v


# -- chat and completions -----------------------------------------------------------------------------------------


def test_chat_completion_shape(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    assert r.id and r.object == "chat.completion" and r.model == MODEL and isinstance(r.created, int)
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= GREEDY["max_tokens"]
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_completion_prompt_forms(server, client):
    """A string, a list of strings, token ids and a list of token-id lists; choice i answers prompt i."""
    ids = server.post("/tokenize", {"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    other = "def add(a, b):"
    other_ids = server.post("/tokenize", {"model": MODEL, "prompt": other}).json()["tokens"]

    one = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    assert one.object == "text_completion" and len(one.choices) == 1 and one.choices[0].text
    assert one.usage.prompt_tokens == len(ids)
    two = client.completions.create(model=MODEL, prompt=[PROMPT, other], **GREEDY)
    assert [c.index for c in two.choices] == [0, 1]
    from_ids = client.completions.create(model=MODEL, prompt=ids, **GREEDY)
    both_ids = client.completions.create(model=MODEL, prompt=[ids, other_ids], **GREEDY)
    other_alone = client.completions.create(model=MODEL, prompt=other, **GREEDY)

    assert two.choices[0].text == one.choices[0].text == from_ids.choices[0].text == both_ids.choices[0].text
    assert two.choices[1].text == other_alone.choices[0].text == both_ids.choices[1].text
    assert from_ids.usage.prompt_tokens == len(ids)
    assert both_ids.usage.prompt_tokens == len(ids) + len(other_ids)


def test_echo_puts_the_prompt_before_the_completion(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, **GREEDY)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text


def test_n_gives_n_choices(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=6, temperature=1.0, seed=5,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 3 * 6  # every choice's tokens, the prompt once
    single = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, n=2, max_tokens=4, temperature=1.0, seed=5)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_seed_makes_sampling_repeatable(client):
    def sample(seed):
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))  # not the same text whatever the seed
    chat = [client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0,
                                           seed=99).choices[0].message.content for _ in range(2)]
    assert chat[0] == chat[1]


# -- logprobs -----------------------------------------------------------------------------------------------------


def test_chat_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert math.isclose(t.logprob, tops[0], abs_tol=1e-5)  # greedy: the sampled token is the most likely
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_chat_stream_carries_logprobs(client):
    ref = client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, top_logprobs=2, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, top_logprobs=2,
                                                 stream=True, **GREEDY))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in ref.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in ref.choices[0].logprobs.content],
                                                          abs=1e-4)
    assert all(len(t.top_logprobs) == 2 for t in streamed)


def test_completion_integer_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset)
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 2 <= len(top) <= 3  # the top 2 plus the sampled token
        assert math.isclose(max(top.values()), logprob, abs_tol=1e-5) and tok in top


# -- vLLM's extra fields ------------------------------------------------------------------------------------------


def complete(client, prompt=PROMPT, **kw):
    extra = {k: kw.pop(k) for k in list(kw) if k in ("top_k", "min_p", "repetition_penalty", "min_tokens",
                                                     "ignore_eos", "skip_special_tokens",
                                                     "include_stop_str_in_output", "stop_token_ids")}
    return client.completions.create(model=MODEL, prompt=prompt, extra_body=extra or None, **kw).choices[0]


def test_top_k_1_and_min_p_1_are_greedy(client):
    greedy = complete(client, temperature=0.0, max_tokens=10, ignore_eos=True).text
    assert complete(client, temperature=1.0, top_k=1, max_tokens=10, ignore_eos=True, seed=3).text == greedy
    assert complete(client, temperature=1.0, min_p=1.0, max_tokens=10, ignore_eos=True, seed=3).text == greedy


def test_repetition_penalty_changes_greedy_output(client):
    base = complete(client, temperature=0.0, max_tokens=24, ignore_eos=True).text
    penalised = complete(client, temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=2.0).text
    assert penalised != base


def test_ignore_eos_and_min_tokens(client):
    # Greedy, this chat reply ends with EOS after about a dozen tokens.
    kw = dict(model=MODEL, messages=CHAT, temperature=0.0, max_tokens=20)
    natural = client.chat.completions.create(**kw)
    assert natural.choices[0].finish_reason == "stop" and natural.usage.completion_tokens < 17
    forced = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 20
    n = natural.usage.completion_tokens + 3
    held = client.chat.completions.create(**kw, extra_body={"min_tokens": n})
    assert held.usage.completion_tokens >= n


def test_skip_special_tokens(client):
    kw = dict(model=MODEL, messages=CHAT, temperature=0.0, max_tokens=14)
    kept = client.chat.completions.create(**kw, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    skipped = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    assert "<|im_end|>" in kept.choices[0].message.content
    assert "<|im_end|>" not in skipped.choices[0].message.content


def test_stop_strings_and_include_stop_str_in_output(client):
    full = complete(client, temperature=0.0, max_tokens=8).text  # " Paris.\n\nThe answer is:"
    assert "." in full
    head = full.split(".")[0]
    stopped = complete(client, temperature=0.0, max_tokens=8, stop=["."])
    assert stopped.text == head and stopped.finish_reason == "stop"
    kept = complete(client, temperature=0.0, max_tokens=8, stop=["."], include_stop_str_in_output=True)
    assert kept.text == head + "." and kept.finish_reason == "stop"


def test_stop_token_ids(server, client, llm):
    ref = greedy_ref(llm, PROMPT, 8, ignore_eos=True)
    stop_id = ref.token_ids[2]
    first = ref.token_ids.index(stop_id)
    r = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0.0, max_tokens=8,
                                  extra_body={"stop_token_ids": [stop_id], "ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == first + 1  # the stop token is generated (and counted)


# -- usage and the prefix cache -----------------------------------------------------------------------------------


def test_cached_tokens_grow_on_a_repeated_prompt(client):
    long = "A prompt long enough to fill several sixteen-token cache blocks: " + "alpha beta gamma delta " * 20
    first = client.completions.create(model=MODEL, prompt=long, max_tokens=2, temperature=0.0)
    second = client.completions.create(model=MODEL, prompt=long, max_tokens=2, temperature=0.0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 64
    c1 = first.usage.prompt_tokens_details.cached_tokens
    c2 = second.usage.prompt_tokens_details.cached_tokens
    assert c1 == 0 and c2 >= 64 and c2 < second.usage.prompt_tokens
    chat = [{"role": "user", "content": long}]
    a = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=2, temperature=0.0)
    b = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=2, temperature=0.0)
    assert b.usage.prompt_tokens_details.cached_tokens > a.usage.prompt_tokens_details.cached_tokens


# -- streaming ----------------------------------------------------------------------------------------------------


def test_chat_stream_without_usage(client):
    ref = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True, **GREEDY))
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [ref.choices[0].finish_reason]


def test_chat_stream_with_usage(server, client):
    ref = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        ref.usage.prompt_tokens, ref.usage.completion_tokens, ref.usage.total_tokens)
    assert all(c.usage is None for c in body) and all(c.choices for c in body)
    # On the wire: SSE data lines, usage null on every chunk but the last, then [DONE].
    body = {"model": MODEL, "messages": CHAT, "stream": True, "stream_options": {"include_usage": True}, **GREEDY}
    with server.http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    payloads = events[:-1]
    assert all("usage" in e and e["usage"] is None for e in payloads[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["total_tokens"] == ref.usage.total_tokens


def test_completion_stream_with_and_without_usage(client):
    ref = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    plain = list(client.completions.create(model=MODEL, prompt=PROMPT, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in plain if c.choices) == ref.choices[0].text
    assert all(c.usage is None for c in plain) and len({c.id for c in plain}) == 1
    counted = list(client.completions.create(model=MODEL, prompt=PROMPT, stream=True,
                                             stream_options={"include_usage": True}, **GREEDY))
    assert counted[-1].choices == [] and counted[-1].usage.total_tokens == ref.usage.total_tokens
    assert all(c.usage is None for c in counted[:-1])


def test_stream_with_n_finishes_each_choice_once(client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, stream=True, n=2, max_tokens=6,
                                            temperature=1.0, seed=11))
    finished = [ch.index for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(finished) == [0, 1]


# -- greedy output is LLM.generate's ------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):", "Once upon a time"])
def test_greedy_completion_matches_llm_generate(client, llm, prompt):
    ref = greedy_ref(llm, prompt, 16, logprobs=0)
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0.0, max_tokens=16, logprobs=0)
    choice = r.choices[0]
    assert choice.text == ref.text and choice.finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == len(ref.token_ids)
    ref_tokens = [ref.logprobs[i][t].decoded_token for i, t in enumerate(ref.token_ids)]
    assert choice.logprobs.tokens == ref_tokens
    ref_logprobs = [ref.logprobs[i][t].logprob for i, t in enumerate(ref.token_ids)]
    assert choice.logprobs.token_logprobs == pytest.approx(ref_logprobs, abs=1e-4)


def test_greedy_token_ids_match_llm_generate(server, client, llm):
    """Token ids in, text out, and the text is the detokenized reference ids."""
    ids = llm.get_tokenizer().encode("Write a haiku about the sea.")
    ref = greedy_ref(llm, ids, 16)
    r = client.completions.create(model=MODEL, prompt=ids, temperature=0.0, max_tokens=16)
    assert r.choices[0].text == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids)
    generated = ref.token_ids[:-1] if ref.finish_reason == "stop" else ref.token_ids  # EOS ended it: no text
    assert server.post("/detokenize", {"model": MODEL, "tokens": generated}).json()["prompt"] == ref.text


def test_greedy_chat_matches_llm_chat(client, llm):
    ref = greedy_ref(llm, CHAT, 24, chat=True)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0.0, max_tokens=24)
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == len(ref.token_ids)


# -- /tokenize and /detokenize ------------------------------------------------------------------------------------


def test_tokenize_and_detokenize(server, llm):
    ids = llm.get_tokenizer().encode(PROMPT)
    r = server.post("/tokenize", {"model": MODEL, "prompt": PROMPT})
    assert r.status_code == 200
    assert r.json() == {"tokens": ids, "count": len(ids), "max_model_len": MAX_MODEL_LEN}
    d = server.post("/detokenize", {"model": MODEL, "tokens": ids})
    assert d.status_code == 200 and d.json() == {"prompt": PROMPT}
    chat_ids = llm.get_tokenizer().encode(llm.get_tokenizer().apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    c = server.post("/tokenize", {"model": MODEL, "messages": CHAT})
    assert c.status_code == 200 and c.json()["tokens"] == chat_ids


# -- many clients at once -----------------------------------------------------------------------------------------


def test_24_concurrent_streams_each_complete_once(server, client):
    prompts = [f"Item {i}: the number after {i} is" for i in range(24)]
    # One batched, non-streamed request is the reference (greedy output does not depend on the batch).
    ref = client.completions.create(model=MODEL, prompt=prompts, temperature=0.0, max_tokens=8,
                                    extra_body={"ignore_eos": True})
    expected = {c.index: c.text for c in ref.choices}

    async def one(aclient, i):
        stream = await aclient.completions.create(model=MODEL, prompt=prompts[i], temperature=0.0, max_tokens=8,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        return i, chunks

    async def run_all():
        aclient = server.async_client()
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(aclient, i) for i in range(24))), timeout=300)
        finally:
            await aclient.close()

    results = asyncio.run(run_all())
    assert sorted(i for i, _ in results) == list(range(24))
    ids = set()
    for i, chunks in results:
        stream_ids = {c.id for c in chunks}
        assert len(stream_ids) == 1, f"stream {i} mixed ids {stream_ids}"
        ids |= stream_ids
        finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
        assert finishes == ["length"], f"stream {i} finished {finishes}"
        assert chunks[-1].usage.completion_tokens == 8
        assert "".join(ch.text for c in chunks for ch in c.choices) == expected[i], f"stream {i}"
    assert len(ids) == 24  # no request answered twice, none under another's id


def test_no_traceback_in_the_log(server):
    log = server.log()
    assert "Traceback" not in log, log[-4000:]
