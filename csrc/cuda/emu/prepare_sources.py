"""Copy the CUDA sources for an emulator build, with ``__launch_bounds__`` turned into a check.

The emulator compiles ``csrc/cuda`` as host C++, where an attribute cannot be read back at run
time. So each ``__global__ void __launch_bounds__(N[, M]) name(params) {`` becomes
``__global__ void name(params) { FI_EMU_LAUNCH_BOUNDS(N[, M]);``, on the same line (line numbers,
and so race reports, stay those of the original), and every thread checks at kernel entry that the
block it runs in has at most N threads. Nothing else changes.

    python prepare_sources.py SRC_DIR OUT_DIR     # SRC_DIR: csrc/cuda (or a mutated copy of it)

Fails (exit 1) when a ``__launch_bounds__`` is left that it could not rewrite.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_BOUNDS = re.compile(r"__launch_bounds__\s*\(([^()]*)\)\s*(\w+)\s*\(")


def _strip_comments(text: str) -> str:
    """The text with comments and string literals blanked (same length, newlines kept)."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out[i:j] = " " * (j - i)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out[i:j] = [c if c == "\n" else " " for c in text[i:j]]
            i = j
        elif text[i] == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out[i + 1 : j] = " " * (j - i - 1)
            i = j + 1
        else:
            i += 1
    return "".join(out)


def rewrite(text: str) -> tuple[str, int]:
    """Returns the rewritten text and the number of kernels rewritten."""
    code = _strip_comments(text)
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) on the original text
    for m in _BOUNDS.finditer(code):
        depth, i = 1, m.end()
        while depth:  # the parameter list's closing parenthesis
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            i += 1
        brace = code.index("{", i)
        if code[i:brace].strip():
            raise ValueError(f"unexpected text between the parameters and the body of {m.group(2)}")
        edits.append((m.start(), m.start(2), ""))  # drop the attribute
        edits.append((brace + 1, brace + 1, f" FI_EMU_LAUNCH_BOUNDS({m.group(1).strip()});"))
    for start, end, rep in sorted(edits, reverse=True):
        text = text[:start] + rep + text[end:]
    return text, len(edits) // 2


def main(src: Path, out: Path) -> int:
    dst = out / "cuda"
    dst.mkdir(parents=True, exist_ok=True)
    total = 0
    wanted = set()
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.suffix not in {".cu", ".cuh", ".h"}:
            continue
        text, n = rewrite(f.read_text())
        left = _strip_comments(text).count("__launch_bounds__")
        if left:
            print(f"prepare_sources: {f.name}: {left} __launch_bounds__ not rewritten", file=sys.stderr)
            return 1
        total += n
        wanted.add(f.name)
        target = dst / f.name
        if not target.exists() or target.read_text() != text:  # unchanged files keep their mtime (incremental builds)
            target.write_text(text)
    for f in dst.iterdir():
        if f.name not in wanted:
            f.unlink()
    if total == 0:
        print(f"prepare_sources: no __launch_bounds__ found under {src}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
