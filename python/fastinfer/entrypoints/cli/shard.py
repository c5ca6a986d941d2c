"""``fastinfer generate --shard I/N``: the part of a batch file that one of N processes (or machines) runs.

A request belongs to shard ``sha256(id) mod N``: its id, not its line number, decides, so the N runs split one file
whatever order its lines are in, each id lands in exactly one shard, and the split is the same on every machine and
Python (``hash()`` is salted per process; sha256 is not). Shards are numbered from 0, as ranks are: ``--shard 0/2``
and ``--shard 1/2`` split a file in two. Each shard writes its own --output, so ``--resume`` continues one shard.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from .batch_input import BadLine, id_key, report_bad_lines
from .messages import say

T = TypeVar("T")
MAX_SHARDS = 1 << 20  # far above any real job; a larger N is a typo


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS:
            raise ValueError(f"shard count must be in [1, {MAX_SHARDS}], got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index must be in [0, {self.count - 1}] (shards are numbered from 0), "
                             f"got {self.index}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` -> Shard(I, N); ValueError naming the rule otherwise."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if m is None:
            raise ValueError(f"expected I/N (shard I of N, 0 <= I < N, e.g. 0/4), got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    def owns(self, request_id: Any) -> bool:
        """Whether the request with this id (as read from the input: 3 and "3" differ) is in this shard."""
        return shard_of(request_id, self.count) == self.index

    def split(self, requests: list[T], bad: list[BadLine]) -> tuple[list[T], list[BadLine]]:
        """This shard's requests (anything with an ``id``) and bad lines. A bad line goes by its id when it has
        one, else by its 0-based line index (a line's default id), so every line is reported by one shard."""
        mine = [r for r in requests if self.owns(r.id)]  # type: ignore[attr-defined]
        mine_bad = [b for b in bad if self.owns(b.id if b.id is not None else b.line - 1)]
        return mine, mine_bad

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_of(request_id: Any, count: int) -> int:
    """The shard (of ``count``) of a request id: the first 8 bytes of sha256 of its JSON text, mod ``count``."""
    digest = hashlib.sha256(id_key(request_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def arg(text: str) -> Shard:
    """argparse ``type=`` for --shard."""
    try:
        return Shard.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def select(shard: Shard | None, requests: list[T], bad: list[BadLine], on_bad_line: str) -> tuple[list[T],
                                                                                                  list[BadLine]]:
    """The requests and bad lines a run takes: all of them without --shard, else its shard's. With
    ``--on-bad-line fail`` a bad line anywhere in the file fails every shard (before anything is generated), so the
    N runs agree on whether the file is good; with ``skip`` each shard reports and records only its own."""
    if shard is None:
        return requests, bad
    if on_bad_line == "fail":
        report_bad_lines(bad, on_bad_line)
    mine, mine_bad = shard.split(requests, bad)
    say(f"shard {shard}: {len(mine)} of the input's {len(requests)} requests")
    return mine, mine_bad
