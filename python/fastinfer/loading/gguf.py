"""GGUF files (llama.cpp's format) read into what the rest of fastinfer loads from a Hugging Face folder.

``read_gguf(path)`` returns the four things a folder would give: the ``config.json`` dict, the weights under
their Hugging Face names (dequantised to float32, lazily, one tensor at a time), the tokenizer and the
``generation_config.json`` dict.

llama.cpp's converter (``convert_hf_to_gguf.py``) changes three things on the way in, undone here:

- every tensor's dimensions are listed in reverse (ggml's ``ne[0]`` is the fastest-varying one);
- Llama-family q/k projections are permuted from Hugging Face's rotate-half rotary layout to the interleaved
  one (``LlamaModel.permute``); Qwen2, Qwen3 and Gemma3 are written as they are;
- Gemma3 RMSNorm weights are stored as ``1 + w`` (Gemma's norm multiplies by ``1 + w``; ggml's by ``w``).

Llama 3's rope scaling arrives as a ``rope_freqs`` tensor and goes back into ``rope_scaling``. The header is
parsed here over a memory map (gguf's GGUFReader spends seconds on a 49k-token vocabulary); the ``gguf``
package (llama.cpp's own) dequantises.

Example::

    config, weights, tokenizer, generation_config = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    state_dict = dict(weights)          # {"model.embed_tokens.weight": Tensor[49152, 576], ...}
"""

from __future__ import annotations

import math
import os
import re
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import (
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    ConfigError,
    check_float,
    check_int,
)

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

    from .tokenizer import Tokenizer

__all__ = ["GGUFError", "SUPPORTED_ARCHITECTURES", "SUPPORTED_TENSOR_TYPES", "read_gguf", "read_gguf_metadata"]

GGUF_MAGIC = b"GGUF"

# What a GGUF header may declare, checked (with the bytes left in the file) before anything is allocated or
# looped over: far above any real model's (a 262k-token vocabulary, ~500k merges, a few thousand tensors).
MAX_METADATA_KEYS = 1 << 16
MAX_TENSORS = 1 << 20
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 256 << 20  # one metadata string (tokenizer.huggingface.json can be tens of MB)
MAX_ARRAY_ITEMS = 1 << 22  # items of one metadata array
MAX_METADATA_ITEMS = 1 << 23  # array items in the whole header (each becomes a Python object)
MAX_ARRAY_DEPTH = 4  # arrays of arrays of ...
MAX_TENSOR_DIMS = 4  # GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 20

# GGUF architecture name -> Hugging Face model_type and class. Mistral is stored as "llama".
SUPPORTED_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
_MISTRAL = ("mistral", "MistralForCausalLM")

# ggml tensor types that gguf.quants.dequantize turns into float32 (named as in gguf.GGMLQuantizationType).
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

# Gemma3 alternates five sliding-window layers with one global layer; llama.cpp hard-codes the pattern
# (llama-model.cpp: hparams.set_swa_pattern(6)) and the local rope base unless the file states them.
_GEMMA3_SWA_PATTERN = 6
_GEMMA3_LOCAL_ROPE_BASE = 10_000.0

# GGUF tensor name -> Hugging Face parameter name. ``{i}`` is the layer index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma3 has four norms per layer; its ffn_norm is the one before the MLP.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded; the message names the file and the problem."""


def read_gguf(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], Iterator[tuple[str, torch.Tensor]], Tokenizer, dict[str, Any]]:
    """Read a GGUF file as ``(hf_config, named_weights, tokenizer, generation_config)``.

    ``named_weights`` yields ``(hf_name, float32 tensor in Hugging Face shape)`` one tensor at a time (the file
    is memory-mapped, so only the tensor being dequantised is in memory). Every check that can fail (format,
    architecture, tensor types, missing or unknown tensors, truncation) runs before this returns.
    """
    from .gguf_tokenizer import tokenizer_from_gguf

    path = os.fspath(path)
    file = _open(path)
    meta, tensors = file.metadata, file.tensors
    config = _hf_config(path, meta, tensors)
    plan = _tensor_plan(path, config, meta, tensors)
    tokenizer, special = tokenizer_from_gguf(path, meta)
    config.update({k: v for k, v in special.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    generation_config = {
        "bos_token_id": special.get("bos_token_id"),
        "eos_token_id": special.get("eos_token_id"),
    }
    if special.get("pad_token_id") is not None:
        generation_config["pad_token_id"] = special["pad_token_id"]
    return config, _dequantised(path, config, plan), tokenizer, generation_config


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as Python values (arrays as lists)."""
    return _open(os.fspath(path)).metadata


# ----------------------------------------------------------------------------------------------- file


@dataclass(slots=True)
class _TensorInfo:
    """One tensor's entry in the file header; ``data`` is a read-only view of its bytes in the memory map."""

    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] varies fastest (Hugging Face shape reversed)
    type: GGMLQuantizationType
    data: np.ndarray  # uint8, (rows, bytes per row)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))


@dataclass(slots=True)
class _GGUFFile:
    path: str
    metadata: dict[str, Any]
    tensors: dict[str, _TensorInfo]


# GGUF metadata value types: fixed-size scalars by struct format; 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
# Fewest bytes one item of each type takes in the file: a declared count is checked against the bytes left.
_MIN_BYTES = {**{k: struct.calcsize(f) for k, f in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


class _Header:
    """Sequential little-endian reader over the memory-mapped header. ``field`` names what is being read, for
    errors; every count and length is checked against the bytes left and the MAX_* bounds before use."""

    def __init__(self, buf: np.ndarray, path: str):
        self.buf, self.path, self.pos = buf, path, 0
        self.field, self.items, self.string_limit = "header", 0, MAX_STRING_BYTES

    def error(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: corrupt GGUF header: {self.field}: {problem}")

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise GGUFError(
                f"{self.path}: truncated GGUF file: {self.field} needs {n} bytes at byte {self.pos}, "
                f"the file has {len(self.buf)}"
            )
        view = memoryview(self.buf[self.pos : self.pos + n])
        self.pos += n
        return view

    def count(self, what: str, n: int, limit: int, min_bytes: int) -> int:
        """``n`` items of ``what``, each at least ``min_bytes`` long: within ``limit`` and the bytes left."""
        if n > limit:
            raise self.error(f"{n} {what}, more than the limit of {limit}")
        if n * min_bytes > len(self.buf) - self.pos:
            raise GGUFError(
                f"{self.path}: truncated GGUF file: {self.field}: {n} {what} need at least {n * min_bytes} bytes, "
                f"{len(self.buf) - self.pos} are left"
            )
        return n

    def scalar(self, kind: int) -> Any:
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise self.error(f"unknown value type {kind} at byte {self.pos}")
        value = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return _float32_value(value) if kind == _FLOAT32 else value

    def string(self, limit: int | None = None) -> str:
        n = self.scalar(10)
        limit = self.string_limit if limit is None else limit
        if n > limit:
            raise self.error(f"a string of {n} bytes, more than the limit of {limit}")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f"the string at byte {self.pos - n} is not UTF-8") from e

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        return self.array() if kind == _ARRAY else self.scalar(kind)

    def array(self, depth: int = 0) -> list:
        """(item type u32, count u64, items); an item that is itself an array is (type, count, items) again."""
        if depth >= MAX_ARRAY_DEPTH:
            raise self.error(f"arrays nested more than {MAX_ARRAY_DEPTH} deep")
        item, count = self.scalar(4), self.scalar(10)
        if item not in _MIN_BYTES:
            raise self.error(f"unknown array item type {item} at byte {self.pos - 12}")
        self.count("array items", count, MAX_ARRAY_ITEMS, _MIN_BYTES[item])
        self.items += count
        if self.items > MAX_METADATA_ITEMS:
            raise self.error(f"more than {MAX_METADATA_ITEMS} array items in the header")
        if item == _STRING:
            return [self.string() for _ in range(count)]
        if item == _ARRAY:
            return [self.array(depth + 1) for _ in range(count)]
        dtype = np.dtype(_NUMPY[item])
        return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()


def _float32_value(value: float) -> float:
    """A float32 as the shortest decimal that reads back as it (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _open(path: str) -> _GGUFFile:
    """Parse the header (metadata and tensor table) and map the tensor data; nothing is dequantised yet."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from .tokenizer import MAX_CHAT_TEMPLATE_BYTES

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or /dev/zero would block or never end
            raise GGUFError(f"{path}: not a regular file")
        buf = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))  # plain ndarray: numpy is faster on it
    except (OSError, ValueError) as e:  # ValueError: empty file
        if isinstance(e, GGUFError):
            raise
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise GGUFError(f"{path}: not a GGUF file (empty)") from e
        raise GGUFError(f"{path}: cannot open GGUF file ({e})") from e
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    h = _Header(buf, path)
    h.pos = 4
    version = h.scalar(4)
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = h.scalar(10), h.scalar(10)
    h.field = "metadata key count"
    h.count("metadata keys", n_kv, MAX_METADATA_KEYS, _MIN_KV_BYTES)
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        h.field = f"metadata key #{i}"
        key = h.string(MAX_KEY_BYTES)
        if key in metadata:
            raise h.error(f"{key} appears twice")
        h.field = key
        h.string_limit = MAX_CHAT_TEMPLATE_BYTES if key.startswith("tokenizer.chat_template") else MAX_STRING_BYTES
        metadata[key] = h.value(h.scalar(4))

    h.field = "tensor count"
    h.count("tensors", n_tensors, MAX_TENSORS, _MIN_TENSOR_BYTES)
    entries = []
    for i in range(n_tensors):
        h.field = f"tensor #{i}"
        name = h.string(MAX_KEY_BYTES)
        h.field = f"tensor {name!r}"
        n_dims = h.scalar(4)
        if not 1 <= n_dims <= MAX_TENSOR_DIMS:
            raise h.error(f"{n_dims} dimensions (1 to {MAX_TENSOR_DIMS} are valid)")
        dims = tuple(h.scalar(10) for _ in range(n_dims))
        raw_type, offset = h.scalar(4), h.scalar(10)
        entries.append((name, dims, raw_type, offset))
    h.field = "general.alignment"
    alignment = metadata.get("general.alignment", 32)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or not 1 <= alignment <= MAX_ALIGNMENT \
            or alignment & (alignment - 1):
        raise h.error(f"{alignment!r} is not a power of two up to {MAX_ALIGNMENT}")
    data_start = -(-h.pos // alignment) * alignment

    tensors = {}
    for name, dims, raw_type, offset in entries:
        h.field = f"tensor {name!r}"
        if name in tensors:
            raise h.error("appears twice in the tensor table")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name!r} has unknown ggml type id {raw_type}") from None
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        if min(dims) < 1:
            raise h.error(f"shape {list(dims)} has an empty dimension")
        if dims[0] % block:
            raise GGUFError(f"{path}: tensor {name!r} of shape {list(dims)} does not fit {ggml_type.name} blocks")
        if offset % alignment:
            raise h.error(f"data offset {offset} is not a multiple of the alignment {alignment}")
        # Python integers: a dimension of 2**64 - 1 cannot wrap around to a small size here.
        row_bytes = dims[0] // block * block_bytes
        rows = math.prod(dims[1:])
        start, end = data_start + offset, data_start + offset + rows * row_bytes
        if end > len(buf):
            raise GGUFError(
                f"{path}: truncated GGUF file: tensor {name!r} of shape {list(dims)} ends at byte {end}, "
                f"the file has {len(buf)} bytes"
            )
        tensors[name] = _TensorInfo(name, dims, ggml_type, buf[start:end].reshape(rows, row_bytes))
    return _GGUFFile(path, metadata, tensors)


# --------------------------------------------------------------------------------------------- config


def _hf_config(path: str, meta: dict[str, Any], tensors: dict[str, _TensorInfo]) -> dict[str, Any]:
    """The Hugging Face ``config.json`` the file was converted from, as far as its metadata says. Every size is
    type-checked and bounded, the layer count by the layers the file holds and the widths by the first layer's
    tensors, before anything is built from them; errors name the metadata key."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: unsupported architecture {arch!r:.60} (general.architecture); "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None, *, required: bool = False) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise GGUFError(f"{path}: metadata key {arch}.{key} is missing")
        return value

    def size(key: str, limit: int, default: Any = None, lo: int = 1) -> Any:
        value = _per_model(path, f"{arch}.{key}", get(key, default, required=default is None))
        return _checked(path, check_int, f"{arch}.{key}", value, lo, limit)

    def number(key: str, default: Any) -> Any:
        value = get(key)
        return default if value is None else _checked(path, check_float, f"{arch}.{key}", value, 0.0)

    hidden = size("embedding_length", MAX_HIDDEN)
    heads = size("attention.head_count", MAX_HEADS)
    kv_heads = size("attention.head_count_kv", MAX_HEADS, heads)
    head_dim = size("attention.key_length", MAX_HEAD_DIM, 0, lo=0)
    head_dim = head_dim or size("rope.dimension_count", MAX_HEAD_DIM, 0, lo=0)
    head_dim = head_dim or _checked(path, check_int, f"{arch}.embedding_length / head_count", hidden // heads, 1,
                                    MAX_HEAD_DIM)
    layers = size("block_count", MAX_LAYERS)
    in_file = {int(m.group(1)) for name in tensors if (m := _LAYER_TENSOR.match(name))}
    if layers > len(in_file):
        raise GGUFError(f"{path}: {arch}.block_count is {layers}, but the file has tensors for {len(in_file)} layers")
    ffn = size("feed_forward_length", MAX_HIDDEN)
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise GGUFError(f"{path}: missing tensor 'token_embd.weight'")
    for name, key, expected in (
        ("token_embd.weight", "embedding_length", hidden),
        ("blk.0.attn_q.weight", "attention.head_count * head dim", heads * head_dim),
        ("blk.0.attn_k.weight", "attention.head_count_kv * head dim", kv_heads * head_dim),
        ("blk.0.ffn_up.weight", "feed_forward_length", ffn),
    ):
        t = tensors.get(name)
        if t is not None and (len(t.dims) != 2 or t.dims[0 if name == "token_embd.weight" else 1] != expected):
            raise GGUFError(f"{path}: {arch}.{key} ({expected}) does not match tensor {name!r} of shape {list(t.dims)}")
    if len(embed.dims) != 2 or embed.dims[1] > MAX_VOCAB:
        raise GGUFError(f"{path}: tensor 'token_embd.weight' of shape {list(embed.dims)} is not a vocabulary table")
    vocab_size = embed.dims[1]
    sliding_window = get("attention.sliding_window")
    if sliding_window is not None:
        sliding_window = _checked(path, check_int, f"{arch}.attention.sliding_window", sliding_window, 1, MAX_POSITIONS)
    name = meta.get("general.name")
    name = name if isinstance(name, str) else ""
    model_type, hf_class = SUPPORTED_ARCHITECTURES[arch]
    if arch == "llama" and (sliding_window is not None or "mistral" in name.lower()):
        model_type, hf_class = _MISTRAL

    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": size("context_length", MAX_POSITIONS, 2048),
        "rms_norm_eps": number("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": number("rope.freq_base", 10_000.0),
        "rope_scaling": _rope_scaling(path, arch, meta, tensors, head_dim),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if (dtype := _file_dtype(tensors)) is not None:
        config["torch_dtype"] = dtype
    if model_type in ("llama", "mistral", "qwen3"):
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if model_type in ("llama", "mistral", "qwen2", "qwen3"):
        config["hidden_act"] = "silu"
    if model_type == "mistral":
        config["sliding_window"] = sliding_window
    if model_type in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
        config["sliding_window"] = None
    if model_type == "gemma3_text":
        config.update(_gemma3_config(config, get, number, sliding_window))
    return config


def _checked(path: str, check: Any, key: str, *args: Any) -> Any:
    """config.check_int / check_float on a metadata value, failing as GGUFError naming the file and the key."""
    try:
        return check(key, *args)
    except ConfigError as err:
        raise GGUFError(f"{path}: {err}") from None


def _per_model(path: str, key: str, value: Any) -> Any:
    """A size, which newer files may store per layer; the supported architectures use one for all."""
    if isinstance(value, list):
        if len(set(map(repr, value))) != 1:
            raise GGUFError(f"{path}: {key} differs between layers ({value!r:.60}), which is not supported")
        value = value[0]
    return value


def _gemma3_config(config: dict[str, Any], get: Any, number: Any, sliding_window: Any) -> dict[str, Any]:
    layers = config["num_hidden_layers"]
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == layers:  # newer files: one bool per layer, True = sliding
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [(i + 1) % _GEMMA3_SWA_PATTERN != 0 for i in range(layers)]
    # llama.cpp scales queries by 1/sqrt(head_dim), except the 27B model (62 layers): 1/sqrt(hidden/heads).
    scalar = config["head_dim"]
    if layers == 62:
        scalar = config["hidden_size"] // config["num_attention_heads"]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": sliding_window,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_local_base_freq": number("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE),
        "final_logit_softcapping": number("final_logit_softcapping", None),
        "attn_logit_softcapping": None,
        "attention_bias": False,
    }


def _rope_scaling(
    path: str, arch: str, meta: dict[str, Any], tensors: dict[str, _TensorInfo], head_dim: int
) -> dict[str, Any] | None:
    """Hugging Face ``rope_scaling`` from ``{arch}.rope.scaling.*`` or, for Llama 3, the ``rope_freqs`` tensor."""
    if "rope_freqs.weight" in tensors:
        return _llama3_rope_scaling(path, meta, tensors["rope_freqs.weight"], head_dim)
    prefix = f"{arch}.rope.scaling."
    kind = meta.get(prefix + "type")
    factor = meta.get(prefix + "factor")
    if kind in (None, "none") or factor is None:
        return None
    factor = _checked(path, check_float, prefix + "factor", factor, 0.0)
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        original = meta.get(prefix + "original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = _checked(
                path, check_int, prefix + "original_context_length", original, 1, MAX_POSITIONS
            )
        for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (value := meta.get(prefix + key)) is not None:
                scaling[hf_key] = _checked(path, check_float, prefix + key, value, 0.0)
        return scaling
    raise GGUFError(f"{path}: unsupported rope scaling type {kind!r:.60} ({prefix}type)")


def _llama3_rope_scaling(path: str, meta: dict[str, Any], tensor: _TensorInfo, head_dim: int) -> dict[str, Any]:
    """Recover Llama 3's rope_scaling parameters from the per-frequency factors llama.cpp stores instead.

    The converter writes ``rope_freqs[i]``, the divisor of rotary frequency i (1 for short wavelengths,
    ``factor`` for long ones, interpolated between), computed from ``factor``, ``low_freq_factor``,
    ``high_freq_factor`` and ``original_max_position_embeddings``. ``factor`` is the largest divisor; the
    released models use low 1 and high 4, so those are tried with the usual original lengths against the
    stored divisors, and anything else is an error.
    """
    from gguf import dequantize

    stored = dequantize(tensor.data, tensor.type).reshape(-1).astype(np.float64)
    theta = _checked(path, check_float, "llama.rope.freq_base", meta.get("llama.rope.freq_base", 10_000.0), 0.0)
    factor = float(stored.max())
    for low, high, original in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 131072)):
        expected = _llama3_factors(theta, head_dim, factor, low, high, original)
        if expected.shape == stored.shape and np.allclose(expected, stored, rtol=1e-4):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
    raise GGUFError(f"{path}: the rope_freqs tensor matches no Llama 3 rope scaling this loader knows")


def _llama3_factors(theta: float, dim: int, factor: float, low: float, high: float, original: int) -> np.ndarray:
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    return np.where(
        wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth))
    )


def _file_dtype(tensors: dict[str, _TensorInfo]) -> str | None:
    """The dtype the weights were stored in when they are all plain floats; None when any is quantised (the
    dequantised values are float32, and which precision to run in is the loader's choice)."""
    kinds = {t.type.name for t in tensors.values() if len(t.dims) > 1}
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    if len(kinds) == 1 and (kind := kinds.pop()) in names:
        return names[kind]
    return None


# -------------------------------------------------------------------------------------------- tensors


def _tensor_plan(
    path: str, config: dict[str, Any], meta: dict[str, Any], tensors: dict[str, _TensorInfo]
) -> list[tuple[str, _TensorInfo]]:
    """``(hf_name, tensor)`` for every tensor, checking types and that nothing is missing or unexpected."""
    layer_names = _GEMMA3_LAYER_NAMES if config["model_type"] == "gemma3_text" else _LAYER_NAMES
    plan = []
    for name, t in tensors.items():
        if name == "rope_freqs.weight":  # folded into rope_scaling
            continue
        if t.type.name not in SUPPORTED_TENSOR_TYPES:
            raise GGUFError(
                f"{path}: tensor {name!r} has unsupported type {t.type.name}; "
                f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            )
        hf_name = _GLOBAL_NAMES.get(name)
        if hf_name is None and (m := _LAYER_TENSOR.match(name)) and m.group(2) in layer_names:
            if int(m.group(1)) < config["num_hidden_layers"]:
                hf_name = f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
        if hf_name is None:
            raise GGUFError(f"{path}: unexpected tensor {name!r} for architecture {meta['general.architecture']}")
        plan.append((hf_name, t))

    missing = sorted(set(_required_tensors(config)) - set(tensors))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise GGUFError(f"{path}: missing tensors: {shown}")
    return plan


def _required_tensors(config: dict[str, Any]) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"]
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "ffn_norm"]
    if config["model_type"] in ("qwen3", "gemma3_text"):
        per_layer += ["attn_q_norm", "attn_k_norm"]
    if config["model_type"] == "gemma3_text":
        per_layer += ["post_attention_norm", "post_ffw_norm"]
    biases = ["attn_q", "attn_k", "attn_v"] if config["model_type"] == "qwen2" else []
    for i in range(config["num_hidden_layers"]):
        names += [f"blk.{i}.{n}.weight" for n in per_layer]
        names += [f"blk.{i}.{n}.bias" for n in biases]
    return names


def _dequantised(
    path: str, config: dict[str, Any], plan: list[tuple[str, _TensorInfo]]
) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import dequantize

    unpermute = config["model_type"] in ("llama", "mistral")
    norm_offset = config["model_type"] == "gemma3_text"
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for hf_name, t in plan:
        try:
            array = dequantize(t.data, t.type)
        except Exception as e:  # gguf raises NotImplementedError / ValueError from deep inside
            raise GGUFError(f"{path}: cannot dequantise tensor {t.name!r} ({t.type.name}): {e}") from e
        # a copy: F32 tensors come back as views of the read-only memory map
        weight = torch.from_numpy(np.array(array, dtype=np.float32).reshape(t.hf_shape))
        if unpermute and ".attn_q." in t.name:
            weight = _unpermute_rotary(weight, heads)
        elif unpermute and ".attn_k." in t.name:
            weight = _unpermute_rotary(weight, kv_heads)
        if norm_offset and t.name.endswith("norm.weight"):
            weight -= 1.0
        yield hf_name, weight


def _unpermute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``LlamaModel.permute``: per head, interleaved (x0, y0, x1, y1, ...) rows back to
    Hugging Face's rotate-half order (x0, x1, ..., y0, y1, ...). Works for weights (rows, cols) and biases (rows,)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
