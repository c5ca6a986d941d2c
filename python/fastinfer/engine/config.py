"""Scheduler settings of one engine, checked once when built (the KV cache's are in cache_config.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SchedulerConfig:
    """How many requests and tokens one step may carry, and how long a sequence may grow."""

    max_num_seqs: int = 256  # most sequences running (holding KV blocks) at once
    max_num_batched_tokens: int = 8192  # token budget of one step (prefill chunks + decodes together)
    max_model_len: int = 4096  # longest sequence (prompt + output) in tokens; longer prompts are rejected

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
