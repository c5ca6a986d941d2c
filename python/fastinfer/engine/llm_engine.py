"""The step loop: schedule, run the model, sample, apply; report per-request outputs."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from .block_manager import PrefixCacheStats
from .config import SchedulerConfig
from .detokenizer import Detokenizer
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence


class Runner(Protocol):
    """What the engine needs from a model runner (engine/model_runner.py)."""

    num_blocks: int  # KV-cache blocks it allocated
    block_size: int  # tokens per block

    def execute(self, sched: SchedulerOutput) -> torch.Tensor:
        """Compute the scheduled chunks (writing their KV); float32 logits [len(sched.sampled), vocab]."""
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
        *,
        eos_token_ids: list[int] | None = None,
        seed: int | None = None,
    ) -> None:
        """tokenizer: anything with encode(text) and decode(ids, skip_special_tokens); None = token ids only, no text.
        eos_token_ids: default tokenizer.eos_token_ids. seed: seeds the generator of unseeded random sampling."""
        for name in ("num_blocks", "block_size"):
            if getattr(runner, name) != getattr(scheduler_config, name):
                raise ValueError(
                    f"scheduler_config.{name}={getattr(scheduler_config, name)} differs from the runner's "
                    f"{getattr(runner, name)}"
                )
        if eos_token_ids is None:
            eos_token_ids = list(getattr(tokenizer, "eos_token_ids", None) or [])
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = scheduler_config
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.scheduler = Scheduler(scheduler_config, eos_token_ids, self.detokenizer)
        device = getattr(runner, "device", "cpu")  # where the logits live: draws are made there
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        self.sampler = Sampler(eos_token_ids, generator)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._aborted: list[str] = []

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        prompt_text: str | None = None,
    ) -> None:
        """Queue a request: prompt text (encoded with the tokenizer's special tokens) or prompt token ids.
        prompt_text: the text to report for a prompt given as token ids (e.g. a rendered chat template)."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        params = params if params is not None else SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt text needs a tokenizer; pass token ids")
            text, ids = prompt, list(self.tokenizer.encode(prompt))
        else:
            text, ids = prompt_text, [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt must have at least one token")
        if params.stop and self.detokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        metrics = RequestMetrics(arrival_time if arrival_time is not None else time.time())
        seqs = []
        for i in range(params.n):
            seq_id = next(self._seq_ids)
            seqs.append(Sequence(seq_id, request_id, list(ids), len(ids), params, index=i))
        self.requests[request_id] = _Request(request_id, text, ids, seqs, metrics)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request; its final output (finish_reason "abort") comes from the next step()."""
        if request_id in self.requests and request_id not in self._aborted:
            self.scheduler.abort(request_id)
            self._aborted.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Run one step; outputs of the requests that got tokens, finished, were rejected or aborted."""
        sched = self.scheduler.schedule()
        now = time.time()
        touched = dict.fromkeys(self._aborted)
        self._aborted = []
        touched.update(dict.fromkeys(s.request_id for s in sched.rejected))
        for chunk in sched.scheduled:
            metrics = self.requests[chunk.seq.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
        if sched.scheduled:
            logits = self.runner.execute(sched)
            seqs = [c.seq for c in sched.sampled]
            sampled = self.sampler(logits, seqs) if seqs else None
            if sampled is not None:
                if self.detokenizer is not None:
                    for entry in sampled.logprobs:
                        for token_id, lp in (entry or {}).items():
                            lp.decoded_token = self.detokenizer.decode_token(token_id, skip_special_tokens=False)
                now = time.time()
                for seq in self.scheduler.update(sched, sampled.token_ids, sampled.logprobs):
                    metrics = self.requests[seq.request_id].metrics
                    if metrics.first_token_time is None:
                        metrics.first_token_time = now
                    touched[seq.request_id] = None
            else:
                self.scheduler.update(sched, [])
        return [self._output(rid, now) for rid in touched]

    def _output(self, request_id: str, now: float) -> RequestOutput:
        req = self.requests[request_id]
        finished = all(s.is_finished for s in req.seqs)
        if finished:
            req.metrics.finished_time = now
            del self.requests[request_id]
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
        )

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prefix-cache hit counters since the engine started."""
        return self.scheduler.block_manager.stats
