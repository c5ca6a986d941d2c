"""The paged KV cache's settings and its sizing: how many blocks of how many tokens, from the model's cache geometry
and the memory given (or a share of what is free).

One sized CacheConfig is the only record of the cache's shape: the engine hands the same object to the model runner
(which allocates the cache) and to the scheduler (whose block manager hands out its blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the settings are checked without it
    import torch

# CPU default when no cache size is given: this fraction of the memory still available.
CPU_CACHE_FRACTION = 0.25
# GPU default: this fraction of the free device memory once the weights are loaded.
GPU_CACHE_FRACTION = 0.85
# Most tokens per block: far above any real use, low enough that nothing sized from it overflows int32 indices.
MAX_BLOCK_SIZE = 1 << 16


def check_int(name: str, value: Any, low: int, high: int | None) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int (not a bool) in [low, high] (high None: no cap)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")


@dataclass(slots=True)
class KVCacheSpec:
    """The model's cache geometry: what one token's keys and values take over every layer."""

    num_layers: int  # attention layers, each with its own (k, v) cache
    num_kv_heads: int  # key/value heads per layer
    head_dim: int  # width of one head
    dtype: torch.dtype  # element type of the cache (the model's)

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> KVCacheSpec:
        """The geometry of a fastinfer model (its ``config``; the dtype of its weights)."""
        cfg = model.config
        dtype = next(model.parameters()).dtype
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, dtype)

    def block_bytes(self, block_size: int) -> int:
        """Bytes one block of ``block_size`` tokens takes over all layers, keys and values."""
        import torch

        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element


@dataclass(slots=True)
class CacheConfig:
    """How the KV cache is laid out and how big it is; every field is checked when built (ValueError naming it).

    ``num_blocks`` is the cache's size. Left None, ``sized`` sets it for a model: ``kv_cache_memory_bytes`` worth of
    blocks, or by default as many as a share of the free memory holds (capped at what the requests can use).
    """

    block_size: int = 16  # tokens per block, in [1, MAX_BLOCK_SIZE]
    num_blocks: int | None = None  # blocks in the whole cache; None until sized
    kv_cache_memory_bytes: int | None = None  # memory to fill with blocks; None = a share of the free memory
    enable_prefix_caching: bool = True  # reuse full blocks whose token prefix was already computed

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, 1, MAX_BLOCK_SIZE)
        if self.num_blocks is not None:
            check_int("num_blocks", self.num_blocks, 1, None)
        if self.kv_cache_memory_bytes is not None:
            check_int("kv_cache_memory_bytes", self.kv_cache_memory_bytes, 1, None)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")

    @property
    def num_tokens(self) -> int:
        """Tokens the whole (sized) cache holds."""
        if self.num_blocks is None:
            raise ValueError("the cache is not sized yet (num_blocks is None)")
        return self.num_blocks * self.block_size

    def check_fits(self, device: torch.device) -> None:
        """Raise ValueError when kv_cache_memory_bytes is more than ``device`` has free (checked before a load)."""
        if self.kv_cache_memory_bytes is not None:
            free = free_memory_bytes(device)
            if self.kv_cache_memory_bytes > free:
                raise ValueError(f"kv_cache_memory_bytes: {self.kv_cache_memory_bytes} bytes is more than the "
                                 f"{free} bytes free on {device}")

    def sized(self, spec: KVCacheSpec, device: torch.device, *, max_model_len: int,
              max_num_seqs: int) -> CacheConfig:
        """This config with num_blocks set for ``spec`` on ``device`` (itself when num_blocks is set already).

        Without kv_cache_memory_bytes: the blocks ``available_memory_bytes(device)`` holds, but no more than
        max_num_seqs sequences of max_model_len tokens can use."""
        if self.num_blocks is not None:
            return self
        block_bytes = spec.block_bytes(self.block_size)
        if self.kv_cache_memory_bytes is None:
            wanted = max_num_seqs * -(-max_model_len // self.block_size)
            num_blocks = min(available_memory_bytes(device) // block_bytes, wanted)
            if num_blocks < 1:
                raise ValueError(f"num_blocks: the KV cache needs at least 1 block, got {num_blocks}")
        else:
            num_blocks = self.kv_cache_memory_bytes // block_bytes
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory_bytes: {self.kv_cache_memory_bytes} bytes hold no "
                                 f"{self.block_size}-token block (one takes {block_bytes} bytes)")
        return replace(self, num_blocks=int(num_blocks))


def free_memory_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now (a GPU's free memory; MemAvailable on the CPU)."""
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info["MemFree"])


def available_memory_bytes(device: torch.device) -> int:
    """The default KV-cache size on ``device``: a fraction of its free memory."""
    fraction = GPU_CACHE_FRACTION if device.type == "cuda" else CPU_CACHE_FRACTION
    return int(free_memory_bytes(device) * fraction)
