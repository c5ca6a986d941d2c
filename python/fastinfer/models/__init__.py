"""fastinfer's model implementations and checkpoint loading.

>>> from fastinfer.models.loader import load_model
>>> loaded = load_model("/path/to/hf_folder", dtype="bfloat16")   # doctest: +SKIP
>>> hidden = loaded.model(input_ids, positions, kv_caches, meta)    # doctest: +SKIP
>>> logits = loaded.model.compute_logits(hidden[last_rows])        # doctest: +SKIP
"""

from __future__ import annotations

import torch

from fastinfer.models.config import ARCHITECTURES, ConfigError, ModelConfig
from fastinfer.models.gemma3 import Gemma3ForCausalLM
from fastinfer.models.llama import LlamaForCausalLM, WeightError, load_weights

# ModelConfig.architecture -> model class.
MODEL_REGISTRY: dict[str, type] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """An uninitialised model for ``config`` (fill it with ``load_weights``), in inference mode (eval, no grads)."""
    if config.architecture not in MODEL_REGISTRY:
        raise ConfigError(f"no model class for architecture {config.architecture!r}")
    return MODEL_REGISTRY[config.architecture](config, dtype, device).eval()


__all__ = ["ARCHITECTURES", "MODEL_REGISTRY", "ConfigError", "ModelConfig", "WeightError", "build_model",
           "load_weights"]
