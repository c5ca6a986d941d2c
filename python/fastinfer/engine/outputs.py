"""What the engine hands back per request (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """Log-probability of one candidate token at one output (or prompt) position."""

    logprob: float  # log-softmax of the raw model logits
    rank: int  # 1 = most likely token at this position
    decoded_token: str | None = None  # the token's text, when a tokenizer is available


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence of a request."""

    index: int  # position among the request's n sequences
    text: str  # generated text (stop string trimmed unless include_stop_str_in_output)
    token_ids: list[int]  # generated token ids (a stop token id or EOS that ended generation is included)
    cumulative_logprob: float | None  # sum of the sampled tokens' logprobs; None unless logprobs were requested
    logprobs: list[dict[int, Logprob]] | None  # per output token: top-k candidates plus the sampled token
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"; None while running
    stop_reason: str | int | None = None  # the matched stop string or stop token id; None for EOS / length

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (time.time()) of one request's milestones; None until reached."""

    arrival_time: float  # when add_request received it
    first_scheduled_time: float | None = None  # first step that computed any of its tokens
    first_token_time: float | None = None  # first output token sampled
    finished_time: float | None = None  # all its sequences finished


@dataclass(slots=True)
class RequestOutput:
    """State of one request after a step: its prompt and every sequence's output so far."""

    request_id: str  # caller's id
    prompt: str | None  # prompt text (None when given as token ids)
    prompt_token_ids: list[int]  # prompt tokens
    outputs: list[CompletionOutput]  # one per sequence, ordered by index
    finished: bool  # all sequences finished
    metrics: RequestMetrics | None = None  # milestone times
    error: str | None = None  # why the request was rejected alone (e.g. prompt too long); None otherwise
    num_cached_tokens: int = field(default=0)  # prompt tokens served from the prefix cache (first sequence)
    # With SamplingParams.prompt_logprobs: per prompt token, None for the first, then its top-k candidates plus the
    # token itself (each a Logprob: log-softmax of the model's logits at the position before it); None otherwise.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
