"""`fastinfer generate`: formats, output records, resume and errors against a fake LLM, then end to end."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from fastinfer.entrypoints.cli import arg_types, batch_input, generate
from model_fixtures import write_tiny_llama
from fastinfer.entrypoints.cli import main as cli
from fastinfer.engine.outputs import CompletionOutput, Logprob, RequestOutput
from fastinfer.engine.sampling_params import SamplingParams

# ------------------------------------------------------------------------------------------- fake LLM


class FakeTokenizer:
    """One token per character; a chat template that tags roles and rejects the role "bad"."""

    vocab_size = 1000

    def __init__(self, chat_template: str | None = "tagged") -> None:
        self.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) % 1000 for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        if any(m["role"] == "bad" for m in messages):
            raise ValueError("roles must be user, assistant or system")
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class FakeLLM:
    """Completes a prompt with "re:" + its text, one character per step, interleaving requests and
    finishing them in reverse order; a prompt containing TOOLONG is rejected like an over-long prompt.
    ``interrupt_after`` raises KeyboardInterrupt after that many requests finished (a Ctrl-C)."""

    def __init__(self, model=None, chat_template="tagged", interrupt_after=None, generation_config=None,
                 **engine_kwargs):
        self.model = model
        self.generation_config = generation_config or {}
        self.engine_kwargs = engine_kwargs
        self.tokenizer = FakeTokenizer(chat_template)
        self.config = SimpleNamespace(vocab_size=1000)
        self.interrupt_after = interrupt_after
        self.received: list[tuple[dict, SamplingParams]] = []

    def get_tokenizer(self):
        return self.tokenizer

    def stream(self, prompts, sampling_params, *, request_ids):
        assert len(prompts) == len(sampling_params) == len(request_ids)
        self.received += list(zip(prompts, sampling_params))
        targets = []
        for p, sp in zip(prompts, sampling_params):
            full = "re:" + (p.get("prompt") or "ids")
            targets.append(full[: sp.max_tokens] if sp.max_tokens else full)
        finished = 0
        live = list(reversed(range(len(prompts))))
        step = 0
        while live:
            step += 1
            for i in list(live):
                p, sp, rid = prompts[i], sampling_params[i], request_ids[i]
                ids = p["prompt_token_ids"]
                if "TOOLONG" in (p.get("prompt") or ""):
                    live.remove(i)
                    yield RequestOutput(rid, p.get("prompt"), ids, [], True, error="prompt is too long")
                else:
                    text = targets[i][:step]
                    done = len(text) == len(targets[i])
                    reason = None if not done else ("length" if len(text) == sp.max_tokens else "stop")
                    outs = []
                    for k in range(sp.n):
                        lps = None
                        if sp.logprobs is not None:
                            lps = [{ord(c): Logprob(-0.5, 1, c), 7: Logprob(-1.5, 2, "x")} for c in text]
                        outs.append(CompletionOutput(k, text + (f"#{k}" if sp.n > 1 and done else ""),
                                                     [ord(c) for c in text], -0.5 * len(text) if lps else None,
                                                     lps, reason))
                    yield RequestOutput(rid, p.get("prompt"), ids, outs, done)
                    if not done:
                        continue
                    live.remove(i)
                finished += 1
                if self.interrupt_after is not None and finished >= self.interrupt_after:
                    raise KeyboardInterrupt


def run(argv, capsys, llm=None, **fake_kwargs):
    """main(argv) with a FakeLLM; returns (exit status, stdout, stderr, the fake or None if never built)."""
    made = []

    def factory(model, **kw):
        made.append(llm or FakeLLM(model, **fake_kwargs, **kw))
        return made[-1]

    code = cli.main([str(a) for a in argv], llm_factory=factory)
    cap = capsys.readouterr()
    return code, cap.out, cap.err, (made[0] if made else None)


def lines(path_or_text) -> list[dict]:
    text = path_or_text.read_text() if hasattr(path_or_text, "read_text") else path_or_text
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


# ------------------------------------------------------------------------------------------- parsing


def test_help_exits_zero(capsys):
    for argv in (["--help"], ["generate", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "examples:" in out and "OpenAI Batch" in out


def test_help_from_python_m():
    r = subprocess.run([sys.executable, "-m", "fastinfer", "generate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--on-bad-line" in r.stdout


def test_detect_format():
    d = batch_input.detect_format
    assert d([b"", b"hello world", b'{"prompt": "x"}']) == "text"
    assert d([b"  ", b'{"prompt": "x"}']) == "jsonl"
    assert d([b'{"prompt": "x"'] + [b'{"messages": []}']) == "jsonl"
    assert d([b'{broken', b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}']) == "openai"
    assert d([]) == "text"
    assert batch_input.split_lines(b'\xef\xbb\xbf{"prompt": "x"}\r\nsecond\n') == [b'{"prompt": "x"}', b"second"]


def test_parse_jsonl_overrides_and_bad_lines():
    data = "\n".join([
        json.dumps({"id": "a", "prompt": "hi", "max_tokens": 5, "temperature": 0, "stop": ["\n"]}),
        "",
        json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "yo"}]}], "n": 2}),
        "{not json",
        json.dumps({"id": "b", "max_tokens": 5}),
        json.dumps({"id": "c", "prompt": "x", "temperature": -1}),
        json.dumps({"id": "a", "prompt": "dup"}),
        json.dumps({"id": "d", "prompt": "x", "max_token": 3}),
        json.dumps({"id": "e", "prompt": "x", "ignore_eos": 1}),
        json.dumps({"prompt": [5, 6, 7], "temperature": None, "max_tokens": None}),
    ]).encode()
    reqs, bad = batch_input.parse_input(data, "jsonl", {"max_tokens": 9, "seed": 3}, SamplingParams)
    assert [r.id for r in reqs] == ["a", 2, 9]
    assert reqs[0].sampling.max_tokens == 5 and reqs[0].sampling.temperature == 0 and reqs[0].sampling.seed == 3
    assert reqs[1].messages == [{"role": "user", "content": "yo"}] and reqs[1].sampling.n == 2
    assert reqs[1].sampling.max_tokens == 9
    assert reqs[2].prompt == [5, 6, 7] and reqs[2].sampling.temperature == 1.0 and reqs[2].sampling.max_tokens is None
    by_line = {b.line: b.message for b in bad}
    assert sorted(by_line) == [4, 5, 6, 7, 8, 9]
    assert "invalid JSON" in by_line[4]
    assert "prompt" in by_line[5]
    assert "temperature" in by_line[6]
    assert "duplicate id 'a' (first on line 1)" in by_line[7]
    assert "max_token" in by_line[8]
    assert "ignore_eos" in by_line[9]


def test_parse_openai():
    good_chat = {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}],
                          "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 2, "seed": 1}}
    good_cmpl = {"custom_id": "c2", "method": "POST", "url": "/v1/completions",
                 "body": {"prompt": ["once"], "top_p": 0.5, "stop": "."}}
    bad_url = {"custom_id": "c3", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}
    bad_field = {"custom_id": "c4", "method": "POST", "url": "/v1/completions",
                 "body": {"prompt": "x", "tools": []}}
    no_id = {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}
    data = "\n".join(json.dumps(o) for o in (good_chat, good_cmpl, bad_url, bad_field, no_id)).encode()
    reqs, bad = batch_input.parse_input(data, "openai", {"max_tokens": 9}, SamplingParams)
    assert [(r.id, r.kind) for r in reqs] == [("c1", "messages"), ("c2", "completion")]
    assert reqs[0].sampling.max_tokens == 4 and reqs[0].sampling.logprobs == 2 and reqs[0].model == "gpt-x"
    assert reqs[1].prompt == "once" and reqs[1].sampling.stop == ["."] and reqs[1].sampling.max_tokens == 9
    assert [(b.line, b.id) for b in bad] == [(3, "c3"), (4, "c4"), (5, None)]
    assert "tools" in bad[1].message


def test_byte_size():
    assert arg_types.byte_size("4GiB") == 4 << 30
    assert arg_types.byte_size("512M") == 512 << 20
    assert arg_types.byte_size("1000") == 1000
    with pytest.raises(Exception):
        arg_types.byte_size("lots")


# ------------------------------------------------------------------------------------------- runs


def test_text_input_chat_by_default(tmp_path, capsys, monkeypatch):
    import torch

    import fastinfer

    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(fastinfer, "set_num_threads", threads.append)
    src = tmp_path / "p.txt"
    src.write_text("hello\n\nworld\r\n")
    out = tmp_path / "o.jsonl"
    code, stdout, err, llm = run(["generate", "--input", src, "--output", out, "--max-tokens", 6,
                                  "--temperature", 0, "--system", "be brief", "--threads", 1], capsys)
    assert code == 0 and stdout == ""
    recs = {r["id"]: r for r in lines(out)}
    assert set(recs) == {0, 2}
    assert recs[0]["prompt"] == "hello"
    assert recs[0]["text"] == "re:<sy" and recs[0]["finish_reason"] == "length"
    assert recs[0]["usage"]["completion_tokens"] == 6
    sent = llm.received[0][0]["prompt"]
    assert sent == "<system>be brief<user>hello<assistant>"
    assert all(sp.max_tokens == 6 and sp.temperature == 0 for _, sp in llm.received)
    assert "2 requests done (0 failed)" in err and "output tok/s" in err
    assert threads == [1, 1]


def test_no_chat_and_model_without_template(tmp_path, capsys):
    src = tmp_path / "p.txt"
    src.write_text("abc\n")
    code, stdout, _, llm = run(["generate", "-i", src, "--no-chat", "--no-progress"], capsys)
    assert code == 0 and llm.received[0][0]["prompt"] == "abc"
    assert lines(stdout)[0]["text"] == "re:abc"
    code, _, _, llm = run(["generate", "-i", src, "--no-progress"], capsys, chat_template=None)
    assert code == 0 and llm.received[0][0]["prompt"] == "abc"
    code, _, err, _ = run(["generate", "-i", src, "--chat"], capsys, chat_template=None)
    assert code == 1 and "no chat template" in err


def test_jsonl_input_records(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(o) for o in [
        {"id": "x", "prompt": "p1", "n": 2, "max_tokens": 50},
        {"custom_id": "y", "messages": [{"role": "user", "content": "m"}], "logprobs": 1},
        {"id": "z", "prompt": "TOOLONG"},
        {"id": "t", "messages": [{"role": "bad", "content": "m"}]},
    ]))
    code, stdout, err, llm = run(["generate", "--input", src, "--no-chat", "--no-progress",
                                  "--dtype", "float32", "--max-num-seqs", 4, "--no-prefix-caching"], capsys)
    assert code == 0
    assert llm.engine_kwargs == {"dtype": "float32", "max_num_seqs": 4, "enable_prefix_caching": False,
                                 "max_logprobs": 20}
    recs = {r["id"]: r for r in lines(stdout)}
    assert set(recs) == {"x", "y", "z", "t"}
    assert recs["x"]["outputs"] == [{"index": 0, "text": "re:p1#0", "finish_reason": "stop"},
                                    {"index": 1, "text": "re:p1#1", "finish_reason": "stop"}]
    assert recs["x"]["usage"] == {"prompt_tokens": 3, "completion_tokens": 10, "total_tokens": 13}
    y = recs["y"]
    assert y["messages"] == [{"role": "user", "content": "m"}] and y["text"] == "re:<user>m<assistant>"
    assert y["logprobs"][0] == {"token_id": ord("r"), "token": "r", "logprob": -0.5,
                                "top_logprobs": [{"token_id": ord("r"), "token": "r", "logprob": -0.5},
                                                 {"token_id": 7, "token": "x", "logprob": -1.5}]}
    assert recs["z"] == {"id": "z", "prompt": "TOOLONG", "error": "prompt is too long"}
    assert "roles must be" in recs["t"]["error"] and "line 4" in err
    assert "4 requests done (2 failed)" in err
    # completion order, not input order: the fake finishes the last request first
    assert [r["id"] for r in lines(stdout)][:2] == ["t", "z"]


def test_openai_batch_output(tmp_path, capsys):
    src = tmp_path / "batch.jsonl"
    src.write_text("\n".join(json.dumps(o) for o in [
        {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}},
        {"custom_id": "t", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "raw", "max_tokens": 4, "logprobs": 1}},
        {"custom_id": "bad", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "n": 0}},
        {"custom_id": "long", "method": "POST", "url": "/v1/completions", "body": {"prompt": "TOOLONG"}},
    ]))
    out = tmp_path / "out.jsonl"
    code, _, err, llm = run(["generate", "-i", src, "-o", out, "--no-progress", "--model", "mymodel"], capsys)
    assert code == 0 and "skipping line 3" in err
    recs = {r["custom_id"]: r for r in lines(out)}
    assert set(recs) == {"c", "t", "bad", "long"}
    c = recs["c"]
    assert c["id"].startswith("batch_req_") and c["error"] is None and c["response"]["status_code"] == 200
    body = c["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "m1" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "re:<user>hi<assistant>"},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"]["completion_tokens"] == len("re:<user>hi<assistant>")
    tb = recs["t"]["response"]["body"]
    assert tb["object"] == "text_completion" and tb["model"] == "mymodel"
    assert tb["choices"][0]["text"] == "re:r" and tb["choices"][0]["finish_reason"] == "length"
    assert tb["choices"][0]["logprobs"]["tokens"] == list("re:r")
    assert tb["choices"][0]["logprobs"]["top_logprobs"][0] == {"r": -0.5, "x": -1.5}
    assert llm.received[1][0]["prompt"] == "raw"  # completions never get the chat template
    assert recs["bad"]["response"] is None and "n must be" in recs["bad"]["error"]["message"]
    assert recs["long"]["response"] is None and recs["long"]["error"]["message"] == "prompt is too long"


def test_model_generation_config_defaults(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "own", "prompt": "a", "temperature": 0.1}\n{"id": "plain", "prompt": "b"}\n')
    gen = {"temperature": 0.6, "top_k": 20, "max_new_tokens": 5, "top_p": None, "do_sample": True}
    code, _, err, llm = run(["generate", "-i", src, "--top-k", 3, "--no-progress", "--no-chat"], capsys,
                            generation_config=gen)
    assert code == 0 and "generation_config: temperature=0.6, top_k=20, max_tokens=5" in err
    got = {p["prompt"][-1]: (sp.temperature, sp.top_k, sp.max_tokens, sp.top_p) for p, sp in llm.received}
    assert got == {"a": (0.1, 3, 5, 1.0), "b": (0.6, 3, 5, 1.0)}  # line > flag > model > SamplingParams
    code, _, err, llm = run(["generate", "-i", src, "--no-generation-config", "--no-progress"], capsys,
                            generation_config=gen)
    assert code == 0 and "generation_config" not in err
    assert [(sp.temperature, sp.top_k, sp.max_tokens) for _, sp in llm.received] == [(0.1, 0, 256), (1.0, 0, 256)]
    code, stdout, err, llm = run(["generate", "-i", src, "--no-progress"], capsys, generation_config={"top_p": 2.0})
    assert code == 0 and not llm.received and "2 requests done (2 failed)" in err
    assert all("top_p" in r["error"] for r in lines(stdout))


def test_single_prompt_prints_text(capsys):
    code, stdout, err, llm = run(["generate", "Tell me", "--no-chat"], capsys)
    assert code == 0 and stdout == "re:Tell me\n"
    assert "output tok/s" in err and "requests done" not in err
    assert llm.model is None and llm.received[0][1].max_tokens == generate.DEFAULT_MAX_TOKENS
    code, stdout, _, _ = run(["generate", "ab", "--no-chat", "--n", 2, "--no-progress", "--seed", 5], capsys)
    assert code == 0 and stdout == "--- completion 0 ---\nre:ab#0\n--- completion 1 ---\nre:ab#1\n"
    code, _, err, _ = run(["generate", "TOOLONG", "--no-chat"], capsys)
    assert code == 1 and "prompt is too long" in err


def test_stdin_input(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(b'{"prompt": "s"}\n')))
    code, stdout, _, _ = run(["generate", "--input", "-", "--no-progress", "--no-chat"], capsys)
    assert code == 0 and lines(stdout) == [{"id": 0, "prompt": "s", "text": "re:s", "finish_reason": "stop",
                                            "usage": {"prompt_tokens": 2, "completion_tokens": 4,
                                                      "total_tokens": 6}}]


def test_module_factory_is_used(tmp_path, capsys, monkeypatch):
    made = []
    monkeypatch.setattr(cli, "make_llm", lambda model, **kw: made.append(FakeLLM(model, **kw)) or made[-1])
    assert cli.main(["generate", "x", "--model", "m", "--kv-cache-memory-bytes", "1MiB"]) == 0
    assert made[0].model == "m" and made[0].engine_kwargs == {"kv_cache_memory_bytes": 1 << 20, "max_logprobs": 20}


def test_bad_lines_skip_or_fail(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a"}\n{"prompt": 3}\n{"prompt": "c", "top_p": 2}\n')
    code, stdout, err, llm = run(["generate", "-i", src, "--on-bad-line", "fail"], capsys)
    assert code == 2 and llm is None and stdout == ""
    assert "line 2:" in err and "line 3:" in err and "top_p" in err and "Traceback" not in err
    code, stdout, err, llm = run(["generate", "-i", src, "--no-progress"], capsys)
    assert code == 0 and [r["id"] for r in lines(stdout)] == [0] and "skipping line 2" in err
    assert "2 bad lines skipped" in err


def test_user_mistakes_one_line(tmp_path, capsys):
    code, _, err, _ = run(["generate", "-i", tmp_path / "missing.txt"], capsys)
    assert code == 1 and err.count("\n") == 1 and "cannot read --input" in err

    def broken(model, **kw):
        raise FileNotFoundError(f"no model at {model}")

    assert cli.main(["generate", "hi", "--model", "/nope"], llm_factory=broken) == 1
    err = capsys.readouterr().err
    assert "cannot load /nope: no model at /nope" in err and "Traceback" not in err
    for argv, msg in [(["generate"], "PROMPT or --input"), (["generate", "x", "-i", "f"], "PROMPT or --input"),
                      (["generate", "x", "--resume"], "--resume needs --output")]:
        code, _, err, _ = run(argv, capsys)
        assert code == 2 and msg in err
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": 0}\n')
    code, _, err, _ = run(["generate", "x", "-o", out], capsys)
    assert code == 1 and "--resume" in err and out.read_text() == '{"id": 0}\n'
    code, _, err, _ = run(["generate", "-i", out, "-o", out, "--resume"], capsys)
    assert code == 2 and "--output is the --input file" in err and out.read_text() == '{"id": 0}\n'
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "x", "--max-tokens", "0"])
    assert exc.value.code == 2


# ------------------------------------------------------------------------------------------- resume


def test_resume_truncates_partial_line_and_skips_done(tmp_path, capsys):
    src = tmp_path / "p.txt"
    src.write_text("".join(f"prompt {i}\n" for i in range(6)))
    out = tmp_path / "o.jsonl"
    code, _, _, _ = run(["generate", "-i", src, "-o", out, "--no-progress"], capsys)
    full = out.read_bytes().splitlines(keepends=True)
    done = full[:2]
    out.write_bytes(b"".join(done) + full[2][:17])  # two whole lines and a kill mid-line
    code, _, err, llm = run(["generate", "-i", src, "-o", out, "--resume", "--no-progress"], capsys)
    assert code == 0 and "cut a partial last line (17 bytes)" in err and "2 already in the output" in err
    assert len(llm.received) == 4
    ids = [r["id"] for r in lines(out)]
    assert sorted(ids) == list(range(6))
    assert out.read_bytes().startswith(b"".join(done))
    # everything done: the model is not even loaded
    code, _, err, llm = run(["generate", "-i", src, "-o", out, "--resume"], capsys)
    assert code == 0 and llm is None and "6 already in the output" in err


def test_interrupt_keeps_lines_then_resume(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                       "body": {"prompt": f"p{i}"}}) + "\n" for i in range(5)))
    out = tmp_path / "o.jsonl"
    code, _, err, _ = run(["generate", "-i", src, "-o", out, "--no-progress"], capsys, interrupt_after=2)
    assert code == 130 and "--resume" in err
    assert len(lines(out)) == 2
    code, _, _, llm = run(["generate", "-i", src, "-o", out, "--no-progress", "--resume"], capsys)
    assert code == 0 and len(llm.received) == 3
    assert sorted(r["custom_id"] for r in lines(out)) == [f"r{i}" for i in range(5)]


def test_resume_retry_failed(tmp_path, capsys):
    def batch(n_of_b):
        return "".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                                   "body": {"prompt": prompt, "n": n}}) + "\n"
                       for cid, prompt, n in [("a", "fine", 1), ("b", "fixed later", n_of_b), ("c", "TOOLONG", 1)])

    src = tmp_path / "in.jsonl"
    src.write_text(batch(0))
    out = tmp_path / "o.jsonl"
    assert run(["generate", "-i", src, "-o", out, "--no-progress"], capsys)[0] == 0
    assert {r["custom_id"]: r["error"] is None for r in lines(out)} == {"a": True, "b": False, "c": False}
    src.write_text(batch(1))
    code, _, err, llm = run(["generate", "-i", src, "-o", out, "--resume"], capsys)
    assert code == 0 and llm is None and "3 already in the output" in err  # errors count as done
    code, _, err, llm = run(["generate", "-i", src, "-o", out, "--resume", "--retry-failed"], capsys)
    assert code == 0 and "removed 2 error line(s)" in err and len(llm.received) == 2
    recs = lines(out)
    assert sorted(r["custom_id"] for r in recs) == ["a", "b", "c"]
    assert {r["custom_id"]: r["error"] is None for r in recs} == {"a": True, "b": True, "c": False}
    assert run(["generate", "-i", src, "-o", out, "--retry-failed"], capsys)[0] == 2


def test_resume_rejects_foreign_output(tmp_path, capsys):
    src = tmp_path / "p.txt"
    src.write_text("a\n")
    out = tmp_path / "o.jsonl"
    out.write_text("not json\n")
    code, _, err, llm = run(["generate", "-i", src, "-o", out, "--resume"], capsys)
    assert code == 1 and "line 1 is not JSON" in err and llm is None


# ------------------------------------------------------------------------------------------- end to end
# The real LLM on a random-weight 2-layer Llama written here (config.json, safetensors, a small BPE tokenizer).

def write_cli_llama(path) -> None:
    """The tiny Llama of the end-to-end CLI tests (also the Ray processor's)."""
    write_tiny_llama(path, ["the quick brown fox jumps over the lazy dog", "hello world, once upon a time"],
                     vocab_size=320, special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
                     max_position_embeddings=128)


def _llm_ready() -> bool:
    try:
        import fastinfer.entrypoints.llm  # noqa: F401
    except ImportError:
        return False
    return True


needs_llm = pytest.mark.skipif(not _llm_ready(), reason="fastinfer.entrypoints.llm is not importable")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The checkpoint's folder. Torch and fastinfer run on one thread meanwhile: a 64-wide model gains
    nothing from more, and on a busy machine spinning threads made each step 10x slower."""
    import torch

    import fastinfer

    path = tmp_path_factory.mktemp("tiny_llama")
    write_cli_llama(path)
    before = torch.get_num_threads(), fastinfer.get_num_threads()
    torch.set_num_threads(1)
    fastinfer.set_num_threads(1)
    yield path
    torch.set_num_threads(before[0])
    fastinfer.set_num_threads(before[1])


E2E = ["--max-num-seqs", "4", "--kv-cache-memory-bytes", "4MiB", "--device", "cpu", "--no-progress", "--threads", "1"]


@needs_llm
def test_e2e_formats_match_llm_generate(tiny, tmp_path, capsys):
    from fastinfer.entrypoints.llm import LLM

    prompts = ["hello world", "the quick brown fox", "once upon"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(o) for o in [
        {"id": "a", "prompt": "hello world", "max_tokens": 3, "logprobs": 2},
        {"id": "b", "messages": [{"role": "user", "content": "the lazy dog"}]},
    ]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(o) for o in [
        {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}},
        {"custom_id": "t", "method": "POST", "url": "/v1/completions", "body": {"prompt": "once upon", "n": 2}},
    ]) + "\n")
    common = ["--model", tiny, "--temperature", "0", "--max-tokens", "6", *E2E]
    for name in ("p.txt", "p.jsonl", "b.jsonl"):
        argv = ["generate", "-i", tmp_path / name, "-o", tmp_path / (name + ".out"), *common]
        assert cli.main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err

    llm = LLM(str(tiny), device="cpu", max_num_seqs=4, kv_cache_memory_bytes=4 << 20)
    tok = llm.get_tokenizer()

    def greedy(prompt, max_tokens=6, n=1):
        [ro] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, n=n), use_tqdm=False)
        return ro

    def chat(content):
        return {"messages": [{"role": "user", "content": content}]}

    text = {r["id"]: r for r in lines(tmp_path / "p.txt.out")}
    assert set(text) == {0, 1, 2}
    for i, p in enumerate(prompts):  # the tiny model has a chat template, so plain prompts go through it
        ref = greedy(chat(p))
        assert text[i]["text"] == ref.outputs[0].text and text[i]["finish_reason"] == ref.outputs[0].finish_reason
        assert text[i]["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)
        assert text[i]["usage"]["completion_tokens"] == len(ref.outputs[0].token_ids)
    assert tok.apply_chat_template(chat("x")["messages"]) == "<|user|>x</s><|assistant|>"

    js = {r["id"]: r for r in lines(tmp_path / "p.jsonl.out")}
    assert js["a"]["text"] == greedy(chat("hello world"), 3).outputs[0].text
    assert js["a"]["usage"]["completion_tokens"] <= 3
    lps = js["a"]["logprobs"]
    assert len(lps) == js["a"]["usage"]["completion_tokens"]
    for e in lps:  # the sampled (greedy) token is the top candidate; at least 2 candidates per position
        assert len(e["top_logprobs"]) >= 2 and e["top_logprobs"][0]["token_id"] == e["token_id"]
        assert e["logprob"] == e["top_logprobs"][0]["logprob"] <= 0 and isinstance(e["token"], str)
    assert js["a"]["cumulative_logprob"] == pytest.approx(sum(e["logprob"] for e in lps), abs=1e-4)
    assert js["b"]["text"] == greedy(chat("the lazy dog")).outputs[0].text

    ob = {r["custom_id"]: r for r in lines(tmp_path / "b.jsonl.out")}
    c = ob["c"]["response"]["body"]
    assert c["object"] == "chat.completion"
    assert c["choices"][0]["message"]["content"] == greedy(chat("hello"), 5).outputs[0].text
    t = ob["t"]["response"]["body"]
    ref = greedy("once upon", 6, n=2)  # /v1/completions: raw prompt, no template
    assert [ch["text"] for ch in t["choices"]] == [o.text for o in ref.outputs]
    assert t["usage"]["prompt_tokens"] == len(tok.encode("once upon"))


@needs_llm
def test_e2e_single_prompt_and_bad_lines(tiny, tmp_path, capsys):
    code = cli.main(["generate", "--model", str(tiny), "--no-chat", "--temperature", "0", "--max-tokens", "5", *E2E,
                     "hello world"])
    out = capsys.readouterr().out
    assert code == 0 and out.endswith("\n") and len(out) > 1
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hello"}\n{"prompt": "x", "temperature": "hot"}\n{"prompt": "the fox"}\n')
    argv = ["generate", "--model", str(tiny), "-i", str(src), "--max-tokens", "3", *E2E]
    assert cli.main([*argv, "--on-bad-line", "fail"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "line 2" in cap.err and "temperature" in cap.err
    assert cli.main(argv) == 0
    cap = capsys.readouterr()
    assert sorted(r["id"] for r in lines(cap.out)) == [0, 2] and "skipping line 2" in cap.err
    src.write_text("hello\n" + "the quick brown fox jumps over the lazy dog " * 4 + "\n")
    assert cli.main([*argv, "--max-model-len", "24"]) == 0  # the engine rejects the long prompt alone
    cap = capsys.readouterr()
    recs = {r["id"]: r for r in lines(cap.out)}
    assert "max_model_len" in recs[1]["error"] and "text" not in recs[1] and "error" not in recs[0]
    assert "2 requests done (1 failed)" in cap.err and f"prompt tokens {recs[0]['usage']['prompt_tokens']}," in cap.err
    assert cli.main(["generate", "--model", str(tmp_path / "no_such_model"), "hi"]) == 1
    err = capsys.readouterr().err
    assert "cannot load" in err and "Traceback" not in err and err.count("\n") == 1


def _run_until_lines(argv, out, count, sig):
    """Start ``python -m fastinfer`` and send it ``sig`` once ``out`` holds ``count`` complete lines."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "fastinfer", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_bytes().count(b"\n") >= count):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, f"not {count} output lines within 60 s"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode()


@needs_llm
def test_e2e_resume_after_kill(tiny, tmp_path, capsys):
    import signal

    n = 20
    src = tmp_path / "p.txt"
    src.write_text("".join(f"prompt number {i}\n" for i in range(n)))
    out = tmp_path / "o.jsonl"
    # One request at a time, so the run is still going when the first line shows up. Seeing that line while
    # the process runs shows each line is flushed as its request finishes.
    argv = ["generate", "--model", str(tiny), "-i", str(src), "-o", str(out), "--max-tokens", "32", "--ignore-eos",
            "--seed", "7", "--max-num-seqs", "1", "--kv-cache-memory-bytes", "4MiB", "--device", "cpu",
            "--threads", "1", "--no-progress"]
    code, err = _run_until_lines(argv, out, 1, signal.SIGTERM)
    assert code == 143, err
    assert "interrupted" in err and "Traceback" not in err
    first = lines(out)
    assert 1 <= len(first) < n, "the run finished before it was stopped; make it longer"
    with open(out, "ab") as f:
        f.write(b'{"id": 99, "prompt": "half a li')  # as if SIGKILLed mid-write
    assert cli.main([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "cut a partial last line (31 bytes)" in err and f"{len(first)} already in the output" in err
    recs = lines(out)
    assert sorted(r["id"] for r in recs) == list(range(n))  # each exactly once
    assert recs[: len(first)] == first
    # --seed: a request's text does not depend on the interruption (checked on requests from both runs)
    k = len(first) + 2
    (tmp_path / "head.txt").write_text("".join(f"prompt number {i}\n" for i in range(k)))
    fresh = tmp_path / "fresh.jsonl"
    argv[argv.index(str(src))], argv[argv.index(str(out))] = str(tmp_path / "head.txt"), str(fresh)
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert {r["id"]: r["text"] for r in lines(fresh)} == {r["id"]: r["text"] for r in recs if r["id"] < k}
