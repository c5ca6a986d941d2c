"""GGUF files (llama.cpp's format) read into what the rest of fastinfer loads from a Hugging Face folder.

``read_gguf(path)`` returns the four things a folder would give: the ``config.json`` dict, the weights under
their Hugging Face names (dequantised to float32, lazily, one tensor at a time), the tokenizer and the
``generation_config.json`` dict.

llama.cpp's converter (``convert_hf_to_gguf.py``) changes three things on the way in, undone here:

- every tensor's dimensions are listed in reverse (ggml's ``ne[0]`` is the fastest-varying one);
- Llama-family q/k projections are permuted from Hugging Face's rotate-half rotary layout to the interleaved
  one (``LlamaModel.permute``); Qwen2, Qwen3 and Gemma3 are written as they are;
- Gemma3 RMSNorm weights are stored as ``1 + w`` (Gemma's norm multiplies by ``1 + w``; ggml's by ``w``).

Llama 3's rope scaling arrives as a ``rope_freqs`` tensor and goes back into ``rope_scaling``. What differs
between architectures (names, tensors, the q/k permutation, the norm offset) is their registry entry's ``gguf``
field (fastinfer.models.registry). The header is parsed by gguf_file.py; the ``gguf`` package (llama.cpp's
own) dequantises.

Example::

    config, weights, tokenizer, generation_config = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    state_dict = dict(weights)          # {"model.embed_tokens.weight": Tensor[49152, 576], ...}
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fastinfer.loading.gguf_file import GGUFError, TensorInfo, open_gguf, read_gguf_metadata
from fastinfer.loading.gguf_tokenizer import tokenizer_from_gguf
from fastinfer.models import registry
from fastinfer.models.config import (
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
from fastinfer.models.registry import Architecture, GGUFFields

if TYPE_CHECKING:
    from fastinfer.loading.tokenizer import Tokenizer

__all__ = ["GGUFError", "SUPPORTED_ARCHITECTURES", "SUPPORTED_TENSOR_TYPES", "read_gguf", "read_gguf_metadata"]

# GGUF architecture name -> Hugging Face model_type and class (the registry's entries; Mistral is stored as
# "llama" and recognised by its sliding window or name).
SUPPORTED_ARCHITECTURES = {a.gguf.name: (a.hf_model_types[0], a.hf_classes[0])
                           for a in registry.REGISTRY if a.gguf and not a.gguf.claims}

# ggml tensor types that gguf.quants.dequantize turns into float32 (named as in gguf.GGMLQuantizationType).
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def read_gguf(
    path: str | os.PathLike[str], native_types: frozenset[str] = frozenset(),
) -> tuple[dict[str, Any], Iterator[tuple[str, Any]], Tokenizer, dict[str, Any]]:
    """Read a GGUF file as ``(hf_config, named_weights, tokenizer, generation_config)``.

    ``named_weights`` yields ``(hf_name, float32 tensor in Hugging Face shape)`` one tensor at a time (the file
    is memory-mapped, so only the tensor being dequantised is in memory). Every check that can fail (format,
    architecture, tensor types, missing or unknown tensors, truncation) runs before this returns.
    2-D weights whose type is in ``native_types`` (GGUF type names, e.g. "Q4_1") come as
    ``fastinfer.models.quantized.QuantizedTensor`` (their raw blocks) instead, for the quantised CPU linear; the
    types dequantised then are in the iterator's ``dequantised_types`` once it is exhausted.
    """
    path = os.fspath(path)
    file = open_gguf(path)
    meta, tensors = file.metadata, file.tensors
    config, arch = _hf_config(path, meta, tensors)
    plan = _tensor_plan(path, config, arch, meta, tensors)
    tokenizer, special = tokenizer_from_gguf(path, meta)
    config.update({k: v for k, v in special.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    generation_config = {
        "bos_token_id": special.get("bos_token_id"),
        "eos_token_id": special.get("eos_token_id"),
    }
    if special.get("pad_token_id") is not None:
        generation_config["pad_token_id"] = special["pad_token_id"]
    return config, _dequantised(path, config, arch, plan, native_types), tokenizer, generation_config


# --------------------------------------------------------------------------------------------- config


def _hf_config(path: str, meta: dict[str, Any], tensors: dict[str, TensorInfo]) -> tuple[dict[str, Any], Architecture]:
    """The Hugging Face ``config.json`` the file was converted from, as far as its metadata says, and the registry
    entry it is (the generic keys are read here, the architecture's own by its entry's hook). Every size is
    type-checked and bounded, the layer count by the layers the file holds and the widths by the first layer's
    tensors, before anything is built from them; errors name the metadata key."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in registry.GGUF_NAMES:
        raise GGUFError(
            f"{path}: unsupported architecture {arch!r:.60} (general.architecture); "
            f"supported: {', '.join(registry.GGUF_NAMES)}"
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
    entry = registry.gguf_architecture(arch, sliding_window, name)

    config: dict[str, Any] = {
        "architectures": [entry.hf_classes[0]],
        "model_type": entry.hf_model_types[0],
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
    config.update(entry.gguf.config(GGUFFields(config, get, number, sliding_window, tensors)))
    return config, entry


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


def _rope_scaling(
    path: str, arch: str, meta: dict[str, Any], tensors: dict[str, TensorInfo], head_dim: int
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


def _llama3_rope_scaling(path: str, meta: dict[str, Any], tensor: TensorInfo, head_dim: int) -> dict[str, Any]:
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


def _file_dtype(tensors: dict[str, TensorInfo]) -> str | None:
    """The dtype the weights were stored in when they are all plain floats; None when any is quantised (the
    dequantised values are float32, and which precision to run in is the loader's choice)."""
    kinds = {t.type.name for t in tensors.values() if len(t.dims) > 1}
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    if len(kinds) == 1 and (kind := kinds.pop()) in names:
        return names[kind]
    return None


# -------------------------------------------------------------------------------------------- tensors


def _tensor_plan(
    path: str, config: dict[str, Any], arch: Architecture, meta: dict[str, Any], tensors: dict[str, TensorInfo]
) -> list[tuple[str, TensorInfo]]:
    """``(hf_name, tensor)`` for every tensor, checking types and that nothing is missing or unexpected."""
    layer_names = registry.gguf_layer_tensors(arch)
    plan = []
    for name, t in tensors.items():
        if name == "rope_freqs.weight":  # folded into rope_scaling
            continue
        if t.type.name not in SUPPORTED_TENSOR_TYPES:
            raise GGUFError(
                f"{path}: tensor {name!r} has unsupported type {t.type.name}; "
                f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            )
        hf_name = registry.GGUF_GLOBAL_TENSORS.get(name)
        if hf_name is None and (m := _LAYER_TENSOR.match(name)) and m.group(2) in layer_names:
            if int(m.group(1)) < config["num_hidden_layers"]:
                hf_name = f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
        if hf_name is None:
            raise GGUFError(f"{path}: unexpected tensor {name!r} for architecture {meta['general.architecture']}")
        plan.append((hf_name, t))

    missing = sorted(set(_required_tensors(config, arch)) - set(tensors))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise GGUFError(f"{path}: missing tensors: {shown}")
    return plan


def _required_tensors(config: dict[str, Any], arch: Architecture) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"]
    per_layer, biases = arch.gguf.required, arch.gguf.required_bias
    for i in range(config["num_hidden_layers"]):
        names += [f"blk.{i}.{n}.weight" for n in per_layer]
        names += [f"blk.{i}.{n}.bias" for n in biases]
    return names


def _dequantised(
    path: str, config: dict[str, Any], arch: Architecture, plan: list[tuple[str, TensorInfo]],
    native_types: frozenset[str] = frozenset(),
) -> Iterator[tuple[str, Any]]:
    from gguf import dequantize

    from fastinfer.models.quantized import QuantizedTensor

    unpermute, norm_offset = arch.gguf.unpermute_qk, arch.gguf.norm_offset
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for hf_name, t in plan:
        if native_types and len(t.hf_shape) == 2 and t.type.name in native_types:
            raw = np.asarray(t.data)
            if unpermute and ".attn_q." in t.name:
                raw = _unpermute_rows(raw, heads)
            elif unpermute and ".attn_k." in t.name:
                raw = _unpermute_rows(raw, kv_heads)
            yield hf_name, QuantizedTensor(t.name, t.type.name.lower(), raw, tuple(t.hf_shape))
            continue
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


def _unpermute_rows(raw: np.ndarray, n_head: int) -> np.ndarray:
    """``_unpermute_rotary`` on the rows of a quantised weight's raw blocks (each row's blocks stay whole)."""
    rows = raw.shape[0]
    return np.ascontiguousarray(raw.reshape(n_head, rows // n_head // 2, 2, -1).transpose(0, 2, 1, 3).reshape(raw.shape))


def _unpermute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``LlamaModel.permute``: per head, interleaved (x0, y0, x1, y1, ...) rows back to
    Hugging Face's rotate-half order (x0, x1, ..., y0, y1, ...). Works for weights (rows, cols) and biases (rows,)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
