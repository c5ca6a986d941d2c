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

import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

    from .tokenizer import Tokenizer

__all__ = ["GGUFError", "SUPPORTED_ARCHITECTURES", "SUPPORTED_TENSOR_TYPES", "read_gguf", "read_gguf_metadata"]

GGUF_MAGIC = b"GGUF"

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


class _Header:
    """Sequential little-endian reader over the memory-mapped header."""

    def __init__(self, buf: np.ndarray, path: str):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF file (header ends at byte {len(self.buf)})")
        view = memoryview(self.buf[self.pos : self.pos + n])
        self.pos += n
        return view

    def scalar(self, kind: int) -> Any:
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise GGUFError(f"{self.path}: corrupt GGUF header (metadata value type {kind} at byte {self.pos})")
        value = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return _float32_value(value) if kind == _FLOAT32 else value

    def string(self) -> str:
        n = self.scalar(10)
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: corrupt GGUF header (string at byte {self.pos - n} is not UTF-8)") from e

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            return self.scalar(kind)
        item, count = self.scalar(4), self.scalar(10)
        if item == _STRING:
            return [self.string() for _ in range(count)]
        if item == _ARRAY:
            return [self.value(self.scalar(4)) for _ in range(count)]
        if item not in _NUMPY:
            raise GGUFError(f"{self.path}: corrupt GGUF header (array item type {item} at byte {self.pos})")
        dtype = np.dtype(_NUMPY[item])
        return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()


def _float32_value(value: float) -> float:
    """A float32 as the shortest decimal that reads back as it (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _open(path: str) -> _GGUFFile:
    """Parse the header (metadata and tensor table) and map the tensor data; nothing is dequantised yet."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        buf = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))  # plain ndarray: numpy is faster on it
    except (OSError, ValueError) as e:  # ValueError: empty file
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
    metadata = {}
    for _ in range(n_kv):
        key = h.string()
        metadata[key] = h.value(h.scalar(4))

    entries = []
    for _ in range(n_tensors):
        name = h.string()
        dims = tuple(h.scalar(10) for _ in range(h.scalar(4)))
        raw_type, offset = h.scalar(4), h.scalar(10)
        entries.append((name, dims, raw_type, offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-h.pos // alignment) * alignment

    tensors = {}
    for name, dims, raw_type, offset in entries:
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name!r} has unknown ggml type id {raw_type}") from None
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        if not dims or dims[0] % block:
            raise GGUFError(f"{path}: tensor {name!r} of shape {list(dims)} does not fit {ggml_type.name} blocks")
        row_bytes = dims[0] // block * block_bytes
        rows = int(np.prod(dims[1:], dtype=np.int64))
        start, end = data_start + offset, data_start + offset + rows * row_bytes
        if end > len(buf):
            raise GGUFError(
                f"{path}: truncated GGUF file: tensor {name!r} ends at byte {end}, the file has {len(buf)} bytes"
            )
        tensors[name] = _TensorInfo(name, dims, ggml_type, buf[start:end].reshape(rows, row_bytes))
    return _GGUFFile(path, metadata, tensors)


# --------------------------------------------------------------------------------------------- config


def _hf_config(path: str, meta: dict[str, Any], tensors: dict[str, _TensorInfo]) -> dict[str, Any]:
    """The Hugging Face ``config.json`` the file was converted from, as far as its metadata says."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: unsupported architecture {arch!r} (general.architecture); "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None, *, required: bool = False) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise GGUFError(f"{path}: metadata key {arch}.{key} is missing")
        return value

    hidden = int(get("embedding_length", required=True))
    heads = _per_model(path, f"{arch}.attention.head_count", get("attention.head_count", required=True))
    kv_heads = _per_model(path, f"{arch}.attention.head_count_kv", get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads)
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: missing tensor 'token_embd.weight'")
    vocab_size = tensors["token_embd.weight"].dims[1]
    sliding_window = get("attention.sliding_window")
    name = str(meta.get("general.name") or "")
    model_type, hf_class = SUPPORTED_ARCHITECTURES[arch]
    if arch == "llama" and (sliding_window is not None or "mistral" in name.lower()):
        model_type, hf_class = _MISTRAL

    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10_000.0)),
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
        config["sliding_window"] = None if sliding_window is None else int(sliding_window)
    if model_type in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
        config["sliding_window"] = None
    if model_type == "gemma3_text":
        config.update(_gemma3_config(config, get, sliding_window))
    return config


def _per_model(path: str, key: str, value: int | list[int]) -> int:
    """A head count, which newer files may store per layer; the supported architectures use one for all."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise GGUFError(f"{path}: {key} differs between layers ({value}), which is not supported")
        value = value[0]
    return int(value)


def _gemma3_config(config: dict[str, Any], get: Any, sliding_window: Any) -> dict[str, Any]:
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
        "sliding_window": None if sliding_window is None else int(sliding_window),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_local_base_freq": float(get("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE)),
        "final_logit_softcapping": get("final_logit_softcapping"),
        "attn_logit_softcapping": None,
        "attention_bias": False,
    }


def _rope_scaling(
    path: str, arch: str, meta: dict[str, Any], tensors: dict[str, _TensorInfo], head_dim: int
) -> dict[str, Any] | None:
    """Hugging Face ``rope_scaling`` from ``{arch}.rope.scaling.*`` or, for Llama 3, the ``rope_freqs`` tensor."""
    if "rope_freqs.weight" in tensors:
        return _llama3_rope_scaling(path, meta, tensors["rope_freqs.weight"], head_dim)
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or factor is None:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (value := meta.get(f"{arch}.rope.scaling.{key}")) is not None:
                scaling[hf_key] = float(value)
        return scaling
    raise GGUFError(f"{path}: unsupported rope scaling type {kind!r} ({arch}.rope.scaling.type)")


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
    theta = float(meta.get("llama.rope.freq_base", 10_000.0))
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
