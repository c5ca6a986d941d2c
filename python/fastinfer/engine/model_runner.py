"""Runs one scheduled step through the model: flattened tokens, attention metadata, the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastinfer.models.attention_metadata import AttentionMetadata

# CPU default when no cache size is given: this fraction of the memory still available.
CPU_CACHE_FRACTION = 0.25
# GPU default: this fraction of the free device memory once the weights are loaded.
GPU_CACHE_FRACTION = 0.85


@dataclass(slots=True)
class StepInputs:
    """The tensors one forward consumes, built from a SchedulerOutput."""

    input_ids: torch.Tensor  # (num_tokens,) int64: the scheduled tokens of every chunk, flattened
    positions: torch.Tensor  # (num_tokens,) int64: each token's position in its sequence
    meta: AttentionMetadata  # the batch's attention layout
    sample_rows: torch.Tensor  # (num_sampled,) int64: rows of the flattened batch whose logits are sampled


def kv_block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one cache block takes over all layers, keys and values."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def free_memory_bytes(device: torch.device) -> int:
    """Memory free on `device` now (a GPU's free memory; MemAvailable on the CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info["MemFree"])


def available_memory_bytes(device: torch.device) -> int:
    """The default KV-cache size on `device`: a fraction of its free memory."""
    fraction = GPU_CACHE_FRACTION if device.type == "cuda" else CPU_CACHE_FRACTION
    return int(free_memory_bytes(device) * fraction)


class ModelRunner:
    """Owns the model and its KV cache; turns each SchedulerOutput into logits.

    Parameters
    ----------
    model : a fastinfer model (``model(input_ids, positions, kv_caches, meta)`` and ``compute_logits``)
    num_layers, num_kv_heads, head_dim : the cache geometry
    block_size : tokens per cache block (any value >= 1)
    num_blocks : blocks to allocate (the engine sizes this with ``kv_block_bytes``)
    dtype, device : of the cache (the model's)
    cpu_kernels : on CPU, run the projections with fastinfer's packed linear (``model.pack_for_cpu``)
        and keep torch to one thread during a step, so the two thread pools never spin against each
        other; False leaves the model and torch's threads as they are
    """

    def __init__(self, model: torch.nn.Module, *, num_layers: int, num_kv_heads: int, head_dim: int,
                 block_size: int, num_blocks: int, dtype: torch.dtype, device: torch.device,
                 cpu_kernels: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: the KV cache needs at least 1 block, got {num_blocks}")
        self.model = model
        self.single_torch_thread = False
        if cpu_kernels and device.type == "cpu" and hasattr(model, "pack_for_cpu"):
            self.single_torch_thread = model.pack_for_cpu()
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = device
        # Token ids the model can read (its embedding's rows); the engine checks prompts against it.
        self.vocab_size: int | None = getattr(getattr(model, "config", None), "vocab_size", None)
        # One allocation; per layer (k, v) views. Slots are written before they are read, so no zero fill.
        # On CPU each block stores, per KV head, its keys then its values (block_size rows each): a decode
        # reads every (sequence, head) as whole 4 KB runs (16 rows of 64), measured 10-15% faster from DRAM
        # than keys and values in separate tensors and ~25% faster than flash-attn's token-major rows.
        # The kernels get flash-attn's (num_blocks, block_size, kv_heads, head_dim) as strided views.
        # GPUs keep flash-attn's layout (the one the CUDA kernels were measured with).
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
        """Flatten the scheduled chunks (each with ``seq``, ``start``, ``num_tokens``, ``sample``)."""
        bs = self.block_size
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
        sample_rows = (cu_q[1:] - 1)[np.fromiter((c.sample for c in chunks), dtype=bool, count=len(chunks))]

        dev = self.device
        meta = AttentionMetadata(
            cu_seqlens_q=torch.from_numpy(cu_q).to(dev),
            cu_seqlens_k=torch.from_numpy(cu_k).to(dev),
            max_seqlen_q=int(q_lens.max()),
            max_seqlen_k=int(k_lens.max()),
            block_table=torch.from_numpy(block_table).to(dev),
            slot_mapping=torch.from_numpy(slot_mapping).to(dev),
        )
        return StepInputs(torch.from_numpy(input_ids).to(dev), torch.from_numpy(positions).to(dev), meta,
                          torch.from_numpy(sample_rows.astype(np.int64)).to(dev))

    @torch.inference_mode()
    def execute(self, sched) -> torch.Tensor:
        """Run one step. Returns float32 logits (num sampled chunks, vocab), in the chunks' order."""
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
            return self.model.compute_logits(hidden[step.sample_rows])
        finally:
            torch.set_num_threads(threads)
