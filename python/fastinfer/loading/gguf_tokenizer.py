"""The tokenizer a GGUF file describes, rebuilt as a ``tokenizers.Tokenizer`` from its metadata.

A GGUF carries no ``tokenizer.json``: llama.cpp stores the vocabulary (``tokenizer.ggml.tokens``), per-token
types and scores, BPE merges, a pre-tokenizer name (``tokenizer.ggml.pre``) and the special token ids. Two
models cover the supported architectures:

- ``gpt2``: byte-level BPE (SmolLM2, Qwen2/3, Llama 3). Tokens are spelled in GPT-2's byte alphabet; the text
  is split by the regex llama.cpp uses for ``tokenizer.ggml.pre`` before byte-level encoding.
- ``llama``: SentencePiece BPE (Llama 2, Mistral v0.1, Gemma3). Spaces are spelled ``▁``; merges are rebuilt
  from the scores (SentencePiece merges the best-scoring pair first) and unknown characters fall back to the
  ``<0xXX>`` byte tokens.

Tokens typed CONTROL become special added tokens, USER_DEFINED ones plain added tokens, both matched whole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from fastinfer.loading.gguf_file import GGUFError

if TYPE_CHECKING:
    import tokenizers

    from fastinfer.loading.tokenizer import Tokenizer

__all__ = ["build_backend", "tokenizer_from_gguf"]

# llama.cpp's token types (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes by tokenizer.ggml.pre, from llama.cpp's llama-vocab.cpp (llm_tokenizer_bpe).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class _Pre(NamedTuple):
    """How llama.cpp prepares text for one ``tokenizer.ggml.pre``."""

    splits: tuple[str, ...]  # regexes applied in order, each isolating its matches, before byte-level encoding
    nfc: bool = False  # NFC-normalise first (as the original Qwen2 tokenizer.json does)
    llama3: bool = False  # a word that is a whole token is not merged (ignore_merges), and BOS is added


_GPT2 = _Pre((_GPT2_SPLIT,))
_DIGITS = _Pre((r"\p{N}", _GPT2_SPLIT))  # individual digits first, then GPT-2's regex
_LLAMA3 = _Pre((_LLAMA3_SPLIT,), llama3=True)
_QWEN2 = _Pre((_QWEN2_SPLIT,), nfc=True)
_PRE_TOKENIZERS: dict[str, _Pre] = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "olmo", "mpt"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), _DIGITS),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral"), _LLAMA3),
    **dict.fromkeys(("smaug-bpe", "dbrx"), _Pre((_LLAMA3_SPLIT,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
    "stablelm2": _Pre((_QWEN2_SPLIT,)),
    "tekken": _Pre((_TEKKEN_SPLIT,)),
    **dict.fromkeys(("gpt-4o", "llama4"), _Pre((_GPT4O_SPLIT,))),
}

# The tokenizer metadata read here and the type of each value (a list's items for a list); a value of another
# type is an error naming the key, not a TypeError from deep inside the tokenizer's construction.
_NUMBER = (int, float)
_SCHEMA: dict[str, Any] = {
    **dict.fromkeys(("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"), str),
    **dict.fromkeys(("tokenizer.ggml.tokens", "tokenizer.ggml.merges"), [str]),
    "tokenizer.ggml.token_type": [int],
    "tokenizer.ggml.scores": [_NUMBER],
    **dict.fromkeys([f"tokenizer.ggml.{k}_token_id" for k in ("bos", "eos", "unknown", "padding", "eot", "eom")], int),
    **dict.fromkeys([f"tokenizer.ggml.{k}" for k in ("add_bos_token", "add_eos_token", "add_space_prefix")], bool),
}

# Tokens that end a chat turn (llama.cpp's end-of-generation list); one counts as an extra EOS when the chat
# template writes it.
_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>")


def tokenizer_from_gguf(path: str, meta: dict[str, Any]) -> tuple[Tokenizer, dict[str, Any]]:
    """The fastinfer Tokenizer of a GGUF file and its special token ids
    (``bos_token_id``, ``eos_token_id`` (int or list), ``pad_token_id``, ``unk_token_id``)."""
    from fastinfer.loading.tokenizer import Tokenizer

    backend, info = build_backend(path, meta)
    tokenizer = Tokenizer(
        backend,
        bos_token=info["bos_token"],
        eos_token=info["eos_token"],
        eos_token_ids=info["eos_token_ids"],
        add_bos_token=info["add_bos_token"],
        add_eos_token=info["add_eos_token"],
        chat_template=info["chat_template"],
        chat_template_source=f"{path} (tokenizer.chat_template)",
        special_tokens={k: info[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if info[k]},
    )
    ids = info["eos_token_ids"]
    special = {
        "bos_token_id": info["bos_token_id"],
        "eos_token_id": ids[0] if len(ids) == 1 else list(ids),
        "pad_token_id": info["pad_token_id"],
        "unk_token_id": info["unk_token_id"],
    }
    return tokenizer, special


def build_backend(path: str, meta: dict[str, Any]) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """``(backend, info)``: the tokenizers.Tokenizer and the special tokens, flags and chat template."""

    _check_types(path, meta)
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError(f"{path}: no tokenizer in the file (tokenizer.ggml.tokens is missing)")
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if model == "gpt2":
        backend = _byte_level_bpe(path, meta, tokens, types)
    elif model == "llama":
        backend = _sentencepiece_bpe(path, meta, tokens, types)
    else:
        raise GGUFError(f"{path}: unsupported tokenizer model {model!r} (tokenizer.ggml.model); supported: gpt2, llama")
    return backend, _special_tokens(meta, tokens, model)


def _check_types(path: str, meta: dict[str, Any]) -> None:

    for key, kind in _SCHEMA.items():
        value = meta.get(key)
        if value is None:
            continue
        item = kind[0] if isinstance(kind, list) else kind
        values = value if isinstance(kind, list) and isinstance(value, list) else [value]
        if (isinstance(kind, list) and not isinstance(value, list)) or not all(
            isinstance(v, item) and (item is bool or not isinstance(v, bool)) for v in values
        ):
            what = f"a list of {getattr(item, '__name__', 'number')}" if isinstance(kind, list) else item.__name__
            raise GGUFError(f"{path}: {key} must be {what}, got {value!r:.60}")


def _merge_pairs(path: str, merges: list[str]) -> list[tuple[str, str]]:

    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise GGUFError(f"{path}: tokenizer.ggml.merges entry {bad!r:.60} is not two tokens separated by a space")
    return pairs  # type: ignore[return-value]


def _special_tokens(meta: dict[str, Any], tokens: list[str], model: str) -> dict[str, Any]:
    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos, eos, unk, pad = (token_id(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"))
    template = meta.get("tokenizer.chat_template")
    eos_ids = [i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
    if template:
        eos_ids += [tokens.index(t) for t in _END_OF_TURN if t in template and t in tokens]
    eos_ids = list(dict.fromkeys(eos_ids))

    def text(i: int | None) -> str | None:
        return None if i is None else tokens[i]

    return {
        "bos_token_id": bos,
        "eos_token_id": eos,
        "unk_token_id": unk,
        "pad_token_id": pad,
        "bos_token": text(bos),
        "eos_token": text(eos),
        "unk_token": text(unk),
        "pad_token": text(pad),
        "eos_token_ids": eos_ids,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", _adds_bos(meta, model))),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": template,
    }


def _adds_bos(meta: dict[str, Any], model: str) -> bool:
    """llama.cpp's default when the file has no tokenizer.ggml.add_bos_token: BOS for SentencePiece vocabularies
    and the Llama 3 family of byte-level ones."""
    if model == "llama":
        return True
    rules = _PRE_TOKENIZERS.get(meta.get("tokenizer.ggml.pre") or "default")
    return bool(rules and rules.llama3)


# --------------------------------------------------------------------------------------- byte-level BPE


def _byte_level_bpe(path: str, meta: dict[str, Any], tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers


    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise GGUFError(f"{path}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(
            f"{path}: unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: {', '.join(_PRE_TOKENIZERS)}"
        )
    rules = _PRE_TOKENIZERS[pre]

    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (_NORMAL, _UNUSED) and not set(token) <= spelled:  # a literal string among the byte spellings
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    pairs = _merge_pairs(path, merges)

    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=rules.llama3))
    if rules.nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in rules.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    _add_special(backend, tokens, types)
    return backend


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


# ------------------------------------------------------------------------------------ SentencePiece BPE


def _sentencepiece_bpe(path: str, meta: dict[str, Any], tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer, decoders, models, normalizers


    # A piece of only spaces is stored with real spaces by some converters; SentencePiece spells them ▁.
    tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None:
        pairs = _merge_pairs(path, merges)
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if meta.get("general.architecture") == "gemma3" or scores is None:
            # Gemma's scores do not follow its merge order, its token order does (as transformers found)
            scores = [-float(i) for i in range(len(tokens))]
        elif len(scores) != len(tokens):
            raise GGUFError(f"{path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
        pairs = _merges_from_scores(tokens, scores, types)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[int(unk)] if unk is not None and 0 <= int(unk) < len(tokens) else None

    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, unk_token=unk_token, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    # llama.cpp prefixes a space to every text fragment at the start or after a special token (llama-vocab.cpp,
    # LLAMA_VOCAB_TYPE_SPM); a normalizer does the same, as it runs on each stretch between added tokens.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    spaces = normalizers.Replace(" ", "▁")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), spaces]) if prefix else spaces
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_special(backend, tokens, types)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's rule (merge the adjacent pair whose union scores best): every
    split of a normal token into two vocabulary tokens, ranked by the token's score, best first."""
    ids = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    ranked = []
    for token, score, kind in zip(tokens, scores, types):
        if kind not in (_NORMAL, _USER_DEFINED) or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-score, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


# ------------------------------------------------------------------------------------------ added tokens


def _add_special(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int]) -> None:
    """CONTROL tokens as special added tokens, USER_DEFINED ones as plain added tokens (both kept whole)."""
    from tokenizers import AddedToken

    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)
