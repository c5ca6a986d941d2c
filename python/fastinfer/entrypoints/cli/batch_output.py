"""Where ``fastinfer generate`` writes: stdout, or the --output file under an exclusive lock, whose write errors become
one ``OutputError``; and ``read_done``, the resume bookkeeping of an output an earlier run left.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

from fastinfer.entrypoints.openai.protocol import loads

from .batch_input import id_key, split_lines

try:
    import fcntl
except ImportError:  # not POSIX: outputs are written unlocked
    fcntl = None  # type: ignore[assignment]


class ResumeError(ValueError):
    """The output file cannot be resumed (not written by this input's format)."""


class OutputError(Exception):
    """The output cannot be opened, locked or written (another run holds it, disk full, no permission, ...);
    the message is one line naming the file."""


class Output:
    """Where the records go: stdout, or the --output file opened for appending under an exclusive ``flock`` held
    until ``close``, so two runs never write one file (a second run is refused, the file untouched).

    Every write is one complete line, flushed. An OSError while writing becomes one OutputError; the lines
    written before it are kept."""

    def __init__(self, file: BinaryIO, name: str, path: str | None = None) -> None:
        self.file = file
        self.name = name  # for messages: the path, or "stdout"
        self.path = path  # None for stdout
        self._failed = False

    @classmethod
    def stdout(cls) -> Output:
        return cls(sys.stdout.buffer, "stdout")

    @classmethod
    def open_locked(cls, path: str, readable: bool = False) -> Output:
        """``path`` created if missing (never truncated here), open for appending (and reading) and locked.
        Raises OutputError when another process holds the lock or the file cannot be opened."""
        flags = (os.O_RDWR if readable else os.O_WRONLY) | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        while True:
            try:
                fd = os.open(path, flags, 0o666)
            except OSError as err:
                raise OutputError(f"cannot write --output {path}: {err.strerror or err}") from None
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise OutputError(f"{path} is being written by another fastinfer run"
                                  f"{f' (pid {holder})' if holder else ''}; wait for it or stop it") from None
            except OSError:
                pass  # a file system without flock (or a device): written unlocked
            st = os.fstat(fd)
            try:
                now = os.stat(path)
            except OSError:
                now = None
            if stat.S_ISREG(st.st_mode) and (now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino)):
                os.close(fd)  # replaced (a --retry-failed rewrite) between our open and our lock: lock the new file
                continue
            return cls(os.fdopen(fd, "r+b" if readable else "ab"), path, path)

    def is_regular_file(self) -> bool:
        return self.path is not None and stat.S_ISREG(os.fstat(self.file.fileno()).st_mode)

    def size(self) -> int:
        return os.fstat(self.file.fileno()).st_size if self.is_regular_file() else 0

    def truncate(self, size: int = 0) -> None:
        """Cut the (regular) file to ``size`` bytes, durably."""
        if self.is_regular_file():
            with self._errors():
                self.file.truncate(size)
                self.file.flush()
                os.fsync(self.file.fileno())

    def replace(self, lines: list[bytes]) -> None:
        """Make ``lines`` the whole file, atomically (a new file renamed over it), keeping the lock: the new file
        is locked before the rename, so no other run can take it meanwhile."""
        assert self.path is not None
        tmp = f"{self.path}.tmp{os.getpid()}"
        with self._errors():
            new = Output.open_locked(tmp, readable=True)
            try:
                new.file.truncate(0)
                new.file.write(b"".join(ln + b"\n" for ln in lines))
                new.file.flush()
                os.fsync(new.file.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                new.file.close()
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        self.file.close()  # releases the old file's lock; it has no name any more
        self.file = new.file

    def write(self, record: dict) -> None:
        """One complete line per write, flushed: a kill loses at most the line being written."""
        # backslashreplace turns a lone surrogate (JSON input may hold one) into its JSON escape, \udXXX.
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
        with self._errors():
            self.file.write(data)
            self.file.flush()

    def write_text(self, text: str) -> None:
        """Text as it is, flushed (a streamed completion)."""
        with self._errors():
            self.file.write(text.encode("utf-8", "replace"))
            self.file.flush()

    def close(self) -> None:
        """Close the file (stdout is flushed, not closed); quietly after a failed write (its lines failing again)."""
        try:
            if self.path is None:
                self.file.flush()
            else:
                self.file.close()  # closes (and unlocks) even when the flush fails
        except OSError as err:
            if not self._failed:
                self._raise(err)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            self._raise(err)

    def _raise(self, err: OSError) -> None:
        if isinstance(err, BrokenPipeError) and self.path is None:
            raise err  # `| head`: the caller ends quietly
        self._failed = True
        if self.path is None:  # Python would retry (and fail) the flush of stdout's buffer at exit, with a traceback
            with contextlib.suppress(OSError, ValueError, AttributeError):  # (no fd under a test's capture)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise OutputError(f"cannot write {self.name}: {err.strerror or err}") from None


def _lock_holder(fd: int) -> int | None:
    """The pid holding a flock on ``fd``'s file, from /proc/locks (Linux), or None."""
    try:
        st = os.fstat(fd)
        want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for row in f:
                parts = row.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == want and parts[4] != str(os.getpid()):
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


@dataclass(slots=True)
class Resumed:
    """What ``read_done`` found in an output file."""

    done: set[str]  # ids (as id_key) with a line in the file: they are not run again
    cut: int  # bytes of a partial last line cut off
    dropped: int  # error lines removed (retry_failed)
    duplicates: int  # ids with more than one line (written by two runs at once before outputs were locked)
    duplicate_example: Any = None  # one of them


def read_done(out: Output, fmt: str, retry_failed: bool = False) -> Resumed:
    """Ids already in the locked output file ``out`` (opened readable), after cutting a partial last line a killed
    run may have left; every complete line must be one of our records.

    With ``retry_failed`` the error lines are removed (the file is rewritten, atomically) and their ids do not
    count as done, so they run again. An id with several lines counts as done (no further line is written)."""
    if not out.is_regular_file():
        return Resumed(set(), 0, 0, 0)
    with out._errors():
        out.file.seek(0)
        data = out.file.read()
    end = data.rfind(b"\n") + 1
    cut = len(data) - end
    if cut:
        out.truncate(end)
    name = "custom_id" if fmt == "openai" else "id"
    done: set[str] = set()
    kept: list[bytes] = []
    dropped = duplicates = 0
    example = None
    counted: set[str] = set()
    for line, raw in enumerate(split_lines(data[:end]), 1):
        if not raw.strip():
            continue
        try:
            rec = loads(raw)
        except ValueError:
            raise ResumeError(f"{out.name} line {line} is not JSON; is it the output of this input?") from None
        if not isinstance(rec, dict) or name not in rec:
            raise ResumeError(f"{out.name} line {line} has no {name!r}; is it the output of this input?")
        if retry_failed and rec.get("error") is not None:
            dropped += 1
            continue
        key = id_key(rec[name])
        if key in done and key not in counted:
            counted.add(key)
            duplicates += 1
            example = rec[name] if example is None else example
        done.add(key)
        kept.append(raw)
    if dropped:
        out.replace(kept)
    return Resumed(done, cut, dropped, duplicates, example)
