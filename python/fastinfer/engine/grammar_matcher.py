"""One sequence's place in its grammar: which tokens may come next, advanced with every token it accepts.

The matcher follows the sequence's output tokens only, so what happens to its KV cache (chunked prefill, preemption
and recompute, prefix-cache hits) never touches it: a recomputed sequence keeps its tokens and its matcher. Each
of a request's n sequences has its own copy of the compiled grammar.
"""

from __future__ import annotations

from concurrent.futures import Future


class GrammarMatcher:
    """The grammar state of one sequence; ``ready`` once its grammar has compiled."""

    __slots__ = ("_future", "matcher", "error")

    def __init__(self, compiled: Future) -> None:
        self._future = compiled  # of the compiled start-state matcher, shared by every sequence using the grammar
        self.matcher = None  # this sequence's own llguidance matcher, once compiled
        self.error: str | None = None  # why the grammar cannot be followed (it did not compile, a token broke it)

    @property
    def future(self) -> Future:
        return self._future

    def ready(self) -> bool:
        """True once the grammar compiled (the matcher exists) or failed (``error`` set); never blocks."""
        if self.matcher is not None or self.error is not None:
            return True
        if not self._future.done():
            return False
        try:
            self.matcher = self._future.result().deep_copy()
        except Exception as err:  # the compile's own ValueError, or llguidance failing on this tokenizer
            self.error = str(err)
        return True

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False (with ``error`` set) when the grammar does not allow it."""
        if self.matcher.consume_token(token):
            return True
        # The masks let only allowed tokens through, so this is a row where nothing was left to sample.
        self.error = ("structured_outputs: no token is left that both the grammar and allowed_token_ids / "
                      "min_tokens allow at this point")
        return False

    @property
    def finished(self) -> bool:
        """No token but end-of-sequence can follow: the output is complete."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """The output so far is a complete match (end-of-sequence is allowed)."""
        return self.matcher.is_accepting()
