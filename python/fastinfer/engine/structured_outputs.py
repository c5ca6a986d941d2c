"""What a request's output must match: a JSON schema, any JSON object, a regex, one of some strings, or a grammar
(vLLM's ``StructuredOutputsParams``), as the llguidance grammar the engine compiles.

Checked when built, without a tokenizer (llguidance validates the schema, regex or grammar on its own), so a bad one
raises ValueError naming the field before anything runs; the engine compiles it against the model's tokenizer later
(engine/grammar_compiler.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")
# Bounds on one constraint: its source text, and the strings of a choice. Far above real use (a large JSON schema is
# tens of KB); llguidance itself bounds the compiled grammar's size and the work per token.
MAX_SPEC_CHARS = 1 << 20
MAX_CHOICES = 4096


@dataclass(slots=True)
class StructuredOutputsParams:
    """Exactly one of ``json``, ``regex``, ``choice``, ``grammar`` or ``json_object=True`` (else ValueError).

    json : a JSON schema, as a dict or as JSON text; the output is one JSON value it validates
    regex : the whole output matches it (Rust ``regex`` syntax, as llguidance reads it)
    choice : the output is exactly one of these strings
    grammar : a context-free grammar in Lark syntax (llguidance's dialect) or llama.cpp's GBNF (EBNF), whose
        start rule the whole output matches
    json_object : the output is one JSON object (any keys and values)
    disable_any_whitespace : JSON without whitespace at all (``{"a":1,"b":[2,3]}``)
    whitespace_pattern : JSON with whitespace matching this regex wherever JSON allows it

    By default JSON is written as Python's ``json.dumps`` writes it (``{"a": 1, "b": [2, 3]}``: one space after
    ``:`` and ``,``, none elsewhere). vLLM's default lets any amount of whitespace go anywhere it is legal, which
    lets a small model pad with newlines until max_tokens and never close the value; ``whitespace_pattern=r"[ \\n]*"``
    asks for that behaviour.
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None
    # The llguidance grammar the fields above describe (derived, not an argument): the compile cache's key.
    llguidance_grammar: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs: exactly one of {', '.join(KINDS)} must be given, "
                             f"got {', '.join(given) if given else 'none'}")
        if self.json_object not in (None, True, False):
            raise ValueError(f"json_object must be True, False or None, got {_short(self.json_object)}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError(f"disable_any_whitespace must be a bool, got {_short(self.disable_any_whitespace)}")
        if self.whitespace_pattern is not None:
            if not isinstance(self.whitespace_pattern, str):
                raise ValueError(f"whitespace_pattern must be a str or None, got {_short(self.whitespace_pattern)}")
            if self.disable_any_whitespace:
                raise ValueError("whitespace_pattern: give it or disable_any_whitespace, not both")
        kind = given[0]
        self.llguidance_grammar = _grammar(self, kind)
        error = _llguidance().LLMatcher.validate_grammar(self.llguidance_grammar)
        if error and not error.startswith("WARNING"):
            raise ValueError(f"{kind}: invalid {_WHAT[kind]}: {error.strip()[:2000]}")

    @property
    def kind(self) -> str:
        """Which constraint this is: one of KINDS."""
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def json_options(self) -> dict:
        """llguidance's JSON options for these settings (separators and whitespace)."""
        if self.whitespace_pattern is not None:
            return {"whitespace_flexible": True, "whitespace_pattern": self.whitespace_pattern}
        if self.disable_any_whitespace:
            return {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
        return {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    @classmethod
    def from_dict(cls, value: Any, where: str = "structured_outputs") -> StructuredOutputsParams:
        """From a JSON object (a request body's ``structured_outputs``); unknown keys are errors naming them."""
        if isinstance(value, StructuredOutputsParams):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be an object, got {_short(value)}")
        known = set(KINDS) | {"disable_any_whitespace", "whitespace_pattern"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{where}: unsupported field {_short(unknown[0])} (supported: {', '.join(sorted(known))})")
        return cls(**value)


_WHAT = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice",
         "grammar": "grammar"}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ValueError("structured_outputs needs llguidance (pip install 'fastinfer[llm]')") from None
    return llguidance


def _grammar(p: StructuredOutputsParams, kind: str) -> str:
    """The llguidance grammar of ``kind``, its value checked for type and size first (errors name the field)."""
    llg = _llguidance()
    value = getattr(p, kind)
    if kind == "json":
        if isinstance(value, str):
            if len(value) > MAX_SPEC_CHARS:
                raise ValueError(f"json: the schema is longer than {MAX_SPEC_CHARS} characters")
            try:
                value = json.loads(value)
            except (ValueError, RecursionError) as err:
                raise ValueError(f"json: the schema is not valid JSON ({err})") from None
        if not isinstance(value, (dict, bool)):
            raise ValueError(f"json must be a JSON schema (a dict or its JSON text), got {_short(p.json)}")
        try:
            text = json.dumps(value)  # key order kept: the output writes properties in the schema's order
        except (TypeError, ValueError, RecursionError) as err:
            raise ValueError(f"json: the schema cannot be written as JSON ({err})") from None
        if len(text) > MAX_SPEC_CHARS:
            raise ValueError(f"json: the schema is longer than {MAX_SPEC_CHARS} characters")
        return _json_grammar(llg, text, p.json_options())
    if kind == "json_object":
        return _json_grammar(llg, '{"type": "object"}', p.json_options())
    if kind == "choice":
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
            raise ValueError(f"choice must be a non-empty list of non-empty strings, got {_short(value)}")
        if len(value) > MAX_CHOICES or sum(map(len, value)) > MAX_SPEC_CHARS:
            raise ValueError(f"choice: at most {MAX_CHOICES} strings of {MAX_SPEC_CHARS} characters in all")
        p.choice = list(value)
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} must be a non-empty string, got {_short(value)}")
    if len(value) > MAX_SPEC_CHARS:
        raise ValueError(f"{kind}: longer than {MAX_SPEC_CHARS} characters")
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(value)
    try:
        return llg.grammar_from("grammar", value)  # Lark as it is; GBNF converted to Lark
    except ValueError as err:
        raise ValueError(f"grammar: invalid grammar: {err}") from None


def _json_grammar(llg, schema_text: str, options: dict) -> str:
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema_text, overrides=options)
    except ValueError as err:
        raise ValueError(f"json: invalid JSON schema: {err}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
