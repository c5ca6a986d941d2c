"""One generation stream: its tokens, how many of them are in the KV cache, and where."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .detokenizer import DetokenizerState
from .grammar_matcher import GrammarMatcher
from .outputs import Logprob
from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()  # queued (new or preempted): holds no KV blocks
    RUNNING = enum.auto()  # holds KV blocks; gets tokens every step the budget allows
    FINISHED = enum.auto()  # done (stopped, length-capped, aborted or rejected); blocks freed


@dataclass(slots=True, eq=False)
class Sequence:
    """Prompt + output token ids of one stream and its KV-cache bookkeeping.

    The core invariant: tokens ``[0, num_computed_tokens)`` have keys/values in the cache blocks of ``block_table``;
    every step the scheduler lets ``num_computed_tokens`` catch up with ``num_tokens``.
    """

    seq_id: int  # engine-wide unique id
    request_id: str  # owning request
    token_ids: list[int]  # prompt followed by output tokens
    num_prompt_tokens: int  # length of the prompt prefix of token_ids
    params: SamplingParams  # sampling and stop settings of the request
    index: int = 0  # position among the request's n sequences
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (prefix-cache hits included)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first scheduling
    block_table: list[int] = field(default_factory=list)  # cache block of each logical block
    block_hashes: list[int] = field(default_factory=list)  # chained hash of each full block of token_ids
    num_registered_blocks: int = 0  # leading blocks of block_table already entered in the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING  # queue the sequence is in
    generator: torch.Generator | None = None  # own RNG (seed + index) when the request is seeded
    logprobs: list[dict[int, Logprob]] | None = None  # per output token, when params.logprobs is set
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs, when params.logprobs is set
    detok: DetokenizerState | None = None  # incremental text state (None without a tokenizer)
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" once finished
    stop_reason: str | int | None = None  # matched stop string or stop token id
    error: str | None = None  # why the sequence was rejected, if it was
    grammar: GrammarMatcher | None = None  # its structured-output grammar state, when the request has one
    # Per prompt token (None first), the top-k logprobs and the token's own, while params.prompt_logprobs is set
    # (on the request's first sequence only); filled as the prompt is computed.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    def __post_init__(self) -> None:
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed + self.index)
        if self.params.logprobs is not None:
            self.logprobs = []
            self.cumulative_logprob = 0.0
        if self.params.prompt_logprobs is not None and self.index == 0:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def collecting_prompt_logprobs(self) -> bool:
        """Prompt logprobs are wanted for prompt tokens not computed yet (their logits must be computed, not taken
        from the prefix cache)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
