"""Reading a batch file for ``fastinfer generate``: its format, its requests and its bad lines.

Three input formats, told apart by the first non-blank line (``detect_format``):

- ``text``: one prompt per line; a request's id is its 0-based line index.
- ``jsonl``: ``{"prompt": ...}`` or ``{"messages": [...]}`` per line, optional ``"id"`` or ``"custom_id"``
  and per-line sampling settings under SamplingParams' names (``max_tokens``, ``temperature``, ``logit_bias``,
  ``structured_outputs``, ...) or OpenAI's ``response_format``.
- ``openai``: the OpenAI Batch API input (``custom_id``, ``method``, ``url``, ``body``), read with
  entrypoints/openai/protocol.py, which also holds the sampling-field rules every format shares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from fastinfer.entrypoints.openai import protocol
from fastinfer.entrypoints.openai.protocol import ProtocolError, loads, short

from .messages import CliError, say

FORMATS = ("text", "jsonl", "openai")
# Default cap on logprobs / top_logprobs per token (vLLM's max_logprobs default); --max-logprobs changes it.
MAX_LOGPROBS = 20

class BadLine(ValueError):
    """An input line that cannot become a request; ``line`` is 1-based, ``id`` the request id when known."""

    def __init__(self, line: int, message: str, id: Any = None) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message
        self.id = id


@dataclass(slots=True)
class Request:
    """One input line made ready for the engine."""

    id: Any  # custom_id / "id" / 0-based line index; unique in the input
    line: int  # 1-based line number, for messages
    kind: str  # "text" (plain prompt, chat template optional), "messages", "completion" (raw prompt)
    prompt: str | list[int] | None  # the prompt as given (token ids allowed), None for messages
    messages: list[dict] | None  # the conversation, for kind "messages"
    params: dict = field(default_factory=dict)  # SamplingParams keyword arguments (CLI defaults + line overrides)
    sampling: Any = None  # the SamplingParams built from params
    model: str | None = None  # the OpenAI body's "model", echoed in its response


def id_key(value: Any) -> str:
    """A hashable key that keeps 3 and "3" apart (ids come from JSON)."""
    return json.dumps(value, sort_keys=True)


def split_lines(data: bytes) -> list[bytes]:
    """Lines without their terminators (``\\n`` or ``\\r\\n``) or a UTF-8 byte order mark; a final newline adds
    no empty line."""
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]


def detect_format(lines: list[bytes]) -> str:
    """``text`` unless the first non-blank line starts with ``{``; then ``openai`` when the first line that
    parses as a JSON object has ``custom_id`` and ``body``, else ``jsonl``."""
    first = next((ln.strip() for ln in lines if ln.strip()), b"")
    if not first.startswith(b"{"):
        return "text"
    for ln in lines:
        try:
            obj = loads(ln)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return "openai" if "custom_id" in obj and "body" in obj else "jsonl"
    return "jsonl"


def parse_input(
    data: bytes, fmt: str, defaults: dict, make_params: Callable[..., Any], max_logprobs: int = MAX_LOGPROBS
) -> tuple[list[Request], list[BadLine]]:
    """Requests and bad lines of an input file in format ``fmt`` (one of FORMATS).

    ``defaults`` are the SamplingParams keyword arguments from the command line; a line's own settings
    override them. ``make_params(**kwargs)`` builds the SamplingParams (its ValueError makes a bad line), so
    every sampling setting is checked here, before a model is loaded. A line asking for more than
    ``max_logprobs`` logprobs is a bad line. Blank lines are skipped (they still count for line numbers and
    text ids). Duplicate ids are bad lines.
    """
    requests: list[Request] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(split_lines(data)):
        line = index + 1
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            if fmt == "text":
                req = Request(index, line, "text", text, None, dict(defaults))
            elif fmt == "jsonl":
                req = _parse_jsonl(text, index, defaults, max_logprobs)
            else:
                req = _parse_openai(text, index, defaults, max_logprobs)
            key = id_key(req.id)
            if key in seen:
                raise BadLine(line, f"duplicate id {short(req.id)} (first on line {seen[key]})")
            seen[key] = line
            try:
                req.sampling = make_params(**req.params)
            except (ValueError, TypeError) as err:
                raise BadLine(line, f"bad sampling setting: {err}", req.id) from None
            requests.append(req)
        except UnicodeDecodeError:
            bad.append(BadLine(line, "not UTF-8 text"))
        except BadLine as err:
            # A bad line's id is taken too: an OpenAI batch records it as an error line under that id.
            if err.id is not None:
                if id_key(err.id) in seen and seen[id_key(err.id)] != line:
                    err.id = None
                else:
                    seen[id_key(err.id)] = line
            bad.append(err)
    return requests, bad



def _json_object(text: str, line: int) -> dict:
    try:
        obj = loads(text)
    except ValueError as err:
        raise BadLine(line, f"invalid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise BadLine(line, f"expected a JSON object, got {type(obj).__name__}")
    return obj



def _parse_jsonl(text: str, index: int, defaults: dict, max_logprobs: int) -> Request:
    line = index + 1
    obj = _json_object(text, line)
    rid = obj.get("custom_id", obj.get("id", index))
    if "custom_id" in obj and "id" in obj:
        raise BadLine(line, 'give "id" or "custom_id", not both', rid)
    if rid is None or isinstance(rid, (dict, list, float, bool)):
        raise BadLine(line, "id must be a string or an integer")
    params = dict(defaults)
    try:
        for name, value in obj.items():
            if name in ("id", "custom_id", "prompt", "messages"):
                continue
            if name not in protocol.SAMPLING_FIELDS and name not in protocol.REQUEST_FIELDS:
                raise ProtocolError(f"unknown field {short(name)}")
            protocol.set_request_field(params, name, value)
        for name in ("logprobs", "prompt_logprobs"):
            protocol.check_logprobs(obj.get(name), name, max_logprobs)
        if ("prompt" in obj) == ("messages" in obj):
            raise ProtocolError('needs exactly one of "prompt" and "messages"')
        if "messages" in obj:
            return Request(rid, line, "messages", None, protocol.parse_messages(obj["messages"]), params)
        return Request(rid, line, "text", protocol.parse_prompt(obj["prompt"]), None, params)
    except ProtocolError as err:
        raise BadLine(line, err.message, rid) from None


def _parse_openai(text: str, index: int, defaults: dict, max_logprobs: int) -> Request:
    line = index + 1
    obj = _json_object(text, line)
    try:
        batch = protocol.parse_batch_line(obj, defaults, max_logprobs)
    except ProtocolError as err:
        raise BadLine(line, err.message, err.id) from None
    req = batch.body
    return Request(batch.custom_id, line, "messages" if req.chat else "completion", req.prompt, req.messages,
                   req.sampling, model=req.model)


def report_bad_lines(bad: list[BadLine], on_bad_line: str) -> None:
    """Say each bad line on stderr; with ``--on-bad-line fail`` any of them stops the run (exit 2) before
    anything is generated."""
    for b in bad:
        say(f"{'bad' if on_bad_line == 'fail' else 'skipping'} line {b.line}: {b.message}")
    if bad and on_bad_line == "fail":
        raise CliError(f"{len(bad)} bad input line(s); nothing generated (--on-bad-line fail)", 2)


def record_bad_lines(out: Any, fmt: str, bad: list[BadLine], done: set[str]) -> None:
    """An OpenAI batch records its bad lines as error lines in ``out`` (those with a custom_id to match them by,
    and not already there)."""
    if fmt != "openai":
        return
    for b in bad:
        if b.id is not None and id_key(b.id) not in done:
            out.write(protocol.batch_error(b.id, "invalid_request", b.message))
