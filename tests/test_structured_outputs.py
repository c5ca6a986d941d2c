"""Structured outputs (issue 19): StructuredOutputsParams, every output of a JSON schema / regex / choice / grammar
matches it at temperature 1.0 over many seeds, on the default model (GGUF-built tokenizer) and a tiny model with a
Hugging Face tokenizer.json; mixed batches, preemption, chunked prefill, seeds, stop strings, min_tokens; grammar
compilation off the engine loop."""

from __future__ import annotations

import json
from concurrent.futures import Future

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from fastinfer import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from fastinfer.engine import CacheConfig, LLMEngine, SchedulerConfig  # noqa: E402
from model_fixtures import default_model_or_skip  # noqa: E402
from structured_fixtures import CHOICES, GRAMMARS, REGEXES, SCHEMAS, fullmatch, write_tiny_llama  # noqa: E402
from test_engine_fakes import ByteTokenizer, FakeRunner  # noqa: E402


@pytest.fixture(scope="module")
def default_llm():
    return LLM(default_model_or_skip(), kv_cache_memory_bytes=256 << 20, max_num_seqs=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import fastinfer

    path = tmp_path_factory.mktemp("tiny_structured")
    write_tiny_llama(path)
    before = torch.get_num_threads(), fastinfer.get_num_threads()
    torch.set_num_threads(1)
    fastinfer.set_num_threads(1)
    yield str(path)
    torch.set_num_threads(before[0])
    fastinfer.set_num_threads(before[1])


def constrained(seed: int, n: int = 1, max_tokens: int = 200, **kind) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, n=n, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**kind))


def chat_prompt(llm: LLM, text: str) -> dict:
    tok = llm.get_tokenizer()
    rendered = tok.apply_chat_template([{"role": "user", "content": text}])
    return {"prompt": rendered, "prompt_token_ids": tok.encode(rendered, add_special_tokens=False)}


# ---------------------------------------------------------------------------------------------------- the params


def test_exported_from_fastinfer():
    import fastinfer
    import fastinfer.engine

    assert fastinfer.StructuredOutputsParams is StructuredOutputsParams is fastinfer.engine.StructuredOutputsParams
    assert "StructuredOutputsParams" in fastinfer.__all__


@pytest.mark.parametrize("kind", [
    {"json": SCHEMAS["enums"]}, {"json": json.dumps(SCHEMAS["enums"])}, {"regex": r"\d+"}, {"choice": ["a", "b"]},
    {"grammar": 'start: "x" /[0-9]+/'}, {"grammar": 'root ::= "x" [0-9]+'}, {"json_object": True}])
def test_each_kind_alone_is_accepted(kind):
    p = StructuredOutputsParams(**kind)
    assert p.kind == next(iter(kind)) and p.llguidance_grammar
    assert SamplingParams(structured_outputs=p).structured_outputs is p
    assert SamplingParams(structured_outputs=kind).structured_outputs.kind == p.kind  # a dict of the fields


@pytest.mark.parametrize("kind,field", [
    ({}, "structured_outputs"),
    ({"json": {"type": "object"}, "regex": "a"}, "structured_outputs"),
    ({"choice": ["a"], "json_object": True}, "structured_outputs"),
    ({"json": {"type": "strng"}}, "json"),
    ({"json": {"properties": {"a": {"$ref": "#/nowhere"}}}}, "json"),
    ({"json": "{not json"}, "json"),
    ({"json": 5}, "json"),
    ({"regex": "[a-"}, "regex"),
    ({"regex": "a{3,2}"}, "regex"),
    ({"grammar": "start: foo("}, "grammar"),
    ({"grammar": 'root ::= "a" undefined_rule'}, "grammar"),
    ({"choice": []}, "choice"),
    ({"choice": ["a", 3]}, "choice"),
    ({"choice": "ab"}, "choice"),
])
def test_bad_constraints_raise_value_error_naming_the_field(kind, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        StructuredOutputsParams(**kind)


def test_unknown_field_in_a_dict_is_named():
    with pytest.raises(ValueError, match="structured_outputs: unsupported field 'guided_json'"):
        SamplingParams(structured_outputs={"guided_json": {}})
    with pytest.raises(ValueError, match="^structured_outputs"):
        SamplingParams(structured_outputs="regex")


def test_bad_constraint_raises_before_anything_is_queued(default_llm):
    with pytest.raises(ValueError, match="^regex"):
        default_llm.generate(["a", "b"], [SamplingParams(), SamplingParams(structured_outputs={"regex": "(a"})])
    assert not default_llm.engine.requests


def test_json_layout_options():
    compact = StructuredOutputsParams(json={"type": "object"}, disable_any_whitespace=True)
    assert compact.json_options()["item_separator"] == ","
    assert StructuredOutputsParams(json={"type": "object"}).json_options()["key_separator"] == ": "
    assert StructuredOutputsParams(json_object=True, whitespace_pattern=r"[ \n]*").json_options()[
        "whitespace_flexible"]
    with pytest.raises(ValueError, match="^whitespace_pattern"):
        StructuredOutputsParams(json_object=True, whitespace_pattern=" ", disable_any_whitespace=True)


# ------------------------------------------------------------------------------------------ the default model


def test_schema_suite_always_parses_and_validates(default_llm):
    """Every schema, 6 seeds each (n=6 from one seed), temperature 1.0: every output is complete JSON that
    validates, ended by the grammar (finish_reason "stop"), never by max_tokens."""
    names = list(SCHEMAS)
    prompts = [chat_prompt(default_llm, f"Reply with JSON for the schema {json.dumps(SCHEMAS[k])}") for k in names]
    params = [constrained(100 + i, n=6, json=SCHEMAS[k]) for i, k in enumerate(names)]
    outs = default_llm.generate(prompts, params, use_tqdm=False)
    for name, out in zip(names, outs):
        assert out.error is None
        for c in out.outputs:
            assert c.finish_reason == "stop", (name, c.text)
            jsonschema.validate(json.loads(c.text), SCHEMAS[name])


def test_regex_choice_grammar_and_json_object_always_match(default_llm):
    prompts, params, checks = [], [], []
    for i, (rx, py) in enumerate(REGEXES):
        prompts.append(chat_prompt(default_llm, "Answer briefly."))
        params.append(constrained(200 + i, n=5, max_tokens=60, regex=rx))
        checks.append(lambda t, py=py: fullmatch(py, t))
    for i, choices in enumerate(CHOICES):
        prompts.append(chat_prompt(default_llm, f"Pick one of {choices}."))
        params.append(constrained(300 + i, n=5, choice=choices))
        checks.append(lambda t, choices=choices: t in choices)
    for i, (grammar, py) in enumerate(GRAMMARS):
        prompts.append(chat_prompt(default_llm, "Write an expression."))
        params.append(constrained(400 + i, n=5, max_tokens=40, grammar=grammar))
        checks.append(lambda t, py=py: fullmatch(py, t))
    prompts.append(chat_prompt(default_llm, "Describe a cat in JSON with at most three keys."))
    params.append(SamplingParams(temperature=0.0, max_tokens=120, structured_outputs={"json_object": True}))
    checks.append(lambda t: isinstance(json.loads(t), dict))
    for out, check, sp in zip(default_llm.generate(prompts, params, use_tqdm=False), checks, params):
        for c in out.outputs:
            assert c.finish_reason == "stop" and check(c.text), (sp.structured_outputs, c.text)


def test_unconstrained_requests_bit_identical_beside_constrained_ones(default_llm):
    """Free requests sample exactly as they do alone; seeded constrained ones give the same tokens whatever shares
    their batch (here: alone, then mixed with free and other constrained requests)."""
    free = [SamplingParams(temperature=1.0, seed=7 + i, max_tokens=12, ignore_eos=True) for i in range(3)]
    free_prompts = ["The weather today is", "My favourite food is", "Once upon a time"]
    json_p = constrained(11, n=2, json=SCHEMAS["enums"])
    regex_p = constrained(12, max_tokens=40, regex=REGEXES[0][0])
    json_prompt = chat_prompt(default_llm, "A t-shirt as JSON.")
    alone_free = default_llm.generate(free_prompts, free, use_tqdm=False)
    alone_json = default_llm.generate([json_prompt], json_p, use_tqdm=False)[0]
    mixed = default_llm.generate([free_prompts[0], json_prompt, free_prompts[1], "Call me at", free_prompts[2]],
                                 [free[0], json_p, free[1], regex_p, free[2]], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone_free] == [mixed[i].outputs[0].token_ids for i in (0, 2, 4)]
    assert [c.token_ids for c in alone_json.outputs] == [c.token_ids for c in mixed[1].outputs]
    assert fullmatch(REGEXES[0][1], mixed[3].outputs[0].text)


def test_eos_only_where_the_grammar_may_end(default_llm):
    """EOS pushed up by +100 is sampled the first moment the grammar allows it, and never before."""
    eos = default_llm.get_tokenizer().eos_token_ids[0]
    params = SamplingParams(temperature=1.0, seed=5, n=4, max_tokens=20, logit_bias={eos: 100.0},
                            structured_outputs=StructuredOutputsParams(regex=r"[0-9]{2,5}"))
    for c in default_llm.generate(["Digits:"], params, use_tqdm=False)[0].outputs:
        # the default model's digits are single tokens: EOS comes right after the second one
        assert c.finish_reason == "stop" and c.token_ids[-1] == eos and fullmatch(r"[0-9]{2}", c.text), c.text


def test_stop_strings_and_min_tokens_with_a_grammar(default_llm):
    # A stop string ends the output inside the grammar, as it would without one.
    p = SamplingParams(temperature=1.0, seed=3, max_tokens=40, stop=["-"],
                       structured_outputs=StructuredOutputsParams(regex=r"[a-z]{3}-[a-z]{3}"))
    c = default_llm.generate(["Code:"], p, use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == "-" and fullmatch(r"[a-z]{3}", c.text)
    # A complete grammar ends the sequence even below min_tokens: nothing but EOS could follow, and EOS is masked.
    p = SamplingParams(temperature=1.0, seed=3, max_tokens=30, min_tokens=20,
                       structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    c = default_llm.generate(["Yes or no?"], p, use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop" and c.text in ("yes", "no")
    # min_tokens still holds EOS back where the grammar could go on: r"a+" with min_tokens 6 gives >= 6 tokens.
    p = SamplingParams(temperature=1.0, seed=3, max_tokens=12, min_tokens=6,
                       structured_outputs=StructuredOutputsParams(regex=r"[ab]+"))
    c = default_llm.generate(["Letters:"], p, use_tqdm=False)[0].outputs[0]
    assert len(c.token_ids) >= 6 and fullmatch(r"[ab]+", c.text)


def test_grammar_and_allowed_token_ids_that_exclude_each_other_end_with_an_error(default_llm):
    ids = default_llm.get_tokenizer().encode(" maybe", add_special_tokens=False)
    for temperature in (0.0, 1.0):
        p = SamplingParams(temperature=temperature, seed=1, max_tokens=5, allowed_token_ids=ids,
                           structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
        out = default_llm.generate(["Yes or no?"], p, use_tqdm=False)[0]
        assert out.outputs[0].finish_reason == "error" and out.outputs[0].token_ids == []
        assert out.error.startswith("structured_outputs: no token is left")


# ------------------------------------------------------------------------ the Hugging Face tokenizer.json bridge


def test_hf_tokenizer_model_follows_every_kind(tiny):
    """Random weights: only the grammar makes these outputs valid."""
    llm = LLM(tiny, device="cpu", kv_cache_memory_bytes=16 << 20)
    schema = SCHEMAS["list"]
    params = [constrained(1, n=4, max_tokens=120, json=schema), constrained(2, n=4, regex=REGEXES[1][0]),
              constrained(3, n=4, choice=CHOICES[0]), constrained(4, n=4, max_tokens=40, grammar=GRAMMARS[0][0]),
              constrained(5, n=2, max_tokens=120, json=SCHEMAS["enums"])]
    outs = llm.generate(["hello"] * len(params), params, use_tqdm=False)
    for c in outs[0].outputs + outs[4].outputs:
        assert c.finish_reason == "stop", c.text
    for c in outs[0].outputs:
        jsonschema.validate(json.loads(c.text), schema)
    for c in outs[4].outputs:
        jsonschema.validate(json.loads(c.text), SCHEMAS["enums"])
    assert all(fullmatch(REGEXES[1][1], c.text) for c in outs[1].outputs)
    assert all(c.text in CHOICES[0] for c in outs[2].outputs)
    assert all(fullmatch(GRAMMARS[0][1], c.text) for c in outs[3].outputs)


def test_preemption_and_chunked_prefill_change_nothing(tiny):
    """A cache of a few blocks (sequences preempted and recomputed), a 7-token step budget (prefills chunked) and
    prefix-cache hits (one prompt for all): the same tokens as a roomy engine, every output valid."""
    params = [constrained(20 + i, n=3, max_tokens=60, json=SCHEMAS["enums"]) for i in range(2)]
    params += [constrained(30, n=3, max_tokens=30, regex=REGEXES[0][0]),
               SamplingParams(temperature=1.0, seed=40, n=2, max_tokens=20, ignore_eos=True)]
    prompt = "the quick brown fox jumps over the lazy dog " * 2
    roomy = LLM(tiny, device="cpu", kv_cache_memory_bytes=16 << 20)
    tight = LLM(tiny, device="cpu", block_size=3, max_num_batched_tokens=7, max_num_seqs=4,
                kv_cache_memory_bytes=24 * 3 * 2 * 2 * 2 * 16 * 4)  # 24 blocks of 3 tokens
    a = roomy.generate([prompt] * len(params), params, use_tqdm=False)
    b = tight.generate([prompt] * len(params), params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]
    for out in b[:2]:
        for c in out.outputs:
            jsonschema.validate(json.loads(c.text), SCHEMAS["enums"])
    assert all(fullmatch(REGEXES[0][1], c.text) for c in b[2].outputs)


def test_batch_file_with_response_format_and_bad_lines(tiny, tmp_path, capsys):
    """OpenAI batch lines: response_format json_schema / text, structured_outputs, logit_bias and
    prompt_logprobs work; an invalid schema and an out-of-vocabulary logit_bias fail their own lines only."""
    from fastinfer.entrypoints.cli import main as cli

    def line(cid, **body):
        return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                           "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 120, **body}})

    schema = SCHEMAS["enums"]
    src = tmp_path / "batch.jsonl"
    src.write_text("\n".join([
        line("schema", response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema,
                                                                               "strict": True}}),
        line("bad-schema", response_format={"type": "json_schema", "json_schema": {"name": "t",
                                                                                   "schema": {"type": "nope"}}}),
        line("text", response_format={"type": "text"}, max_tokens=3),
        line("choice", structured_outputs={"choice": ["yes", "no"]}, prompt_logprobs=2),
        line("bias-oov", logit_bias={"99999": 5}),
        line("bias", logit_bias={"5": 100}, max_tokens=4, temperature=1.0),
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "-i", src, "-o", out, "--model", tiny, "--device", "cpu", "--no-progress", "--threads", "1",
            "--kv-cache-memory-bytes", "16MiB"]
    assert cli.main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(lines) == {"schema", "bad-schema", "text", "choice", "bias-oov", "bias"}

    def content(cid):
        assert lines[cid]["error"] is None, lines[cid]
        return lines[cid]["response"]["body"]["choices"][0]["message"]["content"]

    jsonschema.validate(json.loads(content("schema")), schema)
    assert lines["text"]["response"]["body"]["usage"]["completion_tokens"] == 3
    assert content("choice") in ("yes", "no")
    body = lines["choice"]["response"]["body"]
    assert body["prompt_logprobs"][0] is None and len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"]
    assert "schema" in lines["bad-schema"]["error"]["message"] and lines["bad-schema"]["response"] is None
    assert "logit_bias" in lines["bias-oov"]["error"]["message"]
    assert content("bias") == tiny_token_text(tiny, 5) * 4


def test_jsonl_lines_take_the_same_fields(tiny, tmp_path, capsys):
    from fastinfer.entrypoints.cli import main as cli

    schema = SCHEMAS["enums"]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(o) for o in [
        {"id": "a", "prompt": "hello", "max_tokens": 120, "prompt_logprobs": 1,
         "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}},
        {"id": "b", "prompt": "hello", "structured_outputs": {"regex": "[0-9]{3}"}, "allowed_token_ids": [1, 2]},
        {"id": "c", "prompt": "hello", "structured_outputs": {"regex": "[0-9"}},
        {"id": "d", "prompt": "hello", "max_tokens": 5, "allowed_token_ids": [7, 8], "temperature": 1.0},
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "-i", src, "-o", out, "--model", tiny, "--device", "cpu", "--no-progress", "--threads", "1",
            "--kv-cache-memory-bytes", "16MiB"]
    assert cli.main([str(a) for a in argv]) == 0
    assert "line 3" in capsys.readouterr().err  # the bad regex is reported and skipped, the rest runs
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    jsonschema.validate(json.loads(recs["a"]["text"]), schema)
    assert recs["a"]["prompt_logprobs"][0] is None and len(recs["a"]["prompt_logprobs"]) == recs["a"]["usage"][
        "prompt_tokens"]
    assert "no token is left" in recs["b"]["error"]  # the grammar and allowed_token_ids exclude each other
    assert "c" not in recs
    assert recs["d"]["text"] and set(recs["d"]["text"]) <= set(tiny_token_text(tiny, 7) + tiny_token_text(tiny, 8))


def tiny_token_text(path: str, token: int) -> str:
    from fastinfer.loading.tokenizer import Tokenizer

    return Tokenizer.from_hf_folder(path).decode([token])


# ------------------------------------------------------------------------------- compilation off the engine loop


def fake_engine(**sched) -> LLMEngine:
    runner = FakeRunner(num_blocks=64, block_size=4, vocab=ByteTokenizer().vocab_size)
    cache = CacheConfig(block_size=4, num_blocks=64)
    return LLMEngine(runner, ByteTokenizer(), SchedulerConfig(max_model_len=256, **sched), cache)


def test_compiling_grammar_holds_back_only_its_own_request(monkeypatch):
    engine = fake_engine()
    pending: Future = Future()
    real_submit = engine.grammar_compiler().submit
    monkeypatch.setattr(engine.grammar_compiler(), "submit", lambda params: pending)
    engine.add_request("slow", [1, 2, 3], constrained(1, max_tokens=8, regex="[a-c]{4}"))
    engine.add_request("free", [4, 5, 6], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    done = {}
    for _ in range(5):
        for out in engine.step():
            done[out.request_id] = out
    assert done["free"].finished and len(done["free"].outputs[0].token_ids) == 5
    assert "slow" not in done and engine.num_waiting == 1  # still compiling; the other request ran meanwhile
    pending.set_result(real_submit(StructuredOutputsParams(regex="[a-c]{4}")).result())
    for _ in range(20):
        for out in engine.step():
            done[out.request_id] = out
        if done.get("slow") and done["slow"].finished:
            break
    assert done["slow"].outputs[0].finish_reason == "stop" and fullmatch("[a-c]{4}", done["slow"].outputs[0].text)


def test_grammar_that_fails_to_compile_finishes_its_request_with_an_error(monkeypatch):
    engine = fake_engine()
    failed: Future = Future()
    failed.set_exception(ValueError("structured_outputs: the grammar does not compile for this tokenizer: boom"))
    monkeypatch.setattr(engine.grammar_compiler(), "submit", lambda params: failed)
    engine.add_request("bad", [1, 2], constrained(1, regex="a"))
    engine.add_request("ok", [1, 2], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step()})
    assert "boom" in outs["bad"].error and outs["bad"].outputs[0].finish_reason == "error"
    assert outs["ok"].error is None and len(outs["ok"].outputs[0].token_ids) == 2


def test_compiled_grammars_are_cached_by_spec():
    engine = fake_engine()
    compiler = engine.grammar_compiler()
    a = compiler.submit(StructuredOutputsParams(json=SCHEMAS["enums"]))
    assert compiler.submit(StructuredOutputsParams(json=json.dumps(SCHEMAS["enums"]))) is a
    assert compiler.submit(StructuredOutputsParams(json=SCHEMAS["enums"], disable_any_whitespace=True)) is not a
    assert compiler.submit(StructuredOutputsParams(regex="a+")) is not a
    assert a.result().is_error() is False


def test_abort_while_compiling():
    engine = fake_engine()
    pending: Future = Future()
    engine.grammar_compiler().submit = lambda params: pending
    engine.add_request("r", [1, 2], constrained(1, regex="a"))
    engine.abort("r")
    [out] = engine.step()
    assert out.finished and out.outputs[0].finish_reason == "abort" and not engine.has_unfinished()


def test_accelerator_path_of_the_constraints_matches_the_cpu_path():
    """TokenConstraints works in numpy on the CPU and in torch elsewhere; both give the same logits (the torch path
    runs here on CPU tensors, the only device this suite has)."""
    from fastinfer.engine.grammar_matcher import GrammarMatcher
    from fastinfer.engine.sequence import Sequence
    from fastinfer.engine.token_constraints import TokenConstraints

    engine = fake_engine()
    compiled = engine.grammar_compiler().submit(StructuredOutputsParams(regex="[a-c]{2}x"))
    compiled.result()
    tok = ByteTokenizer()
    vocab = tok.vocab_size
    kinds = [dict(structured_outputs=StructuredOutputsParams(regex="[a-c]{2}x")), {},
             dict(allowed_token_ids=[3, 5, 7]), dict(logit_bias={4: -100.0, 9: 3.5}),
             dict(structured_outputs=StructuredOutputsParams(regex="[a-c]{2}x"), logit_bias={98: 2.0})]
    seqs = []
    for i, kw in enumerate(kinds):
        params = SamplingParams(**kw)
        grammar = GrammarMatcher(compiled) if params.structured_outputs is not None else None
        seqs.append(Sequence(i, str(i), [1, 2], 2, params, grammar=grammar))
        if grammar is not None:
            assert grammar.ready() and grammar.error is None
    assert seqs[4].grammar.accept(tok.encode("b")[0])  # this one is a token further along
    x = torch.randn(len(seqs), vocab, generator=torch.Generator().manual_seed(0))
    constraints = TokenConstraints(engine.grammar_compiler().vocab_size)
    cpu = constraints.apply(x, seqs)
    rows = lambda pred: [i for i, s in enumerate(seqs) if pred(s)]  # noqa: E731
    other = constraints._apply_torch(x.clone(), seqs, rows(lambda s: s.grammar is not None),
                                     rows(lambda s: s.params.allowed_token_ids is not None),
                                     rows(lambda s: bool(s.params.logit_bias)))
    assert torch.equal(cpu, other)
    assert torch.equal(cpu[1], x[1])  # the free row is untouched
    allowed_first = {i for i in range(vocab) if cpu[0, i] > float("-inf")}
    assert allowed_first == {tok.encode(c)[0] for c in "abc"}
    assert torch.isfinite(cpu[2]).sum() == 3 and cpu[3, 4] == x[3, 4] - 100 and cpu[3, 9] == x[3, 9] + 3.5
    assert {i for i in range(vocab) if cpu[4, i] > float("-inf")} == {tok.encode(c)[0] for c in "abc"}
