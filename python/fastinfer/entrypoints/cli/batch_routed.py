"""``fastinfer generate --config router.yaml``: a batch file through the router (fastinfer/router/) instead of one
model. Each line goes to the model group its ``model`` names (OpenAI Batch lines: ``body.model``), else to
--model's group; a line naming neither, or an unknown group, is a bad line naming it. Requests run concurrently
(--concurrency), each line written as soon as its request ends, so --resume works as for one model."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastinfer.entrypoints.openai import protocol

from . import batch_input, shard
from .batch_input import BadLine
from .batch_output import Output
from .batch_run import Stats
from .messages import CliError, package_version, say

# Command-line sampling flags sent as OpenAI body fields (a line's own fields win).
_FLAG_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "repetition_penalty",
                "presence_penalty", "frequency_penalty", "ignore_eos")
_CHAT_URL, _COMPLETION_URL = "/v1/chat/completions", "/v1/completions"


@dataclass(slots=True)
class RoutedLine:
    """One input line made ready for the router."""

    id: Any  # custom_id / "id" / 0-based line index
    line: int  # 1-based
    chat: bool  # /v1/chat/completions (else /v1/completions)
    body: dict  # the OpenAI body, "model" = its group
    echo: dict  # what a JSONL output line repeats: {"prompt": ...} or {"messages": [...]}


def _flag_defaults(args: argparse.Namespace) -> dict:
    out = {name: getattr(args, name) for name in _FLAG_FIELDS if getattr(args, name, None) is not None}
    if args.logprobs is not None:
        out["logprobs"] = args.logprobs
    return out


def _body(fields: dict, defaults: dict, chat: bool, group: str) -> dict:
    body = {**defaults, **fields, "model": group}
    if chat and isinstance(body.get("logprobs"), int) and not isinstance(body.get("logprobs"), bool):
        body["top_logprobs"] = body.pop("logprobs")  # chat spells top-K logprobs this way
        body["logprobs"] = True
    return body


def parse_routed(data: bytes, fmt: str, args: argparse.Namespace, groups: set[str]) -> tuple[list[RoutedLine],
                                                                                            list[BadLine]]:
    """The lines of an input file in ``fmt`` for the router, and its bad lines (unknown group, no group, bad
    JSON, duplicate id). Sampling fields are passed on as they are: the deployment that answers checks them."""
    defaults = _flag_defaults(args)
    chat_plain = args.chat is not False  # plain prompts go through the chat endpoint unless --no-chat
    lines, bad, seen = [], [], {}
    for index, raw in enumerate(batch_input.split_lines(data)):
        number = index + 1
        if not raw.strip():
            continue
        rid: Any = None
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BadLine(number, "not UTF-8 text") from None
            if fmt == "text":
                rid, fields, chat = index, _plain(text, args.system, chat_plain), chat_plain
                echo = {"prompt": text}
            else:
                obj = protocol.loads(text)
                if not isinstance(obj, dict):
                    raise BadLine(number, "expected a JSON object")
                rid, fields, chat, echo = (_openai_line if fmt == "openai" else _jsonl_line)(obj, number, args,
                                                                                               chat_plain)
            key = batch_input.id_key(rid)
            if key in seen:
                raise BadLine(number, f"duplicate id {protocol.short(rid)} (first on line {seen[key]})")
            seen[key] = number
            group = fields.get("model") if fields.get("model") is not None else args.model
            if group is None:
                raise BadLine(number, "no model group: give the line a \"model\" (OpenAI lines: body.model) or "
                                      "--model", rid)
            if not isinstance(group, str) or group not in groups:
                raise BadLine(number, f"model {protocol.short(group)} is not a model group of the config "
                                      f"(groups: {', '.join(sorted(groups))})", rid)
            lines.append(RoutedLine(rid, number, chat, _body(fields, defaults, chat, group), echo))
        except BadLine as err:
            err.id = err.id if err.id is not None else rid
            bad.append(err)
        except ValueError as err:  # JSON
            bad.append(BadLine(number, f"invalid JSON: {err}", rid))
    return lines, bad


def _plain(text: str, system: str | None, chat: bool) -> dict:
    if not chat:
        return {"prompt": text}
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": text}]}


def _openai_line(obj: dict, number: int, args: argparse.Namespace, chat_plain: bool) -> tuple:
    rid = obj.get("custom_id")
    if not isinstance(rid, str) or not rid:
        raise BadLine(number, "custom_id must be a non-empty string")
    if obj.get("method", "POST") != "POST":
        raise BadLine(number, f"method must be POST, got {protocol.short(obj.get('method'))}", rid)
    url = obj.get("url")
    if url not in (_CHAT_URL, _COMPLETION_URL):
        raise BadLine(number, f"url must be {_CHAT_URL} or {_COMPLETION_URL}, got {protocol.short(url)}", rid)
    body = obj.get("body")
    if not isinstance(body, dict):
        raise BadLine(number, "body must be a JSON object", rid)
    if body.get("stream"):
        raise BadLine(number, "body.stream: a batch line cannot stream", rid)
    return rid, dict(body), url == _CHAT_URL, {}


def _jsonl_line(obj: dict, number: int, args: argparse.Namespace, chat_plain: bool) -> tuple:
    if "custom_id" in obj and "id" in obj:
        raise BadLine(number, 'give "id" or "custom_id", not both')
    rid = obj.get("custom_id", obj.get("id", number - 1))
    if rid is None or isinstance(rid, (dict, list, float, bool)):
        raise BadLine(number, "id must be a string or an integer")
    if ("prompt" in obj) == ("messages" in obj):
        raise BadLine(number, 'needs exactly one of "prompt" and "messages"', rid)
    fields = {k: v for k, v in obj.items() if k not in ("id", "custom_id")}
    if fields.get("stream"):
        raise BadLine(number, "stream: a batch line cannot stream", rid)
    if "messages" in fields:
        return rid, fields, True, {"messages": fields["messages"]}
    prompt = fields.pop("prompt")
    if chat_plain and isinstance(prompt, str):
        fields.update(_plain(prompt, args.system, True))
        return rid, fields, True, {"prompt": prompt}
    return rid, {**fields, "prompt": prompt}, False, {"prompt": prompt}


# ----------------------------------------------------------------------------------------------- output lines


def _hex() -> str:
    return uuid.uuid4().hex


def ok_record(fmt: str, line: RoutedLine, answer: Any) -> dict:
    if fmt == "openai":
        return {"id": "batch_req_" + _hex(), "custom_id": line.id,
                "response": {"status_code": 200, "request_id": _hex(), "body": answer.body}, "error": None}
    body = answer.body
    rec: dict[str, Any] = {"id": line.id, "model": answer.group, **line.echo}
    choices = body.get("choices") or []

    def text(c: dict) -> str:
        return (c.get("message") or {}).get("content") or "" if line.chat else c.get("text") or ""

    def one(c: dict) -> dict:
        d = {"text": text(c), "finish_reason": c.get("finish_reason")}
        if c.get("logprobs") is not None:
            d["logprobs"] = c["logprobs"]
        return d

    if len(choices) == 1:
        rec.update(one(choices[0]))
    else:
        rec["outputs"] = [{"index": c.get("index", i), **one(c)} for i, c in enumerate(choices)]
    rec["usage"] = body.get("usage")
    rec["deployment"] = answer.deployment
    return rec


def error_record(fmt: str, line: RoutedLine, status: int, body: dict, message: str) -> dict:
    if fmt == "openai":
        return {"id": "batch_req_" + _hex(), "custom_id": line.id,
                "response": {"status_code": status, "request_id": _hex(), "body": body},
                "error": {"code": str(status), "message": message}}
    return {"id": line.id, **line.echo, "error": message, "status_code": status}


# ----------------------------------------------------------------------------------------------- running


async def _run_all(router: Any, fmt: str, lines: list[RoutedLine], out: Output, stats: Stats,
                   concurrency: int, progress: bool) -> None:
    from fastinfer.router.backend import UpstreamError

    queue = list(reversed(lines))
    t0 = last_log = time.perf_counter()

    async def worker() -> None:
        nonlocal last_log
        while queue:
            line = queue.pop()
            try:
                answer = await router.complete(line.body, line.chat)
                record = ok_record(fmt, line, answer)
                usage = answer.body.get("usage") or {}
                stats.prompt_tokens += usage.get("prompt_tokens") or 0
                stats.output_tokens += usage.get("completion_tokens") or 0
            except UpstreamError as err:
                say(f"line {line.line}: {err.status}: {protocol.short(err.message)}")
                record = error_record(fmt, line, err.status, err.body, err.message)
                stats.failed += 1
            out.write(record)
            stats.requests += 1
            now = time.perf_counter()
            if progress and now - last_log >= 10.0:
                say(f"{stats.requests}/{len(lines)} requests ({stats.failed} failed), "
                    f"{stats.requests / (now - t0):.1f} req/s")
                last_log = now

    try:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(lines)) or 1)))
    finally:
        await router.aclose()


def run_routed(args: argparse.Namespace, read_input: Any, open_output: Any, resume: Any) -> int:
    """Run ``fastinfer generate --config``: read and check every line, skip those already in the output (--resume),
    route the rest. ``read_input()`` gives the input bytes, ``open_output()`` the locked Output, ``resume(out, fmt)``
    the ids done (generate.py's own steps, shared with the one-model run)."""
    from fastinfer.router.config import ConfigError, load_config
    from fastinfer.router.router import Router

    try:
        config = load_config(args.config)
    except ConfigError as err:
        raise CliError(str(err), 2) from None
    stats = Stats()
    if args.prompt is not None:
        data, fmt = json.dumps({"id": 0, "prompt": args.prompt}).encode(), "jsonl"
    else:
        data = read_input()
        fmt = args.input_format or batch_input.detect_format(batch_input.split_lines(data))
    lines, bad = parse_routed(data, fmt, args, set(config.groups))
    lines, bad = shard.select(args.shard, lines, bad, args.on_bad_line)
    stats.bad_lines = len(bad)
    batch_input.report_bad_lines(bad, args.on_bad_line)
    out = open_output(args)
    try:
        done = resume(args, out, fmt) if args.resume else set()
        pending = [ln for ln in lines if batch_input.id_key(ln.id) not in done]
        stats.resumed = len(lines) - len(pending)
        batch_input.record_bad_lines(out, fmt, bad, done)
        if pending:
            router = Router(config, user_agent=f"fastinfer/{package_version()}")
            t0 = time.perf_counter()
            try:
                asyncio.run(_run_all(router, fmt, pending, out, stats, args.concurrency, not args.no_progress))
            finally:
                stats.generate_s = time.perf_counter() - t0
    finally:
        out.close()
    say(stats.summary())
    return 0
