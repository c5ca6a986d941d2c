"""Runs one scheduled step through the model: flattened tokens, attention metadata, the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastinfer.models.attention_metadata import AttentionMetadata

from .cache_config import CacheConfig, KVCacheSpec


@dataclass(slots=True)
class StepInputs:
    """The tensors one forward consumes, built from a SchedulerOutput."""

    input_ids: torch.Tensor  # (num_tokens,) int64: the scheduled tokens of every chunk, flattened
    positions: torch.Tensor  # (num_tokens,) int64: each token's position in its sequence
    meta: AttentionMetadata  # the batch's attention layout
    # (num_logit_rows,) int64: rows of the flattened batch whose logits are returned: per chunk, its prompt-logprob
    # positions, then its last position when it is sampled
    logit_rows: torch.Tensor


class ModelRunner:
    """Owns the model and its KV cache; turns each SchedulerOutput into logits.

    Parameters
    ----------
    model : a fastinfer model (``model(input_ids, positions, kv_caches, meta)`` and ``compute_logits``)
    cache_config : the sized cache (block_size, num_blocks); the engine hands the scheduler the same object
    spec : the cache geometry (layers, KV heads, head_dim, dtype: the model's)
    device : where the model and the cache live
    cpu_kernels : on CPU, run the projections with fastinfer's packed linear (``model.pack_for_cpu``)
        and keep torch to one thread during a step, so the two thread pools never spin against each
        other; False leaves the model and torch's threads as they are
    """

    def __init__(self, model: torch.nn.Module, cache_config: CacheConfig, spec: KVCacheSpec, device: torch.device,
                 cpu_kernels: bool = True) -> None:
        if cache_config.num_blocks is None:
            raise ValueError("cache_config: not sized (num_blocks is None); see CacheConfig.sized")
        self.model = model
        self.single_torch_thread = False
        if cpu_kernels and device.type == "cpu" and hasattr(model, "pack_for_cpu"):
            self.single_torch_thread = model.pack_for_cpu()
        self.cache_config = cache_config
        self.device = device
        # Token ids the model can read (its embedding's rows); the engine checks prompts against it.
        self.vocab_size: int | None = getattr(getattr(model, "config", None), "vocab_size", None)
        # One allocation; per layer (k, v) views. Slots are written before they are read, so no zero fill.
        # On CPU each block stores, per KV head, its keys then its values (block_size rows each): a decode
        # reads every (sequence, head) as whole 4 KB runs (16 rows of 64), measured 10-15% faster from DRAM
        # than keys and values in separate tensors and ~25% faster than flash-attn's token-major rows.
        # The kernels get flash-attn's (num_blocks, block_size, kv_heads, head_dim) as strided views.
        # GPUs keep flash-attn's layout (the one the CUDA kernels were measured with).
        num_layers, num_kv_heads, head_dim, dtype = spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype
        num_blocks, block_size = cache_config.num_blocks, cache_config.block_size
        if device.type == "cpu":
            self.kv_cache = torch.empty((num_layers, num_blocks, num_kv_heads, 2, block_size, head_dim),
                                        dtype=dtype, device=device)
            self.kv_caches = [(self.kv_cache[i, :, :, 0].transpose(1, 2), self.kv_cache[i, :, :, 1].transpose(1, 2))
                              for i in range(num_layers)]
        else:
            self.kv_cache = torch.empty((num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim),
                                        dtype=dtype, device=device)
            self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(num_layers)]

    def prepare(self, chunks: list) -> StepInputs:
        """Flatten the scheduled chunks (each with ``seq``, ``start``, ``num_tokens``, ``sample``, and optionally
        ``prompt_positions``)."""
        bs = self.cache_config.block_size
        q_lens = np.fromiter((c.num_tokens for c in chunks), dtype=np.int32, count=len(chunks))
        k_lens = np.fromiter((c.start + c.num_tokens for c in chunks), dtype=np.int32, count=len(chunks))
        cu_q = np.zeros(len(chunks) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=cu_q[1:])
        cu_k = np.zeros(len(chunks) + 1, dtype=np.int32)
        np.cumsum(k_lens, out=cu_k[1:])
        num_tokens = int(cu_q[-1])

        max_blocks = max(-(-int(n) // bs) for n in k_lens)
        block_table = np.zeros((len(chunks), max_blocks), dtype=np.int32)
        input_ids = np.empty(num_tokens, dtype=np.int64)
        positions = np.empty(num_tokens, dtype=np.int64)
        for i, c in enumerate(chunks):
            table = c.seq.block_table
            block_table[i, :len(table)] = table[:max_blocks]
            lo = cu_q[i]
            input_ids[lo:lo + c.num_tokens] = c.seq.token_ids[c.start:c.start + c.num_tokens]
            positions[lo:lo + c.num_tokens] = np.arange(c.start, c.start + c.num_tokens)
        # Slot of each new token: its sequence's block for that position, then the offset inside it.
        seq_of_token = np.repeat(np.arange(len(chunks)), q_lens)
        slot_mapping = block_table[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        # A token's place in its sequence, never the batch, decides how quantised projections treat its
        # activations (prompt: float, generated: int8), so chunking, batching and recompute give a row the same kind.
        prompt_lens = np.fromiter((c.seq.num_prompt_tokens for c in chunks), dtype=np.int64, count=len(chunks))
        prompt_rows = positions < prompt_lens[seq_of_token]
        logit_rows = (cu_q[1:] - 1)[np.fromiter((c.sample for c in chunks), dtype=bool, count=len(chunks))]
        if any(getattr(c, "prompt_positions", None) for c in chunks):
            rows: list[int] = []
            for i, c in enumerate(chunks):
                rows.extend(int(cu_q[i]) + p - c.start for p in getattr(c, "prompt_positions", ()))
                if c.sample:
                    rows.append(int(cu_q[i + 1]) - 1)
            logit_rows = np.array(rows, dtype=np.int64)

        dev = self.device
        meta = AttentionMetadata(
            cu_seqlens_q=torch.from_numpy(cu_q).to(dev),
            cu_seqlens_k=torch.from_numpy(cu_k).to(dev),
            max_seqlen_q=int(q_lens.max()),
            max_seqlen_k=int(k_lens.max()),
            block_table=torch.from_numpy(block_table).to(dev),
            slot_mapping=torch.from_numpy(slot_mapping).to(dev),
            prompt_rows=torch.from_numpy(prompt_rows).to(dev),
        )
        return StepInputs(torch.from_numpy(input_ids).to(dev), torch.from_numpy(positions).to(dev), meta,
                          torch.from_numpy(logit_rows.astype(np.int64)).to(dev))

    @torch.inference_mode()
    def execute(self, sched) -> torch.Tensor:
        """Run one step. Returns float32 logits (rows, vocab): per chunk in order, one row per prompt-logprob
        position, then one for its sampled position (without prompt logprobs: one row per sampled chunk)."""
        chunks = sched.scheduled
        if not chunks:
            return torch.empty((0, 0), dtype=torch.float32, device=self.device)
        step = self.prepare(chunks)
        threads = torch.get_num_threads()
        if self.single_torch_thread:
            # The heavy work runs on fastinfer's pool; torch's remaining small ops stay on this thread.
            torch.set_num_threads(1)
        try:
            hidden = self.model(step.input_ids, step.positions, self.kv_caches, step.meta)
            rows = step.logit_rows
            prompt_rows = step.meta.prompt_rows
            return self.model.compute_logits(hidden[rows], None if prompt_rows is None else prompt_rows[rows])
        finally:
            torch.set_num_threads(threads)
