"""Model settings read from a Hugging Face config.json, normalised across config versions and architectures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# config.json "architectures" entry -> our architecture name.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
# config.json "model_type" -> architecture, used when "architectures" is absent.
MODEL_TYPES: dict[str, str] = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                               "gemma3_text": "gemma3"}
# Image-text checkpoints whose text decoder we run (text_config; the vision tower is not loaded).
MULTIMODAL = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
# transformers' Gemma3TextConfig defaults: Gemma 3 image-text configs write only the non-default text fields.
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
                            rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                            query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
LAYER_TYPES = ("full_attention", "sliding_attention")
# Where config "attention_bias" puts biases on q/k/v/o (Qwen2 has them on q/k/v always, Mistral never).
BIAS_OPTION = ("llama", "qwen3", "gemma3")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # the ones whose frequencies do not depend on the input length


class ConfigError(ValueError):
    """A config.json this package cannot run (unknown architecture, inconsistent sizes, unsupported option)."""


@dataclass(slots=True)
class ModelConfig:
    """Everything the model modules need, independent of how a checkpoint spelled it.

    ``rope_scaling`` applies to full-attention layers; Gemma 3 sliding layers use ``rope_local_base_freq``
    without scaling (as Hugging Face does). ``layer_types[i]`` is "full_attention" or "sliding_attention";
    a sliding layer attends to keys with ``q_pos - k_pos < sliding_window``.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict] = None
    rope_local_base_freq: Optional[float] = None
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    layer_types: tuple = ()
    hidden_act: str = "silu"
    attention_bias: bool = False  # bias on q/k/v
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before rotary (Qwen3, Gemma 3)
    query_pre_attn_scalar: Optional[float] = None  # softmax scale = this ** -0.5 when set (Gemma 3)
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    bos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    eos_token_id: list = field(default_factory=list)
    torch_dtype: Optional[str] = None

    def __post_init__(self) -> None:
        if self.architecture not in MODEL_TYPES.values():
            raise ConfigError(f"architecture {self.architecture!r} is not one of {sorted(set(MODEL_TYPES.values()))}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.layer_types:
            self.layer_types = ("full_attention",) * self.num_hidden_layers
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise ConfigError(f"layer_types must list {self.num_hidden_layers} of {LAYER_TYPES}, "
                              f"got {self.layer_types}")
        if "sliding_attention" in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
            raise ConfigError(f"sliding attention layers need a positive sliding_window, got {self.sliding_window!r}")
        if self.hidden_act not in ("silu", "gelu_pytorch_tanh"):
            raise ConfigError(f"hidden activation {self.hidden_act!r} is not supported (silu, gelu_pytorch_tanh)")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ROPE_TYPES:
            raise ConfigError(f"rope scaling {self.rope_scaling.get('rope_type')!r} is not supported "
                              f"(supported: {', '.join(ROPE_TYPES)})")

    def window(self, layer: int) -> Optional[int]:
        """Sliding window of layer ``layer`` (keys with q_pos - k_pos < window are seen), None = full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @staticmethod
    def from_hf_dict(d: dict) -> "ModelConfig":
        """Read a Hugging Face config.json dict (transformers 4.x or 5.x spelling); for an image-text
        checkpoint (Gemma3ForConditionalGeneration) the text decoder's config."""
        d = text_config(d)
        arch = _architecture(d)
        if arch == "gemma3":
            d = {**GEMMA3_TEXT_DEFAULTS, **d}
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        gemma = arch == "gemma3"
        rope_full, rope_local = _rope(d, arch)
        eos = d.get("eos_token_id")
        sliding = d.get("sliding_window")
        if arch in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
            sliding = None  # Qwen configs carry a window that is off unless use_sliding_window
        if arch == "llama":
            sliding = None
        return ModelConfig(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_full.pop("rope_theta")),
            rope_scaling=None if rope_full.get("rope_type", "default") == "default" else rope_full,
            rope_local_base_freq=float(rope_local["rope_theta"]) if rope_local else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            sliding_window=int(sliding) if sliding else None,
            layer_types=_layer_types(d, arch, sliding),
            hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "silu",
            attention_bias=arch == "qwen2" or (bool(d.get("attention_bias")) and arch in BIAS_OPTION),
            o_proj_bias=bool(d.get("attention_bias")) and arch in BIAS_OPTION,
            mlp_bias=bool(d.get("mlp_bias", False)) and arch == "llama",
            qk_norm=arch in ("qwen3", "gemma3"),
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)) if gemma else None,
            attn_logit_softcapping=d.get("attn_logit_softcapping") if gemma else None,
            final_logit_softcapping=d.get("final_logit_softcapping") if gemma else None,
            bos_token_id=d.get("bos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            eos_token_id=[] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])],
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
        )


def is_multimodal(d: dict) -> bool:
    return any(name in MULTIMODAL for name in d.get("architectures") or [])


def text_config(d: dict) -> dict:
    """The text decoder's config: ``d`` itself, or an image-text config's text_config with the top-level
    dtype and special token ids filled in."""
    if not is_multimodal(d):
        return d
    text = dict(d.get("text_config") or {})
    text["architectures"] = [MULTIMODAL[next(n for n in d["architectures"] if n in MULTIMODAL)]]
    for key in ("torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        if d.get(key) is not None and text.get(key) is None:
            text[key] = d[key]
    return text


def _architecture(d: dict) -> str:
    names = d.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if not names and d.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[d["model_type"]]
    raise ConfigError(f"unsupported model: architectures={names}, model_type={d.get('model_type')!r}; "
                      f"supported architectures: {', '.join(ARCHITECTURES)}")


def _rope(d: dict, arch: str) -> tuple[dict, Optional[dict]]:
    """(full-attention rope parameters incl. rope_theta, sliding-layer parameters or None).

    transformers 5 writes ``rope_parameters`` (nested per layer type for Gemma 3); 4.x wrote ``rope_theta``,
    ``rope_scaling`` (with "type" in old files) and Gemma 3's ``rope_local_base_freq``.
    """
    params: dict[str, Any] = dict(d.get("rope_parameters") or {})
    local = None
    if "full_attention" in params or "sliding_attention" in params:
        local = dict(params.get("sliding_attention") or {})
        params = dict(params.get("full_attention") or {})
    scaling = d.get("rope_scaling")
    if scaling:
        params.update(scaling)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0 if arch == "gemma3" else 10_000.0))
    if params["rope_type"] in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
    if arch == "gemma3":
        local = local or {}
        local.setdefault("rope_theta", d.get("rope_local_base_freq", 10_000.0))
        if local.get("rope_type", "default") != "default":
            raise ConfigError(f"scaled rope on Gemma 3 sliding layers ({local['rope_type']!r}) is not supported")
    return params, local


def _layer_types(d: dict, arch: str, sliding: Optional[int]) -> tuple:
    n = int(d["num_hidden_layers"])
    if arch == "llama" or not sliding:
        return ("full_attention",) * n
    if d.get("layer_types"):
        return tuple(d["layer_types"])
    if arch == "mistral":
        return ("sliding_attention",) * n
    if arch == "gemma3":
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
        return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n))
    first = int(d.get("max_window_layers", n))  # Qwen: layers from max_window_layers on slide
    return tuple("sliding_attention" if i >= first else "full_attention" for i in range(n))
