"""Tokenizer: a ``tokenizers.Tokenizer`` plus the Hugging Face conventions around it (special tokens,
BOS/EOS insertion, chat templates), matching transformers' fast tokenizers without importing transformers."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import tokenizers
from tokenizers import processors

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _content(token: Any) -> Optional[str]:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    """Text <-> token ids, and chat-template rendering.

    Parameters
    ----------
    backend : the tokenizers.Tokenizer (tokenizer.json)
    bos_token, eos_token : their strings, or None
    eos_token_ids : every id that ends generation (tokenizer's EOS plus generation_config's)
    add_bos_token, add_eos_token : rebuild the post-processor to add them or not; None keeps the backend's
        post-processor (transformers 5 lets tokenizer.json decide and ignores tokenizer_config.json's flags)
    chat_template : Jinja source, or None
    special_tokens : special token name ("bos_token", "pad_token", ...) -> string, visible to templates
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, eos_token_ids: Optional[list[int]] = None,
                 add_bos_token: Optional[bool] = None, add_eos_token: Optional[bool] = None,
                 chat_template: Optional[str] = None, special_tokens: Optional[dict[str, str]] = None,
                 clean_up_tokenization_spaces: bool = False) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.special_tokens.update({k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v})
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        ids = ([eos_id] if eos_id is not None else []) + list(eos_token_ids or [])
        self.eos_token_ids: list[int] = list(dict.fromkeys(ids))
        self.chat_template = chat_template
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
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json / chat_template.jinja)")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        text = _compile(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> "Tokenizer":
        """Read tokenizer.json, tokenizer_config.json (special tokens, chat_template), chat_template.jinja and
        generation_config.json (extra EOS ids) from a Hugging Face folder. As in transformers 5, whether BOS/EOS
        are added is tokenizer.json's post-processor's decision, not tokenizer_config.json's add_bos_token."""
        folder = Path(path)
        if not (folder / "tokenizer.json").exists():
            raise FileNotFoundError(f"{folder / 'tokenizer.json'}: file not found")
        try:
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # the Rust side raises plain Exception for malformed files
            raise ValueError(f"{folder / 'tokenizer.json'}: cannot be read by tokenizers ({err})") from None
        cfg = _json(folder / "tokenizer_config.json")
        special = {**{k: _content(v) for k, v in _json(folder / "special_tokens_map.json").items()
                      if k in SPECIAL_TOKEN_NAMES},
                   **{k: _content(cfg[k]) for k in SPECIAL_TOKEN_NAMES if cfg.get(k) is not None}}
        template = cfg.get("chat_template")
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        elif isinstance(template, list):  # named templates: the "default" one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        eos = _json(folder / "generation_config.json").get("eos_token_id")
        eos_ids = [] if eos is None else (eos if isinstance(eos, list) else [eos])
        return cls(backend, bos_token=special.get("bos_token"), eos_token=special.get("eos_token"),
                   eos_token_ids=[int(e) for e in eos_ids], chat_template=template, special_tokens=special,
                   clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)))


def _json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _clean_up(text: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


@lru_cache(maxsize=16)
def _compile(source: str):
    """A sandboxed Jinja template with the globals and filters transformers gives chat templates."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
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

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
