"""The step loop: schedule, run the model, sample, apply; report per-request outputs."""

from __future__ import annotations

import concurrent.futures
import itertools
import operator
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from .block_manager import PrefixCacheStats
from .cache_config import CacheConfig, KVCacheSpec
from .config import SchedulerConfig
from .detokenizer import Detokenizer
from .grammar_compiler import GrammarCompiler
from .grammar_matcher import GrammarMatcher
from .model_runner import ModelRunner
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampler import Sampler, prompt_logprobs
from .sampling_params import SEED_MAX, SEED_MIN, SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence


class Runner(Protocol):
    """What the engine needs from a model runner (engine/model_runner.py), whose KV cache has the shape of the
    engine's CacheConfig (``LLMEngine.for_model`` builds both from one object)."""

    vocab_size: int  # rows of the embedding = width of the logits (optional: without it ids are not range-checked)

    def execute(self, sched: SchedulerOutput) -> torch.Tensor:
        """Compute the scheduled chunks (writing their KV); float32 logits [rows, vocab]: per chunk in order, one
        row per position in its ``prompt_positions``, then one if it is sampled (so [len(sched.sampled), vocab] when
        no request asks for prompt logprobs)."""
        ...


@dataclass(slots=True)
class _Request:
    """Engine-side record of one request."""

    request_id: str  # caller's id
    prompt: str | None  # prompt text, when given as text
    prompt_token_ids: list[int]  # prompt tokens
    seqs: list[Sequence]  # its n sequences, by index
    metrics: RequestMetrics  # milestone times


class LLMEngine:
    """Runs requests to completion one step at a time (offline LLM and the server both drive step())."""

    def __init__(
        self,
        runner: Runner,
        tokenizer,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        *,
        eos_token_ids: list[int] | None = None,
        seed: int | None = None,
        vocab_size: int | None = None,
        max_logprobs: int = 20,
    ) -> None:
        """tokenizer: anything with encode(text) and decode(ids, skip_special_tokens); None = token ids only, no text.
        cache_config: the sized KV cache (num_blocks set) the runner computes into.
        eos_token_ids: default tokenizer.eos_token_ids. seed: seeds the generator of unseeded random sampling.
        vocab_size: token ids a prompt may use are [0, vocab_size); default runner.vocab_size.
        max_logprobs: the most logprobs a request may ask for (vLLM's name and default)."""
        if cache_config.num_blocks is None:
            raise ValueError("cache_config: not sized (num_blocks is None); see CacheConfig.sized")
        if seed is not None and (not _is_int(seed) or not SEED_MIN <= seed <= SEED_MAX):
            raise ValueError(f"seed must be None or an int in [-2**63, 2**64), got {seed!r}")
        if not _is_int(max_logprobs) or max_logprobs < 0:
            raise ValueError(f"max_logprobs must be an int >= 0, got {max_logprobs!r}")
        if vocab_size is None:
            vocab_size = getattr(runner, "vocab_size", None)
        if vocab_size is not None and (not _is_int(vocab_size) or vocab_size < 1):
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        if eos_token_ids is None:
            eos_token_ids = list(getattr(tokenizer, "eos_token_ids", None) or [])
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = scheduler_config
        self.cache_config = cache_config
        self.vocab_size = vocab_size
        self.max_logprobs = max_logprobs
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.scheduler = Scheduler(scheduler_config, cache_config, eos_token_ids, self.detokenizer)
        device = getattr(runner, "device", "cpu")  # where the logits live: draws are made there
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        self.sampler = Sampler(eos_token_ids, generator)
        self.eos_token_ids = list(eos_token_ids)
        self._grammars: GrammarCompiler | None = None  # made with the first structured-output request
        # check_request may run in a server's handler thread while the engine thread adds a request: one compiler
        self._grammars_lock = threading.Lock()
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        # Requests the next step() reports even if they made no progress: aborted ones, and those whose output a
        # failed step never handed out.
        self._report: dict[str, None] = {}

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        tokenizer,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        *,
        device: torch.device,
        seed: int | None = None,
        vocab_size: int | None = None,
        max_logprobs: int = 20,
    ) -> LLMEngine:
        """The engine for a loaded fastinfer model on ``device``: the KV cache sized from ``cache_config`` (unless it
        is sized already) for the model's geometry and scheduler_config's limits, then the model runner and the
        scheduler built over that one sized config. The other arguments are ``__init__``'s."""
        spec = KVCacheSpec.of_model(model)
        sized = cache_config.sized(spec, device, max_model_len=scheduler_config.max_model_len,
                                   max_num_seqs=scheduler_config.max_num_seqs)
        runner = ModelRunner(model, sized, spec, device)
        return cls(runner, tokenizer, scheduler_config, sized, seed=seed, vocab_size=vocab_size,
                   max_logprobs=max_logprobs)

    def check_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> tuple[str | None, list, SamplingParams, str | None]:
        """Raise ValueError / TypeError if add_request would refuse the request; queue nothing.

        Returns (prompt text or None, prompt token ids, params, why the prompt cannot run or None). A prompt the model
        cannot read (a token id that is not an int or lies outside the vocabulary) is not an error of the call: its
        request is queued and finishes at the next step() with ``error`` set, like a prompt longer than the model.
        """
        if not isinstance(request_id, str):
            raise TypeError(f"request_id: expected str, got {type(request_id).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params: expected SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt text needs a tokenizer; pass token ids")
            text, ids = prompt, list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, Iterable) and not isinstance(prompt, (bytes, dict)):
            text, ids = None, list(prompt)
        else:
            raise TypeError(f"prompt: expected str or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt must have at least one token")
        if params.stop and self.detokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise ValueError(f"logprobs: {params.logprobs} is more than max_logprobs ({self.max_logprobs})")
        if params.prompt_logprobs is not None and params.prompt_logprobs > self.max_logprobs:
            raise ValueError(f"prompt_logprobs: {params.prompt_logprobs} is more than max_logprobs "
                             f"({self.max_logprobs})")
        if self.vocab_size is not None:
            params.check_vocab(self.vocab_size)
        if params.structured_outputs is not None:
            self.grammar_compiler()  # raises if this tokenizer cannot drive a grammar
        ids, problem = _check_token_ids(ids, self.vocab_size)
        return text, ids, params, problem

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        prompt_text: str | None = None,
    ) -> None:
        """Queue a request: prompt text (encoded with the tokenizer's special tokens) or prompt token ids.
        prompt_text: the text to report for a prompt given as token ids (e.g. a rendered chat template).
        Raises what check_request raises, queueing nothing; a prompt that cannot run finishes with ``error`` set."""
        text, ids, params, problem = self.check_request(request_id, prompt, params)
        if text is None:
            text = prompt_text
        metrics = RequestMetrics(arrival_time if arrival_time is not None else time.time())
        seqs = []
        # A prompt that never runs never grows: its sequences share one list (it may be long, and n up to MAX_N).
        never_runs = problem is not None or len(ids) > self.scheduler.max_seq_len
        # Compiled off the engine loop (or found in the cache); the sequences wait in the scheduler until it is ready.
        compiled = None
        if params.structured_outputs is not None and not never_runs:
            compiled = self.grammar_compiler().submit(params.structured_outputs)
        for i in range(params.n):
            seq_id = next(self._seq_ids)
            seqs.append(Sequence(seq_id, request_id, ids if never_runs else list(ids), len(ids), params, index=i,
                                 grammar=GrammarMatcher(compiled) if compiled is not None else None))
        self.requests[request_id] = _Request(request_id, text, ids, seqs, metrics)
        for seq in seqs:
            if problem:
                self.scheduler.reject(seq, problem)
            else:
                self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request; its final output (finish_reason "abort") comes from the next step()."""
        if request_id in self.requests:
            self.scheduler.abort(request_id)
            self._report[request_id] = None

    def discard(self, request_id: str) -> None:
        """Stop a request and forget it now, with no final output (its caller has gone)."""
        if self.requests.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)
            self._report.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def grammar_compiler(self) -> GrammarCompiler:
        """The compiler of structured-output grammars for this engine's tokenizer (made on first use)."""
        with self._grammars_lock:
            if self._grammars is None:
                if self.tokenizer is None:
                    raise ValueError("structured_outputs: needs the model's tokenizer (this model has none)")
                compiler = GrammarCompiler(self.tokenizer, self.vocab_size or self.tokenizer.vocab_size,
                                           self.eos_token_ids)
                self.sampler.constraints.mask_vocab = compiler.vocab_size
                self._grammars = compiler
            return self._grammars

    def step(self) -> list[RequestOutput]:
        """Run one step; outputs of the requests that got tokens, finished, were rejected or aborted.

        If the step fails (the model raises, or KeyboardInterrupt), the engine stays usable: the step's sequences
        give back their blocks and recompute from scratch later, and the next step reports what this one would have.
        """
        sched = self.scheduler.schedule()
        now = time.time()
        touched = self._report
        self._report = {}
        touched.update(dict.fromkeys(s.request_id for s in sched.rejected))
        try:
            for chunk in sched.scheduled:
                metrics = self.requests[chunk.seq.request_id].metrics
                if metrics.first_scheduled_time is None:
                    metrics.first_scheduled_time = now
            if not sched.scheduled and not sched.rejected and self.scheduler.compiling:
                # Nothing runs until a grammar compiles: wait for one (briefly) rather than spin.
                concurrent.futures.wait([s.grammar.future for s in self.scheduler.compiling], timeout=0.05,
                                        return_when=concurrent.futures.FIRST_COMPLETED)
            if sched.scheduled:
                logits = self.runner.execute(sched)
                if sched.num_prompt_logit_rows:
                    logits = self._take_prompt_logprobs(sched, logits)
                seqs = [c.seq for c in sched.sampled]
                sampled = self.sampler(logits, seqs) if seqs else None
                if sampled is not None:
                    self._decode_logprobs(sampled.logprobs)
                    now = time.time()
                    for seq in self.scheduler.update(sched, sampled.token_ids, sampled.logprobs):
                        metrics = self.requests[seq.request_id].metrics
                        if metrics.first_token_time is None:
                            metrics.first_token_time = now
                        touched[seq.request_id] = None
                else:
                    self.scheduler.update(sched, [])
            outputs = [self._output(rid, now) for rid in touched if rid in self.requests]
        except BaseException:
            self.scheduler.recover(sched)
            self._report.update(touched)
            raise
        for out in outputs:  # only once every output exists: a failure above loses no finished request
            if out.finished:
                del self.requests[out.request_id]
        return outputs

    def _take_prompt_logprobs(self, sched: SchedulerOutput, logits: torch.Tensor) -> torch.Tensor:
        """Record the prompt logprobs of the step's prompt-logprob rows; return the sampled rows' logits."""
        expected = sched.num_prompt_logit_rows + len(sched.sampled)
        if logits.shape[0] != expected:
            raise RuntimeError(f"the runner returned {logits.shape[0]} logit rows for {expected} (prompt_logprobs "
                               f"needs a runner that returns the rows of each chunk's prompt_positions)")
        sample_rows, row = [], 0
        for chunk in sched.scheduled:
            positions, seq = chunk.prompt_positions, chunk.seq
            if positions:
                if positions.start == len(seq.prompt_logprobs) - 1:  # not recorded by an earlier, failed attempt
                    tokens = seq.token_ids[positions.start + 1:positions.stop + 1]
                    entries = prompt_logprobs(logits[row:row + len(positions)], tokens, seq.params.prompt_logprobs)
                    self._decode_logprobs(entries)
                    seq.prompt_logprobs.extend(entries)
                row += len(positions)
            if chunk.sample:
                sample_rows.append(row)
                row += 1
        return logits[sample_rows]

    def _decode_logprobs(self, entries: list[dict[int, Logprob] | None]) -> None:
        if self.detokenizer is not None:
            for entry in entries:
                for token_id, lp in (entry or {}).items():
                    lp.decoded_token = self.detokenizer.decode_token(token_id, skip_special_tokens=False)

    def _output(self, request_id: str, now: float) -> RequestOutput:
        req = self.requests[request_id]
        finished = all(s.is_finished for s in req.seqs)
        if finished:
            req.metrics.finished_time = now
        outputs = [
            CompletionOutput(
                index=s.index,
                text=Detokenizer.visible_text(s.detok, s.is_finished) if s.detok is not None else "",
                token_ids=s.output_token_ids,
                cumulative_logprob=s.cumulative_logprob,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for s in req.seqs
        ]
        return RequestOutput(
            request_id=request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            metrics=req.metrics,
            error=next((s.error for s in req.seqs if s.error), None),
            num_cached_tokens=req.seqs[0].num_cached_tokens,
            prompt_logprobs=list(req.seqs[0].prompt_logprobs) if req.seqs[0].prompt_logprobs is not None else None,
        )

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prefix-cache hit counters since the engine started."""
        return self.scheduler.block_manager.stats

    # Read-only views for monitoring (a server's /metrics reads them from another thread: each is one len() or a
    # small set, safe to read while a step runs, and at worst one step old).

    @property
    def num_running(self) -> int:
        """Requests with a sequence in the running batch."""
        return len({s.request_id for s in list(self.scheduler.running)})

    @property
    def num_waiting(self) -> int:
        """Requests with a sequence waiting to be scheduled (new, preempted, or waiting for its grammar to compile)."""
        return len({s.request_id for s in [*self.scheduler.waiting, *self.scheduler.compiling]})

    @property
    def num_free_blocks(self) -> int:
        """KV-cache blocks not held by any sequence (cached prefixes that may be evicted count as free)."""
        return self.scheduler.block_manager.num_free_blocks

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV-cache blocks held by sequences, in [0, 1]."""
        total = self.cache_config.num_blocks
        return 1.0 - self.num_free_blocks / total

    @property
    def max_seq_len(self) -> int:
        """Longest prompt + output a request can run: max_model_len, or the whole cache when that is smaller."""
        return self.scheduler.max_seq_len


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_token_ids(ids: list, vocab_size: int | None) -> tuple[list, str | None]:
    """(ids as plain ints where possible, why the model cannot read them or None); the first bad id is named."""
    if all(type(t) is int for t in ids):  # the common case: two passes in C
        if min(ids) >= 0 and (vocab_size is None or max(ids) < vocab_size):
            return ids, None
    else:
        ids = [_as_int(t) for t in ids]
    for pos, t in enumerate(ids):
        if type(t) is not int:
            text = repr(t) if len(repr(t)) <= 40 else repr(t)[:37] + "..."
            return ids, f"prompt token id {text} at position {pos} is not an int"
        if t < 0 and vocab_size is None:
            return ids, f"prompt token id {t} at position {pos} is negative"
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            return ids, f"prompt token id {t} at position {pos} is out of the vocabulary [0, {vocab_size})"
    return ids, None


def _as_int(t: object) -> object:
    """t as a plain int if it is an integer (numpy's and torch's too; bools and floats are not token ids)."""
    if type(t) is int or isinstance(t, bool):
        return t
    try:
        return operator.index(t)
    except TypeError:
        return t
