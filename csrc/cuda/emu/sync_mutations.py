"""Planted synchronisation bugs for the emulator's mutation gate (mutation_gate.py).

Finds every synchronisation statement of the CUDA sources (``__syncthreads()``, ``__syncwarp(...)``,
``cp_async_wait<N>()``) and makes, one at a time, the known classes of bug from each:

* ``delete``: the statement removed;
* ``move-down``: moved past the next statement of its block (past the end of the block, out of a loop
  or an ``if``, when it is the last one);
* ``move-up``: moved before the previous statement (before the enclosing loop or ``if`` when it is the
  first one).

A move carries the statement past local declarations (``const int n = ...;``, ``float s[4][4];``) on its
way, up to the next other statement: crossing a declaration alone changes nothing a barrier orders,
and would only add mutants equivalent by construction.

A statement is found with a small C++ statement splitter (braces, parentheses, ``if``/``else``,
``for``, ``while``, ``#pragma`` lines glued to the statement they precede) run on the text with
comments and strings blanked, so offsets are those of the original.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Files holding kernels; the wrappers in cuda_utils.cuh are definitions, not uses.
KERNEL_FILES = ("attention_fwd_kernel.cuh", "attention_bwd_kernel.cuh", "attention_cuda.cu", "kv_cache_cuda.cu")

_SYNC = re.compile(r"\b(__syncthreads\s*\(\s*\)|__syncwarp\s*\([^;()]*\)|cp_async_wait\s*<[^;<>]*>\s*\(\s*\))\s*;")
_DECL = re.compile(
    r"(?:(?:const|constexpr|static|unsigned|signed)\s+)*[A-Za-z_][\w:]*(?:\s*<[^;()]*>)?[\s*&]+"
    r"[A-Za-z_]\w*\s*(?:\[[^\]]*\]\s*)*(?:[=;,{]|$)")
_NOT_TYPES = {"return", "if", "for", "while", "else", "case", "goto", "break", "continue", "throw", "delete", "new"}
_KEYWORD = re.compile(r"(if|for|while|switch)\b\s*(constexpr\b\s*)?\(")


@dataclass(frozen=True, slots=True)
class Mutant:
    """One planted bug: the file's text with it, and where it came from."""

    id: str  # "<file>:<line>:<op>", stable while the file does not change above the site
    file: str
    line: int
    op: str  # delete | move-down | move-up
    statement: str
    description: str
    text: str


def blank_comments(text: str) -> str:
    """``text`` with comments and string/char literals replaced by spaces (newlines kept)."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out[i:j] = " " * (j - i)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out[i:j] = [ch if ch == "\n" else " " for ch in text[i:j]]
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out[i + 1 : j] = " " * (j - i - 1)
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _skip_ws(code: str, i: int) -> int:
    while i < len(code) and code[i].isspace():
        i += 1
    return i


def _match(code: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at ``i``."""
    depth = 0
    while True:
        if code[i] == open_:
            depth += 1
        elif code[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1


def statement_end(code: str, i: int) -> int:
    """End (exclusive) of the statement starting at ``i`` (``i`` at its first character)."""
    if code[i] == "#":  # a #pragma belongs to the statement after it
        return statement_end(code, _skip_ws(code, code.index("\n", i)))
    if code[i] == "{":
        return _match(code, i, "{", "}")
    m = _KEYWORD.match(code, i)
    if m:
        end = statement_end(code, _skip_ws(code, _match(code, m.end() - 1, "(", ")")))
        if m.group(1) == "if":
            j = _skip_ws(code, end)
            if re.match(r"else\b", code[j:]):
                return statement_end(code, _skip_ws(code, j + 4))
        return end
    paren = brace = 0
    while True:
        c = code[i]
        paren += (c == "(") - (c == ")")
        brace += (c == "{") - (c == "}")
        i += 1
        if c == ";" and paren == 0 and brace == 0:
            return i


def enclosing_block(code: str, pos: int) -> tuple[int, int]:
    """(index of the ``{``, index of its ``}``) of the innermost block around ``pos``."""
    depth, i = 0, pos - 1
    while i >= 0:
        if code[i] == "}":
            depth += 1
        elif code[i] == "{":
            if depth == 0:
                return i, _match(code, i, "{", "}") - 1
            depth -= 1
        i -= 1
    raise ValueError("no enclosing block")


def block_statements(code: str, open_: int, close: int) -> list[tuple[int, int]]:
    """Spans of the statements of the block whose braces are at ``open_`` and ``close``."""
    spans, i = [], _skip_ws(code, open_ + 1)
    while i < close:
        e = statement_end(code, i)
        spans.append((i, e))
        i = _skip_ws(code, e)
    return spans


def _owner(code: str, open_: int) -> tuple[int, int] | None:
    """Span of the statement (in the block around it) that owns the block starting at ``open_``;
    None when the block is a function body."""
    try:
        po, pc = enclosing_block(code, open_)
    except ValueError:
        return None
    for s, e in block_statements(code, po, pc):
        if s <= open_ < e:
            return s, e
    return None  # a function body: what surrounds it is not a statement list


def _is_decl(code: str) -> bool:
    """A local declaration (with or without an initializer)."""
    code = code.strip()
    return bool(_DECL.match(code)) and code.split()[0] not in _NOT_TYPES


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _short(text: str) -> str:
    s = " ".join(text.split())
    return s if len(s) <= 60 else s[:57] + "..."


def mutants_of(name: str, text: str) -> list[Mutant]:
    """Every planted bug of one file's text (sites in source order; delete, move-down, move-up each)."""
    code = blank_comments(text)
    out: list[Mutant] = []
    for m in _SYNC.finditer(code):
        s, e = m.start(), m.end()
        line = _line(text, s)
        stmt = " ".join(text[s:e].split())
        where = f"{name}:{line}"
        out.append(Mutant(f"{where}:delete", name, line, "delete", stmt, f"delete `{stmt}` at {where}",
                          text[:s] + text[e:]))
        bo, bc = enclosing_block(code, s)
        spans = block_statements(code, bo, bc)
        k = next(i for i, (a, b) in enumerate(spans) if a == s)
        # move-down: past the next statement, else out of the block (after its owner)
        j = k + 1
        while j + 1 < len(spans) and _is_decl(code[spans[j][0] : spans[j][1]]):
            j += 1
        if j < len(spans) and not all(_is_decl(code[a:b]) for a, b in spans[k + 1 : j + 1]):
            ns, ne = spans[k + 1][0], spans[j][1]
            moved = text[:s] + text[ns:ne] + text[e:ns] + text[s:e] + text[ne:]
            past = f"past `{_short(text[ns:ne])}`"
        else:
            owner = _owner(code, bo)
            moved, past = None, ""
            if owner:
                moved = text[:s] + text[e : owner[1]] + " " + text[s:e] + text[owner[1] :]
                past = f"out of its block, after `{_short(text[owner[0]:owner[1]])}`"
        if moved is not None:
            out.append(Mutant(f"{where}:move-down", name, line, "move-down", stmt,
                              f"move `{stmt}` at {where} down {past}", moved))
        # move-up: before the previous statement, else before the block's owner
        j = k - 1
        while j > 0 and _is_decl(code[spans[j][0] : spans[j][1]]):
            j -= 1
        if j >= 0 and not all(_is_decl(code[a:b]) for a, b in spans[j:k]):
            ps, pe = spans[j][0], spans[k - 1][1]
            moved = text[:ps] + text[s:e] + text[pe:s] + text[ps:pe] + text[e:]
            before = f"before `{_short(text[ps:pe])}`"
        else:
            owner = _owner(code, bo)
            moved, before = None, ""
            if owner:
                moved = text[: owner[0]] + text[s:e] + " " + text[owner[0] : s] + text[e:]
                before = f"out of its block, before `{_short(text[owner[0]:owner[1]])}`"
        if moved is not None:
            out.append(Mutant(f"{where}:move-up", name, line, "move-up", stmt,
                              f"move `{stmt}` at {where} up {before}", moved))
    return out


def all_mutants(src: Path) -> list[Mutant]:
    """The planted bugs of every kernel file under ``src`` (csrc/cuda)."""
    out: list[Mutant] = []
    for name in KERNEL_FILES:
        out += mutants_of(name, (src / name).read_text())
    return out
