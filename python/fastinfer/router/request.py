"""A client's completion body read for routing: which groups to try in which order (``model``, then OpenRouter's
``models``), OpenRouter's ``provider`` preferences, and the body each deployment is sent (without those fields)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .backend import UpstreamError, error_body
from .deployment import Deployment

SORTS = ("price", "latency", "throughput")
_PROVIDER_KEYS = {"sort", "order", "only", "ignore", "allow_fallbacks", "max_price"}
# OpenRouter provider fields about things a self-hosted router has no notion of: refused by name, never ignored.
_PROVIDER_UNSUPPORTED = {"data_collection", "require_parameters", "quantizations", "zdr", "experimental"}
_ROUTER_FIELDS = ("models", "provider", "route")
_PER_MILLION = 1e6  # OpenRouter's max_price is in dollars per million tokens; costs in the config are per token


def bad_request(message: str, param: str | None = None, status: int = 400, code: Any = None) -> UpstreamError:
    return UpstreamError(status, error_body(message, "invalid_request_error", code, param))


def _names(value: Any, param: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise bad_request(f"{param} must be a list of non-empty strings", param)
    return tuple(value)


@dataclass(slots=True)
class RouteRequest:
    """Everything the router needs to know about one client request."""

    groups: list[str]  # model groups to try, in order, before any configured fallback
    forward: dict  # the body sent to deployments (router-only fields removed; "model" set per deployment)
    stream: bool
    include_usage: bool  # the client asked for the usage chunk of a stream
    sort: str | None = None  # provider.sort
    order: tuple[str, ...] = ()  # provider.order: deployments tried first, in this order
    only: tuple[str, ...] | None = None  # provider.only: no other deployments
    ignore: tuple[str, ...] = ()  # provider.ignore: never these deployments
    allow_fallbacks: bool = True  # provider.allow_fallbacks: False = no configured fallbacks, only `order`
    max_prompt_price: float | None = None  # dollars per prompt token (from per million)
    max_completion_price: float | None = None
    tokens: int = 0  # a rough size of the request in tokens (usage-based routing's tpm check)

    def allows(self, d: Deployment) -> bool:
        """The deployment passes provider.only / ignore / max_price (and, without fallbacks, provider.order)."""
        if self.only is not None and not _matches(d, self.only):
            return False
        if self.ignore and _matches(d, self.ignore):
            return False
        if not self.allow_fallbacks and self.order and not _matches(d, self.order):
            return False
        if self.max_prompt_price is not None and d.spec.input_cost_per_token > self.max_prompt_price:
            return False
        if self.max_completion_price is not None and d.spec.output_cost_per_token > self.max_completion_price:
            return False
        return True

    def ordered(self, ds: list[Deployment]) -> list[Deployment]:
        """``ds`` with provider.order's deployments moved first, in that order."""
        if not self.order:
            return ds
        first = [d for name in self.order for d in ds if _matches(d, (name,))]
        seen = set()
        first = [d for d in first if not (d.id in seen or seen.add(d.id))]
        return first + [d for d in ds if d.id not in seen]


def provider_names(d: Deployment) -> set[str]:
    """The names provider.order / only / ignore may use for a deployment: its id, its config model string
    ("openai/Qwen/Qwen3-8B"), its provider ("openai", "fastinfer"), its api_base and that base's host[:port]."""
    spec = d.spec
    names = {spec.id, f"{spec.provider}/{spec.model}", spec.provider}
    if spec.api_base:
        names.add(spec.api_base)
        host = spec.api_base.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
        names.add(host)
        names.add(host.split(":", 1)[0])
    return names


def _matches(d: Deployment, names: tuple[str, ...]) -> bool:
    mine = provider_names(d)
    return any(n in mine for n in names)


def parse_route(body: dict, known_groups: set[str], count_tokens: bool = False) -> RouteRequest:
    """Read ``body`` (a JSON object) for routing; a bad routing field is a 400 naming it, an unknown model 404.
    ``count_tokens``: estimate the request's size (only usage-based routing needs it)."""
    model = body.get("model")
    models = body.get("models")
    groups: list[str] = []
    if model is not None:
        if not isinstance(model, str) or not model:
            raise bad_request("model must be a non-empty string", "model")
        groups.append(model)
    if models is not None:
        for name in _names(models, "models"):
            if name not in groups:
                groups.append(name)
    if not groups:
        raise bad_request('the body needs "model" (a model group of this router) or "models"', "model")
    for i, name in enumerate(groups):
        if name not in known_groups:
            if i == 0 and model is not None:
                raise bad_request(f"The model `{name}` does not exist.", "model", 404, "model_not_found")
            raise bad_request(f"models: `{name}` is not a model group of this router", "models", 404,
                              "model_not_found")
    if "route" in body and body["route"] not in (None, "fallback"):
        raise bad_request('route must be "fallback" (the only routing OpenRouter defines)', "route")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    forward = {k: v for k, v in body.items() if k not in _ROUTER_FIELDS}
    req = RouteRequest(groups, forward, stream, include_usage, tokens=_rough_tokens(body) if count_tokens else 0)
    provider = body.get("provider")
    if provider is not None:
        _parse_provider(provider, req)
    return req


def _parse_provider(p: Any, req: RouteRequest) -> None:
    if not isinstance(p, dict):
        raise bad_request("provider must be an object", "provider")
    for key in p:
        if key in _PROVIDER_UNSUPPORTED:
            raise bad_request(f"provider.{key} is not supported by fastinfer's router", f"provider.{key}")
        if key not in _PROVIDER_KEYS:
            raise bad_request(f"provider: unknown field {key!r} (known: {', '.join(sorted(_PROVIDER_KEYS))})",
                              f"provider.{key}")
    sort = p.get("sort")
    if sort is not None:
        if isinstance(sort, dict):  # OpenRouter's {"by": ..., "partition": ...} form
            sort = sort.get("by")
        if sort not in SORTS:
            raise bad_request(f"provider.sort must be one of {', '.join(SORTS)}", "provider.sort")
        req.sort = sort
    if p.get("order") is not None:
        req.order = _names(p["order"], "provider.order")
    if p.get("only") is not None:
        req.only = _names(p["only"], "provider.only")
    if p.get("ignore") is not None:
        req.ignore = _names(p["ignore"], "provider.ignore")
    allow = p.get("allow_fallbacks", True)
    if not isinstance(allow, bool):
        raise bad_request("provider.allow_fallbacks must be a boolean", "provider.allow_fallbacks")
    req.allow_fallbacks = allow
    price = p.get("max_price")
    if price is not None:
        if not isinstance(price, dict):
            raise bad_request("provider.max_price must be an object", "provider.max_price")
        for key, value in price.items():
            if key not in ("prompt", "completion"):
                raise bad_request(f"provider.max_price: unknown field {key!r} (known: prompt, completion; dollars "
                                  "per million tokens)", f"provider.max_price.{key}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise bad_request(f"provider.max_price.{key} must be a number >= 0 (dollars per million tokens)",
                                  f"provider.max_price.{key}")
        if "prompt" in price:
            req.max_prompt_price = price["prompt"] / _PER_MILLION
        if "completion" in price:
            req.max_completion_price = price["completion"] / _PER_MILLION


def _rough_tokens(body: dict) -> int:
    """About four characters a token, plus max_tokens: enough to keep a deployment under its tpm."""
    text = body.get("messages", body.get("prompt", ""))
    size = len(text) if isinstance(text, str) else len(json.dumps(text, ensure_ascii=False, default=str))
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    return size // 4 + (limit if isinstance(limit, int) and not isinstance(limit, bool) else 0)
