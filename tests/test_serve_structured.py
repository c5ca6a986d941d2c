"""`fastinfer serve` with structured outputs, logit_bias, allowed_token_ids and prompt_logprobs (issue 19), through
the official openai client on 127.0.0.1: OpenAI's response_format and logit_bias, vLLM's extras in extra_body, and a
400 naming the field for each bad value."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from serve_fixtures import MODEL, assert_openai_error, sse_events, start_server  # noqa: E402
from structured_fixtures import SCHEMAS, fullmatch  # noqa: E402

CHAT = [{"role": "user", "content": "Describe a t-shirt."}]


@pytest.fixture(scope="module")
def server():
    s = start_server("--max-num-seqs", "16")
    yield s
    s.kill()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_response_format_json_schema(client):
    schema = SCHEMAS["nested"]
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=150, temperature=1.0, seed=1, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "shirt", "schema": schema, "strict": True}})
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_response_format_json_object(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=200, temperature=0.0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)


def test_streamed_json_schema_joins_into_valid_json(server):
    schema = SCHEMAS["enums"]
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 100, "temperature": 1.0, "seed": 4, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}}
    with server.http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    jsonschema.validate(json.loads(text), schema)


def test_structured_outputs_extra_body(client):
    r = client.completions.create(model=MODEL, prompt="My favourite colour is", max_tokens=10, temperature=1.0,
                                  seed=3, n=4, extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert all(c.text in ("red", "green") and c.finish_reason == "stop" for c in r.choices)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=1.0, seed=3,
                                       extra_body={"structured_outputs": {"regex": r"[A-Z]{2}-\d{3}"}})
    assert fullmatch(r"[A-Z]{2}-\d{3}", r.choices[0].message.content)


def test_logit_bias_bans_and_forces(server, client):
    prompt = "The capital of France is"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0.0)
    top = free.choices[0].text
    [token] = server.post("/tokenize", {"model": MODEL, "prompt": top, "add_special_tokens": False}).json()["tokens"]
    banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0.0,
                                       logit_bias={str(token): -100})
    assert banned.choices[0].text != top
    forced = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=1.0, seed=2,
                                       logit_bias={str(token): 100})
    assert forced.choices[0].text == top * 3


def test_allowed_token_ids_extra_body(server, client):
    ids = server.post("/tokenize", {"model": MODEL, "prompt": " yes no", "add_special_tokens": False}).json()["tokens"]
    r = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=5, temperature=1.0, seed=1,
                                  extra_body={"allowed_token_ids": ids})
    assert r.choices[0].text and set(r.choices[0].text.split()) <= {"yes", "no"}


def test_prompt_logprobs_extra_body(server):
    prompt = "The capital of France is"
    ids = server.post("/tokenize", {"model": MODEL, "prompt": prompt}).json()["tokens"]
    body = server.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1,
                                           "prompt_logprobs": 2}).json()
    entries = body["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for token, entry in zip(ids[1:], entries[1:]):
        assert str(token) in entry and 2 <= len(entry) <= 3
        assert {"logprob", "rank", "decoded_token"} <= set(entry[str(token)])
    chat = server.post("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 1,
                                                "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    plain = server.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1}).json()
    assert "prompt_logprobs" not in plain["choices"][0]


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"},
                              "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"regex": "(a"}}, "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"grammar": "start: ("}}, "structured_outputs"),
    ("/v1/completions", {"logit_bias": {"42": 101}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"42": "high"}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"fortytwo": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"49152": 1}}, "logit_bias"),
    ("/v1/completions", {"allowed_token_ids": [1, 10**7]}, "allowed_token_ids"),
    ("/v1/completions", {"allowed_token_ids": []}, "allowed_token_ids"),
    ("/v1/completions", {"prompt_logprobs": -1}, "prompt_logprobs"),
    ("/v1/completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
])
def test_bad_values_are_400_naming_the_field(server, path, extra, param):
    base = {"model": MODEL, "max_tokens": 2}
    base.update({"messages": CHAT} if "chat" in path else {"prompt": "Hello"})
    assert_openai_error(server.post(path, {**base, **extra}), 400, param=param)


def test_openai_client_raises_bad_request_for_a_bad_schema(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
    assert info.value.body["param"] == "response_format"


def test_grammar_excluded_by_allowed_token_ids_is_400_naming_structured_outputs(server):
    ids = server.post("/tokenize", {"model": MODEL, "prompt": " maybe", "add_special_tokens": False}).json()["tokens"]
    body = {"model": MODEL, "prompt": "Yes or no?", "max_tokens": 3, "allowed_token_ids": ids,
            "structured_outputs": {"choice": ["yes", "no"]}}
    assert_openai_error(server.post("/v1/completions", body), 400, param="structured_outputs")
