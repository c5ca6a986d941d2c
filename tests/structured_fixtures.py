"""Shared inputs of the structured-output, logit_bias and prompt_logprobs tests: a tiny random-weight Llama with a
Hugging Face tokenizer.json (the other tokenizer bridge: the default model's is rebuilt from GGUF metadata), and
the schema suite."""

from __future__ import annotations

import re

import model_fixtures


def write_tiny_llama(path) -> None:
    """A 2-layer Llama (random weights, float32) with a byte-level BPE tokenizer.json trained here (every byte is a
    token, so any text can be written), a chat template and EOS "</s>"."""
    model_fixtures.write_tiny_llama(
        path, ['{"name": "Bob", "age": 33, "tags": ["a", "b"]}', "the quick brown fox jumps over the lazy dog",
               "red green blue yes no 0123456789", '[{"k": "x", "v": 1}, {"k": "y", "v": -2}] true false null'],
        vocab_size=400, special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>"], max_position_embeddings=512)


def _object(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": required if required is not None
            else list(properties), "additionalProperties": False}


# Every schema bounds its output's size (string lengths, item counts, number ranges), so a sample always closes.
SCHEMAS = {
    "nested": _object({"person": _object({
        "name": {"type": "string", "maxLength": 12},
        "address": _object({"city": {"type": "string", "maxLength": 12},
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})}),
    "enums": _object({"color": {"enum": ["red", "green", "blue"]},
                      "size": {"type": "string", "enum": ["S", "M", "L"]}, "ok": {"type": "boolean"}}),
    "arrays": _object({"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                "minItems": 2, "maxItems": 4},
                       "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                                  "minItems": 1, "maxItems": 3}}),
    "required": _object({"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                         "note": {"type": "string", "maxLength": 16},
                         "flag": {"type": "boolean"}}, required=["id"]),
    "numbers": _object({"age": {"type": "integer", "minimum": 18, "maximum": 65},
                        "temp": {"type": "number", "minimum": -10.5, "maximum": 40},
                        "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}),
    "patterns": _object({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                         "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}),
    "list": {"type": "array", "items": _object({"k": {"type": "string", "maxLength": 6},
                                                 "v": {"type": "integer", "minimum": -5, "maximum": 5}}),
             "minItems": 1, "maxItems": 3},
}

# (regex, the same language as a Python regex for re.fullmatch)
REGEXES = [(r"\d{3}-\d{4}", r"\d{3}-\d{4}"), (r"(cat|dog|bird)s?", r"(cat|dog|bird)s?"),
           (r"[A-Z][a-z]{1,6} [A-Z][a-z]{1,6}", r"[A-Z][a-z]{1,6} [A-Z][a-z]{1,6}"),
           (r"(yes|no), because [a-z ]{1,12}\.", r"(yes|no), because [a-z ]{1,12}\.")]
CHOICES = [["red", "green", "blue sky"], ["positive", "negative", "neutral"], ["A", "B", "C", "D"]]
# (Lark or GBNF grammar, the same language as a Python regex)
GRAMMARS = [('start: "(" expr ")"\nexpr: NUM | NUM "+" NUM\nNUM: /[0-9]{1,3}/', r"\((\d{1,3}|\d{1,3}\+\d{1,3})\)"),
            ('root ::= ("on" | "off") " " [0-9] [0-9]?', r"(on|off) \d\d?")]


def fullmatch(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text) is not None
