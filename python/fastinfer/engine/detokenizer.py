"""Incremental detokenization with stop-string detection on the new text only.

Text is decoded over a sliding window of token ids (``prefix_offset:read_offset`` is already emitted, the tokens after
``read_offset`` are new), the way vLLM and Hugging Face's TextStreamer do it: the window keeps enough left context that
tokenizers which drop or merge leading spaces decode the new tokens as they read in the full text, and a decode that
ends in U+FFFD (an incomplete multi-byte character) is held back until the following tokens complete it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

_CONTEXT_TOKENS = 5  # prompt tokens decoded in front of the first output token (spacing context)


class TokenizerLike(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(slots=True)
class DetokenizerState:
    """Decoding progress of one sequence."""

    output_text: str = ""  # output text so far (cut at a matched stop string)
    prefix_offset: int = 0  # first token id of the decode window (context already part of the text)
    read_offset: int = 0  # token ids before this index are part of output_text
    stop_buffer: int = 0  # longest stop string - 1: tail of the text held back while unfinished


class Detokenizer:
    """Turns a sequence's growing token ids into text and finds stop strings in the newly added part."""

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self.tokenizer = tokenizer

    def new_state(self, num_prompt_tokens: int, stop: list[str]) -> DetokenizerState:
        """State for a sequence whose first num_prompt_tokens ids are the prompt."""
        return DetokenizerState(
            prefix_offset=max(num_prompt_tokens - _CONTEXT_TOKENS, 0),
            read_offset=num_prompt_tokens,
            stop_buffer=max((len(s) for s in stop), default=1) - 1,
        )

    def decode_token(self, token_id: int, skip_special_tokens: bool = True) -> str:
        """Text of a single token (logprob candidates)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=skip_special_tokens)

    def update(
        self,
        state: DetokenizerState,
        token_ids: list[int],
        skip_special_tokens: bool,
        stop: list[str],
        include_stop_str_in_output: bool,
    ) -> str | None:
        """Decode the ids appended since the last call; return the stop string found in the new text, if any.

        token_ids is the sequence's whole id list (prompt + output). On a match the text is cut right before the
        stop string, or right after it when include_stop_str_in_output.
        """
        if state.read_offset >= len(token_ids):
            return None
        decode, skip = self.tokenizer.decode, skip_special_tokens
        prefix_text = decode(token_ids[state.prefix_offset : state.read_offset], skip_special_tokens=skip)
        new_text = decode(token_ids[state.prefix_offset :], skip_special_tokens=skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None  # nothing printable yet, or a multi-byte character still incomplete
        old_len = len(state.output_text)
        state.output_text += new_text[len(prefix_text) :]
        state.prefix_offset = state.read_offset
        state.read_offset = len(token_ids)
        return self._find_stop(state, old_len, stop, include_stop_str_in_output) if stop else None

    @staticmethod
    def _find_stop(state: DetokenizerState, old_len: int, stop: list[str], include: bool) -> str | None:
        """Earliest stop string that ends inside the text added after old_len; cut the text there."""
        text = state.output_text
        best, best_at = None, len(text)
        for s in stop:
            at = text.find(s, max(old_len - len(s) + 1, 0))
            if 0 <= at < best_at:
                best, best_at = s, at
        if best is not None:
            state.output_text = text[: best_at + len(best)] if include else text[:best_at]
        return best

    @staticmethod
    def visible_text(state: DetokenizerState, finished: bool) -> str:
        """Text to report: while running, hold back a tail that could still grow into a stop string."""
        if finished or state.stop_buffer == 0:
            return state.output_text
        return state.output_text[: max(len(state.output_text) - state.stop_buffer, 0)]
