"""Running a batch for ``fastinfer generate``: each request's prompt built, ``LLM.stream`` driven, each result written
as its request finishes (JSONL records for text/jsonl input, Batch API lines for openai input), and the counts for
the summary.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastinfer.entrypoints.openai import protocol

from .batch_input import Request
from .batch_output import Output

if TYPE_CHECKING:  # importing the engine imports torch; `fastinfer --help` should not wait for that
    from fastinfer.engine.outputs import RequestOutput


def engine_prompt(req: Request, tokenizer: Any, chat: bool, system: str | None, vocab_size: int | None) -> dict:
    """``{"prompt", "prompt_token_ids"}`` for LLM.stream. The chat template and the tokenizer run here, one
    request at a time, so a request they reject (or an empty prompt, or token ids out of range) fails alone
    with ValueError instead of failing the whole batch inside LLM.stream.

    ``chat``: put plain ("text" kind) prompts through the chat template, after ``system`` when given."""
    if tokenizer is None and not isinstance(req.prompt, list):
        raise ValueError("the model has no tokenizer (tokenizer.json); give the prompt as token ids")
    if vocab_size is not None and req.sampling is not None:
        req.sampling.check_vocab(vocab_size)  # logit_bias / allowed_token_ids / stop_token_ids: this line fails alone
    if isinstance(req.prompt, list):
        if vocab_size is not None and not all(0 <= t < vocab_size for t in req.prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        return {"prompt_token_ids": req.prompt}
    messages = req.messages
    if messages is None and req.kind == "text" and chat:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": req.prompt})
    try:
        if messages is not None:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)  # the template holds its special tokens
        else:
            text = req.prompt
            ids = tokenizer.encode(text)
    except Exception as err:  # a chat template may raise anything (jinja2's raise_exception included)
        raise ValueError(f"cannot build the prompt: {err}") from None
    if not ids:
        raise ValueError("the prompt has no tokens")
    return {"prompt": text, "prompt_token_ids": list(ids)}



def jsonl_error(req: Request, message: str) -> dict:
    """The output line of a text/JSONL request that failed."""
    rec: dict[str, Any] = {"id": req.id}
    if req.messages is not None:
        rec["messages"] = req.messages
    else:
        rec["prompt"] = req.prompt
    rec["error"] = message
    return rec


def jsonl_record(req: Request, out: RequestOutput) -> dict:
    """The output line of a text/JSONL request."""
    rec = jsonl_error(req, out.error or "")
    if out.error is not None:
        return rec
    del rec["error"]
    want_logprobs = req.sampling is not None and getattr(req.sampling, "logprobs", None) is not None

    def one(c: Any) -> dict:
        d: dict[str, Any] = {"text": c.text, "finish_reason": c.finish_reason}
        if c.stop_reason is not None:
            d["stop_reason"] = c.stop_reason
        if want_logprobs:
            d["cumulative_logprob"] = protocol.finite(c.cumulative_logprob)
            d["logprobs"] = protocol.logprob_entries(c)
        return d

    if len(out.outputs) == 1:
        rec.update(one(out.outputs[0]))
    else:
        rec["outputs"] = [{"index": c.index, **one(c)} for c in out.outputs]
    if out.prompt_logprobs is not None:
        rec["prompt_logprobs"] = protocol.prompt_logprob_entries(out)
    rec["usage"] = protocol.usage(out)
    return rec



def record(fmt: str, req: Request, out: RequestOutput, model_name: str) -> dict:
    """The output line of a finished request in the output format of input format ``fmt``."""
    if fmt == "openai":
        return protocol.batch_output(req.id, out, req.kind == "messages", req.model or model_name)
    return jsonl_record(req, out)


def error_record(fmt: str, req: Request, message: str) -> dict:
    """The output line of a request that failed before it ran, in the output format of input format ``fmt``."""
    if fmt == "openai":
        return protocol.batch_error(req.id, "invalid_request", message)
    return jsonl_error(req, message)


@dataclass(slots=True)
class Stats:
    """Counts for the summary a run prints on stderr."""

    requests: int = 0  # finished this run (rejected ones included)
    failed: int = 0  # rejected by the engine
    bad_lines: int = 0
    resumed: int = 0  # already in the output
    prompt_tokens: int = 0
    output_tokens: int = 0
    load_s: float = 0.0
    generate_s: float = 0.0

    def summary(self, counts: bool = True) -> str:
        """Token counts and rates (none when nothing was generated), after a line of request counts unless not
        ``counts`` (one prompt)."""
        ran = self.generate_s > 0
        tokens = f"prompt tokens {self.prompt_tokens}, output tokens {self.output_tokens}"
        if ran:
            tokens += (f", wall {self.generate_s:.2f} s (+ {self.load_s:.2f} s model load), "
                       f"{self.output_tokens / self.generate_s:.1f} output tok/s")
        if not counts:
            return tokens
        return (f"{self.requests} requests done ({self.failed} failed), {self.bad_lines} bad lines skipped, "
                f"{self.resumed} already in the output\n  {tokens}"
                + (f", {self.requests / self.generate_s:.2f} req/s" if ran else ", nothing generated"))


class RequestFailed(RuntimeError):
    """The engine rejected a request that has no output line to record it in."""


# Seconds between the plain progress lines written when stderr is not a terminal (a log file).
LOG_EVERY_S = 30.0


def run_batch(llm: Any, fmt: str, pending: list[Request], prompts: list[dict], out: Output, stats: Stats, *,
              model_name: str, progress: bool) -> None:
    """Stream every pending request through ``llm.stream``, writing each one's line as soon as it finishes.
    Unless not ``progress``: a tqdm bar on a terminal stderr counts requests and the output tokens/s; into a
    file or pipe, a plain line every LOG_EVERY_S seconds says the same (no carriage-return redraws in logs)."""
    from tqdm import tqdm

    seen_tokens = [0] * len(pending)  # output tokens of each request counted so far (for the live rate)
    live_tokens = 0
    t0 = time.perf_counter()
    last_postfix = last_log = t0
    log_lines = progress and not _is_tty(sys.stderr)
    bar = tqdm(total=len(pending), unit="req", file=sys.stderr, disable=not progress or log_lines,
               dynamic_ncols=True)
    try:
        ids = [str(i) for i in range(len(pending))]
        for ro in llm.stream(prompts, [r.sampling for r in pending], request_ids=ids):
            i = int(ro.request_id)
            tokens = sum(len(c.token_ids) for c in ro.outputs)
            live_tokens += tokens - seen_tokens[i]
            seen_tokens[i] = tokens
            if ro.finished:
                req = pending[i]
                out.write(record(fmt, req, ro, model_name))
                stats.requests += 1
                stats.failed += ro.error is not None
                stats.prompt_tokens += len(ro.prompt_token_ids) if ro.error is None else 0
                stats.output_tokens += tokens
                bar.update(1)
            now = time.perf_counter()
            if log_lines and now - last_log >= LOG_EVERY_S:
                print(f"fastinfer: {stats.requests}/{len(pending)} requests, "
                      f"{live_tokens / max(now - t0, 1e-9):.1f} output tok/s", file=sys.stderr, flush=True)
                last_log = now
            elif progress and now - last_postfix > 0.5:
                bar.set_postfix_str(f"{live_tokens / max(now - t0, 1e-9):.1f} tok/s", refresh=False)
                last_postfix = now
    finally:
        stats.generate_s = time.perf_counter() - t0
        bar.close()


def _is_tty(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def print_stream(llm: Any, prompt: dict, req: Request, stats: Stats, out: Output) -> None:
    """One prompt: its text goes to ``out`` (stdout) as it grows (n = 1) or each completion at the end (n > 1).
    Raises RequestFailed when the engine rejects it."""
    printed = ""
    final = None
    t0 = time.perf_counter()
    for ro in llm.stream([prompt], [req.sampling], request_ids=["0"]):
        if len(ro.outputs) == 1 and ro.error is None:
            text = ro.outputs[0].text
            if text.startswith(printed) and len(text) > len(printed):
                out.write_text(text[len(printed):])
                printed = text
        if ro.finished:
            final = ro
    stats.generate_s = time.perf_counter() - t0
    if final is None:
        raise RequestFailed("the engine finished without a result")
    if final.error is not None:
        raise RequestFailed(f"request rejected: {final.error}")
    if len(final.outputs) > 1:
        for c in final.outputs:
            out.write_text(f"{'' if c.index == 0 else chr(10)}--- completion {c.index} ---\n{c.text}")
        printed = final.outputs[-1].text
    if not printed.endswith("\n"):
        out.write_text("\n")
    stats.requests = 1
    stats.prompt_tokens = len(final.prompt_token_ids)
    stats.output_tokens = sum(len(c.token_ids) for c in final.outputs)
