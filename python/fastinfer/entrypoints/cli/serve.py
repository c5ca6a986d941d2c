"""``fastinfer serve``: the OpenAI-compatible HTTP server (entrypoints/openai/api_server.py) on one model.

This file holds the subcommand's flags and their checks; the server needs the ``serve`` extra (fastapi, uvicorn,
prometheus-client), imported only when the command runs."""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from . import arg_types, batch_input, batch_run, generate
from .messages import CliError, package_version

_DESCRIPTION = """\
Serve MODEL over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions (streaming too),
/v1/models, /tokenize, /detokenize, /health, /metrics (Prometheus), /version.
Without MODEL the built-in default model (SmolLM2-135M-Instruct, GGUF) is served.
The server listens at once and prints `fastinfer serve: listening on http://HOST:PORT` on stderr;
/health answers 503 while the model loads, then 200. SIGTERM or Ctrl-C drains: no new requests,
in-flight ones get --shutdown-timeout seconds to finish, the rest are aborted; exit status 0."""

_EPILOG = """\
examples:
  fastinfer serve                                  # the default model on http://127.0.0.1:8000
  fastinfer serve ./Qwen3-0.6B --port 0 --api-key "$KEY" --max-waiting 64
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}]}'"""

_MISSING = 'fastinfer serve needs the server extra: pip install "fastinfer[serve]" (missing: {})'


def add_parser(sub: Any) -> None:
    """Add ``serve`` and its flags to the subparsers ``sub``."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server", description=_DESCRIPTION, epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_arg", nargs="?", metavar="MODEL",
                   help="HF model folder, .gguf file or cached HF id (default: built-in model)")
    p.add_argument("--model", "-m", metavar="PATH_OR_ID", help="the same as MODEL")
    p.add_argument("--config", metavar="ROUTER_YAML",
                   help="serve every model group of a router config (LiteLLM's model_list/router_settings shape: "
                        "local engines and remote OpenAI-compatible providers) instead of one MODEL")
    p.add_argument("--preload", action="store_true",
                   help="with --config: load the local engines before /health says ready (default: on first use)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    s.add_argument("--port", type=arg_types.int_at_least(0), default=8000,
                   help="port; 0 = any free port (default: %(default)s)")
    s.add_argument("--api-key", metavar="KEY", default=os.environ.get("FASTINFER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $FASTINFER_API_KEY; none)")
    s.add_argument("--served-model-name", metavar="NAME", help="the model's name in the API (default: from MODEL)")
    s.add_argument("--max-waiting", type=arg_types.positive_int, metavar="N",
                   help="requests waiting for the engine before new ones get 429 (default: no limit)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="seconds in-flight requests may finish after SIGTERM (default: %(default)s)")
    s.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                   help="(default: %(default)s)")
    r = p.add_argument_group("requests")
    r.add_argument("--seed", type=int, metavar="S", help="seed of the engine's generator (requests may set their own)")
    r.add_argument("--max-logprobs", type=arg_types.int_at_least(0), default=batch_input.MAX_LOGPROBS, metavar="K",
                   help="most logprobs a request may ask for (default: %(default)s)")
    r.add_argument("--no-generation-config", action="store_true",
                   help="ignore the sampling defaults in the model's generation_config.json")
    generate.add_engine_args(p.add_argument_group("engine"))


def model_name(model: str | None) -> str:
    """The name a model is served under: the path or id as given; for the default model its file's name without
    the extension and quantisation (``SmolLM2-135M-Instruct``)."""
    if model is not None:
        return model
    try:
        from fastinfer.loading.load import default_model_path

        stem = os.path.basename(default_model_path()).removesuffix(".gguf")
    except Exception:  # no default model installed: the load will say so
        return "fastinfer-default"
    return stem.split(".")[0] or stem


def run(args: argparse.Namespace, llm_factory: Callable[..., Any]) -> int:
    """Run ``fastinfer serve`` with parsed ``args``; returns the exit status."""
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if not _importable(m)]
    if missing:
        raise CliError(_MISSING.format(", ".join(missing)))
    if args.model_arg is not None and args.model is not None and args.model_arg != args.model:
        raise CliError("give MODEL or --model, not both", 2)
    args.model = args.model if args.model is not None else args.model_arg
    if not args.shutdown_timeout >= 0:
        raise CliError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}", 2)
    if args.api_key is not None and not args.api_key:
        raise CliError("--api-key must not be empty", 2)
    if args.config is not None:
        return _run_router(args)
    if args.preload:
        raise CliError("--preload needs --config (one MODEL is always loaded at start)", 2)

    from fastinfer.entrypoints.openai import protocol
    from fastinfer.entrypoints.openai.api_server import Loaded, ServeConfig, run_server


    def load() -> Loaded:
        llm = generate.load_llm(args, llm_factory, batch_run.Stats())
        defaults = {} if args.no_generation_config else protocol.model_sampling_defaults(
            getattr(llm, "generation_config", None) or {})
        return Loaded(llm.engine, llm.get_tokenizer(), defaults, args.max_logprobs)

    config = ServeConfig(args.host, args.port, args.served_model_name or model_name(args.model), args.api_key,
                         args.max_waiting, args.shutdown_timeout, args.log_level, package_version())
    try:
        return run_server(config, load)
    except OSError as err:  # the address is taken or cannot be bound
        raise CliError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from None


# Flags that configure one model; with --config each local deployment has its own (litellm_params.engine_args).
_ONE_MODEL_FLAGS = ("served_model_name", "max_waiting", "seed", "no_generation_config", "dtype", "device",
                    "max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_bytes",
                    "no_prefix_caching", "threads", "quantization")


def _run_router(args: argparse.Namespace) -> int:
    """``fastinfer serve --config``: the routing layer (fastinfer/router/) over the config's model groups."""
    missing = [m for m in ("yaml", "httpx") if not _importable(m)]
    if missing:
        raise CliError(_MISSING.format(", ".join(missing)))
    if args.model is not None:
        raise CliError("--config serves the config's model groups: give no MODEL with it", 2)
    given = [name for name in _ONE_MODEL_FLAGS if getattr(args, name) not in (None, False)]
    if given:
        raise CliError(f"{'--' + given[0].replace('_', '-')} configures one model; with --config set it per "
                       "deployment in litellm_params.engine_args", 2)
    from fastinfer.router.config import ConfigError, load_config
    from fastinfer.router.router import Router
    from fastinfer.router.server import RouterServeConfig, run_router

    try:
        config = load_config(args.config)
    except ConfigError as err:
        raise CliError(str(err), 2) from None
    api_key = args.api_key if args.api_key is not None else config.master_key
    serve_config = RouterServeConfig(args.host, args.port, api_key, args.preload, args.shutdown_timeout,
                                     args.log_level, package_version())
    try:
        return run_router(serve_config, Router(config, user_agent=f"fastinfer/{package_version()}"))
    except OSError as err:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from None


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
