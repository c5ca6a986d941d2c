"""fastinfer's model implementations: one file per model family, the registry of supported architectures
(registry.py), the generic config (config.py) and weight filling (weights.py). Reading checkpoint files is
``fastinfer.loading``'s.

>>> from fastinfer.loading import load_model
>>> loaded = load_model("/path/to/hf_folder", dtype="bfloat16")   # doctest: +SKIP
>>> hidden = loaded.model(input_ids, positions, kv_caches, meta)    # doctest: +SKIP
>>> logits = loaded.model.compute_logits(hidden[last_rows])        # doctest: +SKIP
"""

from __future__ import annotations

import importlib

import torch

from fastinfer.models.config import ARCHITECTURES, ConfigError, ModelConfig
from fastinfer.models.registry import REGISTRY
from fastinfer.models.weights import WeightError, load_weights


def _import_class(path: str) -> type:
    """The class a registry entry names as "module:Class"."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# ModelConfig.architecture -> model class, from the registry.
MODEL_REGISTRY: dict[str, type] = {arch.name: _import_class(arch.model_class) for arch in REGISTRY}


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """An uninitialised model for ``config`` (fill it with ``load_weights``), in inference mode (eval, no grads)."""
    if config.architecture not in MODEL_REGISTRY:
        raise ConfigError(f"no model class for architecture {config.architecture!r}")
    return MODEL_REGISTRY[config.architecture](config, dtype, device).eval()


__all__ = ["ARCHITECTURES", "MODEL_REGISTRY", "ConfigError", "ModelConfig", "WeightError", "build_model",
           "load_weights"]
