"""Model settings read from a Hugging Face config.json, normalised across config versions and architectures.

ModelConfig and its checks are generic; what differs between architectures is read from their entries in
registry.py (``Architecture.hf_config``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

from fastinfer.models import registry
from fastinfer.models.registry import Architecture, HFConfig, HFFields

# config.json "architectures" entry -> our architecture name (from the registry).
ARCHITECTURES: dict[str, str] = {c: a.name for c, a in registry.BY_HF_CLASS.items()}
# config.json "model_type" -> architecture, used when "architectures" is absent.
MODEL_TYPES: dict[str, str] = {t: a.name for t, a in registry.BY_HF_MODEL_TYPE.items()}
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # the ones whose frequencies do not depend on the input length
# Upper bounds on the sizes a config may declare, checked before anything is built from them: far above any
# released model (126 layers, hidden 16384, 262k-token vocabulary, 10M-token context), far below what would
# overflow a size computation. The loaders also bound them by what the checkpoint holds.
MAX_LAYERS = 1024
MAX_HIDDEN = 1 << 17  # hidden_size and intermediate_size
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 12
MAX_VOCAB = 1 << 24
MAX_POSITIONS = 1 << 30  # max_position_embeddings, sliding_window, rope original_max_position_embeddings
SIZE_LIMITS = {"vocab_size": MAX_VOCAB, "hidden_size": MAX_HIDDEN, "intermediate_size": MAX_HIDDEN,
               "num_hidden_layers": MAX_LAYERS, "num_attention_heads": MAX_HEADS, "num_key_value_heads": MAX_HEADS,
               "head_dim": MAX_HEAD_DIM, "max_position_embeddings": MAX_POSITIONS}


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
        if self.architecture not in registry.BY_NAME:
            raise ConfigError(f"architecture {self.architecture!r} is not one of {sorted(registry.BY_NAME)}")
        for name, limit in SIZE_LIMITS.items():
            check_int(name, getattr(self, name), 1, limit)
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
                              f"got {_show(self.layer_types)}")
        if self.sliding_window is not None:
            check_int("sliding_window", self.sliding_window, 1, MAX_POSITIONS)
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ConfigError(f"sliding attention layers need a positive sliding_window, got {self.sliding_window!r}")
        check_float("rms_norm_eps", self.rms_norm_eps, 0.0)
        check_float("rope_theta", self.rope_theta, 1.0, inclusive=False)
        if self.rope_local_base_freq is not None:
            check_float("rope_local_base_freq", self.rope_local_base_freq, 1.0, inclusive=False)
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(self, name) is not None:
                check_float(name, getattr(self, name), 0.0, inclusive=False)
        for name in ("bos_token_id", "pad_token_id"):  # -1: none, in some older configs
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), -1, MAX_VOCAB)
        for i in self.eos_token_id:
            check_int("eos_token_id", i, 0, MAX_VOCAB)
        if self.hidden_act not in ("silu", "gelu_pytorch_tanh"):
            raise ConfigError(f"hidden activation {self.hidden_act!r} is not supported (silu, gelu_pytorch_tanh)")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    def window(self, layer: int) -> Optional[int]:
        """Sliding window of layer ``layer`` (keys with q_pos - k_pos < window are seen), None = full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @staticmethod
    def from_hf_dict(d: dict) -> "ModelConfig":
        """Read a Hugging Face config.json dict (transformers 4.x or 5.x spelling); for an image-text
        checkpoint (Gemma3ForConditionalGeneration) the text decoder's config. Every size is type-checked and
        bounded (SIZE_LIMITS) before anything is built from it; errors name the key."""
        if not isinstance(d, dict):
            raise ConfigError(f"must be a JSON object, got {_show(d)}")
        d = text_config(d)
        arch = _architecture(d)
        hf = arch.hf_config
        if hf.defaults:
            d = {**hf.defaults, **d}
        heads = _int(d, "num_attention_heads")
        hidden = _int(d, "hidden_size")
        rope_full, rope_local = _rope(d, arch)
        eos = d.get("eos_token_id")
        sliding = _int(d, "sliding_window", None, lo=0, hi=MAX_POSITIONS)
        if hf.sliding_window == "opt_in" and not d.get("use_sliding_window", False):
            sliding = None  # Qwen configs carry a window that is off unless use_sliding_window
        if hf.sliding_window == "never":
            sliding = None
        fields = HFFields(d, partial(_int, d), partial(_float, d))
        bias = bool(d.get("attention_bias"))
        return ModelConfig(
            architecture=arch.name,
            vocab_size=_int(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size"),
            num_hidden_layers=_int(d, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=_int(d, "num_key_value_heads", None) or heads,
            head_dim=_int(d, "head_dim", None) or hidden // heads,
            max_position_embeddings=_int(d, "max_position_embeddings", 2048),
            rms_norm_eps=_float(d, "rms_norm_eps", 1e-6),
            rope_theta=_number("rope_theta", rope_full.pop("rope_theta")),
            rope_scaling=None if rope_full.get("rope_type", "default") == "default" else rope_full,
            rope_local_base_freq=_number("rope_local_base_freq", rope_local["rope_theta"]) if rope_local else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=sliding or None,
            layer_types=_layer_types(fields, hf, sliding),
            hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "silu",
            attention_bias=hf.attention_bias == "qkv" or (bias and hf.attention_bias == "config"),
            o_proj_bias=bias and hf.attention_bias == "config",
            mlp_bias=bool(d.get("mlp_bias", False)) and hf.mlp_bias,
            qk_norm=hf.qk_norm,
            **(hf.extra(fields) if hf.extra else {}),
            bos_token_id=d.get("bos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            eos_token_id=[] if eos is None else list(eos) if isinstance(eos, list) else [eos],
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
        )


def is_multimodal(d: dict) -> bool:
    """Whether ``d`` is an image-text config whose text decoder (text_config) we run."""
    return any(name in registry.BY_HF_MULTIMODAL_CLASS for name in _architectures(d))


def _architectures(d: dict) -> list:
    names = d.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"architectures must be a list of class names, got {_show(names)}")
    return names


def text_config(d: dict) -> dict:
    """The text decoder's config: ``d`` itself, or an image-text config's text_config with the top-level
    dtype and special token ids filled in."""
    if not is_multimodal(d):
        return d
    text = dict(_dict(d, "text_config"))
    arch = registry.BY_HF_MULTIMODAL_CLASS[next(n for n in d["architectures"] if n in registry.BY_HF_MULTIMODAL_CLASS)]
    text["architectures"] = [arch.hf_classes[0]]
    for key in ("torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        if d.get(key) is not None and text.get(key) is None:
            text[key] = d[key]
    return text


def _architecture(d: dict) -> Architecture:
    names = _architectures(d)
    for name in names:
        if name in registry.BY_HF_CLASS:
            return registry.BY_HF_CLASS[name]
    if not names and d.get("model_type") in registry.BY_HF_MODEL_TYPE:
        return registry.BY_HF_MODEL_TYPE[d["model_type"]]
    raise ConfigError(f"unsupported model: architectures={names}, model_type={d.get('model_type')!r}; "
                      f"supported architectures: {', '.join(ARCHITECTURES)}")


def _rope(d: dict, arch: Architecture) -> tuple[dict, Optional[dict]]:
    """(full-attention rope parameters incl. rope_theta, sliding-layer parameters or None).

    transformers 5 writes ``rope_parameters`` (nested per layer type for Gemma 3); 4.x wrote ``rope_theta``,
    ``rope_scaling`` (with "type" in old files) and, where sliding layers have their own base (Gemma 3),
    ``rope_local_base_freq``.
    """
    params: dict[str, Any] = dict(_dict(d, "rope_parameters"))
    local = None
    if "full_attention" in params or "sliding_attention" in params:
        local = dict(_dict(params, "sliding_attention", "rope_parameters.sliding_attention"))
        params = dict(_dict(params, "full_attention", "rope_parameters.full_attention"))
    scaling = _dict(d, "rope_scaling")
    if scaling:
        params.update(scaling)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", d.get("rope_theta", 10_000.0))  # an entry's defaults may say otherwise
    if params["rope_type"] in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
    if arch.hf_config.local_rope:
        local = local or {}
        local.setdefault("rope_theta", d.get("rope_local_base_freq", 10_000.0))
        if local.get("rope_type", "default") != "default":
            raise ConfigError(f"scaled rope on {arch.title} sliding layers ({local['rope_type']!r}) is not supported")
    return params, local


def _layer_types(f: HFFields, hf: HFConfig, sliding: Optional[int]) -> tuple:
    d = f.d
    n = _int(d, "num_hidden_layers", hi=MAX_LAYERS)  # bounded before a tuple of n entries is built
    if not sliding:
        return ("full_attention",) * n
    if d.get("layer_types"):
        if not isinstance(d["layer_types"], list) or len(d["layer_types"]) != n:
            raise ConfigError(f"layer_types must list {n} of {LAYER_TYPES}, got {_show(d['layer_types'])}")
        return tuple(d["layer_types"])
    return hf.sliding_layers(f, n) if hf.sliding_layers else ("sliding_attention",) * n


# ------------------------------------------------------------------------------------------- checks


def _show(value: Any, width: int = 60) -> str:
    """``repr(value)`` cut to ``width`` characters (a bad value may be a megabyte-long list)."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` if it is an int (not a bool or a float such as 1e7) in [lo, hi], else ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def check_float(name: str, value: Any, lo: float, inclusive: bool = True) -> float:
    """``value`` as a float if it is a finite number (not a bool) above ``lo``, else ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value) or value < lo or (value == lo and not inclusive):
        raise ConfigError(f"{name} must be a finite number {'>=' if inclusive else '>'} {lo}, got {value}")
    return value


_REQUIRED = object()


def _int(d: dict, key: str, default: Any = _REQUIRED, *, lo: int = 1, hi: Optional[int] = None) -> Any:
    """Integer entry ``key`` of ``d`` (``default`` when absent or null), type-checked and bounded (SIZE_LIMITS)."""
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"missing key {key!r}")
        return default
    return check_int(key, value, lo, SIZE_LIMITS.get(key, MAX_POSITIONS) if hi is None else hi)


def _float(d: dict, key: str, default: Any = _REQUIRED) -> Any:
    """Number entry ``key`` of ``d`` as a float (``default`` when absent or null); range checks are __post_init__'s."""
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"missing key {key!r}")
        return default
    return _number(key, value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {_show(value)}")
    return float(value)


def _dict(d: dict, key: str, where: Optional[str] = None) -> dict:
    """Object entry ``key`` of ``d`` ({} when absent or null)."""
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where or key} must be an object, got {_show(value)}")
    return value


def _check_rope_scaling(s: Any) -> None:
    """The parameters rotary frequencies are computed from: present, numbers, and in a range they can be used in."""
    if not isinstance(s, dict):
        raise ConfigError(f"rope_scaling must be an object, got {_show(s)}")
    kind = s.get("rope_type")
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return
    check_float("rope_scaling.factor", s.get("factor"), 0.0, inclusive=False)
    if kind in ("llama3", "yarn"):
        check_int("rope_scaling.original_max_position_embeddings", s.get("original_max_position_embeddings"), 1,
                  MAX_POSITIONS)
    if kind == "llama3":
        low = check_float("rope_scaling.low_freq_factor", s.get("low_freq_factor"), 0.0, inclusive=False)
        high = check_float("rope_scaling.high_freq_factor", s.get("high_freq_factor"), 0.0, inclusive=False)
        if high <= low:
            raise ConfigError(f"rope_scaling.high_freq_factor ({high}) must be above low_freq_factor ({low})")
    if kind == "yarn":
        for key in ("beta_fast", "beta_slow"):
            if s.get(key) is not None:
                check_float(f"rope_scaling.{key}", s[key], 0.0, inclusive=False)
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if s.get(key) is not None:
                check_float(f"rope_scaling.{key}", s[key], 0.0)
