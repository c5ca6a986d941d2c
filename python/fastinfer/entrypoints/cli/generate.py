"""``fastinfer generate``: offline generation for one prompt or a whole file of them.

This file holds the subcommand's flags and the order of a run: read and check every request, skip the ones already
in the output (--resume), load the model, generate. Reading the input is batch_input.py, the output file and resume
bookkeeping batch_output.py, the streaming loops and output records batch_run.py.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Any, Callable

from fastinfer.engine.sampling_params import SamplingParams
from fastinfer.entrypoints.openai import protocol

from . import arg_types, batch_input, batch_run, shard
from .batch_input import BadLine, Request
from .batch_output import Output, ResumeError, read_done
from .messages import CliError, flag, one_line, say

DEFAULT_MAX_TOKENS = 256

_GENERATE_DESCRIPTION = """\
Complete one PROMPT (printed to stdout as it is generated) or every request of --input FILE
(written as JSON lines to --output, or to stdout, each line as soon as its request finishes).
Without --model the built-in default model (SmolLM2-135M-Instruct, GGUF) is used."""

_GENERATE_EPILOG = """\
input formats (--input; detected from the first non-blank line, or set with --input-format):
  text     one prompt per line; a request's id is its 0-based line index; blank lines are skipped
  jsonl    {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]} per line, with an
           optional "id" (or "custom_id") and per-line sampling settings under the --flag names with
           underscores: {"id": "q7", "prompt": "...", "max_tokens": 64, "temperature": 0, "stop": ["\\n"]}
  openai   OpenAI Batch API lines: {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
           "body": {"messages": [...], "max_tokens": 64}}; "/v1/completions" takes "prompt" instead

output (--output FILE, else stdout):
  text and jsonl input give {"id", "prompt" (or "messages"), "text", "finish_reason", "usage"} per
  request ("outputs": [...] instead of "text" when n > 1, "error" when the engine rejected it);
  openai input gives OpenAI Batch API output lines ({"custom_id", "response": {"status_code": 200,
  "body": {...}}, "error": null}, or "response": null and an "error" for a failed request).
  Lines come in completion order, not input order; match them by id.

chat template:
  {"messages"} lines and /v1/chat/completions always go through the model's chat template and
  /v1/completions prompts never do. PROMPT, text lines and {"prompt"} lines use it when the model has
  one (instruct models do) unless --no-chat; --chat makes a model without a template an error.

shards (--shard I/N, I from 0 to N-1):
  Each request goes to shard sha256(its id) mod N, so N runs over the same --input, one per shard, do every
  request exactly once between them, in any order and on any machines; give each its own --output. --resume
  continues one shard. With --on-bad-line fail a bad line anywhere in the file fails every shard.

resume:
  With --resume, requests whose id is already in --output are skipped and new lines are appended; a
  half-written last line left by a killed run is cut off first. A request recorded with an error
  counts as done, unless --retry-failed (e.g. after fixing its input line). Without --resume an
  existing, non-empty --output is an error unless --overwrite. A run locks its --output file: a
  second run on the same file is refused (one line, the file untouched) until the first ends.

exit status:
  0    done (a request the engine rejected is recorded in the output, not a failure)
  1    usage, load or output error (missing file, bad model, --output busy or not writable)
  2    bad command line, or bad input lines with --on-bad-line fail (nothing is generated then)
  130  interrupted (Ctrl-C), 143 terminated (SIGTERM); the lines written so far are kept

examples:
  fastinfer generate "Write a haiku about caches."
  fastinfer generate --model ./Qwen3-0.6B --temperature 0 --max-tokens 64 "The capital of France is"
  fastinfer generate --input prompts.txt --output results.jsonl
  fastinfer generate --input batch.jsonl --output out.jsonl --resume   # after an interruption
  fastinfer generate --input batch.jsonl --output out.1.jsonl --shard 1/4  # the 2nd of 4 processes
  cat prompts.txt | fastinfer generate --input - --no-progress > results.jsonl"""


def add_parser(sub: Any) -> None:
    """Add ``generate`` and its flags to the subparsers ``sub``."""
    fmt = argparse.RawDescriptionHelpFormatter
    g = sub.add_parser(
        "generate", help="complete a prompt or a file of prompts", description=_GENERATE_DESCRIPTION,
        epilog=_GENERATE_EPILOG, formatter_class=fmt,
    )
    g.add_argument("prompt", nargs="?", metavar="PROMPT", help="one prompt to complete (or use --input)")
    g.add_argument("--model", "-m", metavar="PATH_OR_ID",
                   help="HF model folder, .gguf file or cached HF id (default: built-in model); with --config, the "
                        "model group of lines that name none")
    g.add_argument("--config", metavar="ROUTER_YAML",
                   help="route each request through a router config (local engines and remote OpenAI-compatible "
                        "providers, LiteLLM's shape) to the group its \"model\" names (OpenAI lines: body.model)")
    g.add_argument("--concurrency", type=arg_types.positive_int, metavar="N",
                   help="with --config: requests in flight at once (default: 32)")

    io = g.add_argument_group("input and output")
    io.add_argument("--input", "-i", metavar="FILE", help="file of requests, - for stdin")
    io.add_argument("--input-format", choices=batch_input.FORMATS, help="skip format detection")
    io.add_argument("--output", "-o", metavar="FILE", help="write JSON lines here (default: stdout)")
    io.add_argument("--resume", action="store_true", help="skip ids already in --output and append")
    io.add_argument("--retry-failed", action="store_true",
                    help="with --resume, also redo requests whose output line is an error (the line is replaced)")
    io.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    io.add_argument("--on-bad-line", choices=("skip", "fail"), default="skip",
                    help="bad input lines: report and skip (default), or fail before generating (exit 2)")
    io.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="apply the chat template to plain prompts (default: when the model has one)")
    io.add_argument("--system", metavar="TEXT", help="system message for chat-templated plain prompts")
    io.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    io.add_argument("--shard", type=shard.arg, metavar="I/N",
                    help="run only shard I of N (0-based: 0/2 and 1/2 split a file in two): the requests whose id "
                         "hashes (sha256) to I, so N processes or machines split one --input, each with its own "
                         "--output (and --resume)")

    s = g.add_argument_group(
        "sampling", "Defaults for every request; input lines may override them. Unset ones come from the\n"
        "model's generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty,\n"
        "max_new_tokens), else they are the defaults shown.")
    s.add_argument("--max-tokens", type=arg_types.positive_int, metavar="N",
                   help=f"most new tokens per completion (default: {DEFAULT_MAX_TOKENS})")
    s.add_argument("--temperature", "-t", type=float, metavar="T", help="0 = greedy (default: 1.0)")
    s.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass (default: 1.0 = off)")
    s.add_argument("--top-k", type=int, metavar="K", help="sample from the k most likely tokens (default: 0 = off)")
    s.add_argument("--min-p", type=float, metavar="P",
                   help="drop tokens below min_p x the top probability (default: 0)")
    s.add_argument("--seed", type=int, metavar="S",
                   help="seed of every request, so a resumed run samples as the interrupted one would have")
    s.add_argument("--stop", action="append", metavar="STRING",
                   help="stop string (repeatable; $'\\n' in bash for a newline)")
    s.add_argument("--n", type=arg_types.positive_int, metavar="N", help="completions per prompt (default: 1)")
    s.add_argument("--repetition-penalty", type=float, metavar="X", help="(default: 1.0 = off)")
    s.add_argument("--presence-penalty", type=float, metavar="X", help="(default: 0)")
    s.add_argument("--frequency-penalty", type=float, metavar="X", help="(default: 0)")
    s.add_argument("--ignore-eos", action="store_true", default=None, help="keep generating past end-of-sequence")
    s.add_argument("--no-generation-config", action="store_true",
                   help="ignore the sampling defaults in the model's generation_config.json")
    s.add_argument("--logprobs", type=int, metavar="K", help="record the sampled token's and the top K logprobs")
    s.add_argument("--max-logprobs", type=arg_types.int_at_least(0), default=batch_input.MAX_LOGPROBS, metavar="K",
                   help="most logprobs a request may ask for; input lines above it are bad lines "
                        "(default: %(default)s)")

    add_engine_args(g.add_argument_group("engine"))


def add_engine_args(e: Any) -> None:
    """The engine's flags (model loading and KV cache), shared by every subcommand that loads a model."""
    e.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="(default: auto)")
    e.add_argument("--device", type=arg_types.device, help="auto, cpu or cuda[:i] (default: auto)")
    e.add_argument("--max-model-len", type=arg_types.positive_int, metavar="N",
                   help="longest prompt + output (default: the model's)")
    e.add_argument("--block-size", type=arg_types.positive_int, metavar="N",
                   help="tokens per KV cache block (default: 16)")
    e.add_argument("--max-num-seqs", type=arg_types.positive_int, metavar="N",
                   help="most sequences per step (default: 256)")
    e.add_argument("--max-num-batched-tokens", type=arg_types.positive_int, metavar="N", help="most tokens per step")
    e.add_argument("--kv-cache-memory-bytes", type=arg_types.byte_size, metavar="SIZE", help="KV cache size, e.g. 2GiB")
    e.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt prefixes")
    e.add_argument("--threads", type=arg_types.threads, metavar="N",
                   help="CPU threads (default: all this process may use)")
    e.add_argument("--quantization", choices=("auto", "none", "q8_0"),
                   help="auto: a GGUF's quantised weights run natively on the CPU (q8_0, q4_0, q4_1, q5_0, q4_k, q5_k, q6_k; other types "
                        "dequantised); none: every weight dequantised to --dtype; q8_0: float weights quantised "
                        "to Q8_0 at load (default: auto)")


def _sampling_defaults(args: argparse.Namespace) -> dict:
    """The sampling flags given: every flag named after a SamplingParams field (protocol.SAMPLING_FIELDS), in the
    order of the command line's flags."""
    return {name: value for name, value in vars(args).items()
            if name in protocol.SAMPLING_FIELDS and value is not None}


def _check_sampling_flags(args: argparse.Namespace, defaults: dict) -> None:
    """The command line's sampling settings, each checked once, before any input is read or model loaded: a bad
    one is one error naming its flag (not a bad-line report on every line)."""
    make_params = _make_params()
    for name, value in defaults.items():
        try:
            make_params(**{name: value})
        except (ValueError, TypeError) as err:
            raise CliError(f"{flag(name)}: {one_line(err)}", 2) from None
    try:
        make_params(**defaults)
    except (ValueError, TypeError) as err:
        raise CliError(f"bad sampling setting: {one_line(err)}", 2) from None
    if args.logprobs is not None and args.logprobs > args.max_logprobs:
        raise CliError(f"--logprobs must be <= {args.max_logprobs} (--max-logprobs), got {args.logprobs}", 2)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLM keyword arguments from the engine flags given (and --seed, --max-logprobs)."""
    d: dict[str, Any] = {}
    for name in ("dtype", "device", "max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens",
                 "kv_cache_memory_bytes", "seed"):
        if getattr(args, name) is not None:
            d[name] = getattr(args, name)
    if args.no_prefix_caching:
        d["enable_prefix_caching"] = False
    if getattr(args, "quantization", None) is not None:
        d["quantization"] = None if args.quantization == "none" else args.quantization
    d["max_logprobs"] = args.max_logprobs
    return d


def _make_params(model_defaults: dict | None = None) -> Callable[..., Any]:
    """SamplingParams(**kwargs) over the model's defaults, over max_tokens=DEFAULT_MAX_TOKENS."""
    base = {"max_tokens": DEFAULT_MAX_TOKENS, **(model_defaults or {})}
    return lambda **kwargs: SamplingParams(**{**base, **kwargs})


def _read_requests(args: argparse.Namespace, defaults: dict) -> tuple[str, list[Request], list[BadLine]]:
    """The input's format, its requests (each one's SamplingParams built now, with the command line's sampling
    defaults; the model's are added once it is loaded) and its bad lines."""
    if args.prompt is not None:
        req = Request(0, 1, "text", args.prompt, None, dict(defaults))
        req.sampling = _make_params()(**req.params)  # checked by _check_sampling_flags
        return "text", [req], []
    data = _read_input(args)
    lines = batch_input.split_lines(data)
    fmt = args.input_format or batch_input.detect_format(lines)
    requests, bad = batch_input.parse_input(data, fmt, defaults, _make_params(), args.max_logprobs)
    return fmt, requests, bad


def _read_input(args: argparse.Namespace) -> bytes:
    try:
        if args.input == "-":
            return sys.stdin.buffer.read()
        with open(args.input, "rb") as f:
            return f.read()
    except OSError as err:
        raise CliError(f"cannot read --input {args.input}: {err.strerror or err}") from None


def _check_args(args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.input is None):
        raise CliError("give one PROMPT or --input FILE (see fastinfer generate --help)", 2)
    if args.resume and not args.output:
        raise CliError("--resume needs --output FILE", 2)
    if args.retry_failed and not args.resume:
        raise CliError("--retry-failed needs --resume", 2)
    if args.resume and args.overwrite:
        raise CliError("--resume and --overwrite contradict each other", 2)
    if args.shard is not None and args.input is None:
        raise CliError("--shard splits an --input file; it cannot split one PROMPT", 2)
    if args.output and os.path.isdir(args.output):
        raise CliError(f"--output {args.output} is a directory; give a file in it", 2)
    if args.output and args.input not in (None, "-") and os.path.exists(args.output) and os.path.exists(args.input):
        if os.path.samefile(args.input, args.output):
            raise CliError("--output is the --input file", 2)


# Flags that configure the one model a run loads; with --config each local deployment has its own engine_args.
_ENGINE_FLAGS = ("dtype", "device", "max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens",
                 "kv_cache_memory_bytes", "no_prefix_caching", "threads", "no_generation_config", "quantization")


def _check_routed_args(args: argparse.Namespace) -> None:
    given = [name for name in _ENGINE_FLAGS if getattr(args, name) not in (None, False)]
    if given:
        raise CliError(f"{flag(given[0])} configures one model; with --config set it per deployment in "
                       "litellm_params.engine_args", 2)
    if args.concurrency is None:
        args.concurrency = 32


def _exists(path: str) -> str:
    return f"{path} exists; add --resume to continue it or --overwrite to replace it"


def run(args: argparse.Namespace, llm_factory: Callable[..., Any]) -> int:
    """Run ``fastinfer generate`` with parsed ``args``; returns the exit status (CliError for user mistakes)."""
    _check_args(args)
    defaults = _sampling_defaults(args)
    _check_sampling_flags(args, defaults)
    if args.config is not None:
        _check_routed_args(args)
        from .batch_routed import run_routed

        return run_routed(args, lambda: _read_input(args), _open_output, _resume)
    if args.concurrency is not None:
        raise CliError("--concurrency needs --config (one model batches every request itself)", 2)
    stats = batch_run.Stats()
    fmt, requests, bad = _read_requests(args, defaults)
    requests, bad = shard.select(args.shard, requests, bad, args.on_bad_line)
    stats.bad_lines = len(bad)
    batch_input.report_bad_lines(bad, args.on_bad_line)

    single = args.prompt is not None and not args.output
    # Locked before anything in it is read, cut or replaced, and before the model loads; held until the end.
    out = _open_output(args)
    try:
        done = _resume(args, out, fmt) if args.resume else set()
        pending = [r for r in requests if batch_input.id_key(r.id) not in done]
        stats.resumed = len(requests) - len(pending)
        batch_input.record_bad_lines(out, fmt, bad, done)
        if pending:
            llm = load_llm(args, llm_factory, stats)
            pending, prompts = _prepare(args, llm, pending, fmt, out, stats)
        if pending and single:
            try:
                batch_run.print_stream(llm, prompts[0], pending[0], stats, out)
            except batch_run.RequestFailed as err:
                raise CliError(str(err)) from None
        elif pending:
            model_name = args.model or "fastinfer-default"
            batch_run.run_batch(llm, fmt, pending, prompts, out, stats, model_name=model_name,
                             progress=not args.no_progress)
    finally:
        out.close()
    if not single:
        say(stats.summary())
    elif not args.no_progress:
        say(stats.summary(counts=False))
    return 0


def _open_output(args: argparse.Namespace) -> Output:
    """stdout, or --output opened and locked (refused while another run holds it), then emptied (--overwrite)
    or checked to be empty (a run without --resume must not add to an earlier run's file)."""
    if not args.output:
        return Output.stdout()
    out = Output.open_locked(args.output, readable=args.resume)
    try:
        if args.overwrite:
            out.truncate(0)
        elif not args.resume and out.size() > 0:
            raise CliError(_exists(args.output))
    except BaseException:
        out.close()
        raise
    return out


def _resume(args: argparse.Namespace, out: Output, fmt: str) -> set[str]:
    """The ids already in the (locked) output, after reporting what reading it changed or found."""
    try:
        found = read_done(out, fmt, args.retry_failed)
    except ResumeError as err:
        raise CliError(str(err)) from None
    if found.cut:
        say(f"cut a partial last line ({found.cut} bytes) from {args.output}")
    if found.dropped:
        say(f"removed {found.dropped} error line(s) from {args.output} to retry them")
    if found.duplicates:
        example = protocol.short(found.duplicate_example)
        say(f"{args.output} holds {found.duplicates} id(s) more than once (e.g. {example}), written by two runs "
             f"at once; they are skipped, not written again")
    return found.done


def load_llm(args: argparse.Namespace, llm_factory: Callable[..., Any], stats: batch_run.Stats) -> Any:
    """The LLM for the engine flags (--threads applied first); a load failure is one CliError line."""
    if args.threads:
        import torch

        import fastinfer  # its set_num_threads (tests replace it)

        try:
            torch.set_num_threads(args.threads)
            fastinfer.set_num_threads(args.threads)
        except (ValueError, RuntimeError) as err:
            raise CliError(f"--threads: {one_line(err)}", 2) from None
    t0 = time.perf_counter()
    kwargs = engine_kwargs(args)
    try:
        llm = llm_factory(args.model, **kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # any load failure is reported as one line, not a traceback
        if os.environ.get("FASTINFER_DEBUG"):
            raise
        message = one_line(err)
        # An engine setting the model cannot run with is the setting's error, not the model's: the engine's
        # errors name their field first ("kv_cache_memory_bytes: ...", "max_model_len must be ...").
        field = next((k for k in kwargs if re.match(rf"{k}\b", message)), None)
        if field is not None:
            raise CliError(f"{flag(field)}: {message.removeprefix(f'{field}: ')}") from None
        name = args.model or "the default model"
        raise CliError(f"cannot load {name}: {message} (FASTINFER_DEBUG=1 shows the traceback)") from None
    stats.load_s = time.perf_counter() - t0
    return llm


def _prepare(args: argparse.Namespace, llm: Any, pending: list[Request], fmt: str, out: Output,
             stats: batch_run.Stats) -> tuple[list[Request], list[dict]]:
    """The requests whose sampling settings (now over the model's defaults) and prompt could be built, and
    their LLM.stream prompts; the others are written as error lines now."""
    model_defaults = {}
    if not args.no_generation_config:
        model_defaults = protocol.model_sampling_defaults(getattr(llm, "generation_config", None) or {})
    if model_defaults:
        shown = ", ".join(f"{k}={v}" for k, v in model_defaults.items())
        say(f"sampling defaults from the model's generation_config: {shown} (--no-generation-config ignores them)")
    make_params = _make_params(model_defaults)
    tokenizer = llm.get_tokenizer()
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.chat and not has_template:
        raise CliError("--chat: the model has no chat template")
    chat = has_template if args.chat is None else args.chat
    vocab_size = getattr(getattr(llm, "config", None), "vocab_size", None)
    ok: list[Request] = []
    prompts: list[dict] = []
    for r in pending:
        try:
            if model_defaults:
                try:
                    r.sampling = make_params(**r.params)
                except (ValueError, TypeError) as err:
                    raise ValueError(f"bad sampling setting: {err}") from None
            prompts.append(batch_run.engine_prompt(r, tokenizer, chat, args.system, vocab_size))
            ok.append(r)
        except ValueError as err:
            if args.prompt is not None and not args.output:
                raise CliError(str(err)) from None
            say(f"line {r.line}: {one_line(err)}")
            out.write(batch_run.error_record(fmt, r, str(err)))
            stats.requests += 1
            stats.failed += 1
    return ok, prompts
