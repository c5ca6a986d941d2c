"""The ``fastinfer`` command: its parser, one subcommand per module (generate.py, serve.py, each in COMMANDS), and
the exit statuses every subcommand shares.

``main(argv)`` returns the exit status; ``make_llm`` builds the LLM and is the seam tests replace (or pass
``llm_factory``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any, Callable

from . import generate, serve
from .batch_output import OutputError
from .messages import CliError, one_line, package_version, say

_DESCRIPTION = """\
fastinfer: LLM inference on CPU and CUDA with a paged KV cache.

Commands:
  generate   complete one prompt, or a file of prompts (text, JSONL or OpenAI Batch API format)
  serve      an OpenAI-compatible HTTP server (streaming, metrics, health)

Run `fastinfer generate --help` or `fastinfer serve --help` for the details."""

# Subcommand name -> its module: ``add_parser(subparsers)`` and ``run(args, llm_factory) -> exit status``.
COMMANDS = {"generate": generate, "serve": serve}


def make_llm(model: str | None, **engine_kwargs: Any) -> Any:
    """The LLM a run uses (tests replace this, or pass ``llm_factory`` to ``main``)."""
    from fastinfer.entrypoints.llm import LLM

    return LLM(model, **engine_kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand's flags."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="fastinfer", description=_DESCRIPTION, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None, *, llm_factory: Callable[..., Any] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    on_main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _on_sigterm) if on_main_thread else None
    try:
        return COMMANDS[args.command].run(args, llm_factory or make_llm)
    except (CliError, OutputError) as err:
        say(f"error: {one_line(err)}")
        return getattr(err, "code", 1)
    except KeyboardInterrupt as err:
        if getattr(args, "output", None):
            say(f"interrupted; the lines written so far are kept in {args.output} (run again with --resume to finish)")
        else:
            say("interrupted")
        return 143 if isinstance(err, _Terminated) else 130
    except BrokenPipeError:  # stdout closed early (`| head`): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, old_term)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (output flushed and closed) but exiting with 143."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


if __name__ == "__main__":
    sys.exit(main())
