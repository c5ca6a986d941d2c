"""Tokenizer: a ``tokenizers.Tokenizer`` plus the Hugging Face conventions around it (special tokens,
BOS/EOS insertion, chat templates), matching transformers' fast tokenizers without importing transformers."""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import jinja2
import tokenizers
from tokenizers import processors

from fastinfer.loading.files import MAX_CHAT_TEMPLATE_BYTES, MAX_JSON_BYTES, MAX_TOKENIZER_JSON_BYTES, read_text
from fastinfer.loading.files import size_text as _size

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Bounds on rendering a chat template (released templates take milliseconds and write what the messages hold):
RENDER_TIMEOUT_S = 2.0
MAX_RENDERED_CHARS = 32 << 20  # also the largest string one template expression may build


class ChatTemplateError(jinja2.TemplateError, ValueError):
    """A chat template that cannot be used: too large, too slow, too long an output, or raising an error (its
    own ``raise_exception`` included); the message names where the template came from."""


class Tokenizer:
    """Text <-> token ids, and chat-template rendering.

    Parameters
    ----------
    backend : the tokenizers.Tokenizer (tokenizer.json)
    bos_token, eos_token : their strings, or None
    eos_token_ids : every id that ends generation (tokenizer's EOS plus generation_config's)
    add_bos_token, add_eos_token : rebuild the post-processor to add them or not; None keeps the backend's
        post-processor (transformers 5 lets tokenizer.json decide and ignores tokenizer_config.json's flags)
    chat_template : Jinja source, or None; at most MAX_CHAT_TEMPLATE_BYTES
    chat_template_source : where the template came from (a file, a GGUF key), named by template errors
    special_tokens : special token name ("bos_token", "pad_token", ...) -> string, visible to templates
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, eos_token_ids: Optional[list[int]] = None,
                 add_bos_token: Optional[bool] = None, add_eos_token: Optional[bool] = None,
                 chat_template: Optional[str] = None, special_tokens: Optional[dict[str, str]] = None,
                 clean_up_tokenization_spaces: bool = False, chat_template_source: str = "chat template") -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.special_tokens.update({k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v})
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        ids = ([eos_id] if eos_id is not None else []) + list(eos_token_ids or [])
        self.eos_token_ids: list[int] = list(dict.fromkeys(ids))
        if chat_template is not None and not isinstance(chat_template, str):
            raise ChatTemplateError(f"{chat_template_source}: the chat template must be a string, "
                                    f"got {type(chat_template).__name__}")
        if chat_template is not None and len(chat_template.encode("utf-8", "replace")) > MAX_CHAT_TEMPLATE_BYTES:
            raise ChatTemplateError(f"{chat_template_source}: the chat template is larger than "
                                    f"{_size(MAX_CHAT_TEMPLATE_BYTES)}")
        self.chat_template, self.chat_template_source = chat_template, chat_template_source
        self.clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        if add_bos_token is not None or add_eos_token is not None or backend.post_processor is None:
            self._set_post_processor(bool(add_bos_token) and self.bos_token_id is not None,
                                     bool(add_eos_token) and eos_id is not None, eos_id)
        self.add_bos_token = self.bos_token_id is not None and self.encode("")[:1] == [self.bos_token_id]

    def _set_post_processor(self, bos: bool, eos: bool, eos_id: Optional[int]) -> None:
        single = f"{self.bos_token + ':0 ' if bos else ''}$A:0{' ' + self.eos_token + ':0' if eos else ''}"
        pair = f"{single}{' ' + self.bos_token + ':1' if bos else ''} $B:1{' ' + self.eos_token + ':1' if eos else ''}"
        special = ([(self.bos_token, self.bos_token_id)] if bos else []) + ([(self.eos_token, eos_id)] if eos else [])
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text; byte-level pieces are joined into UTF-8 by the backend's decoder."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean_up else text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            **kwargs: Any) -> str | list[int]:
        """Render ``messages`` with the chat template (transformers' Jinja environment and variables).

        Extra keyword arguments (``tools``, ``documents``, template flags) are passed to the template.
        With ``tokenize=True`` returns ids, encoded without adding special tokens (the template writes them).
        Rendering is sandboxed and bounded (RENDER_TIMEOUT_S, MAX_RENDERED_CHARS); any failure raises
        ChatTemplateError naming the template's source.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json / chat_template.jinja)")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        text = render_chat_template(self.chat_template, self.chat_template_source, messages=messages,
                                    add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> "Tokenizer":
        """Read tokenizer.json, tokenizer_config.json (special tokens, chat_template), chat_template.jinja and
        generation_config.json (extra EOS ids) from a Hugging Face folder. As in transformers 5, whether BOS/EOS
        are added is tokenizer.json's post-processor's decision, not tokenizer_config.json's add_bos_token."""
        folder = Path(path)
        try:
            text = read_text(folder / "tokenizer.json", MAX_TOKENIZER_JSON_BYTES)
            backend = tokenizers.Tokenizer.from_str(text)
        except (FileNotFoundError, ValueError):
            raise
        except Exception as err:  # the Rust side raises plain Exception for malformed files
            raise ValueError(f"{folder / 'tokenizer.json'}: cannot be read by tokenizers ({err})") from None
        cfg = _json(folder / "tokenizer_config.json")
        special = {**{k: _content(v, folder / "special_tokens_map.json", k)
                      for k, v in _json(folder / "special_tokens_map.json").items() if k in SPECIAL_TOKEN_NAMES},
                   **{k: _content(cfg[k], folder / "tokenizer_config.json", k)
                      for k in SPECIAL_TOKEN_NAMES if cfg.get(k) is not None}}
        template, source = cfg.get("chat_template"), f"{folder / 'tokenizer_config.json'} (chat_template)"
        if (folder / "chat_template.jinja").exists():
            template, source = read_text(folder / "chat_template.jinja", MAX_CHAT_TEMPLATE_BYTES), \
                str(folder / "chat_template.jinja")
        elif isinstance(template, list):  # named templates: the "default" one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        gen_path = folder / "generation_config.json"
        eos = _json(gen_path).get("eos_token_id")
        eos_ids = [] if eos is None else (eos if isinstance(eos, list) else [eos])
        if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos_ids):
            raise ValueError(f"{gen_path}: eos_token_id must be a token id or a list of them, got {eos!r:.60}")
        return cls(backend, bos_token=special.get("bos_token"), eos_token=special.get("eos_token"),
                   eos_token_ids=eos_ids, chat_template=template, special_tokens=special,
                   clean_up_tokenization_spaces=cfg.get("clean_up_tokenization_spaces") is True,
                   chat_template_source=source)


def _content(token: Any, path: Path, key: str) -> Optional[str]:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    content = token.get("content") if isinstance(token, dict) else token
    if content is not None and not isinstance(content, str):
        raise ValueError(f"{path}: {key} must be a string or an AddedToken object, got {token!r:.60}")
    return content


def _json(path: Path) -> dict:
    """A JSON object file of the folder ({} when absent), read within MAX_JSON_BYTES."""
    if not path.exists():
        return {}
    try:
        value = json.loads(read_text(path, MAX_JSON_BYTES))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value


def _clean_up(text: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class _RenderTimeout(BaseException):
    """Raised inside a template past its deadline; a BaseException, so no ``except Exception`` in Jinja or a
    filter can swallow it (the tracer that raised it is gone once it has)."""


def render_chat_template(template: str, source: str, **variables: Any) -> str:
    """``template`` rendered with ``variables`` in the sandbox, within RENDER_TIMEOUT_S and MAX_RENDERED_CHARS.

    The deadline is checked on every line the compiled template runs and every Python call it makes (a
    thread-local ``sys.settrace`` hook, so it also holds in a server's worker threads); the output is counted
    as it streams out of ``generate()``. Failures raise ChatTemplateError naming ``source``.
    """
    try:
        compiled = _compile(template)
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"{source}: the chat template does not compile ({err})") from None
    deadline = time.monotonic() + RENDER_TIMEOUT_S

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise _RenderTimeout
        return on_line

    def on_call(frame, event, arg):
        if time.monotonic() > deadline:
            raise _RenderTimeout
        return on_line if frame.f_code.co_filename == "<template>" else None  # line events in template code only

    parts, size, previous = [], 0, sys.gettrace()
    sys.settrace(on_call)
    try:
        for chunk in compiled.generate(**variables):
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise ChatTemplateError(f"the chat template wrote more than {MAX_RENDERED_CHARS} characters")
            parts.append(chunk)
    except _RenderTimeout:
        raise ChatTemplateError(f"{source}: rendering the chat template took longer than {RENDER_TIMEOUT_S} s") \
            from None
    except ChatTemplateError as err:  # a limit of the environment below
        raise ChatTemplateError(f"{source}: {err}") from None
    except RecursionError:
        raise ChatTemplateError(f"{source}: the chat template recursed too deep") from None
    except jinja2.TemplateError as err:  # raise_exception(), undefined names, sandbox violations, ...
        raise ChatTemplateError(f"{source}: {err}") from None
    except Exception as err:  # a Python error inside an expression (TypeError, ZeroDivisionError, ...)
        raise ChatTemplateError(f"{source}: {type(err).__name__}: {err}") from None
    finally:
        sys.settrace(previous)
    return "".join(parts)


# A width or precision of 8+ digits in a %-format or {}-format spec: a one-expression way to build gigabytes.
_WIDE_FORMAT = re.compile(r"%[-+ #0]*(\d{8,}|\d*\.\d{8,})|\{[^{}]*:[^{}]*\d{8,}[^{}]*\}")


def _bounded(length: int) -> None:
    """Refuse to build a string or list of ``length`` items when that is more than MAX_RENDERED_CHARS."""
    if length > MAX_RENDERED_CHARS:
        raise ChatTemplateError(f"an expression would build {length} characters or items, more than "
                                f"{MAX_RENDERED_CHARS}")


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _WIDE_FORMAT.search(fmt):
        raise ChatTemplateError(f"format string {fmt[:40]!r} asks for a width over {MAX_RENDERED_CHARS}")


@lru_cache(maxsize=16)
def _compile(source: str):
    """A sandboxed Jinja template with the globals and filters transformers gives chat templates. Besides the
    sandbox's own limits (no unsafe attributes, range() of at most 100k), no expression may build a string or
    list longer than MAX_RENDERED_CHARS: ``*``, ``+``, ``~``, ``%``, ``**`` and the padding filters are checked
    before they allocate."""
    import jinja2
    from jinja2.compiler import CodeGenerator
    from jinja2.ext import Extension, loopcontrols
    from jinja2.filters import FILTERS
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class BoundedConcat(CodeGenerator):
        """``a ~ b`` through ``environment.concat_bounded`` (Jinja writes a plain str join)."""

        def visit_Concat(self, node, frame):
            self.write("environment.concat_bounded((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Environment(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedConcat
        intercepted_binops = frozenset({"*", "+", "%", "**"})

        def call_binop(self, context, op, left, right):
            if op == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)):
                _bounded(len(left) * max(right, 0))
            elif op == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
                _bounded(len(right) * max(left, 0))
            elif op == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                _bounded(len(left) + len(right))
            elif op == "%":
                _check_format(left)
            elif op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and right * left.bit_length() > 1 << 16:
                raise ChatTemplateError(f"{left} ** {right} is too large a number")
            return super().call_binop(context, op, left, right)

        def wrap_str_format(self, value):
            wrapped = super().wrap_str_format(value)
            if wrapped is not None:
                _check_format(value.__self__)
            return wrapped

        @staticmethod
        def concat_bounded(values):
            values = [str(v) for v in values]
            _bounded(sum(map(len, values)))
            return "".join(values)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def width_checked(name: str):
        def run(value, *args, **kwargs):
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, int) and arg > MAX_RENDERED_CHARS:
                    raise ChatTemplateError(f"{name}: width {arg} is over {MAX_RENDERED_CHARS}")
                if isinstance(arg, str):
                    _bounded(len(arg) * (str(value).count("\n") + 1))  # indent: its string starts every line
            if name == "format":
                _check_format(value)
            return FILTERS[name](value, *args, **kwargs)
        return run

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    for name in ("center", "indent", "wordwrap", "truncate", "format"):
        env.filters[name] = width_checked(name)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
