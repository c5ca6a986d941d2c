"""What the ``fastinfer`` command says on stderr: one line per message, and CliError, the user mistake it reports."""

from __future__ import annotations

import sys


class CliError(Exception):
    """A user mistake: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def say(message: str) -> None:
    """``fastinfer: message`` on stderr, flushed."""
    print(f"fastinfer: {message}", file=sys.stderr, flush=True)


def one_line(err: BaseException | str, limit: int = 500) -> str:
    """The first line of an error's text, cut to ``limit`` characters: some (torch's, a chat template's) span
    pages, and the CLI reports a mistake in one line."""
    lines = str(err).strip().splitlines() or [""]
    text = lines[0] + (" ..." if len(lines) > 1 else "")
    return text if len(text) <= limit else text[:limit] + " ..."


def flag(name: str) -> str:
    """The command-line flag of a setting: ``max_tokens`` -> ``--max-tokens``."""
    return "--" + name.replace("_", "-")


def package_version() -> str:
    """fastinfer's installed version ("unknown" when running from a source tree that is not installed)."""
    try:
        from importlib.metadata import version

        return version("fastinfer")
    except Exception:  # not installed as a distribution
        return "unknown"
