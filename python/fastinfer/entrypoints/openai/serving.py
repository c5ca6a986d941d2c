"""/v1/completions and /v1/chat/completions: a checked request becomes engine requests, their outputs become an
OpenAI response body or a stream of server-sent events."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastinfer.engine.outputs import CompletionOutput, RequestOutput
from fastinfer.engine.sampling_params import SamplingParams

from . import protocol
from .engine_client import EngineClient, RequestAborted, make_add
from .metrics import ServerMetrics


class ApiError(Exception):
    """A request the server answers with an OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


@dataclass(slots=True)
class ServerSettings:
    """What the handlers need to know about the model and the server."""

    model_name: str  # the one served model's name (/v1/models, the responses' "model")
    sampling_defaults: dict  # SamplingParams keyword arguments from generation_config.json
    max_logprobs: int  # the most logprobs a request may ask for
    max_waiting: int | None  # most requests waiting for the engine; more are refused with 429


@dataclass(slots=True)
class _Choice:
    """Streaming state of one choice: how much of its output was already sent."""

    text_len: int = 0
    tokens: int = 0
    text_offset: int = 0  # completions' logprobs text_offset of the next token
    finished: bool = False


@dataclass(slots=True, eq=False)
class _Job:
    """One HTTP request in flight: its engine requests and what the access log and metrics need."""

    id: str
    req: protocol.CompletionRequest
    prompts: list[tuple[str | None, list[int]]]  # (text, token ids) per prompt
    request_ids: list[str]
    queue: asyncio.Queue
    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    finals: dict[str, RequestOutput] = field(default_factory=dict)
    generated: dict[str, int] = field(default_factory=dict)  # output tokens so far per engine request

    @property
    def output_tokens(self) -> int:
        return sum(self.generated.values())


class Serving:
    """The completion handlers over one EngineClient."""

    def __init__(self, client: EngineClient, tokenizer: Any, settings: ServerSettings, metrics: ServerMetrics):
        self.client = client
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = metrics
        self.max_len = client.engine.max_seq_len
        self.draining = False

    # -- requests --------------------------------------------------------------------------------

    def check_model(self, model: Any) -> None:
        if model is not None and model != self.settings.model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model", "model_not_found")

    def parse(self, body: Any, chat: bool) -> protocol.CompletionRequest:
        try:
            req = protocol.parse_completion_body(body, chat, self.settings.sampling_defaults,
                                                 self.settings.max_logprobs, server=True)
        except protocol.ProtocolError as err:
            raise ApiError(400, err.message, param=err.param or _param(err.message)) from None
        self.check_model(body.get("model"))
        return req

    def encode_prompts(self, req: protocol.CompletionRequest) -> list[tuple[str | None, list[int]]]:
        tok = self.tokenizer
        if req.chat:
            if tok is None or not getattr(tok, "chat_template", None):
                raise ApiError(400, "the model has no chat template: use /v1/completions")
            try:
                text = tok.apply_chat_template(req.messages, add_generation_prompt=True)
            except Exception as err:  # a template that refuses the conversation (raise_exception in jinja)
                raise ApiError(400, f"chat template: {protocol.short(str(err))}", param="messages") from None
            return [(text, list(tok.encode(text, add_special_tokens=False)))]
        out = []
        for p in req.prompts:
            if isinstance(p, str):
                if tok is None:
                    raise ApiError(400, "the model has no tokenizer: send token ids", param="prompt")
                out.append((p, list(tok.encode(p))))
            else:
                out.append((None, list(p)))
        return out

    def sampling_params(self, req: protocol.CompletionRequest, ids: list[int]) -> SamplingParams:
        kwargs = dict(req.sampling)
        room = self.max_len - len(ids)
        if kwargs.get("max_tokens") is None:
            kwargs["max_tokens"] = max(room, 1)
        try:
            params = SamplingParams(**kwargs)
        except (ValueError, TypeError) as err:
            raise ApiError(400, str(err), param=_param(str(err))) from None
        if len(ids) + params.max_tokens > self.max_len:
            where = "messages" if req.chat else "prompt"
            raise ApiError(400, f"This model's maximum context length is {self.max_len} tokens. However, you "
                                f"requested {len(ids) + params.max_tokens} tokens ({len(ids)} in the {where}, "
                                f"{params.max_tokens} in the completion). Please reduce the length of the "
                                f"{where} or completion.", param=where, code="context_length_exceeded")
        return params

    async def submit(self, body: Any, chat: bool) -> _Job:
        """Check a body and queue its engine requests; raises ApiError (queueing nothing) for a bad one.
        Parsing, the chat template and tokenization run in a worker thread, so a long prompt or a slow
        template never stalls the event loop that streams every other response."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", "service_unavailable", headers={"Retry-After": "5"})
        job, adds = await asyncio.to_thread(self._prepare, body, chat)
        limit = self.settings.max_waiting
        if limit is not None and self.client.num_waiting + len(adds) > limit:
            raise ApiError(429, f"too many requests waiting ({limit}, --max-waiting); retry later",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        for add in adds:
            job.request_ids.append(add.request_id)
            self.client.add(add, loop, job.queue)
        return job

    def _prepare(self, body: Any, chat: bool) -> tuple[_Job, list]:
        """The job and its checked engine requests (not queued yet)."""
        req = self.parse(body, chat)
        prompts = self.encode_prompts(req)
        prefix = "chatcmpl-" if chat else "cmpl-"
        job = _Job(prefix + uuid.uuid4().hex, req, prompts, [], asyncio.Queue())
        adds = []
        for i, (text, ids) in enumerate(prompts):
            params = self.sampling_params(req, ids)
            rid = f"{job.id}-{i}"
            try:
                _, ids, params, problem = self.client.engine.check_request(rid, ids, params)
            except (ValueError, TypeError) as err:
                raise ApiError(400, str(err), param=_param(str(err))) from None
            if problem is not None:
                raise ApiError(400, problem, param="prompt")
            adds.append(make_add(rid, ids, params, text))
        return job, adds

    # -- outputs ---------------------------------------------------------------------------------

    async def outputs(self, job: _Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) until every engine request of the job finished; aborts the rest if the consumer
        stops early (a disconnect)."""
        index = {rid: i for i, rid in enumerate(job.request_ids)}
        try:
            while len(job.finals) < len(job.request_ids):
                item = await job.queue.get()
                if isinstance(item, RequestAborted):
                    raise item
                if isinstance(item, BaseException):
                    raise ApiError(500, str(item), "internal_error") from None
                now = time.perf_counter()
                n_tokens = sum(len(c.token_ids) for c in item.outputs)
                job.generated[item.request_id] = n_tokens
                if n_tokens:
                    if job.first_token is None:
                        job.first_token = now
                        self.metrics.ttft.labels(self.settings.model_name).observe(now - job.start)
                    elif job.last_token is not None:
                        self.metrics.itl.labels(self.settings.model_name).observe(now - job.last_token)
                    job.last_token = now
                if item.finished:
                    job.finals[item.request_id] = item
                    if item.error is not None:  # a prompt the model cannot run, or a grammar left no token
                        raise ApiError(400, item.error, param=_param(item.error) or "prompt")
                    self.metrics.request_done(self.settings.model_name, len(item.prompt_token_ids),
                                              sum(len(c.token_ids) for c in item.outputs),
                                              item.outputs[0].finish_reason or "stop")
                yield index[item.request_id], item
        finally:
            for rid in job.request_ids:
                if rid not in job.finals:  # a disconnect or shutdown: counted as vLLM counts it, reason "abort"
                    self.client.abort(rid)
                    self.metrics.request_done(self.settings.model_name, len(job.prompts[index[rid]][1]),
                                              job.generated.get(rid, 0), "abort")
            self.metrics.e2e.labels(self.settings.model_name).observe(time.perf_counter() - job.start)

    def usage(self, job: _Job) -> dict:
        prompt = sum(len(ids) for _, ids in job.prompts)
        completion = sum(len(c.token_ids) for out in job.finals.values() for c in out.outputs)
        cached = sum(out.num_cached_tokens for out in job.finals.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def respond(self, job: _Job) -> dict:
        """The whole response body of a non-streaming request."""
        choices: dict[int, dict] = {}
        n = job.req.sampling.get("n") or 1
        prompt_logprobs = None
        async for i, out in self.outputs(job):
            if out.finished:
                for c in out.outputs:
                    state = _Choice()
                    choice = self._choice(job, i, c, state, len(c.token_ids), full=True)
                    if out.prompt_logprobs is not None and not job.req.chat:
                        choice["prompt_logprobs"] = protocol.prompt_logprob_entries(out)
                    choices[i * n + c.index] = choice
                if out.prompt_logprobs is not None and job.req.chat:
                    prompt_logprobs = protocol.prompt_logprob_entries(out)
        body = {"id": job.id, "object": "chat.completion" if job.req.chat else "text_completion",
                "created": int(time.time()), "model": self.settings.model_name,
                "choices": [choices[k] for k in sorted(choices)], "usage": self.usage(job)}
        if prompt_logprobs is not None:  # vLLM's place for them: the chat response, each completion choice
            body["prompt_logprobs"] = prompt_logprobs
        return body

    async def stream(self, job: _Job) -> AsyncIterator[str]:
        """The server-sent events of a streaming request, ``data: [DONE]`` last."""
        chat, n = job.req.chat, job.req.sampling.get("n") or 1
        usage_null = {"usage": None} if job.req.include_usage else {}
        created = int(time.time())
        head = {"id": job.id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": self.settings.model_name}
        states: dict[int, _Choice] = {}
        sent_prompt_logprobs: set[int] = set()  # prompts whose prompt_logprobs a chat chunk carried
        if chat:
            role = [{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None} for k in range(n)]
            yield _sse({**head, "choices": role, **usage_null})
        try:
            async for i, out in self.outputs(job):
                choices = []
                for c in out.outputs:
                    k = i * n + c.index
                    state = states.setdefault(k, _Choice())
                    if state.finished or (len(c.text) == state.text_len and len(c.token_ids) == state.tokens
                                          and c.finish_reason is None):
                        continue
                    first = state.tokens == 0 and state.text_len == 0
                    choices.append(self._choice(job, i, c, state, len(c.token_ids), full=False))
                    if first and out.prompt_logprobs is not None and not chat:
                        choices[-1]["prompt_logprobs"] = protocol.prompt_logprob_entries(out)
                if choices:
                    extra = {}
                    if chat and out.prompt_logprobs is not None and i not in sent_prompt_logprobs:
                        sent_prompt_logprobs.add(i)
                        extra["prompt_logprobs"] = protocol.prompt_logprob_entries(out)
                    yield _sse({**head, "choices": choices, **extra, **usage_null})
        except ApiError as err:
            yield _sse(err.body())
        except RequestAborted as err:
            yield _sse(ApiError(503, str(err), "service_unavailable").body())
        else:
            if job.req.include_usage:
                yield _sse({**head, "choices": [], "usage": self.usage(job)})
        yield "data: [DONE]\n\n"

    def _choice(self, job: _Job, i: int, c: CompletionOutput, state: _Choice, upto: int, full: bool) -> dict:
        """One choice of a response (full) or of a chunk (the part not sent yet); advances ``state``."""
        chat, n = job.req.chat, job.req.sampling.get("n") or 1
        text = c.text[state.text_len:]
        prompt_text = job.prompts[i][0]
        if not chat and job.req.echo and state.text_len == 0 and state.tokens == 0:
            if prompt_text is None:
                prompt_text = self.tokenizer.decode(job.prompts[i][1]) if self.tokenizer is not None else ""
            text = prompt_text + text
            state.text_offset = len(prompt_text)
        logprobs = None
        if c.logprobs is not None:
            new = _entries(c, state.tokens, upto)
            if chat:
                top = job.req.top_logprobs
                logprobs = {"content": [_chat_logprob(e, top) for e in new]}
            else:
                logprobs, state.text_offset = _completion_logprobs(new, state.text_offset,
                                                                   job.req.sampling.get("logprobs") or 0)
        state.text_len, state.tokens = len(c.text), upto
        finish = c.finish_reason
        if finish is not None:
            state.finished = True
        choice: dict[str, Any] = {"index": i * n + c.index}
        if chat and full:
            choice["message"] = {"role": "assistant", "content": text}
        elif chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish
        if finish is not None:
            choice["stop_reason"] = c.stop_reason
        return choice


def _param(message: str) -> str | None:
    """The request field an error message names first (protocol's and SamplingParams' messages start with it)."""
    m = re.match(r"(?:unsupported body field |bad sampling setting: )?'?([a-z_]+)", message)
    known = m and (m.group(1) in protocol.SAMPLING_FIELDS or m.group(1) in protocol.REQUEST_FIELDS)
    return m.group(1) if m and (known or "'" in message[:40]) else None


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


def _entries(c: CompletionOutput, start: int, end: int) -> list[tuple[str, float | None, list]]:
    """(token text, its logprob, [(candidate text, logprob)] by rank) for output tokens [start, end)."""
    out = []
    for token_id, cands in zip(c.token_ids[start:end], c.logprobs[start:end]):
        chosen = cands.get(token_id)
        top = sorted(cands.values(), key=lambda lp: lp.rank)
        out.append((chosen.decoded_token or "" if chosen else "", protocol.finite(chosen.logprob) if chosen else None,
                    [(lp.rank, lp.decoded_token or "", protocol.finite(lp.logprob)) for lp in top]))
    return out


def _chat_logprob(entry: tuple, top: int) -> dict:
    token, logprob, cands = entry
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                             for rank, t, lp in cands if rank <= top]}


def _completion_logprobs(entries: list[tuple], offset: int, top: int) -> tuple[dict, int]:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token, logprob, cands in entries:
        tokens.append(token)
        token_logprobs.append(logprob)
        d = {t: lp for rank, t, lp in cands if rank <= top}
        d.setdefault(token, logprob)
        tops.append(d)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}, offset
