"""Incremental detokenization and stop conditions through LLMEngine (byte-level tokenizer, scripted model)."""

from __future__ import annotations

import torch

from fastinfer.engine import CacheConfig, LLMEngine, SamplingParams, SchedulerConfig
from fastinfer.engine.detokenizer import Detokenizer
from test_engine_fakes import ByteTokenizer

TOK = ByteTokenizer()
EOS = TOK.eos_token_ids[0]

CACHE = CacheConfig(block_size=4, num_blocks=64)


class ScriptRunner:
    """A model that emits a fixed token script per request (one-hot logits), then EOS."""

    def __init__(self, scripts: dict[str, list[int]], num_blocks: int = 64, block_size: int = 4) -> None:
        self.scripts, self.num_blocks, self.block_size = scripts, num_blocks, block_size

    def execute(self, sched) -> torch.Tensor:
        rows = []
        for c in sched.sampled:
            script = self.scripts[c.seq.request_id]
            k = c.seq.num_output_tokens
            row = torch.zeros(TOK.vocab_size)
            row[script[k] if k < len(script) else EOS] = 10.0
            rows.append(row)
        return torch.stack(rows) if rows else torch.empty(0, TOK.vocab_size)


def generate(script: list[int] | str, prompt: str = "Hi", collect: list | None = None, **kwargs):
    """Run one request whose model output is `script`; return its final CompletionOutput."""
    ids = TOK.encode(script) if isinstance(script, str) else script
    kwargs.setdefault("max_tokens", 64)
    engine = LLMEngine(ScriptRunner({"r": ids}), TOK, SchedulerConfig(), CACHE, seed=0)
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, **kwargs))
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            if collect is not None:
                collect.append(out.outputs[0].text)
            final = out
    assert final.finished
    return final.outputs[0]


def test_incremental_decode_never_splits_characters():
    text = "héllo wörld — 你好 🙂!"
    ids = TOK.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    detok = Detokenizer(TOK)
    prompt = TOK.encode("Q: ")
    all_ids = list(prompt)
    state = detok.new_state(len(prompt), [])
    seen = []
    for t in ids:
        all_ids.append(t)
        detok.update(state, all_ids, True, [], False)
        assert "\ufffd" not in state.output_text
        seen.append(state.output_text)
    assert state.output_text == text
    assert seen[ids.index(TOK.encode("é")[0])] == "h"  # the first byte of é alone adds nothing yet


def test_stop_string_across_token_boundaries():
    out = generate("hello world. Bye", stop=["o w"])
    assert (out.text, out.finish_reason, out.stop_reason) == ("hell", "stop", "o w")
    assert out.token_ids == TOK.encode("hello w")  # generation stopped at the token completing the stop string
    out = generate("hello world. Bye", stop=["o w"], include_stop_str_in_output=True)
    assert out.text == "hello w"


def test_earliest_of_several_stop_strings_and_multibyte_stop():
    out = generate("abcdef", stop=["def", "cd"])
    assert (out.text, out.stop_reason) == ("ab", "cd")
    out = generate("price: 5€ only", stop=["€"])
    assert (out.text, out.stop_reason) == ("price: 5", "€")


def test_stop_token_ids_and_eos():
    b = TOK.encode("b")[0]
    out = generate("abc", stop_token_ids=[b])
    assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == (TOK.encode("ab"), "a", "stop", b)
    assert generate("abc", stop_token_ids=[b], include_stop_str_in_output=True).text == "ab"
    script = TOK.encode("ab") + [EOS] + TOK.encode("cd")
    out = generate(script)
    assert (out.text, out.finish_reason, out.stop_reason, out.token_ids) == ("ab", "stop", None, script[:3])


def test_ignore_eos_max_tokens_and_special_tokens():
    script = TOK.encode("ab") + [EOS] + TOK.encode("cd")
    out = generate(script, ignore_eos=True, max_tokens=5)
    assert (out.text, out.finish_reason, out.token_ids) == ("abcd", "length", script)
    out = generate(script, ignore_eos=True, max_tokens=5, skip_special_tokens=False)
    assert out.text == "ab<eos>cd"


def test_min_tokens_masks_eos_and_delays_stop_strings():
    out = generate([EOS, EOS, EOS, 5], min_tokens=2)
    assert len(out.token_ids) == 3 and out.token_ids[-1] == EOS and EOS not in out.token_ids[:2]
    assert generate([EOS, 5]).token_ids == [EOS]
    out = generate("aaaab", stop=["a"], min_tokens=2)
    assert (out.text, out.stop_reason, len(out.token_ids)) == ("aa", "a", 3)


def test_running_text_holds_back_a_possible_stop_string():
    texts: list[str] = []
    out = generate("one two STOP three", stop=["STOP"], collect=texts)
    assert out.text == "one two "
    for t in texts[:-1]:
        assert "S" not in t and "one two "[: len(t)] == t  # never shows a partial stop string
    texts = []
    generate("abc", collect=texts)
    assert texts == ["a", "ab", "abc", "abc"]  # no stop strings: every step shows all text (last step: EOS)


def test_logprobs_carry_decoded_tokens_and_cumulative_logprob():
    out = generate("xy", logprobs=2)
    assert len(out.logprobs) == 3  # x, y, EOS
    first = out.logprobs[0][TOK.encode("x")[0]]
    assert first.rank == 1 and first.decoded_token == "x"
    assert abs(out.cumulative_logprob - sum(d[t].logprob for d, t in zip(out.logprobs, out.token_ids))) < 1e-6
    assert generate("xy").cumulative_logprob is None and generate("xy").logprobs is None


def test_text_prompt_is_encoded():
    engine = LLMEngine(ScriptRunner({"r": TOK.encode("ok")}), TOK, SchedulerConfig(), CACHE)
    engine.add_request("r", "héllo", SamplingParams(temperature=0.0))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].prompt == "héllo" and outs[-1].prompt_token_ids == TOK.encode("héllo")
    assert outs[-1].outputs[0].text == "ok"
