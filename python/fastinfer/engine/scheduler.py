"""Decides which tokens of which sequences one step computes, and applies the step's sampled tokens.

The core rule (vLLM v1): there is no prefill or decode phase. Every sequence has ``num_tokens`` tokens of which
``num_computed_tokens`` are in the KV cache; each step gives running sequences (oldest first) and then waiting ones
``min(num_tokens - num_computed_tokens, remaining budget)`` tokens, so prompt chunks and decodes share one batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .cache_config import CacheConfig
from .config import SchedulerConfig
from .detokenizer import Detokenizer
from .outputs import Logprob
from .sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledChunk:
    """Tokens ``[start, start + num_tokens)`` of one sequence, computed this step."""

    seq: Sequence  # the sequence (its block_table already covers the chunk)
    start: int  # first token of the chunk (= seq.num_computed_tokens before the step)
    num_tokens: int  # tokens in the chunk (>= 1)
    sample: bool  # the chunk reaches the sequence's last token: its last position's logits are sampled
    # Positions of the chunk whose logits give the sequence's prompt logprobs (those of the next prompt token).
    prompt_positions: range = range(0)


@dataclass(slots=True)
class SchedulerOutput:
    """One step's batch, in the order the runner lays out its tokens."""

    scheduled: list[ScheduledChunk] = field(default_factory=list)  # chunks to compute, running ones first
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting; their KV will be recomputed
    rejected: list[Sequence] = field(default_factory=list)  # finished with an error without running
    num_batched_tokens: int = 0  # sum of the chunks' num_tokens

    @property
    def sampled(self) -> list[ScheduledChunk]:
        """The chunks whose last position is sampled, in order."""
        return [c for c in self.scheduled if c.sample]

    @property
    def num_prompt_logit_rows(self) -> int:
        """Rows of prompt-logprob logits the step computes besides the sampled ones."""
        return sum(len(c.prompt_positions) for c in self.scheduled)


class Scheduler:
    """Waiting and running queues over one BlockManager (the blocks of a sized CacheConfig)."""

    def __init__(
        self,
        config: SchedulerConfig,
        cache_config: CacheConfig,
        eos_token_ids: list[int] = (),
        detokenizer: Detokenizer | None = None,
    ) -> None:
        self.config = config
        self.cache_config = cache_config
        self.eos_token_ids = list(eos_token_ids)
        self.detokenizer = detokenizer
        self.block_manager = BlockManager(
            cache_config.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.waiting: deque[Sequence] = deque()
        # New sequences whose structured-output grammar is still compiling (in arrival order); they join waiting
        # when it is ready, so a slow compile holds back nobody else.
        self.compiling: list[Sequence] = []
        self.running: list[Sequence] = []
        self._rejected: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def max_seq_len(self) -> int:
        """Longest sequence that can run: the model limit, or the whole cache when that is smaller."""
        return min(self.config.max_model_len, self.cache_config.num_tokens)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; one that can never run is finished with an error at the next schedule()."""
        limit = self.max_seq_len
        if seq.num_tokens > limit:
            what = "max_model_len" if limit == self.config.max_model_len else "the KV cache capacity"
            self.reject(seq, f"prompt of {seq.num_tokens} tokens is longer than {what} ({limit} tokens)")
            return
        seq.status = SequenceStatus.WAITING
        if self.detokenizer is not None and seq.detok is None:
            seq.detok = self.detokenizer.new_state(seq.num_prompt_tokens, seq.params.stop)
        if seq.grammar is not None and not seq.grammar.ready():
            self.compiling.append(seq)
        elif seq.grammar is not None and seq.grammar.error is not None:
            self.reject(seq, seq.grammar.error)
        else:
            self.waiting.append(seq)

    def reject(self, seq: Sequence, error: str) -> None:
        """Finish a sequence that can never run with reason "error"; the next schedule() reports it."""
        self._finish(seq, "error")
        seq.error = error
        self._rejected.append(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of the request with reason "abort"; return them."""
        found = [s for s in (*self.running, *self.waiting, *self.compiling) if s.request_id == request_id]
        for seq in found:
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
            elif seq in self.compiling:
                self.compiling.remove(seq)
            else:
                self.waiting.remove(seq)
            self._finish(seq, "abort")
        self._rejected = [s for s in self._rejected if s.request_id != request_id]
        return found

    def recover(self, out: SchedulerOutput) -> None:
        """Undo the scheduling of a step that failed before (or while) it ran: its KV writes may be partial.

        Every unfinished sequence it scheduled gives back its blocks and waits, in its old order, to be recomputed
        from scratch; the blocks the step made findable in the prefix cache are forgotten first, so no later request
        reuses KV that was never written. (Blocks before a chunk's start were full, and findable, before the step.)
        """
        bm = self.block_manager
        for chunk in out.scheduled:
            bm.forget(chunk.seq.block_table[chunk.start // bm.block_size :])
        for chunk in reversed(out.scheduled):
            seq = chunk.seq
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
                self._requeue(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._rejected or self.compiling)

    def _admit_compiled(self) -> None:
        """Sequences whose grammar compiled join the waiting queue; those whose grammar failed are rejected."""
        still = []
        for seq in self.compiling:
            if not seq.grammar.ready():
                still.append(seq)
            elif seq.grammar.error is not None:
                self.reject(seq, seq.grammar.error)
            else:
                self.waiting.append(seq)
        self.compiling = still

    def schedule(self) -> SchedulerOutput:
        if self.compiling:
            self._admit_compiled()
        out = SchedulerOutput(rejected=self._rejected)
        self._rejected = []
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.allocate(seq, num_new):
                victim = self.running.pop()  # the newest running sequence gives its blocks back
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq preempted itself: it was the newest, nothing after it
            self._add_chunk(out, seq, num_new)
            budget -= num_new
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            # A sequence collecting prompt logprobs computes its prompt: cached KV has no logits.
            cached = bm.find_cached_prefix(seq) if not seq.block_table and not seq.collecting_prompt_logprobs else []
            num_new = min(seq.num_tokens - seq.num_computed_tokens - len(cached) * bm.block_size, budget)
            if not bm.allocate(seq, num_new, cached):
                break  # the cache is full; wait for running sequences to finish
            if seq.num_prompt_tokens == seq.num_tokens:
                seq.num_cached_tokens = len(cached) * bm.block_size
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add_chunk(out, seq, num_new)
            budget -= num_new
        return out

    def update(
        self,
        out: SchedulerOutput,
        token_ids: list[int],
        logprobs: list[dict[int, Logprob] | None] | None = None,
    ) -> list[Sequence]:
        """Apply a step: advance computed tokens, append the sampled tokens (one per sampled chunk, in order),
        finish sequences that stopped and free their blocks. Returns the sequences that got a token (and those that
        finished with an error instead: a grammar that allowed no token left by allowed_token_ids / min_tokens)."""
        sampled: list[Sequence] = []
        k = 0
        for chunk in out.scheduled:
            seq = chunk.seq
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            if not chunk.sample:
                continue
            token = token_ids[k]
            entry = logprobs[k] if logprobs is not None else None
            k += 1
            if seq.is_finished:
                continue  # aborted between schedule() and update()
            sampled.append(seq)
            if seq.grammar is not None and not seq.grammar.accept(token):
                self.running.remove(seq)  # the token is not kept: it was drawn from a row with nothing allowed
                self._finish(seq, "error")
                seq.error = seq.grammar.error
                continue
            seq.token_ids.append(token)
            if seq.logprobs is not None and entry is not None:
                seq.logprobs.append(entry)
                seq.cumulative_logprob += entry[token].logprob
            self._check_stop(seq, token)
        if k != len(token_ids):
            raise ValueError(f"got {len(token_ids)} sampled tokens for {k} sampled chunks")
        return sampled

    def _check_stop(self, seq: Sequence, token: int) -> None:
        """Finish seq if its newest token ends it (vLLM v1 order: length, then EOS / stop ids, then stop strings)."""
        p = seq.params
        reason, stop_reason = None, None
        max_tokens = p.max_tokens if p.max_tokens is not None else self.max_seq_len
        if seq.num_tokens >= self.max_seq_len or seq.num_output_tokens >= max_tokens:
            reason = "length"
        elif seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
            elif token in p.stop_token_ids:
                reason, stop_reason = "stop", token
        if seq.detok is not None and not (reason == "stop" and not p.include_stop_str_in_output):
            # a stop token is left out of the text unless include_stop_str_in_output
            stop = p.stop if seq.num_output_tokens > p.min_tokens else []  # stop strings count after min_tokens
            stop_str = self.detokenizer.update(
                seq.detok, seq.token_ids, p.skip_special_tokens, stop, p.include_stop_str_in_output
            )
            if stop_str is not None:
                reason, stop_reason = "stop", stop_str
        if reason is None and seq.grammar is not None and seq.grammar.finished:
            # The grammar is complete and allows nothing more: the sequence ends here (its last token is text), even
            # below min_tokens or with ignore_eos, since the only token left to sample would be end-of-sequence.
            reason = "stop"
        if reason is not None:
            self.running.remove(seq)
            self._finish(seq, reason, stop_reason)

    def _add_chunk(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        start = seq.num_computed_tokens
        positions = range(0)
        if seq.collecting_prompt_logprobs:
            # position p's logits give prompt token p + 1's logprobs; entries before len(prompt_logprobs) exist
            # already (a recompute after preemption computes them again, unrecorded)
            positions = range(max(start, len(seq.prompt_logprobs) - 1), min(start + num_new, seq.num_prompt_tokens - 1))
        out.scheduled.append(ScheduledChunk(seq, start, num_new, start + num_new == seq.num_tokens, positions))
        out.num_batched_tokens += num_new

    def _preempt(self, seq: Sequence) -> None:
        self._requeue(seq)
        self.num_preemptions += 1

    def _requeue(self, seq: Sequence) -> None:
        """Free seq's blocks and put it at the front of waiting; its KV is recomputed when it runs again."""
        self.block_manager.free_blocks(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        self.block_manager.free_blocks(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
