"""The router's config: LiteLLM's router/proxy YAML shape, loaded strictly.

Why LiteLLM's shape: an existing LiteLLM config that only uses what we implement loads unchanged.
Why strictly: a key we do not act on (a typo, or a LiteLLM feature we lack) would otherwise be dropped silently and
the router would not do what the config's author expects, so every such key is an error, and a known LiteLLM key
says so. Every error is one ``ConfigError`` whose message is one line, ``file: where: what``, built by ``_error``.
No secret (api_key, master_key, a header or environment value) is ever put in a message or a repr.
"""

from __future__ import annotations

import difflib
import os
import re
from collections import ChainMap
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PROVIDERS = ("openai", "fastinfer")
STRATEGIES = ("simple-shuffle", "least-busy", "latency-based-routing", "cost-based-routing", "usage-based-routing")
_STRATEGY_ALIASES = {"usage-based-routing-v2": "usage-based-routing"}  # LiteLLM's other name for it
OPENAI_DEFAULT_BASE = "https://api.openai.com/v1"
_ENV = "os.environ/"  # LiteLLM's marker for "read this value from the environment"
_ENV_ONLY = "os.environ/ values are read only for api_key, api_base and general_settings.master_key"


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the file, the entry and the key."""


# ---- the result: plain frozen dataclasses, so the router never sees pydantic or raw YAML ----

@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """One model_list entry: one place a public model group is served."""
    group: str  # model_name: entries sharing it form a load-balanced group
    id: str  # model_info.id, else f"{group}-{n}" (n = position within the group; -2, -3 ... added on a clash)
    index: int  # position in model_list
    provider: str  # "openai" | "fastinfer"
    model: str  # after the provider prefix: "Qwen/Qwen3-8B", "default", "/path/to/model.gguf"
    api_base: str | None = None  # openai only; no trailing '/'
    api_key: str | None = field(default=None, repr=False)  # os.environ/ already read; never shown
    timeout: float | None = None  # None = RouterSettings.timeout
    stream_timeout: float | None = None
    rpm: int | None = None
    tpm: int | None = None
    weight: float = 1.0
    max_parallel_requests: int | None = None
    input_cost_per_token: float = 0.0
    output_cost_per_token: float = 0.0
    extra_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # a value may be a credential
    engine_args: tuple[tuple[str, Any], ...] = ()  # fastinfer.LLM kwargs, in a fixed key order (usable as a key)


@dataclass(frozen=True, slots=True)
class RouterSettings:
    """How the router picks, retries and falls back: router_settings merged with litellm_settings."""
    routing_strategy: str = "simple-shuffle"
    num_retries: int = 2
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    context_window_fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    default_fallbacks: tuple[str, ...] = ()
    allowed_fails: int = 3
    cooldown_time: float = 5.0
    timeout: float = 600.0
    retry_after: float = 0.0  # minimum wait before a retry, seconds
    max_fallbacks: int = 5
    max_loaded_models: int | None = None  # fastinfer extension; None = no limit


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """A whole checked config."""
    path: str  # the file it came from ("<string>" when parsed from text)
    deployments: tuple[DeploymentSpec, ...]
    groups: tuple[str, ...]  # model_names in first-appearance order
    settings: RouterSettings = field(default_factory=RouterSettings)
    master_key: str | None = field(default=None, repr=False)  # the API key protecting the router; never shown

    def deployments_of(self, group: str) -> tuple[DeploymentSpec, ...]:
        """The deployments of one group in config order (empty for a name that is not a group)."""
        return tuple(d for d in self.deployments if d.group == group)


# ---- LiteLLM keys we know but do not implement, per section: named as such, not as typos ----

_NOT_IMPLEMENTED = {k: frozenset(v.split()) for k, v in {
    "": "include credential_list files_settings assistant_settings guardrails mcp_servers callback_settings "
        "vector_store_registry finetune_settings search_tools",
    "model_list": "tpm rpm",
    "litellm_params": "custom_llm_provider api_version organization max_retries num_retries region_name tags "
        "mock_response merge_reasoning_content_in_choices use_in_pass_through use_litellm_proxy base_model "
        "litellm_credential_name tenant_id client_id client_secret temperature max_tokens top_p stop stream "
        "drop_params additional_drop_params headers budget_duration max_budget cache_control_injection_points "
        "configurable_clientside_auth_params litellm_trace_id auto_router_config",
    "model_info": "mode base_model max_tokens max_input_tokens max_output_tokens db_model litellm_provider team_id "
        "team_public_model_name access_groups created_at created_by updated_at updated_by tier key description "
        "health_check_timeout output_vector_size cache_creation_input_token_cost cache_read_input_token_cost",
    "router_settings": "redis_host redis_port redis_password redis_url cache_responses cache_kwargs caching_groups "
        "client_ttl enable_pre_call_checks optional_pre_call_checks model_group_alias retry_policy "
        "allowed_fails_policy model_group_retry_policy content_policy_fallbacks routing_strategy_args "
        "provider_budget_config set_verbose debug_level default_litellm_params disable_cooldowns "
        "enable_tag_filtering tag_filtering_match_any polling_interval router_general_settings assistants_config "
        "alerting_config default_priority default_max_parallel_requests",
    "litellm_settings": "drop_params set_verbose json_logs success_callback failure_callback callbacks cache "
        "service_callback cache_params turn_off_message_logging redact_user_api_key_info modify_params telemetry "
        "max_budget budget_duration default_team_settings upperbound_key_generate_params force_ipv4 ssl_verify "
        "default_internal_user_params enable_json_schema_validation max_internal_user_budget guardrails "
        "content_policy_fallbacks disable_end_user_cost_tracking log_raw_request_response return_response_headers",
    "general_settings": "database_url database_type database_connection_pool_limit database_connection_timeout "
        "store_model_in_db alerting alerting_threshold alert_types alert_to_webhook_url proxy_batch_write_at "
        "disable_spend_logs disable_master_key_return disable_reset_budget custom_auth custom_key_generate "
        "enforce_user_param allowed_routes admin_only_routes public_routes ui_access_mode allowed_ips "
        "enable_jwt_auth litellm_jwtauth max_parallel_requests global_max_parallel_requests infer_model_from_keys "
        "background_health_checks health_check_interval health_check_details forward_openai_org_id "
        "forward_client_headers_to_llm_api pass_through_endpoints key_management_system key_management_settings "
        "maximum_spend_logs_retention_period use_redis_transaction_buffer allow_requests_on_db_unavailable",
}.items()}
_NOT_IMPLEMENTED_PREFIXES = {  # families of LiteLLM keys (checked after the keys we implement)
    "litellm_params": ("aws_", "vertex_", "azure_", "watsonx_", "input_cost_per_", "output_cost_per_"),
    "model_info": ("supports_", "input_cost_per_", "output_cost_per_"),
}
_TOP_KEYS = ("model_list", "router_settings", "litellm_settings", "general_settings", "environment_variables")

# ---- the schema: pydantic, strict (no "60" for 60, no true for 1); null means "not given" ----

_PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
_PosInt = Annotated[int, Field(gt=0)]
_NonNegInt = Annotated[int, Field(ge=0)]
_Name = Annotated[str, Field(min_length=1)]
_Fallbacks = list[dict[_Name, list[_Name]]]  # LiteLLM's [{group: [fallback, ...]}, ...]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _EngineArgs(_Strict):
    """fastinfer.LLM keyword args (a fastinfer extension); the LLM checks the values further when it loads."""
    dtype: _Name | None = None
    device: _Name | None = None
    max_model_len: _PosInt | None = None
    block_size: _PosInt | None = None
    max_num_seqs: _PosInt | None = None
    max_num_batched_tokens: _PosInt | None = None
    kv_cache_memory_bytes: Any = None  # an int, or a size string such as "64MiB"
    enable_prefix_caching: bool | None = None
    seed: int | None = None
    max_logprobs: _NonNegInt | None = None
    quantization: Literal["auto", "none", "q8_0"] | None = None  # "none": every weight dequantised

    @field_validator("kv_cache_memory_bytes")
    @classmethod
    def _size(cls, v: Any) -> int | None:
        return None if v is None else parse_size(v)


class _LitellmParams(_Strict):
    model: str
    api_base: _Name | None = None
    api_key: _Name | None = None
    timeout: _PosFloat | None = None
    stream_timeout: _PosFloat | None = None
    rpm: _PosInt | None = None
    tpm: _PosInt | None = None
    weight: _PosFloat | None = None
    max_parallel_requests: _PosInt | None = None
    input_cost_per_token: _NonNegFloat | None = None  # LiteLLM takes costs here or in model_info
    output_cost_per_token: _NonNegFloat | None = None
    extra_headers: dict[_Name, str] | None = None
    engine_args: _EngineArgs | None = None

    @field_validator("model")
    @classmethod
    def _provider(cls, v: str) -> str:
        if v.startswith(_ENV):
            raise ValueError(_ENV_ONLY)
        provider, sep, rest = v.partition("/")
        if provider not in PROVIDERS or not sep:
            what = f"unknown provider '{provider}' in" if sep else "no provider prefix in"
            raise ValueError(f"{what} '{v}' (supported: {', '.join(p + '/' for p in PROVIDERS)})")
        if not rest.strip():
            raise ValueError(f"no model after '{provider}/'")
        return v

    @field_validator("extra_headers")
    @classmethod
    def _headers(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for name, value in (v or {}).items():  # names only in messages: a value may be a credential
            if name.lower() == "authorization":
                raise ValueError("an 'Authorization' header is not allowed; set the key with api_key")
            if value.startswith(_ENV):
                raise ValueError(f"header '{name}': {_ENV_ONLY}")
            if any(c in name + value for c in "\r\n"):
                raise ValueError(f"header '{name}' has a line break")
        return v


class _ModelInfo(_Strict):
    id: _Name | None = None
    input_cost_per_token: _NonNegFloat | None = None
    output_cost_per_token: _NonNegFloat | None = None


class _Entry(_Strict):
    model_name: _Name
    litellm_params: _LitellmParams
    model_info: _ModelInfo | None = None


class _SharedSettings(_Strict):
    """The settings router_settings and litellm_settings both take."""
    num_retries: _NonNegInt | None = None
    fallbacks: _Fallbacks | None = None
    context_window_fallbacks: _Fallbacks | None = None
    default_fallbacks: list[_Name] | None = None
    allowed_fails: _NonNegInt | None = None
    cooldown_time: _NonNegFloat | None = None


class _RouterSettings(_SharedSettings):
    routing_strategy: str | None = None
    timeout: _PosFloat | None = None
    retry_after: _NonNegFloat | None = None
    max_fallbacks: _NonNegInt | None = None
    max_loaded_models: _PosInt | None = None

    @field_validator("routing_strategy")
    @classmethod
    def _strategy(cls, v: str | None) -> str | None:
        v = _STRATEGY_ALIASES.get(v, v)
        if v is not None and v not in STRATEGIES:
            raise ValueError(f"unknown routing strategy '{v}' (supported: {', '.join(STRATEGIES)})")
        return v


class _LitellmSettings(_SharedSettings):
    request_timeout: _PosFloat | None = None  # LiteLLM's name for router_settings.timeout


class _GeneralSettings(_Strict):
    master_key: _Name | None = None


_MODELS = {"model_list": _Entry, "litellm_params": _LitellmParams, "model_info": _ModelInfo,
           "engine_args": _EngineArgs, "router_settings": _RouterSettings, "litellm_settings": _LitellmSettings,
           "general_settings": _GeneralSettings}

# ---- errors: one helper builds every message ----


def _error(path: str, where: str, msg: str) -> ConfigError:
    """The one place messages are built: ``file: where: msg``, on one line."""
    text = f"{path}: {where}: {msg}" if where else f"{path}: {msg}"
    return ConfigError(text.replace("\r", " ").replace("\n", " "))


def _kind(v: Any) -> str:
    """What a YAML value is, in words (never the value: it may be a secret)."""
    return {type(None): "null", bool: "a bool", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(v), type(v).__name__)


_TYPE_NAMES = {"int_type": "an integer", "float_type": "a number", "string_type": "a string",
               "bool_type": "true or false", "dict_type": "a mapping", "model_type": "a mapping", "list_type": "a list"}


def _message(err: dict, section: str) -> tuple[tuple, str]:
    """(key path, message) for one pydantic error; the input is quoted only where it is a number."""
    loc, kind, ctx = tuple(err["loc"]), err["type"], err.get("ctx") or {}
    if kind in ("extra_forbidden", "missing"):
        key, loc = loc[-1], loc[:-1]  # named by its container
        if kind == "missing":
            return loc, f"missing required key '{key}'"
        name = next((p for p in reversed(loc) if isinstance(p, str)), section)
        if key in _NOT_IMPLEMENTED.get(name, ()) or str(key).startswith(_NOT_IMPLEMENTED_PREFIXES.get(name, "\0")):
            return loc, f"'{key}' is a LiteLLM setting fastinfer's router does not implement"
        known = list(_MODELS[name].model_fields) if name in _MODELS else []
        if name == "engine_args":
            return loc, f"unknown key '{key}' (allowed: {', '.join(known)})"
        close = difflib.get_close_matches(str(key), known, n=1)
        return loc, f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
    if kind in _TYPE_NAMES:
        return loc, f"must be {_TYPE_NAMES[kind]}, got {_kind(err.get('input'))}"
    if kind in ("greater_than", "greater_than_equal"):
        op, bound = (">", ctx["gt"]) if kind == "greater_than" else (">=", ctx["ge"])
        return loc, f"must be {op} {bound:g}, got {err.get('input')!r}"
    if kind == "value_error":
        return loc, str(ctx.get("error"))
    return loc, {"finite_number": "must be a finite number", "string_too_short": "must not be empty"}.get(
        kind, err["msg"])  # pydantic's own messages do not quote the input


def _validate(model: type[BaseModel], data: Any, path: str, base: str, sep: str, section: str) -> Any:
    """``model`` over ``data``, or its first error as a ConfigError at ``base`` + ``sep`` + the key path."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        loc, msg = _message(exc.errors(include_url=False)[0], section)
        dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc if p != "[key]").lstrip(".")
        raise _error(path, base + (sep + dotted if dotted else ""), msg) from None


# ---- helpers ----

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as "64MiB" or "1.5 GB" (KiB = 1024, KB = 1000); ValueError if not."""
    m = _SIZE_RE.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif m and m.group(2).lower() in _SIZE_UNITS:
        exact = Fraction(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
        if exact.denominator != 1:
            raise ValueError(f"'{value}' is not a whole number of bytes")
        n = int(exact)
    elif isinstance(value, str):
        raise ValueError(f"'{value}' is not a size: give bytes or e.g. '64MiB' (units B, KiB, MiB, GiB, KB, MB, GB)")
    else:
        raise ValueError(f"must be a byte count or a size string, got {_kind(value)}")
    if n < 1:
        raise ValueError(f"must be at least 1 byte, got {value!r}")
    return n


def _resolve(value: str | None, env: Mapping[str, str], path: str, where: str) -> str | None:
    """The value, or for ``os.environ/NAME`` the variable's; an error names the variable, never a value."""
    if value is None or not value.startswith(_ENV):
        return value
    name = value[len(_ENV):]
    if not name or not env.get(name):
        raise _error(path, where, f"environment variable {name} is " + ("empty" if name in env else "not set")
                     if name else "os.environ/ needs a variable name after it")
    return env[name]


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-7`` as a float (YAML 1.2; PyYAML's 1.1 reads a string) and refuses a key given
    twice in one mapping (PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key_node.value}'",
                                                            key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def _section(data: dict, key: str, path: str) -> dict:
    value = data.get(key)
    if value is not None and not isinstance(value, dict):
        raise _error(path, key, f"must be a mapping, got {_kind(value)}")
    return value or {}


def _groups_setting(key: str, value: Any, groups: tuple[str, ...], path: str, where: str) -> Any:
    """Check the group names in a fallback setting; LiteLLM's list of one-key mappings becomes one dict."""
    if value is None or not key.endswith("fallbacks"):
        return value
    items = [{"": value}] if key == "default_fallbacks" else value
    merged: dict[str, tuple[str, ...]] = {}
    for item in items:
        if len(item) != 1:
            raise _error(path, where, f"each item must be one {{group: [fallback, ...]}}, got {len(item)} keys")
        (group, targets), = item.items()
        for name in (group, *targets) if group else targets:
            if name not in groups:
                raise _error(path, where, f"group '{name}' is not a model_name in model_list")
        if group in merged:
            raise _error(path, where, f"group '{group}' is listed twice")
        if group in targets:
            raise _error(path, where, f"group '{group}' lists itself as its fallback")
        if len(set(targets)) != len(targets):
            raise _error(path, where, "a group is listed twice" + (f" for '{group}'" if group else ""))
        merged[group] = tuple(targets)
    return merged[""] if key == "default_fallbacks" else merged


# ---- the loader ----

def load_config(path: str | os.PathLike) -> RouterConfig:
    """Read and check a router config file; raises ConfigError (one line) on any problem."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = "file not found" if isinstance(exc, FileNotFoundError) else "not UTF-8 text" if isinstance(
            exc, UnicodeDecodeError) else f"cannot read: {exc.strerror or type(exc).__name__}"
        raise _error(name, "", why) from None
    return parse_config(text, name)


def parse_config(text: str, path: str = "<string>", environ: Mapping[str, str] | None = None) -> RouterConfig:
    """Check a config given as YAML text. os.environ/ values come from ``environ`` (default os.environ) with the
    config's environment_variables over it; os.environ itself is never changed."""
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as exc:  # the problem and line only: PyYAML's snippet of the file may hold a secret
        mark = getattr(exc, "problem_mark", None)
        raise _error(path, f"line {mark.line + 1}" if mark else "",
                     f"invalid YAML: {getattr(exc, 'problem', None) or 'cannot parse'}") from None
    if not isinstance(data, dict):
        raise _error(path, "", f"the document must be a mapping with a model_list, got {_kind(data)}")
    for key in data:
        if key in _NOT_IMPLEMENTED[""]:
            raise _error(path, "", f"'{key}' is a LiteLLM setting fastinfer's router does not implement")
        if key not in _TOP_KEYS:
            raise _error(path, "", f"unknown top-level key '{key}' (known: {', '.join(_TOP_KEYS)})")
    overlay = _section(data, "environment_variables", path)
    for key, value in overlay.items():
        if not isinstance(key, str) or not key:
            raise _error(path, "environment_variables", f"names must be non-empty strings, got {_kind(key)}")
        if not isinstance(value, str):
            raise _error(path, f"environment_variables.{key}", f"must be a string, got {_kind(value)}")
    env = ChainMap(overlay, os.environ if environ is None else environ)

    deployments = _deployments(data.get("model_list"), env, path)
    groups = tuple(dict.fromkeys(d.group for d in deployments))
    sections = {s: _validate(_MODELS[s], _section(data, s, path), path, s, ".", s)
                for s in ("router_settings", "litellm_settings", "general_settings")}
    settings = _settings(sections["router_settings"], sections["litellm_settings"], groups, path)
    master_key = _resolve(sections["general_settings"].master_key, env, path, "general_settings.master_key")
    return RouterConfig(path=path, deployments=deployments, groups=groups, settings=settings, master_key=master_key)


def _deployments(model_list: Any, env: Mapping[str, str], path: str) -> tuple[DeploymentSpec, ...]:
    """Check model_list and build its deployments (ids assigned, os.environ/ values read)."""
    if not isinstance(model_list, list) or not model_list:
        got = "an empty list" if model_list == [] else _kind(model_list)
        raise _error(path, "model_list", f"must be a non-empty list, got {got}" if model_list is not None
                     else "is required")
    entries, labels = [], []
    for i, raw in enumerate(model_list):
        name = raw.get("model_name") if isinstance(raw, dict) else None
        labels.append(f"model_list[{i}]" + (f" ({name})" if isinstance(name, str) and name else ""))
        if not isinstance(raw, dict):
            raise _error(path, labels[i], f"must be a mapping, got {_kind(raw)}")
        entries.append(_validate(_Entry, raw, path, labels[i], ": ", "model_list"))

    taken: dict[str, int] = {}  # id -> index; explicit ids first, so generated ids can avoid them
    for i, e in enumerate(entries):
        if e.model_info is not None and e.model_info.id is not None:
            if e.model_info.id in taken:
                raise _error(path, f"{labels[i]}: model_info.id",
                             f"'{e.model_info.id}' is already the id of model_list[{taken[e.model_info.id]}]")
            taken[e.model_info.id] = i
    deployments, per_group = [], {}
    for i, e in enumerate(entries):
        p, info, label = e.litellm_params, e.model_info or _ModelInfo(), labels[i]
        provider, _, model = p.model.partition("/")
        if provider == "fastinfer":
            for key in ("api_base", "api_key"):
                if getattr(p, key) is not None:
                    raise _error(path, f"{label}: litellm_params.{key}",
                                 f"the fastinfer/ provider runs in-process and takes no {key}")
        elif p.engine_args is not None:
            raise _error(path, f"{label}: litellm_params.engine_args",
                         f"only the fastinfer/ provider takes engine_args (this entry uses {provider}/)")
        costs = {}
        for key in ("input_cost_per_token", "output_cost_per_token"):
            given = [v for v in (getattr(p, key), getattr(info, key)) if v is not None]
            if len(given) == 2:
                raise _error(path, f"{label}: model_info.{key}", "also set in litellm_params; keep one")
            costs[key] = given[0] if given else 0.0
        api_key = _resolve(p.api_key, env, path, f"{label}: litellm_params.api_key")
        api_base = _resolve(p.api_base, env, path, f"{label}: litellm_params.api_base")
        if provider == "openai":
            api_base = api_base or OPENAI_DEFAULT_BASE
            if not re.match(r"https?://[^/\s]+", api_base):  # not quoted: a URL may hold a password
                raise _error(path, f"{label}: litellm_params.api_base", "must be an http:// or https:// URL")
            api_base = api_base[:-1] if api_base.endswith("/") else api_base
        n = per_group[e.model_name] = per_group.get(e.model_name, -1) + 1  # position within the group
        ident = info.id
        if ident is None:
            base, suffix = f"{e.model_name}-{n}", 2
            ident = base
            while ident in taken:
                ident, suffix = f"{base}-{suffix}", suffix + 1
            taken[ident] = i
        engine = p.engine_args.model_dump(exclude_none=True) if p.engine_args is not None else {}
        deployments.append(DeploymentSpec(
            group=e.model_name, id=ident, index=i, provider=provider, model=model, api_base=api_base,
            api_key=api_key, timeout=p.timeout, stream_timeout=p.stream_timeout, rpm=p.rpm, tpm=p.tpm,
            weight=1.0 if p.weight is None else p.weight, max_parallel_requests=p.max_parallel_requests,
            extra_headers=tuple((p.extra_headers or {}).items()), engine_args=tuple(engine.items()), **costs))
    return tuple(deployments)


def _settings(rs: _RouterSettings, ls: _LitellmSettings, groups: tuple[str, ...], path: str) -> RouterSettings:
    """router_settings and litellm_settings as one RouterSettings; a setting in both must agree."""
    settings: dict[str, Any] = {}
    for rkey in ("num_retries", "timeout", "fallbacks", "context_window_fallbacks", "default_fallbacks",
                 "allowed_fails", "cooldown_time"):
        lkey = "request_timeout" if rkey == "timeout" else rkey
        r = _groups_setting(rkey, getattr(rs, rkey), groups, path, f"router_settings.{rkey}")
        l_ = _groups_setting(rkey, getattr(ls, lkey), groups, path, f"litellm_settings.{lkey}")
        if r is not None and l_ is not None and r != l_:
            shown = f"is {l_!r} but router_settings.{rkey} is {r!r}" if not isinstance(r, (dict, tuple)) else \
                f"differs from router_settings.{rkey}"
            raise _error(path, f"litellm_settings.{lkey}", f"{shown}; set it in one section")
        if r is not None or l_ is not None:
            settings[rkey] = r if r is not None else l_
    for key in ("routing_strategy", "retry_after", "max_fallbacks", "max_loaded_models"):
        if getattr(rs, key) is not None:
            settings[key] = getattr(rs, key)
    return RouterSettings(**settings)
