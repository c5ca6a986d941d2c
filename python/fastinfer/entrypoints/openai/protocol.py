"""The OpenAI API as fastinfer understands it: request and response shapes of the Batch API, /v1/completions and
/v1/chat/completions, and the one mapping from request fields to SamplingParams.

The batch-file reader (entrypoints/cli) uses it now; an OpenAI-compatible server is meant to use the same functions.
Request fields are SamplingParams' own dataclass fields, each taking the JSON types of its annotation
(SAMPLING_FIELDS, derived, not listed; logit_bias and structured_outputs take JSON objects); OPENAI_ALIASES maps
OpenAI's other names onto them, and REQUEST_FIELDS are OpenAI fields that set one (response_format sets
structured_outputs). A request that cannot be served raises ProtocolError: one message naming the field, and the
request's id when it is known.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
import time
import typing
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastinfer.engine.sampling_params import SamplingParams
from fastinfer.engine.structured_outputs import StructuredOutputsParams

if TYPE_CHECKING:
    from fastinfer.engine.outputs import CompletionOutput, RequestOutput

# Deepest JSON nesting a request (or output) line may have. Deeper lines are refused: nesting that deep would
# exhaust Python's recursion limit in json, repr or the chat template instead (no request needs more than ~10).
MAX_JSON_DEPTH = 64

_JSON_TYPES: dict[Any, tuple[type, ...]] = {int: (int,), float: (int, float), bool: (bool,), str: (str,),
                                             type(None): (type(None),)}
_UNIONS = (typing.Union, type(int | None))


def _field_types(annotation: Any) -> tuple[tuple[type, ...], type | None]:
    """(the JSON types a field's annotation accepts, the item type of its list form or None)."""
    types: list[type] = []
    item = None
    for t in typing.get_args(annotation) if typing.get_origin(annotation) in _UNIONS else (annotation,):
        if typing.get_origin(t) is list:
            types.append(list)
            (item,) = typing.get_args(t)
        elif typing.get_origin(t) is dict or t is StructuredOutputsParams:  # logit_bias, structured_outputs
            types.append(dict)
        else:
            types.extend(_JSON_TYPES[t])
    return tuple(dict.fromkeys(types)), item


_HINTS = typing.get_type_hints(SamplingParams, {"StructuredOutputsParams": StructuredOutputsParams})
# Every SamplingParams field, by name: the JSON types a request may give it (JSON true/false only for bool fields).
SAMPLING_FIELDS: dict[str, tuple[type, ...]] = {f.name: _field_types(_HINTS[f.name])[0]
                                                for f in dataclasses.fields(SamplingParams)}
# Item type of the fields that take a list (stop: str, stop_token_ids: int).
_LIST_ITEMS: dict[str, type] = {name: item for name in SAMPLING_FIELDS
                                if (item := _field_types(_HINTS[name])[1]) is not None}
# OpenAI body fields under another name than SamplingParams'. (A chat body's logprobs (bool) and top_logprobs (int)
# become SamplingParams.logprobs together: parse_completion_body.)
OPENAI_ALIASES = {"max_completion_tokens": "max_tokens"}
# OpenAI body fields accepted and ignored (they change nothing in an offline run).
OPENAI_IGNORED = {"model", "user", "store", "metadata", "service_tier", "stream_options", "parallel_tool_calls"}
# Endpoints a batch line may name -> whether its body is a chat completion.
OPENAI_URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
# Body fields that are not SamplingParams fields but set one: OpenAI's response_format sets structured_outputs.
REQUEST_FIELDS = {"response_format"}
# A model's generation_config.json keys that set a sampling default (as vLLM reads them) -> SamplingParams field.
GENERATION_CONFIG_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 3, 60, 60, 6, 4


def short(value: Any) -> str:
    """``repr(value)`` cut to a readable length and depth, for messages that echo user input."""
    return _repr.repr(value)


def loads(raw: bytes | str) -> Any:
    """``json.loads`` whose failures are all ValueError: bad JSON, and nesting deeper than MAX_JSON_DEPTH
    (checked without recursion, so a line nested 100000 levels deep is one more bad line)."""
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return obj


class ProtocolError(ValueError):
    """A request that cannot be served; ``message`` names the field, ``id`` is the request's id when known,
    ``param`` the body field at fault where the message's first word is not it (the server reports it)."""

    def __init__(self, message: str, id: Any = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.id = id
        self.param = param


# ----------------------------------------------------------------------------------------------- requests


@dataclass(slots=True)
class CompletionRequest:
    """One /v1/completions or /v1/chat/completions body, checked."""

    chat: bool  # a chat completion (messages) rather than a completion (prompt)
    prompt: str | list[int] | None  # the completion's prompt (text or token ids); None for a chat
    messages: list[dict] | None  # the chat's conversation, content parts joined into strings; None for a completion
    sampling: dict  # SamplingParams keyword arguments: the defaults given, overridden by the body's fields
    model: str | None  # the body's "model" when a string (echoed in the response, otherwise ignored)
    # Server-only fields (parse_completion_body(server=True)); a batch line leaves them at these defaults.
    prompts: list[str | list[int]] | None = None  # every prompt of a completion (a list of them is allowed)
    stream: bool = False  # answer as server-sent events
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    echo: bool = False  # a completion's text starts with its prompt
    top_logprobs: int = 0  # a chat's top_logprobs (its logprobs are SamplingParams.logprobs)


@dataclass(slots=True)
class BatchRequest:
    """One Batch API input line, checked."""

    custom_id: str  # the caller's id, echoed in the output line
    body: CompletionRequest  # the request for its url


def set_sampling_field(params: dict, name: str, value: Any) -> None:
    """params[name] = value after a type check against SAMPLING_FIELDS (of list items too); null leaves the default
    of a field that has no null value. ``name`` must be in SAMPLING_FIELDS."""
    types = SAMPLING_FIELDS[name]
    if value is None and type(None) not in types:
        return
    # JSON true/false are Python bools, which are ints too: only bool fields take them.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ProtocolError(f"bad sampling setting: {name} has the wrong type ({short(value)})")
    item = _LIST_ITEMS.get(name)
    if isinstance(value, list) and not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
        raise ProtocolError(f"bad sampling setting: {name} must be a list of {item.__name__} ({short(value)})")
    if name == "logit_bias":
        value = _logit_bias(value)
    elif name == "structured_outputs":
        if params.get("structured_outputs") is not None:
            raise ProtocolError("give response_format or structured_outputs, not both", param="structured_outputs")
        try:
            value = StructuredOutputsParams.from_dict(value)
        except (ValueError, TypeError) as err:
            raise ProtocolError(f"structured_outputs: {_unprefixed(str(err), 'structured_outputs')}") from None
    params[name] = value


def set_request_field(params: dict, name: str, value: Any) -> None:
    """A body field onto ``params``: a SamplingParams field (set_sampling_field) or one of REQUEST_FIELDS."""
    if name == "response_format":
        structured = parse_response_format(value)
        if structured is not None:
            if params.get("structured_outputs") is not None:
                raise ProtocolError("give response_format or structured_outputs, not both", param="response_format")
            params["structured_outputs"] = structured
        return
    set_sampling_field(params, name, value)


def parse_response_format(value: Any) -> StructuredOutputsParams | None:
    """OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint, None), ``{"type": "json_object"}`` or
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ProtocolError(f'response_format must be an object with a "type", got {short(value)}')
    kind = value["type"]
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise ProtocolError(f"response_format: unsupported type {short(kind)} (supported: {', '.join(allowed)})")
    extra = sorted(set(value) - allowed[kind])
    if extra:
        raise ProtocolError(f"response_format: unsupported field {short(extra[0])} for type {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ProtocolError('response_format: "json_schema" must be an object with a "schema"')
    extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if extra:
        raise ProtocolError(f"response_format: unsupported json_schema field {short(extra[0])}")
    for key, types in (("name", str), ("description", str), ("strict", bool)):
        if spec.get(key) is not None and not isinstance(spec[key], types):
            raise ProtocolError(f"response_format: json_schema.{key} must be a {types.__name__}, "
                                f"got {short(spec[key])}")
    if not isinstance(spec.get("schema"), dict):
        raise ProtocolError(f"response_format: json_schema.schema must be a JSON schema object, "
                            f"got {short(spec.get('schema'))}")
    # strict or not, the schema is enforced: every output validates against it
    try:
        return StructuredOutputsParams(json=spec["schema"])
    except ValueError as err:
        raise ProtocolError(f"response_format: json_schema.schema: {_unprefixed(str(err), 'json')}") from None


def _logit_bias(value: dict) -> dict[int, Any]:
    """OpenAI's logit_bias: token ids as JSON object keys (strings of integers) -> bias; the values are checked by
    SamplingParams (numbers in [-100, 100])."""
    out = {}
    for key, bias in value.items():
        token = key
        if isinstance(key, str):
            token = int(key) if key.isascii() and key.isdigit() and len(key) <= 12 else None
        if not isinstance(token, int) or isinstance(token, bool):
            raise ProtocolError(f"bad sampling setting: logit_bias keys must be token ids, got {short(key)}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise ProtocolError(f"bad sampling setting: logit_bias values must be numbers, got {short(bias)}")
        out[token] = bias
    return out


def _unprefixed(message: str, name: str) -> str:
    """``message`` without a leading ``name: `` (so a field is not named twice)."""
    return message[len(name) + 2:] if message.startswith(name + ": ") else message


def check_logprobs(value: Any, name: str, max_logprobs: int) -> None:
    """A request may ask for at most ``max_logprobs`` logprobs per token (``name`` is the field it used: logprobs,
    top_logprobs or prompt_logprobs)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > max_logprobs:
        raise ProtocolError(f"bad sampling setting: {name} must be <= {max_logprobs} (--max-logprobs), "
                            f"got {short(value)}")


def parse_prompt(value: Any, where: str = "prompt") -> str | list[int]:
    """A prompt string or a list of token ids (a one-string list is unwrapped, as the OpenAI API allows)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise ProtocolError(f"{where} must be a string or a non-empty list of token ids", param="prompt")


def parse_messages(value: Any) -> list[dict]:
    """A conversation; OpenAI content parts of type "text" are joined into one string."""
    if not isinstance(value, list) or not value:
        raise ProtocolError("messages must be a non-empty list")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ProtocolError('each message needs a "role" string and a "content"')
        content = m["content"]
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ProtocolError("only text content parts are supported")
            if not all(isinstance(p.get("text", ""), str) for p in content):
                raise ProtocolError('a text content part\'s "text" must be a string')
            content = "".join(p.get("text", "") for p in content)
        elif not isinstance(content, str):
            raise ProtocolError("message content must be a string or a list of text parts")
        out.append({**m, "content": content})
    return out


def parse_completion_body(body: Any, chat: bool, defaults: dict, max_logprobs: int, *,
                          server: bool = False) -> CompletionRequest:
    """A (chat) completion request body; ``defaults`` are SamplingParams keyword arguments its fields override.

    server=True reads it as the HTTP server does: stream, stream_options, echo and a list of prompts are allowed,
    and every unsupported field is refused by name. Without it, a Batch API line's body."""
    if not isinstance(body, dict):
        raise ProtocolError("body must be a JSON object")
    body = dict(body)
    params = dict(defaults)
    for alias, name in OPENAI_ALIASES.items():
        if alias in body:
            body[name] = body.pop(alias)
    if server:
        return _parse_server_body(body, chat, params, max_logprobs)
    if body.pop("stream", False):
        raise ProtocolError("stream is not supported in a batch")
    if chat:
        want = body.pop("logprobs", False)
        top = body.pop("top_logprobs", None)
        if not isinstance(want, bool) or (top is not None and (not isinstance(top, int) or isinstance(top, bool))):
            raise ProtocolError("logprobs must be a bool and top_logprobs an integer")
        check_logprobs(top, "top_logprobs", max_logprobs)
        if want:
            params["logprobs"] = top or 0
        if "messages" not in body:
            raise ProtocolError('a chat completion body needs "messages"')
        messages = parse_messages(body.pop("messages"))
        prompt = None
    else:
        if body.pop("echo", False) or body.pop("suffix", None) or body.pop("best_of", None) not in (None, 1):
            raise ProtocolError("echo, suffix and best_of are not supported")
        if "prompt" not in body:
            raise ProtocolError('a completion body needs "prompt"')
        prompt = parse_prompt(body.pop("prompt"))
        messages = None
    model = _apply_sampling_fields(body, params, max_logprobs)
    if not chat:
        check_logprobs(body.get("logprobs"), "logprobs", max_logprobs)
    return CompletionRequest(chat, prompt, messages, params, model)


def _flag(body: dict, name: str) -> bool:
    value = body.pop(name, None)
    if value is not None and not isinstance(value, bool):
        raise ProtocolError(f"{name} must be a boolean, got {short(value)}")
    return bool(value)


def parse_prompts(value: Any) -> list[str | list[int]]:
    """A completion's prompts: a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(isinstance(p, list) for p in value):
            return [parse_prompt(p, f"prompt[{i}]") for i, p in enumerate(value)]
    return [parse_prompt(value)]


def _apply_sampling_fields(body: dict, params: dict, max_logprobs: int) -> str | None:
    """Every field left in ``body`` onto ``params`` (one that is neither a sampling field nor ignorable is refused);
    returns the model name the body asks for, if any."""
    for name, value in body.items():
        if name in OPENAI_IGNORED:
            continue
        if name not in SAMPLING_FIELDS and name not in REQUEST_FIELDS:
            raise ProtocolError(f"unsupported body field {short(name)}")
        set_request_field(params, name, value)
    check_logprobs(body.get("prompt_logprobs"), "prompt_logprobs", max_logprobs)
    return body.get("model") if isinstance(body.get("model"), str) else None


def _parse_server_body(body: dict, chat: bool, params: dict, max_logprobs: int) -> CompletionRequest:
    """parse_completion_body(server=True) after the aliases: the fields an HTTP client may send."""
    stream = _flag(body, "stream")
    options = body.pop("stream_options", None)
    if options is not None and not isinstance(options, dict):
        raise ProtocolError("stream_options must be an object")
    options = options or {}
    if set(options) - {"include_usage"}:  # vLLM's continuous_usage_stats would change the chunks: not silently ignored
        raise ProtocolError(f"unsupported stream_options field {short(sorted(set(options) - {'include_usage'})[0])}",
                            param="stream_options")
    include_usage = _flag(dict(options), "include_usage")
    if options and not stream:
        raise ProtocolError("stream_options is only allowed with stream")
    best_of = body.pop("best_of", None)
    n = body.get("n") if body.get("n") is not None else params.get("n", 1)
    if best_of is not None and best_of != n:
        raise ProtocolError(f"unsupported body field 'best_of' (only best_of == n, {short(n)}, is)")
    top_logprobs, echo, prompts, messages = 0, False, None, None
    if chat:
        want = _flag(body, "logprobs")
        top = body.pop("top_logprobs", None)
        if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < 0):
            raise ProtocolError(f"top_logprobs must be a non-negative integer, got {short(top)}")
        if top and not want:
            raise ProtocolError("top_logprobs needs logprobs: true")
        check_logprobs(top, "top_logprobs", max_logprobs)
        if want:
            params["logprobs"] = top_logprobs = top or 0
        if "messages" not in body:
            raise ProtocolError('a chat completion body needs "messages"')
        messages = parse_messages(body.pop("messages"))
    else:
        echo = _flag(body, "echo")
        if body.get("suffix") is None:
            body.pop("suffix", None)
        if "prompt" not in body:
            raise ProtocolError('a completion body needs "prompt"')
        prompts = parse_prompts(body.pop("prompt"))
        check_logprobs(body.get("logprobs"), "logprobs", max_logprobs)
        if echo and body.get("logprobs") is not None:
            raise ProtocolError("unsupported: echo together with logprobs (ask for prompt_logprobs instead)",
                                param="echo")
    model = _apply_sampling_fields(body, params, max_logprobs)
    return CompletionRequest(chat, prompts[0] if prompts else None, messages, params, model, prompts=prompts,
                             stream=stream, include_usage=include_usage, echo=echo, top_logprobs=top_logprobs)


def parse_batch_line(obj: dict, defaults: dict, max_logprobs: int) -> BatchRequest:
    """A Batch API input line (``custom_id``, ``method``, ``url``, ``body``), parsed from JSON."""
    rid = obj.get("custom_id")
    if not isinstance(rid, str) or not rid:
        raise ProtocolError("custom_id must be a non-empty string", rid if isinstance(rid, (str, int)) else None)
    if obj.get("method", "POST") != "POST":
        raise ProtocolError(f"method must be POST, got {short(obj.get('method'))}", rid)
    kind = OPENAI_URLS.get(obj.get("url"))
    if kind is None:
        raise ProtocolError(f"url must be one of {sorted(OPENAI_URLS)}, got {short(obj.get('url'))}", rid)
    try:
        body = parse_completion_body(obj.get("body"), kind == "chat", defaults, max_logprobs)
    except ProtocolError as err:
        raise ProtocolError(err.message, rid) from None
    return BatchRequest(rid, body)


def model_sampling_defaults(generation_config: dict) -> dict:
    """SamplingParams keyword arguments from a model's generation_config.json (its null values skipped)."""
    return {field: generation_config[key] for key, field in GENERATION_CONFIG_KEYS.items()
            if generation_config.get(key) is not None}


# ----------------------------------------------------------------------------------------------- responses


def usage(out: RequestOutput) -> dict:
    """The response's token counts."""
    prompt_tokens = len(out.prompt_token_ids)
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finite(x: float | None) -> float | None:
    """JSON has no infinities or NaN: such a logprob is written as null."""
    return x if x is None or math.isfinite(x) else None


def logprob_entries(comp: CompletionOutput) -> list[dict] | None:
    """Per output token: the sampled token's logprob and the top candidates (rank order)."""
    if comp.logprobs is None:
        return None
    entries = []
    for token_id, cands in zip(comp.token_ids, comp.logprobs):
        chosen = cands.get(token_id)
        top = sorted(cands.items(), key=lambda kv: kv[1].rank)
        entries.append({
            "token_id": token_id,
            "token": chosen.decoded_token if chosen else None,
            "logprob": finite(chosen.logprob) if chosen else None,
            "top_logprobs": [
                {"token_id": t, "token": lp.decoded_token, "logprob": finite(lp.logprob)} for t, lp in top
            ],
        })
    return entries


def prompt_logprob_entries(out: RequestOutput) -> list[dict | None] | None:
    """vLLM's ``prompt_logprobs``: per prompt token, null for the first, then ``{token id: {"logprob", "rank",
    "decoded_token"}}`` holding the top candidates and the prompt token itself; None when not asked for."""
    if out.prompt_logprobs is None:
        return None
    return [None if entry is None else {
        str(t): {"logprob": finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
        for t, lp in entry.items()} for entry in out.prompt_logprobs]


def _hex() -> str:
    return uuid.uuid4().hex


def completion_response(out: RequestOutput, chat: bool, model: str) -> dict:
    """The body of a chat.completion or text_completion response for a finished request."""
    choices = []
    for c in out.outputs:
        entries = logprob_entries(c)
        if chat:
            choice: dict[str, Any] = {"index": c.index, "message": {"role": "assistant", "content": c.text}}
            choice["logprobs"] = None if entries is None else {"content": [
                {"token": e["token"], "logprob": e["logprob"],
                 "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in e["top_logprobs"]]}
                for e in entries
            ]}
        else:
            choice = {"index": c.index, "text": c.text}
            choice["logprobs"] = None if entries is None else {
                "tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            }
        choice["finish_reason"] = c.finish_reason
        if not chat and out.prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprob_entries(out)
        choices.append(choice)
    body = {
        "id": ("chatcmpl-" if chat else "cmpl-") + _hex(),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(out),
    }
    if chat and out.prompt_logprobs is not None:  # vLLM's place for them: the chat response, the completion choice
        body["prompt_logprobs"] = prompt_logprob_entries(out)
    return body


def batch_output(custom_id: Any, out: RequestOutput, chat: bool, model: str) -> dict:
    """The Batch API output line of a finished request (an error line when the engine rejected it)."""
    if out.error is not None:
        return batch_error(custom_id, "request_rejected", out.error)
    return {
        "id": "batch_req_" + _hex(),
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": _hex(), "body": completion_response(out, chat, model)},
        "error": None,
    }


def batch_error(custom_id: Any, code: str, message: str) -> dict:
    """The Batch API output line of a request that failed."""
    return {"id": "batch_req_" + _hex(), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}
