"""Bounded reading of a checkpoint's small files: regular files only (a FIFO would block the reader, /dev/zero
never end), size caps checked before reading, and the errors that name the file (LoadError)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

# Size caps of the files read from a model folder (a real model's are ~35 MB for tokenizer.json, a few MB for
# the rest); a file over its cap, or one that is not a regular file (a FIFO, /dev/zero), is refused unread.
MAX_JSON_BYTES = 64 << 20  # config.json, tokenizer_config.json, generation_config.json, shard indexes
MAX_TOKENIZER_JSON_BYTES = 512 << 20
MAX_CHAT_TEMPLATE_BYTES = 1 << 20  # released templates are under 20 kB


class LoadError(RuntimeError):
    """A checkpoint that cannot be loaded: missing or corrupt files, pickles without opt-in, unknown model id."""


def read_text(path: str | os.PathLike[str], limit: int) -> str:
    """The UTF-8 text of ``path``, a regular file of at most ``limit`` bytes.

    Raises FileNotFoundError when absent and ValueError naming the file otherwise (not a regular file, over
    the limit, not UTF-8); the file is opened non-blocking, so a FIFO is refused rather than waited on.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path}: not a regular file")
        data = f.read(limit + 1)
    if info.st_size > limit or len(data) > limit:
        raise ValueError(f"{path}: larger than the {size_text(limit)} this file may have")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None


def size_text(n: int) -> str:
    """``n`` bytes as "N MiB" or "N bytes"."""
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


def read(path: Path, limit: int) -> str:
    """read_text (a regular file of at most ``limit`` bytes) with its errors as LoadError."""
    try:
        return read_text(path, limit)
    except (OSError, ValueError) as err:
        raise LoadError(str(err)) from None


def read_json(path: Path) -> dict:
    """A JSON object file of at most MAX_JSON_BYTES, or LoadError naming it."""
    try:
        value = json.loads(read(path, MAX_JSON_BYTES))
    except (json.JSONDecodeError, RecursionError) as err:
        raise LoadError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise LoadError(f"{path}: not a JSON object")
    return value


def regular(files: list[Path]) -> list[Path]:
    """``files``, each a regular file (a FIFO would block the reader, /dev/zero never end)."""
    for f in files:
        if not stat.S_ISREG(f.stat().st_mode):
            raise LoadError(f"{f}: not a regular file")
    return files
