"""Input parsing, output records and resume bookkeeping for ``fastinfer generate``.

Three input formats, told apart by the first non-blank line (``detect_format``):

- ``text``: one prompt per line; a request's id is its 0-based line index.
- ``jsonl``: ``{"prompt": ...}`` or ``{"messages": [...]}`` per line, optional ``"id"`` or ``"custom_id"``
  and per-line sampling settings under SamplingParams' names (``max_tokens``, ``temperature``, ...).
- ``openai``: the OpenAI Batch API input (``custom_id``, ``method``, ``url``, ``body``).

``text`` and ``jsonl`` produce JSONL records ``{"id", "prompt" | "messages", "text" | "outputs",
"finish_reason", "usage"}``; ``openai`` produces the Batch API output lines.

``run_batch`` and ``print_stream`` drive ``LLM.stream`` and write each result as its request finishes, through an
``Output`` (the --output file under an exclusive lock, or stdout) that turns write errors into one ``OutputError``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import reprlib
import stat
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: outputs are written unlocked
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:  # importing the engine imports torch; `fastinfer --help` should not wait for that
    from fastinfer.engine.outputs import RequestOutput

FORMATS = ("text", "jsonl", "openai")

# Per-line sampling settings a JSONL line may carry, with the JSON types each accepts.
_NUM = (int, float)
SAMPLING_FIELDS: dict[str, tuple[type, ...]] = {
    "n": (int,),
    "temperature": _NUM,
    "top_p": _NUM,
    "top_k": (int,),
    "min_p": _NUM,
    "seed": (int, type(None)),
    "stop": (str, list, type(None)),
    "stop_token_ids": (list, type(None)),
    "ignore_eos": (bool,),
    "max_tokens": (int, type(None)),
    "min_tokens": (int,),
    "logprobs": (int, type(None)),
    "presence_penalty": _NUM,
    "frequency_penalty": _NUM,
    "repetition_penalty": _NUM,
    "skip_special_tokens": (bool,),
    "include_stop_str_in_output": (bool,),
}
# OpenAI body fields accepted and ignored (they change nothing in an offline run).
_OPENAI_IGNORED = {"model", "user", "store", "metadata", "service_tier", "stream_options", "parallel_tool_calls"}
OPENAI_URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
# Deepest JSON nesting an input (or output) line may have. Deeper lines are bad lines: nesting that deep would
# exhaust Python's recursion limit in json, repr or the chat template instead (no request needs more than ~10).
MAX_JSON_DEPTH = 64
# Default cap on logprobs / top_logprobs per token (vLLM's max_logprobs default); --max-logprobs changes it.
MAX_LOGPROBS = 20

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


def _set_sampling(params: dict, name: str, value: Any, line: int, id: Any) -> None:
    """params[name] = value after a type check (of list items too); null leaves the default of a field that has
    no null value."""
    types = SAMPLING_FIELDS[name]
    if value is None and type(None) not in types:
        return
    # JSON true/false are Python bools, which are ints too: only bool fields take them.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise BadLine(line, f"bad sampling setting: {name} has the wrong type ({short(value)})", id)
    item = {"stop": str, "stop_token_ids": int}.get(name)
    if isinstance(value, list) and not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
        raise BadLine(line, f"bad sampling setting: {name} must be a list of {item.__name__} ({short(value)})", id)
    params[name] = value


def _check_logprobs(value: Any, name: str, max_logprobs: int, line: int, id: Any) -> None:
    """A line may ask for at most ``max_logprobs`` logprobs per token (``name`` is the field it used)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > max_logprobs:
        raise BadLine(line, f"bad sampling setting: {name} must be <= {max_logprobs} (--max-logprobs), "
                            f"got {short(value)}", id)


def _prompt(value: Any, line: int, id: Any, where: str = "prompt") -> str | list[int]:
    """A prompt string or a list of token ids (a one-string list is unwrapped, as the OpenAI API allows)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise BadLine(line, f"{where} must be a string or a non-empty list of token ids", id)


def _messages(value: Any, line: int, id: Any) -> list[dict]:
    """A conversation; OpenAI content parts of type "text" are joined into one string."""
    if not isinstance(value, list) or not value:
        raise BadLine(line, "messages must be a non-empty list", id)
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise BadLine(line, 'each message needs a "role" string and a "content"', id)
        content = m["content"]
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadLine(line, "only text content parts are supported", id)
            if not all(isinstance(p.get("text", ""), str) for p in content):
                raise BadLine(line, 'a text content part\'s "text" must be a string', id)
            content = "".join(p.get("text", "") for p in content)
        elif not isinstance(content, str):
            raise BadLine(line, "message content must be a string or a list of text parts", id)
        out.append({**m, "content": content})
    return out


def _parse_jsonl(text: str, index: int, defaults: dict, max_logprobs: int) -> Request:
    line = index + 1
    obj = _json_object(text, line)
    rid = obj.get("custom_id", obj.get("id", index))
    if "custom_id" in obj and "id" in obj:
        raise BadLine(line, 'give "id" or "custom_id", not both', rid)
    if rid is None or isinstance(rid, (dict, list, float, bool)):
        raise BadLine(line, "id must be a string or an integer")
    params = dict(defaults)
    for name, value in obj.items():
        if name in ("id", "custom_id", "prompt", "messages"):
            continue
        if name not in SAMPLING_FIELDS:
            raise BadLine(line, f"unknown field {short(name)}", rid)
        _set_sampling(params, name, value, line, rid)
    _check_logprobs(obj.get("logprobs"), "logprobs", max_logprobs, line, rid)
    if ("prompt" in obj) == ("messages" in obj):
        raise BadLine(line, 'needs exactly one of "prompt" and "messages"', rid)
    if "messages" in obj:
        return Request(rid, line, "messages", None, _messages(obj["messages"], line, rid), params)
    return Request(rid, line, "text", _prompt(obj["prompt"], line, rid), None, params)


def _parse_openai(text: str, index: int, defaults: dict, max_logprobs: int) -> Request:
    line = index + 1
    obj = _json_object(text, line)
    rid = obj.get("custom_id")
    if not isinstance(rid, str) or not rid:
        raise BadLine(line, "custom_id must be a non-empty string", rid if isinstance(rid, (str, int)) else None)
    if obj.get("method", "POST") != "POST":
        raise BadLine(line, f"method must be POST, got {short(obj.get('method'))}", rid)
    kind = OPENAI_URLS.get(obj.get("url"))
    if kind is None:
        raise BadLine(line, f"url must be one of {sorted(OPENAI_URLS)}, got {short(obj.get('url'))}", rid)
    body = obj.get("body")
    if not isinstance(body, dict):
        raise BadLine(line, "body must be a JSON object", rid)
    body = dict(body)
    params = dict(defaults)
    if "max_completion_tokens" in body:
        body["max_tokens"] = body.pop("max_completion_tokens")
    if body.pop("stream", False):
        raise BadLine(line, "stream is not supported in a batch", rid)
    if kind == "chat":
        want = body.pop("logprobs", False)
        top = body.pop("top_logprobs", None)
        if not isinstance(want, bool) or (top is not None and (not isinstance(top, int) or isinstance(top, bool))):
            raise BadLine(line, "logprobs must be a bool and top_logprobs an integer", rid)
        _check_logprobs(top, "top_logprobs", max_logprobs, line, rid)
        if want:
            params["logprobs"] = top or 0
        if "messages" not in body:
            raise BadLine(line, 'a chat completion body needs "messages"', rid)
        messages = _messages(body.pop("messages"), line, rid)
        prompt = None
    else:
        if body.pop("echo", False) or body.pop("suffix", None) or body.pop("best_of", None) not in (None, 1):
            raise BadLine(line, "echo, suffix and best_of are not supported", rid)
        if "prompt" not in body:
            raise BadLine(line, 'a completion body needs "prompt"', rid)
        prompt = _prompt(body.pop("prompt"), line, rid)
        messages = None
    model = body.get("model") if isinstance(body.get("model"), str) else None
    for name, value in body.items():
        if name in _OPENAI_IGNORED:
            continue
        if name not in SAMPLING_FIELDS:
            raise BadLine(line, f"unsupported body field {short(name)}", rid)
        _set_sampling(params, name, value, line, rid)
    if kind == "completion":
        _check_logprobs(body.get("logprobs"), "logprobs", max_logprobs, line, rid)
    req_kind = "messages" if kind == "chat" else "completion"
    return Request(rid, line, req_kind, prompt, messages, params, model=model)


# ----------------------------------------------------------------------------------------------- prompts

# generation_config.json keys that set a sampling default (as vLLM reads them) -> SamplingParams field.
GENERATION_CONFIG_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def model_sampling_defaults(generation_config: dict) -> dict:
    """SamplingParams keyword arguments from a model's generation_config.json (its null values skipped)."""
    return {field: generation_config[key] for key, field in GENERATION_CONFIG_KEYS.items()
            if generation_config.get(key) is not None}


def engine_prompt(req: Request, tokenizer: Any, chat: bool, system: str | None, vocab_size: int | None) -> dict:
    """``{"prompt", "prompt_token_ids"}`` for LLM.stream. The chat template and the tokenizer run here, one
    request at a time, so a request they reject (or an empty prompt, or token ids out of range) fails alone
    with ValueError instead of failing the whole batch inside LLM.stream.

    ``chat``: put plain ("text" kind) prompts through the chat template, after ``system`` when given."""
    if tokenizer is None and not isinstance(req.prompt, list):
        raise ValueError("the model has no tokenizer (tokenizer.json); give the prompt as token ids")
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


# ----------------------------------------------------------------------------------------------- output


def usage(out: RequestOutput) -> dict:
    prompt_tokens = len(out.prompt_token_ids)
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _finite(x: float | None) -> float | None:
    """JSON has no infinities or NaN: such a logprob is written as null."""
    return x if x is None or math.isfinite(x) else None


def _logprob_entries(comp: Any) -> list[dict] | None:
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
            "logprob": _finite(chosen.logprob) if chosen else None,
            "top_logprobs": [
                {"token_id": t, "token": lp.decoded_token, "logprob": _finite(lp.logprob)} for t, lp in top
            ],
        })
    return entries


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
            d["cumulative_logprob"] = _finite(c.cumulative_logprob)
            d["logprobs"] = _logprob_entries(c)
        return d

    if len(out.outputs) == 1:
        rec.update(one(out.outputs[0]))
    else:
        rec["outputs"] = [{"index": c.index, **one(c)} for c in out.outputs]
    rec["usage"] = usage(out)
    return rec


def _hex() -> str:
    return uuid.uuid4().hex


def openai_record(req: Request, out: RequestOutput, model_name: str) -> dict:
    """The Batch API output line of an OpenAI request (an error line when the engine rejected it)."""
    if out.error is not None:
        return openai_error(req.id, "request_rejected", out.error)
    chat = req.kind == "messages"
    choices = []
    for c in out.outputs:
        entries = _logprob_entries(c)
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
        choices.append(choice)
    body = {
        "id": ("chatcmpl-" if chat else "cmpl-") + _hex(),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": req.model or model_name,
        "choices": choices,
        "usage": usage(out),
    }
    return {
        "id": "batch_req_" + _hex(),
        "custom_id": req.id,
        "response": {"status_code": 200, "request_id": _hex(), "body": body},
        "error": None,
    }


def openai_error(custom_id: Any, code: str, message: str) -> dict:
    return {"id": "batch_req_" + _hex(), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


# ----------------------------------------------------------------------------------------------- resume


class ResumeError(ValueError):
    """The output file cannot be resumed (not written by this input's format)."""


class OutputError(Exception):
    """The output cannot be opened, locked or written (another run holds it, disk full, no permission, ...);
    the message is one line naming the file."""


class Output:
    """Where the records go: stdout, or the --output file opened for appending under an exclusive ``flock`` held
    until ``close``, so two runs never write one file (a second run is refused, the file untouched).

    Every write is one complete line, flushed. An OSError while writing becomes one OutputError; the lines
    written before it are kept."""

    def __init__(self, file: BinaryIO, name: str, path: str | None = None) -> None:
        self.file = file
        self.name = name  # for messages: the path, or "stdout"
        self.path = path  # None for stdout
        self._failed = False

    @classmethod
    def stdout(cls) -> Output:
        return cls(sys.stdout.buffer, "stdout")

    @classmethod
    def open_locked(cls, path: str, readable: bool = False) -> Output:
        """``path`` created if missing (never truncated here), open for appending (and reading) and locked.
        Raises OutputError when another process holds the lock or the file cannot be opened."""
        flags = (os.O_RDWR if readable else os.O_WRONLY) | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        while True:
            try:
                fd = os.open(path, flags, 0o666)
            except OSError as err:
                raise OutputError(f"cannot write --output {path}: {err.strerror or err}") from None
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise OutputError(f"{path} is being written by another fastinfer run"
                                  f"{f' (pid {holder})' if holder else ''}; wait for it or stop it") from None
            except OSError:
                pass  # a file system without flock (or a device): written unlocked
            st = os.fstat(fd)
            try:
                now = os.stat(path)
            except OSError:
                now = None
            if stat.S_ISREG(st.st_mode) and (now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino)):
                os.close(fd)  # replaced (a --retry-failed rewrite) between our open and our lock: lock the new file
                continue
            return cls(os.fdopen(fd, "r+b" if readable else "ab"), path, path)

    def is_regular_file(self) -> bool:
        return self.path is not None and stat.S_ISREG(os.fstat(self.file.fileno()).st_mode)

    def size(self) -> int:
        return os.fstat(self.file.fileno()).st_size if self.is_regular_file() else 0

    def truncate(self, size: int = 0) -> None:
        """Cut the (regular) file to ``size`` bytes, durably."""
        if self.is_regular_file():
            with self._errors():
                self.file.truncate(size)
                self.file.flush()
                os.fsync(self.file.fileno())

    def replace(self, lines: list[bytes]) -> None:
        """Make ``lines`` the whole file, atomically (a new file renamed over it), keeping the lock: the new file
        is locked before the rename, so no other run can take it meanwhile."""
        assert self.path is not None
        tmp = f"{self.path}.tmp{os.getpid()}"
        with self._errors():
            new = Output.open_locked(tmp, readable=True)
            try:
                new.file.truncate(0)
                new.file.write(b"".join(ln + b"\n" for ln in lines))
                new.file.flush()
                os.fsync(new.file.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                new.file.close()
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        self.file.close()  # releases the old file's lock; it has no name any more
        self.file = new.file

    def write(self, record: dict) -> None:
        """One complete line per write, flushed: a kill loses at most the line being written."""
        # backslashreplace turns a lone surrogate (JSON input may hold one) into its JSON escape, \udXXX.
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
        with self._errors():
            self.file.write(data)
            self.file.flush()

    def write_text(self, text: str) -> None:
        """Text as it is, flushed (a streamed completion)."""
        with self._errors():
            self.file.write(text.encode("utf-8", "replace"))
            self.file.flush()

    def close(self) -> None:
        """Close the file (stdout is flushed, not closed); quietly after a failed write (its lines failing again)."""
        try:
            if self.path is None:
                self.file.flush()
            else:
                self.file.close()  # closes (and unlocks) even when the flush fails
        except OSError as err:
            if not self._failed:
                self._raise(err)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            self._raise(err)

    def _raise(self, err: OSError) -> None:
        if isinstance(err, BrokenPipeError) and self.path is None:
            raise err  # `| head`: the caller ends quietly
        self._failed = True
        if self.path is None:  # Python would retry (and fail) the flush of stdout's buffer at exit, with a traceback
            with contextlib.suppress(OSError, ValueError, AttributeError):  # (no fd under a test's capture)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise OutputError(f"cannot write {self.name}: {err.strerror or err}") from None


def _lock_holder(fd: int) -> int | None:
    """The pid holding a flock on ``fd``'s file, from /proc/locks (Linux), or None."""
    try:
        st = os.fstat(fd)
        want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for row in f:
                parts = row.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == want and parts[4] != str(os.getpid()):
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


@dataclass(slots=True)
class Resumed:
    """What ``read_done`` found in an output file."""

    done: set[str]  # ids (as id_key) with a line in the file: they are not run again
    cut: int  # bytes of a partial last line cut off
    dropped: int  # error lines removed (retry_failed)
    duplicates: int  # ids with more than one line (written by two runs at once before outputs were locked)
    duplicate_example: Any = None  # one of them


def read_done(out: Output, fmt: str, retry_failed: bool = False) -> Resumed:
    """Ids already in the locked output file ``out`` (opened readable), after cutting a partial last line a killed
    run may have left; every complete line must be one of our records.

    With ``retry_failed`` the error lines are removed (the file is rewritten, atomically) and their ids do not
    count as done, so they run again. An id with several lines counts as done (no further line is written)."""
    if not out.is_regular_file():
        return Resumed(set(), 0, 0, 0)
    with out._errors():
        out.file.seek(0)
        data = out.file.read()
    end = data.rfind(b"\n") + 1
    cut = len(data) - end
    if cut:
        out.truncate(end)
    name = "custom_id" if fmt == "openai" else "id"
    done: set[str] = set()
    kept: list[bytes] = []
    dropped = duplicates = 0
    example = None
    counted: set[str] = set()
    for line, raw in enumerate(split_lines(data[:end]), 1):
        if not raw.strip():
            continue
        try:
            rec = loads(raw)
        except ValueError:
            raise ResumeError(f"{out.name} line {line} is not JSON; is it the output of this input?") from None
        if not isinstance(rec, dict) or name not in rec:
            raise ResumeError(f"{out.name} line {line} has no {name!r}; is it the output of this input?")
        if retry_failed and rec.get("error") is not None:
            dropped += 1
            continue
        key = id_key(rec[name])
        if key in done and key not in counted:
            counted.add(key)
            duplicates += 1
            example = rec[name] if example is None else example
        done.add(key)
        kept.append(raw)
    if dropped:
        out.replace(kept)
    return Resumed(done, cut, dropped, duplicates, example)


# ----------------------------------------------------------------------------------------------- running


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
                out.write(openai_record(req, ro, model_name) if fmt == "openai" else jsonl_record(req, ro))
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
