"""The router config loader: LiteLLM's YAML shape, every problem one line naming file, entry and key, no secrets.

Configs are built as Python data from a small valid base, changed at one dotted path per case, and dumped to YAML,
so each case states only what it breaks and the exact message it expects.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("pydantic")

from fastinfer.router.config import (  # noqa: E402
    PROVIDERS, STRATEGIES, ConfigError, DeploymentSpec, RouterConfig, RouterSettings, load_config, parse_config,
    parse_size)

SECRET = "sk-TEST-s3cr3t-DEADBEEF-7731"  # distinctive: it must never show in a message or a repr
ENV = {"KEY": SECRET}
DELETE = object()

# The example config of the design, verbatim.
EXAMPLE = """\
model_list:
  - model_name: small                      # the public group name
    litellm_params: {model: fastinfer/default}
  - model_name: big
    litellm_params: {model: openai/Qwen/Qwen3-8B, api_base: http://127.0.0.1:8001/v1, api_key: os.environ/KEY,
                     timeout: 60, rpm: 600}
    model_info: {input_cost_per_token: 1.0e-7, output_cost_per_token: 2.0e-7}
router_settings:
  routing_strategy: simple-shuffle
  num_retries: 2
  fallbacks: [{small: [big]}]
  context_window_fallbacks: [{small: [big]}]
  allowed_fails: 3
  cooldown_time: 30
  timeout: 60
"""

BASE = {"model_list": [
    {"model_name": "small", "litellm_params": {"model": "fastinfer/default"}},
    {"model_name": "big", "litellm_params": {"model": "openai/Qwen/Qwen3-8B", "api_base": "http://127.0.0.1:8001/v1",
                                             "api_key": "os.environ/KEY"}},
]}


def changed(*edits: tuple[str, object]) -> str:
    """BASE as YAML with each (dotted path, value) set; numbers in the path index lists; DELETE removes."""
    data = copy.deepcopy(BASE)
    for dotted, value in edits:
        *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
        node = data
        for p in parents:
            node = node[p] if isinstance(p, int) else node.setdefault(p, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return yaml.safe_dump(data, sort_keys=False)


def load(text: str, environ: dict | None = None) -> RouterConfig:
    return parse_config(text, "router.yaml", ENV if environ is None else environ)


def error_of(text: str, environ: dict | None = None) -> str:
    """The message of the ConfigError ``text`` raises, checked to be one line, from the file, without the secret."""
    with pytest.raises(ConfigError) as info:
        load(text, environ)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("router.yaml: ") and SECRET not in msg, msg
    assert isinstance(info.value, ValueError)
    return msg


# ---- a good config ----

def test_example_loads_with_its_values():
    cfg = load(EXAMPLE)
    assert cfg.path == "router.yaml" and cfg.groups == ("small", "big") and cfg.master_key is None
    small, big = cfg.deployments
    assert small == DeploymentSpec(group="small", id="small-0", index=0, provider="fastinfer", model="default")
    assert (big.group, big.id, big.index, big.provider, big.model) == ("big", "big-0", 1, "openai", "Qwen/Qwen3-8B")
    assert (big.api_base, big.api_key, big.timeout, big.rpm) == ("http://127.0.0.1:8001/v1", SECRET, 60.0, 600)
    assert (big.input_cost_per_token, big.output_cost_per_token) == (1.0e-7, 2.0e-7)
    assert (big.weight, big.tpm, big.stream_timeout, big.extra_headers, big.engine_args) == (1.0, None, None, (), ())
    assert cfg.settings == RouterSettings(routing_strategy="simple-shuffle", num_retries=2,
                                          fallbacks={"small": ("big",)}, context_window_fallbacks={"small": ("big",)},
                                          allowed_fails=3, cooldown_time=30.0, timeout=60.0)
    assert cfg.deployments_of("big") == (big,) and cfg.deployments_of("nope") == ()


def test_defaults_and_every_implemented_key():
    text = changed(("model_list.1.litellm_params", {
        "model": "openai/gpt-4o", "api_key": SECRET, "timeout": 5, "stream_timeout": 2.5, "rpm": 10, "tpm": 1000,
        "weight": 3, "max_parallel_requests": 4, "input_cost_per_token": 1e-7, "extra_headers": {"X-Team": "a"}}),
        ("model_list.1.model_info", {"id": "gpt", "output_cost_per_token": 0}),
        ("model_list.0.litellm_params.engine_args", {"seed": 7, "dtype": "float32", "enable_prefix_caching": False}),
        ("general_settings.master_key", SECRET), ("environment_variables", {"OTHER": "x"}))
    cfg = load(text, environ={})
    small, big = cfg.deployments
    assert big.api_base == "https://api.openai.com/v1" and big.api_key == SECRET and big.id == "gpt"
    assert (big.timeout, big.stream_timeout, big.rpm, big.tpm, big.weight, big.max_parallel_requests) == (
        5.0, 2.5, 10, 1000, 3.0, 4)
    assert (big.input_cost_per_token, big.output_cost_per_token, big.extra_headers) == (1e-7, 0.0, (("X-Team", "a"),))
    assert small.engine_args == (("dtype", "float32"), ("enable_prefix_caching", False), ("seed", 7))
    assert cfg.master_key == SECRET and cfg.settings == RouterSettings()
    assert RouterSettings().cooldown_time == 5.0 and RouterSettings().timeout == 600.0


def test_public_constants():
    assert PROVIDERS == ("openai", "fastinfer")
    assert STRATEGIES == ("simple-shuffle", "least-busy", "latency-based-routing", "cost-based-routing",
                          "usage-based-routing")


def test_result_is_frozen():
    cfg = load(EXAMPLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.deployments[0].model = "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.settings.num_retries = 9


@pytest.mark.parametrize("strategy", [*STRATEGIES, "usage-based-routing-v2"])
def test_routing_strategies(strategy):
    got = load(changed(("router_settings.routing_strategy", strategy))).settings.routing_strategy
    assert got == strategy.removesuffix("-v2")


def test_router_settings_values():
    cfg = load(changed(("router_settings", {"retry_after": 1, "max_fallbacks": 0, "max_loaded_models": 2,
                                            "default_fallbacks": ["big"],
                                            "fallbacks": [{"small": ["big"]}, {"big": ["small"]}]})))
    s = cfg.settings
    assert (s.retry_after, s.max_fallbacks, s.max_loaded_models, s.default_fallbacks) == (1.0, 0, 2, ("big",))
    assert s.fallbacks == {"small": ("big",), "big": ("small",)}


def test_litellm_settings_apply_and_agree():
    cfg = load(changed(("litellm_settings", {"num_retries": 0, "request_timeout": 9, "allowed_fails": 1,
                                             "cooldown_time": 0, "fallbacks": [{"small": ["big"]}]}),
                       ("router_settings", {"num_retries": 0, "timeout": 9.0})))  # the same values: no conflict
    s = cfg.settings
    assert (s.num_retries, s.timeout, s.allowed_fails, s.cooldown_time, s.fallbacks) == (
        0, 9.0, 1, 0.0, {"small": ("big",)})


def test_generated_ids_count_per_group_and_avoid_explicit_ids():
    entry = {"model_name": "a", "litellm_params": {"model": "fastinfer/default"}}
    data = {"model_list": [entry, {**entry, "model_info": {"id": "a-0"}}, entry,
                           {**entry, "model_info": {"id": "a-0-2"}}, {**entry, "model_name": "b"}]}
    ids = [d.id for d in load(yaml.safe_dump(data)).deployments]
    assert ids == ["a-0-3", "a-0", "a-2", "a-0-2", "b-0"]


def test_api_base_one_trailing_slash_stripped_and_env():
    cfg = load(changed(("model_list.1.litellm_params.api_base", "os.environ/BASE")), {"BASE": "https://h/v1//",
                                                                                      "KEY": "k"})
    assert cfg.deployments[1].api_base == "https://h/v1/"


def test_environment_variables_overlay_the_environment_without_changing_it(monkeypatch):
    monkeypatch.setenv("KEY", "from-os")
    monkeypatch.setenv("MK", "master-from-os")
    text = changed(("environment_variables", {"KEY": "from-config"}), ("general_settings.master_key", "os.environ/MK"))
    cfg = parse_config(text)  # environ defaults to os.environ
    assert cfg.deployments[1].api_key == "from-config" and cfg.master_key == "master-from-os"
    assert os.environ["KEY"] == "from-os"
    assert load(changed(("environment_variables", {"KEY": "b"})), {"KEY": "a"}).deployments[1].api_key == "b"


def test_float_in_exponent_form_is_a_number():  # PyYAML alone reads 1e-7 as a string
    text = EXAMPLE.replace("1.0e-7", "1e-7")
    assert load(text).deployments[1].input_cost_per_token == 1e-7


def test_engine_args_order_is_canonical():
    a = load(changed(("model_list.0.litellm_params.engine_args", {"seed": 1, "dtype": "bf16"})))
    b = load(changed(("model_list.0.litellm_params.engine_args", {"dtype": "bf16", "seed": 1})))
    assert a.deployments[0].engine_args == b.deployments[0].engine_args


# ---- sizes ----

@pytest.mark.parametrize("text, n", [
    ("64MiB", 64 * 2**20), ("1GiB", 2**30), ("512KiB", 512 * 1024), ("1.5GiB", 3 * 2**29), ("100MB", 10**8),
    ("1KB", 1000), ("2 GB", 2 * 10**9), ("4096", 4096), ("4096B", 4096), ("64mib", 64 * 2**20), (1024, 1024)])
def test_kv_cache_size(text, n):
    assert parse_size(text) == n
    cfg = load(changed(("model_list.0.litellm_params.engine_args.kv_cache_memory_bytes", text)))
    assert cfg.deployments[0].engine_args == (("kv_cache_memory_bytes", n),)


@pytest.mark.parametrize("value, why", [
    ("64XB", "'64XB' is not a size"), ("-5MiB", "'-5MiB' is not a size"), ("1.5B", "not a whole number of bytes"),
    ("0", "must be at least 1 byte"), (0, "must be at least 1 byte"), (True, "got a bool"), (1.5, "got a number")])
def test_bad_kv_cache_size(value, why):
    msg = error_of(changed(("model_list.0.litellm_params.engine_args.kv_cache_memory_bytes", value)))
    assert msg.startswith("router.yaml: model_list[0] (small): litellm_params.engine_args.kv_cache_memory_bytes: ")
    assert why in msg


# ---- one line per problem, naming file, entry and key ----

E0, E1 = "router.yaml: model_list[0] (small)", "router.yaml: model_list[1] (big)"
NOT_IMPL = "is a LiteLLM setting fastinfer's router does not implement"
BAD = [
    # unknown keys, each at its own level
    (("model_list.1.litellm_params.foo", 1), f"{E1}: litellm_params: unknown key 'foo'"),
    (("model_list.1.litellm_params.tmeout", 1),
     f"{E1}: litellm_params: unknown key 'tmeout' (did you mean 'timeout'?)"),
    (("model_list.0.foo", 1), f"{E0}: unknown key 'foo'"),
    (("model_list.1.model_info.foo", 1), f"{E1}: model_info: unknown key 'foo'"),
    (("router_settings.foo", 1), "router.yaml: router_settings: unknown key 'foo'"),
    (("litellm_settings.foo", 1), "router.yaml: litellm_settings: unknown key 'foo'"),
    (("general_settings.foo", 1), "router.yaml: general_settings: unknown key 'foo'"),
    (("model_list.0.litellm_params.engine_args.gpu", 1), f"{E0}: litellm_params.engine_args: unknown key 'gpu' "
     "(allowed: dtype, device, max_model_len, block_size, max_num_seqs, max_num_batched_tokens, "
     "kv_cache_memory_bytes, enable_prefix_caching, seed, max_logprobs, quantization)"),
    # required keys and shapes
    (("model_list.0.litellm_params", DELETE), f"{E0}: missing required key 'litellm_params'"),
    (("model_list.1.litellm_params.model", DELETE), f"{E1}: litellm_params: missing required key 'model'"),
    (("model_list.0.litellm_params", ["x"]), f"{E0}: litellm_params: must be a mapping, got a list"),
    (("model_list.0.model_name", ""), "router.yaml: model_list[0]: model_name: must not be empty"),
    (("model_list.0.model_name", 5), "router.yaml: model_list[0]: model_name: must be a string, got an integer"),
    (("model_list.0", "small"), "router.yaml: model_list[0]: must be a mapping, got a string"),
    (("model_list", []), "router.yaml: model_list: must be a non-empty list, got an empty list"),
    (("model_list", {"a": 1}), "router.yaml: model_list: must be a non-empty list, got a mapping"),
    (("model_list", DELETE), "router.yaml: model_list: is required"),
    (("router_settings", [1]), "router.yaml: router_settings: must be a mapping, got a list"),
    (("environment_variables.PORT", 8000), "router.yaml: environment_variables.PORT: must be a string, got an integer"),
    # types and ranges
    (("model_list.1.litellm_params.timeout", -1), f"{E1}: litellm_params.timeout: must be > 0, got -1"),
    (("model_list.1.litellm_params.timeout", 0), f"{E1}: litellm_params.timeout: must be > 0, got 0"),
    (("model_list.1.litellm_params.timeout", "60"), f"{E1}: litellm_params.timeout: must be a number, got a string"),
    (("model_list.1.litellm_params.timeout", float("inf")), f"{E1}: litellm_params.timeout: must be a finite number"),
    (("model_list.1.litellm_params.stream_timeout", 0), f"{E1}: litellm_params.stream_timeout: must be > 0, got 0"),
    (("model_list.1.litellm_params.rpm", 0), f"{E1}: litellm_params.rpm: must be > 0, got 0"),
    (("model_list.1.litellm_params.rpm", 1.5), f"{E1}: litellm_params.rpm: must be an integer, got a number"),
    (("model_list.1.litellm_params.tpm", True), f"{E1}: litellm_params.tpm: must be an integer, got a bool"),
    (("model_list.1.litellm_params.weight", 0), f"{E1}: litellm_params.weight: must be > 0, got 0"),
    (("model_list.1.litellm_params.max_parallel_requests", -2),
     f"{E1}: litellm_params.max_parallel_requests: must be > 0, got -2"),
    (("model_list.1.litellm_params.input_cost_per_token", -1e-7),
     f"{E1}: litellm_params.input_cost_per_token: must be >= 0, got -1e-07"),
    (("model_list.1.litellm_params.output_cost_per_token", float("nan")),
     f"{E1}: litellm_params.output_cost_per_token: must be a finite number"),
    (("model_list.1.model_info.input_cost_per_token", -1),
     f"{E1}: model_info.input_cost_per_token: must be >= 0, got -1"),
    (("model_list.1.model_info.id", ""), f"{E1}: model_info.id: must not be empty"),
    (("model_list.1.litellm_params.extra_headers", {"X-A": 1}),
     f"{E1}: litellm_params.extra_headers.X-A: must be a string, got an integer"),
    (("model_list.0.litellm_params.engine_args.max_num_seqs", 0),
     f"{E0}: litellm_params.engine_args.max_num_seqs: must be > 0, got 0"),
    (("model_list.0.litellm_params.engine_args.enable_prefix_caching", "yes please"),
     f"{E0}: litellm_params.engine_args.enable_prefix_caching: must be true or false, got a string"),
    (("router_settings.num_retries", -1), "router.yaml: router_settings.num_retries: must be >= 0, got -1"),
    (("router_settings.allowed_fails", "3"),
     "router.yaml: router_settings.allowed_fails: must be an integer, got a string"),
    (("router_settings.cooldown_time", -1), "router.yaml: router_settings.cooldown_time: must be >= 0, got -1"),
    (("router_settings.timeout", 0), "router.yaml: router_settings.timeout: must be > 0, got 0"),
    (("router_settings.retry_after", -0.5), "router.yaml: router_settings.retry_after: must be >= 0, got -0.5"),
    (("router_settings.max_fallbacks", 1.0),
     "router.yaml: router_settings.max_fallbacks: must be an integer, got a number"),
    (("router_settings.max_loaded_models", 0), "router.yaml: router_settings.max_loaded_models: must be > 0, got 0"),
    (("router_settings.routing_strategy", "round-robin"), "router.yaml: router_settings.routing_strategy: unknown "
     "routing strategy 'round-robin' (supported: simple-shuffle, least-busy, latency-based-routing, "
     "cost-based-routing, usage-based-routing)"),
    (("litellm_settings.request_timeout", 0), "router.yaml: litellm_settings.request_timeout: must be > 0, got 0"),
    # providers
    (("model_list.0.litellm_params.model", "anthropic/claude"), f"{E0}: litellm_params.model: unknown provider "
     "'anthropic' in 'anthropic/claude' (supported: openai/, fastinfer/)"),
    (("model_list.0.litellm_params.model", "gpt-4"),
     f"{E0}: litellm_params.model: no provider prefix in 'gpt-4' (supported: openai/, fastinfer/)"),
    (("model_list.1.litellm_params.model", "openai/"), f"{E1}: litellm_params.model: no model after 'openai/'"),
    (("model_list.0.litellm_params.model", "fastinfer/"), f"{E0}: litellm_params.model: no model after 'fastinfer/'"),
    (("model_list.0.litellm_params.model", "os.environ/M"), f"{E0}: litellm_params.model: os.environ/ values are "
     "read only for api_key, api_base and general_settings.master_key"),
    (("model_list.0.litellm_params.api_base", "http://h/v1"),
     f"{E0}: litellm_params.api_base: the fastinfer/ provider runs in-process and takes no api_base"),
    (("model_list.0.litellm_params.api_key", "os.environ/KEY"),
     f"{E0}: litellm_params.api_key: the fastinfer/ provider runs in-process and takes no api_key"),
    (("model_list.1.litellm_params.engine_args", {"seed": 1}),
     f"{E1}: litellm_params.engine_args: only the fastinfer/ provider takes engine_args (this entry uses openai/)"),
    (("model_list.1.litellm_params.api_base", "ftp://h/v1"),
     f"{E1}: litellm_params.api_base: must be an http:// or https:// URL"),
    (("model_list.1.litellm_params.extra_headers", {"Authorization": "Bearer x"}),
     f"{E1}: litellm_params.extra_headers: an 'Authorization' header is not allowed; set the key with api_key"),
    (("model_list.1.litellm_params.extra_headers", {"AUTHORIZATION": "Bearer x"}),
     f"{E1}: litellm_params.extra_headers: an 'Authorization' header is not allowed; set the key with api_key"),
    # environment
    (("model_list.1.litellm_params.api_key", "os.environ/NOPE"),
     f"{E1}: litellm_params.api_key: environment variable NOPE is not set"),
    (("model_list.1.litellm_params.api_key", "os.environ/"),
     f"{E1}: litellm_params.api_key: os.environ/ needs a variable name after it"),
    (("general_settings.master_key", "os.environ/MK"),
     "router.yaml: general_settings.master_key: environment variable MK is not set"),
    # fallbacks
    (("router_settings.fallbacks", [{"small": ["huge"]}]),
     "router.yaml: router_settings.fallbacks: group 'huge' is not a model_name in model_list"),
    (("router_settings.fallbacks", [{"huge": ["small"]}]),
     "router.yaml: router_settings.fallbacks: group 'huge' is not a model_name in model_list"),
    (("router_settings.fallbacks", [{"small": ["small"]}]),
     "router.yaml: router_settings.fallbacks: group 'small' lists itself as its fallback"),
    (("router_settings.fallbacks", [{"small": ["big"]}, {"small": ["big"]}]),
     "router.yaml: router_settings.fallbacks: group 'small' is listed twice"),
    (("router_settings.fallbacks", [{"small": ["big", "big"]}]),
     "router.yaml: router_settings.fallbacks: a group is listed twice for 'small'"),
    (("router_settings.fallbacks", [{"small": ["big"], "big": ["small"]}]),
     "router.yaml: router_settings.fallbacks: each item must be one {group: [fallback, ...]}, got 2 keys"),
    (("router_settings.fallbacks", {"small": ["big"]}),
     "router.yaml: router_settings.fallbacks: must be a list, got a mapping"),
    (("router_settings.fallbacks", [{"small": "big"}]),
     "router.yaml: router_settings.fallbacks[0].small: must be a list, got a string"),
    (("router_settings.context_window_fallbacks", [{"small": ["huge"]}]),
     "router.yaml: router_settings.context_window_fallbacks: group 'huge' is not a model_name in model_list"),
    (("router_settings.default_fallbacks", ["huge"]),
     "router.yaml: router_settings.default_fallbacks: group 'huge' is not a model_name in model_list"),
    (("litellm_settings.fallbacks", [{"small": ["huge"]}]),
     "router.yaml: litellm_settings.fallbacks: group 'huge' is not a model_name in model_list"),
    # the top level
    (("x", 1), "router.yaml: unknown top-level key 'x' (known: model_list, router_settings, litellm_settings, "
     "general_settings, environment_variables)"),
    (("include", ["other.yaml"]), f"router.yaml: 'include' {NOT_IMPL}"),
]


@pytest.mark.parametrize("edit, expected", BAD, ids=[f"{e[0]}={e[1]!r}"[:60] for e, _ in BAD])
def test_bad_config_is_one_line(edit, expected):
    assert error_of(changed(edit)) == expected


def test_env_var_that_is_empty():
    assert error_of(EXAMPLE, {"KEY": ""}) == f"{E1}: litellm_params.api_key: environment variable KEY is empty"


@pytest.mark.parametrize("section, key", [
    *[("model_list.1.litellm_params", k) for k in (
        "custom_llm_provider", "api_version", "organization", "max_retries", "region_name", "aws_access_key_id",
        "aws_region_name", "vertex_project", "vertex_location", "tags", "mock_response",
        "merge_reasoning_content_in_choices", "use_in_pass_through", "input_cost_per_second")],
    *[("model_list.1.model_info", k) for k in (
        "mode", "base_model", "max_tokens", "max_input_tokens", "max_output_tokens", "supports_vision",
        "supports_function_calling", "db_model")],
    *[("router_settings", k) for k in (
        "redis_host", "redis_port", "redis_password", "cache_responses", "enable_pre_call_checks",
        "model_group_alias", "retry_policy", "allowed_fails_policy", "content_policy_fallbacks",
        "routing_strategy_args", "provider_budget_config")],
    *[("litellm_settings", k) for k in ("drop_params", "set_verbose", "success_callback", "cache")],
    *[("general_settings", k) for k in ("database_url", "store_model_in_db", "alerting")],
])
def test_litellm_keys_we_do_not_implement_say_so(section, key):
    msg = error_of(changed((f"{section}.{key}", 1)))
    where = {"model_list.1.litellm_params": f"{E1}: litellm_params", "model_list.1.model_info": f"{E1}: model_info"}
    assert msg == f"{where.get(section, 'router.yaml: ' + section)}: '{key}' {NOT_IMPL}"


def test_duplicate_ids():
    text = changed(("model_list.0.model_info.id", "x"), ("model_list.1.model_info.id", "x"))
    assert error_of(text) == f"{E1}: model_info.id: 'x' is already the id of model_list[0]"


@pytest.mark.parametrize("cost", ["input_cost_per_token", "output_cost_per_token"])
def test_cost_in_both_places(cost):
    text = changed((f"model_list.1.litellm_params.{cost}", 1e-7), (f"model_list.1.model_info.{cost}", 1e-7))
    assert error_of(text) == f"{E1}: model_info.{cost}: also set in litellm_params; keep one"


@pytest.mark.parametrize("lkey, rkey, lval, rval, shown", [
    ("num_retries", "num_retries", 3, 2, "is 3 but router_settings.num_retries is 2"),
    ("request_timeout", "timeout", 30, 60, "is 30.0 but router_settings.timeout is 60.0"),
    ("allowed_fails", "allowed_fails", 1, 0, "is 1 but router_settings.allowed_fails is 0"),
    ("fallbacks", "fallbacks", [{"small": ["big"]}], [{"big": ["small"]}], "differs from router_settings.fallbacks"),
    ("default_fallbacks", "default_fallbacks", ["big"], ["small"], "differs from router_settings.default_fallbacks"),
])
def test_both_sections_disagree(lkey, rkey, lval, rval, shown):
    text = changed((f"litellm_settings.{lkey}", lval), (f"router_settings.{rkey}", rval))
    assert error_of(text) == f"router.yaml: litellm_settings.{lkey}: {shown}; set it in one section"


# ---- secrets ----

@pytest.mark.parametrize("edit", [
    ("model_list.1.litellm_params.foo", 1),
    ("model_list.1.litellm_params.api_base", "os.environ/KEY"),  # a bad URL read from a secret
    ("model_list.1.litellm_params.api_key", 12345),
    ("model_list.1.litellm_params.extra_headers", {"x-api-key": SECRET, "Authorization": SECRET}),
    ("model_list.1.litellm_params.extra_headers", {"x-api-key": f"os.environ/{SECRET}"}),
    ("general_settings.master_key", [SECRET]),
    ("environment_variables.KEY", [SECRET]),
])
def test_secrets_never_in_messages(edit):
    error_of(changed(("model_list.1.litellm_params.api_key", SECRET), edit))  # error_of asserts it is absent


def test_secret_on_a_line_yaml_cannot_parse():
    msg = error_of(f"model_list:\n  - model_name: a\n    litellm_params: {{api_key: {SECRET}: x}}\n")
    assert msg.startswith("router.yaml: line 3: invalid YAML: ")


def test_secrets_never_in_repr():
    text = changed(("model_list.1.litellm_params.extra_headers", {"x-api-key": SECRET}),
                   ("general_settings.master_key", "os.environ/KEY"))
    cfg = load(text)
    assert cfg.master_key == SECRET and cfg.deployments[1].api_key == SECRET
    assert SECRET not in repr(cfg) and SECRET not in str(cfg) and SECRET not in repr(cfg.deployments[1])


# ---- files and YAML ----

def test_load_config_file(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(EXAMPLE.replace("os.environ/KEY", "literal-key"))
    cfg = load_config(path)
    assert cfg.path == str(path) and cfg.deployments[1].api_key == "literal-key"


def test_load_config_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: file not found"


def test_load_config_directory_and_not_utf8(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: cannot read: ")
    (tmp_path / "bin.yaml").write_bytes(b"model_list: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "bin.yaml")
    assert str(info.value) == f"{tmp_path / 'bin.yaml'}: not UTF-8 text"


@pytest.mark.parametrize("text, line", [
    ("model_list:\n  - model_name: a\n   litellm_params: [\n", 3),
    ("model_list: [\n", 2),
    ("a: b: c\n", 1),
    ("model_list:\n  - model_name: a\n    model_name: b\n", 3),  # a key given twice
])
def test_malformed_yaml_names_the_line(tmp_path, text, line):
    path = tmp_path / "router.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: line {line}: invalid YAML: ") and "\n" not in msg


@pytest.mark.parametrize("text, kind", [("", "null"), ("- a\n- b\n", "a list"), ("just text\n", "a string")])
def test_document_must_be_a_mapping(text, kind):
    assert error_of(text) == f"router.yaml: the document must be a mapping with a model_list, got {kind}"


def test_default_path_in_messages():
    with pytest.raises(ConfigError) as info:
        parse_config("x: 1\nmodel_list: []\n", environ={})
    assert str(info.value).startswith("<string>: ")
