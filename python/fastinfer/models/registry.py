"""The supported architectures, one ``Architecture`` entry each: how Hugging Face config.json files and GGUF
files name them, how their settings become ModelConfig fields, their checkpoint tensor names, their model class.

Adding an architecture = one model file + one entry in ``REGISTRY``. The generic readers use the entries:
``ModelConfig.from_hf_dict`` (config.py) the ``hf_*`` fields, ``fastinfer.models.load_weights`` the tensor
names, ``fastinfer.loading.gguf`` the ``gguf`` field, ``fastinfer.models.build_model`` the class.

This module imports nothing from fastinfer, so it can be read by everything above it without an import cycle:
the model class is named by its import path (resolved by ``fastinfer.models``), and the hooks get their
type-checked value readers (``HFFields``, ``GGUFFields``) from the generic reader that calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Optional

# ------------------------------------------------------------------------------ shared checkpoint names

# Hugging Face tensor name piece -> (our fused parameter's name piece, shard index).
FUSED = {
    ".self_attn.q_proj.": (".self_attn.qkv_proj.", 0),
    ".self_attn.k_proj.": (".self_attn.qkv_proj.", 1),
    ".self_attn.v_proj.": (".self_attn.qkv_proj.", 2),
    ".mlp.gate_proj.": (".mlp.gate_up_proj.", 0),
    ".mlp.up_proj.": (".mlp.gate_up_proj.", 1),
}
# Tensors some checkpoints carry that the forward pass never reads.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# transformers' image-text checkpoints: prefix of the text decoder's tensors -> ours (transformers 5, then 4.x),
# and the prefixes of the tensors never read (the vision tower).
TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                 ("language_model.lm_head.", "lm_head."))
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")

# GGUF tensor name -> Hugging Face parameter name, outside the layers.
GGUF_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# GGUF per-layer name (blk.{i}.<name>.{weight,bias}) -> Hugging Face's (model.layers.{i}.<name>.{weight,bias}).
GGUF_LAYER_TENSORS = {
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
# The per-layer GGUF tensors every Llama-style file has.
GGUF_LAYER_REQUIRED = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
                       "ffn_norm")


# ------------------------------------------------------------------------------------------ entry types


@dataclass(frozen=True, slots=True)
class HFFields:
    """What an ``HFConfig`` hook reads: config.json (the entry's defaults filled in) and checked readers of it."""

    d: dict
    get_int: Callable[..., Any]  # (key, default=required, *, lo=1, hi=None): an int in bounds, or ConfigError
    get_float: Callable[..., Any]  # (key, default=required): a number as float, or ConfigError


@dataclass(frozen=True, slots=True)
class HFConfig:
    """How an architecture's config.json differs from the generic reading in ``ModelConfig.from_hf_dict``."""

    defaults: Optional[Mapping[str, Any]] = None  # values a config.json may leave out
    sliding_window: str = "config"  # "config": as written; "opt_in": only with use_sliding_window; "never"
    sliding_layers: Optional[Callable[[HFFields, int], tuple]] = None  # layer_types when sliding and the config
    # lists none (None: every layer slides)
    attention_bias: str = "never"  # "config": attention_bias puts biases on q/k/v and o; "qkv": q/k/v always
    mlp_bias: bool = False  # config's mlp_bias honoured
    qk_norm: bool = False  # per-head RMSNorm of q and k before rotary
    local_rope: bool = False  # sliding layers use their own unscaled rope base (rope_local_base_freq)
    extra: Optional[Callable[[HFFields], dict]] = None  # further ModelConfig fields read from the config


@dataclass(frozen=True, slots=True)
class HFTensors:
    """Hugging Face checkpoint tensor names (besides our parameter names, which the model class defines)."""

    fused: Optional[Mapping[str, tuple[str, int]]] = None  # HF piece -> (fused parameter piece, shard); None: FUSED
    ignored: tuple[str, ...] = IGNORED_SUFFIXES  # suffixes of tensors never read
    text_prefixes: tuple[tuple[str, str], ...] = ()  # image-text checkpoints: text decoder's prefix -> ours
    skip_prefixes: tuple[str, ...] = ()  # image-text checkpoints: prefixes of tensors never read


@dataclass(frozen=True, slots=True)
class GGUFFields:
    """What a ``GGUFFormat.config`` hook reads: the config.json built so far and checked metadata readers."""

    config: dict  # the generic config.json keys, read from "{arch}.*" metadata and the tensor table
    get: Callable[[str], Any]  # raw value of metadata key "{arch}.{key}", None when absent
    number: Callable[[str, Any], Any]  # checked float of "{arch}.{key}", the default when absent
    sliding_window: Optional[int]  # {arch}.attention.sliding_window, checked
    tensors: Collection[str]  # the file's tensor names


@dataclass(frozen=True, slots=True)
class GGUFFormat:
    """How llama.cpp's converter (convert_hf_to_gguf.py) writes an architecture."""

    name: str  # general.architecture
    config: Callable[[GGUFFields], dict]  # config.json keys beyond the generic ones
    claims: Optional[Callable[[Optional[int], str], bool]] = None  # (sliding window, general.name) -> whether a
    # file of ``name`` is this architecture, for one that shares its name with another (Mistral is "llama")
    layer_tensors: Optional[Mapping[str, str]] = None  # None: GGUF_LAYER_TENSORS
    required: tuple[str, ...] = GGUF_LAYER_REQUIRED  # per-layer weights every file has
    required_bias: tuple[str, ...] = ()  # per-layer biases every file has
    unpermute_qk: bool = False  # q/k rows permuted to interleaved rotary (llama.cpp's LlamaModel.permute)
    norm_offset: bool = False  # RMSNorm weights stored as 1 + w


@dataclass(frozen=True, slots=True)
class Architecture:
    """One supported architecture."""

    name: str  # ModelConfig.architecture
    title: str  # for messages
    model_class: str  # "module:Class", imported by fastinfer.models
    hf_classes: tuple[str, ...]  # config.json "architectures" entries
    hf_model_types: tuple[str, ...]  # config.json "model_type", used when "architectures" is absent
    hf_config: HFConfig
    hf_tensors: HFTensors = HFTensors()
    hf_multimodal_classes: tuple[str, ...] = ()  # image-text classes whose text decoder (text_config) we run
    gguf: Optional[GGUFFormat] = None


# -------------------------------------------------------------------------------------- per-arch hooks


def _qwen_sliding_layers(f: HFFields, n: int) -> tuple:
    first = f.get_int("max_window_layers", n, lo=0)  # Qwen: layers from max_window_layers on slide
    return tuple("sliding_attention" if i >= first else "full_attention" for i in range(n))


def _gemma3_sliding_layers(f: HFFields, n: int) -> tuple:
    pattern = f.get_int("sliding_window_pattern", None) or f.get_int("_sliding_window_pattern", None) or 6
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n))


def _gemma3_extra(f: HFFields) -> dict:
    return dict(query_pre_attn_scalar=f.get_float("query_pre_attn_scalar", 256),
                attn_logit_softcapping=f.get_float("attn_logit_softcapping", None),
                final_logit_softcapping=f.get_float("final_logit_softcapping", None))


# transformers' Gemma3TextConfig defaults: Gemma 3 image-text configs write only the non-default text fields.
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
                            rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                            query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)


def _gguf_llama(f: GGUFFields) -> dict:
    return {"attention_bias": "blk.0.attn_q.bias" in f.tensors, "hidden_act": "silu"}


def _gguf_mistral(f: GGUFFields) -> dict:
    return {**_gguf_llama(f), "sliding_window": f.sliding_window}


def _gguf_qwen2(f: GGUFFields) -> dict:
    return {"hidden_act": "silu", "use_sliding_window": False, "sliding_window": None}


def _gguf_qwen3(f: GGUFFields) -> dict:
    return {"attention_bias": "blk.0.attn_q.bias" in f.tensors, **_gguf_qwen2(f)}


# Gemma3 alternates five sliding-window layers with one global layer; llama.cpp hard-codes the pattern
# (llama-model.cpp: hparams.set_swa_pattern(6)) and the local rope base unless the file states them.
_GEMMA3_SWA_PATTERN = 6
_GEMMA3_LOCAL_ROPE_BASE = 10_000.0


def _gguf_gemma3(f: GGUFFields) -> dict:
    layers = f.config["num_hidden_layers"]
    pattern = f.get("attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == layers:  # newer files: one bool per layer, True = sliding
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [(i + 1) % _GEMMA3_SWA_PATTERN != 0 for i in range(layers)]
    # llama.cpp scales queries by 1/sqrt(head_dim), except the 27B model (62 layers): 1/sqrt(hidden/heads).
    scalar = f.config["head_dim"]
    if layers == 62:
        scalar = f.config["hidden_size"] // f.config["num_attention_heads"]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": f.sliding_window,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_local_base_freq": f.number("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE),
        "final_logit_softcapping": f.number("final_logit_softcapping", None),
        "attn_logit_softcapping": None,
        "attention_bias": False,
    }


# ------------------------------------------------------------------------------------------ the table

_LLAMA_CLASS = "fastinfer.models.llama:LlamaForCausalLM"

REGISTRY: tuple[Architecture, ...] = (
    Architecture(
        "llama", "Llama", _LLAMA_CLASS, ("LlamaForCausalLM",), ("llama",),
        HFConfig(sliding_window="never", attention_bias="config", mlp_bias=True),
        gguf=GGUFFormat("llama", _gguf_llama, unpermute_qk=True),
    ),
    Architecture(
        "mistral", "Mistral", _LLAMA_CLASS, ("MistralForCausalLM",), ("mistral",),
        HFConfig(),
        gguf=GGUFFormat("llama", _gguf_mistral, unpermute_qk=True,
                        claims=lambda window, name: window is not None or "mistral" in name.lower()),
    ),
    Architecture(
        "qwen2", "Qwen2", _LLAMA_CLASS, ("Qwen2ForCausalLM",), ("qwen2",),
        HFConfig(sliding_window="opt_in", sliding_layers=_qwen_sliding_layers, attention_bias="qkv"),
        gguf=GGUFFormat("qwen2", _gguf_qwen2, required_bias=("attn_q", "attn_k", "attn_v")),
    ),
    Architecture(
        "qwen3", "Qwen3", _LLAMA_CLASS, ("Qwen3ForCausalLM",), ("qwen3",),
        HFConfig(sliding_window="opt_in", sliding_layers=_qwen_sliding_layers, attention_bias="config",
                 qk_norm=True),
        gguf=GGUFFormat("qwen3", _gguf_qwen3, required=GGUF_LAYER_REQUIRED + ("attn_q_norm", "attn_k_norm")),
    ),
    Architecture(
        "gemma3", "Gemma 3", "fastinfer.models.gemma3:Gemma3ForCausalLM", ("Gemma3ForCausalLM",), ("gemma3_text",),
        HFConfig(defaults=GEMMA3_TEXT_DEFAULTS, sliding_layers=_gemma3_sliding_layers, attention_bias="config",
                 qk_norm=True, local_rope=True, extra=_gemma3_extra),
        HFTensors(text_prefixes=TEXT_PREFIXES, skip_prefixes=VISION_PREFIXES),
        hf_multimodal_classes=("Gemma3ForConditionalGeneration",),
        gguf=GGUFFormat(
            "gemma3", _gguf_gemma3, norm_offset=True,
            # Gemma3 has four norms per layer; its ffn_norm is the one before the MLP.
            layer_tensors={**GGUF_LAYER_TENSORS, "post_attention_norm": "post_attention_layernorm",
                           "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
            required=GGUF_LAYER_REQUIRED + ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"),
        ),
    ),
)

# --------------------------------------------------------------------------------------------- lookups

BY_NAME: dict[str, Architecture] = {a.name: a for a in REGISTRY}
BY_HF_CLASS: dict[str, Architecture] = {c: a for a in REGISTRY for c in a.hf_classes}
BY_HF_MODEL_TYPE: dict[str, Architecture] = {t: a for a in REGISTRY for t in a.hf_model_types}
BY_HF_MULTIMODAL_CLASS: dict[str, Architecture] = {c: a for a in REGISTRY for c in a.hf_multimodal_classes}
GGUF_NAMES: tuple[str, ...] = tuple(dict.fromkeys(a.gguf.name for a in REGISTRY if a.gguf))


def fused_names(arch: Architecture) -> Mapping[str, tuple[str, int]]:
    """The entry's HF name piece -> (fused parameter piece, shard index) map."""
    return FUSED if arch.hf_tensors.fused is None else arch.hf_tensors.fused


def gguf_layer_tensors(arch: Architecture) -> Mapping[str, str]:
    """The entry's GGUF per-layer name -> Hugging Face name map."""
    return GGUF_LAYER_TENSORS if arch.gguf.layer_tensors is None else arch.gguf.layer_tensors


def gguf_architecture(name: str, sliding_window: Optional[int], general_name: str) -> Architecture:
    """The entry a GGUF file of ``general.architecture == name`` is (``name`` must be in GGUF_NAMES): one whose
    ``claims`` accepts the file, else the one of that name without ``claims``."""
    candidates = [a for a in REGISTRY if a.gguf and a.gguf.name == name]
    claimed = [a for a in candidates if a.gguf.claims and a.gguf.claims(sliding_window, general_name)]
    return (claimed or [a for a in candidates if not a.gguf.claims])[0]
