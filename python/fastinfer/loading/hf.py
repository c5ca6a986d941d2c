"""Hugging Face checkpoints: the snapshot folder of a cached model id, the weight files of a folder (safetensors
shards, or pickles on opt-in), the check that a config fits the safetensors headers before anything is
allocated, and the tensors one at a time. Image-text checkpoints give their text decoder's tensors under the
text-only names their registry entry lists (``hf_tensors``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch

from fastinfer.loading.files import LoadError, read, read_json, regular
from fastinfer.models import build_model, load_weights, registry
from fastinfer.models.config import ConfigError, ModelConfig


def text_decoder_prefixes(config: ModelConfig, multimodal: bool) -> tuple[tuple, tuple]:
    """(prefixes never read, (checkpoint prefix, ours) renames) of ``config``'s architecture's checkpoints: its
    image-text ones' (``multimodal``: the vision tower skipped, the text decoder renamed), else none."""
    names = registry.BY_NAME[config.architecture].hf_tensors
    return (names.skip_prefixes, names.text_prefixes) if multimodal else ((), ())


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
        revision = read(ref, 4096).strip() if ref.is_file() else ""
        if revision and "/" not in revision and revision not in (".", "..") and (snapshots / revision).is_dir():
            return snapshots / revision
        found = sorted((p for p in snapshots.iterdir() if (p / "config.json").exists()),
                       key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    looked = ", ".join(str(r / repo) for r in roots)
    raise LoadError(f"{model_id!r} is not a folder, a .gguf file, or a model in the local Hugging Face cache "
                    f"(looked in: {looked}); nothing is downloaded: fetch it first or pass a local path")


def check_fits(config_path: Path, config: ModelConfig, files: list[Path], multimodal: bool,
               dtype: torch.dtype) -> None:
    """Check, before allocating anything, that the config describes what the checkpoint holds: no more layers
    than it has tensors, then load_weights on a model of meta tensors (no memory) from the tensor shapes of the
    safetensors headers, so that missing, unexpected and wrongly shaped tensors fail here, the same way."""
    if any(f.suffix != ".safetensors" for f in files):
        return  # pickles are only known by loading them
    from safetensors import SafetensorError, safe_open

    skip, renames = text_decoder_prefixes(config, multimodal)
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
        load_weights(build_model(config, dtype, "meta"), text_names(tensors, renames))
    except ValueError as err:
        raise type(err)(f"{config_path.parent}: {err}") from None


def weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """The checkpoint files: from the shard index when there is one, else every *.safetensors file."""
    for index_name, pickled in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
        index = folder / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
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
            return regular(_check_pickle(files, allow_pickle) if pickled else files)
    if (folder / "model.safetensors").exists():
        return regular([folder / "model.safetensors"])
    # Mistral repositories also ship consolidated.safetensors, the same weights under mistral-inference names.
    files = sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("consolidated"))
    if files:
        return regular(files)
    bins = sorted(folder.glob("*.bin"))
    if bins:
        return regular(_check_pickle(bins, allow_pickle))
    raise LoadError(f"{folder}: no weights found (expected model.safetensors, *.safetensors shards with "
                    f"model.safetensors.index.json, or pytorch_model*.bin)")


def _check_pickle(files: list[Path], allow_pickle: bool) -> list[Path]:
    if not allow_pickle:
        raise LoadError(f"{files[0]}: PyTorch pickle checkpoints can run code when loaded and are refused; convert "
                        f"to safetensors, or pass allow_pickle=True to load with torch.load(weights_only=True)")
    return files


def text_names(tensors: Iterator[tuple[str, torch.Tensor]], renames: tuple) -> Iterator[tuple[str, torch.Tensor]]:
    """An image-text checkpoint's text-decoder tensors under the text-only model's names: the first of the
    (checkpoint prefix, ours) ``renames`` that fits each name (none: the names as they are)."""
    for name, tensor in tensors:
        new = next((to + name[len(old):] for old, to in renames if name.startswith(old)), name)
        yield new, tensor


def iter_tensors(files: list[Path], skip: tuple = ()) -> Iterator[tuple[str, torch.Tensor]]:
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
