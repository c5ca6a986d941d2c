"""Scheduler and cache-size settings of one engine, checked once when built."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SchedulerConfig:
    """How many requests and tokens one step may carry, and the shape of the paged KV cache."""

    max_num_seqs: int = 256  # most sequences running (holding KV blocks) at once
    max_num_batched_tokens: int = 8192  # token budget of one step (prefill chunks + decodes together)
    max_model_len: int = 4096  # longest sequence (prompt + output) in tokens; longer prompts are rejected
    block_size: int = 16  # tokens per KV-cache block
    num_blocks: int = 1024  # KV-cache blocks in the whole cache
    enable_prefix_caching: bool = True  # reuse full blocks whose token prefix was already computed

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "num_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")

    @property
    def max_seq_len(self) -> int:
        """Longest sequence that can run: the model limit, or the whole cache when that is smaller."""
        return min(self.max_model_len, self.num_blocks * self.block_size)
