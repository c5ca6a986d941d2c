"""Quantised weights in the model: GGUF blocks kept as they are (``quantization="auto"``) or float weights
quantised to Q8_0 at load (``quantization="q8_0"``), run by the quantised CPU linear (``fastinfer.ops``).

The loader hands ``QuantizedTensor`` pieces to ``load_weights``; ``assemble`` joins the pieces of a fused
projection (q/k/v, gate/up: rows of the same block type concatenate) and packs each weight once
(``ops.pack_linear_weight``); a fused weight whose pieces differ in type is dequantised instead (reported).
Embedding rows are dequantised on lookup from the packed table (``ops.dequantize_rows``), which the tied output head
shares, so the weights are held once, quantised.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import fastinfer.ops

QUANTIZATION_CHOICES = ("auto", None, "q8_0")


def check_quantization(value: Any) -> Any:
    """``value`` if it is one of QUANTIZATION_CHOICES, else a ValueError listing them."""
    if value not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of 'auto', None or 'q8_0', got {value!r}")
    return value


@dataclass(slots=True)
class QuantizedTensor:
    """A weight (or a row slice of a fused one) as GGUF blocks: ``raw`` (rows, bytes per row) uint8."""

    name: str  # the checkpoint's tensor name (errors, reports)
    qtype: str  # "q8_0", "q4_0", "q4_1", ... (lower-case GGUF type name)
    raw: np.ndarray
    shape: tuple[int, int]  # (rows, in_features) of the float weight it stands for

    def dequantize(self) -> torch.Tensor:
        from gguf import GGMLQuantizationType, dequantize

        return torch.from_numpy(np.ascontiguousarray(
            dequantize(self.raw, GGMLQuantizationType[self.qtype.upper()]), dtype=np.float32).reshape(self.shape))


def quantize_q8_0(name: str, weight: torch.Tensor) -> QuantizedTensor | None:
    """A float weight as Q8_0 blocks (gguf's own quantiser), or None when its rows are not whole blocks."""
    from gguf import GGMLQuantizationType, quantize

    if weight.ndim != 2 or weight.shape[1] % 32:
        return None
    raw = quantize(weight.float().numpy(), GGMLQuantizationType.Q8_0)
    return QuantizedTensor(name, "q8_0", raw, (int(weight.shape[0]), int(weight.shape[1])))


def join(pieces: list[tuple[int, QuantizedTensor]], rows: int) -> QuantizedTensor | None:
    """One QuantizedTensor from the row pieces (start row, piece) of a parameter of ``rows`` rows, or None when
    they do not cover it or differ in block type (the caller dequantises them then)."""
    pieces = sorted(pieces, key=lambda p: p[0])
    types = {p.qtype for _, p in pieces}
    starts = [s for s, _ in pieces]
    ends = [s + p.shape[0] for s, p in pieces]
    if len(types) != 1 or starts[0] != 0 or ends[-1] != rows or starts[1:] != ends[:-1]:
        return None
    first = pieces[0][1]
    raw = first.raw if len(pieces) == 1 else np.concatenate([p.raw for _, p in pieces], axis=0)
    names = first.name if len(pieces) == 1 else "+".join(p.name for _, p in pieces)
    return QuantizedTensor(names, first.qtype, raw, (rows, first.shape[1]))


def split_by_type(pieces: list[tuple[int, QuantizedTensor]], rows: int) -> list[QuantizedTensor] | None:
    """The row pieces of a parameter of ``rows`` rows joined into runs of one block type each, in row order (a
    fused q/k/v of types q5_0, q5_0, q8_0: two runs), or None when the pieces do not cover the rows."""
    pieces = sorted(pieces, key=lambda p: p[0])
    runs: list[list[tuple[int, QuantizedTensor]]] = []
    for start, piece in pieces:
        if runs and runs[-1][-1][1].qtype == piece.qtype:
            runs[-1].append((start, piece))
        else:
            runs.append([(start, piece)])
    joined = []
    for run in runs:
        start, end = run[0][0], run[-1][0] + run[-1][1].shape[0]
        j = join([(s - start, p) for s, p in run], end - start)
        if j is None:
            return None
        joined.append((start, end, j))
    if joined[0][0] != 0 or joined[-1][1] != rows or any(a[1] != b[0] for a, b in zip(joined, joined[1:])):
        return None
    return [j for _, _, j in joined]


def pack(q: QuantizedTensor) -> fastinfer.ops.QuantizedPacked:
    with warnings.catch_warnings():  # read-only (the file's memory map): only read here, no copy needed
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        raw = torch.from_numpy(q.raw)
    packed = fastinfer.ops.pack_linear_weight(raw, qtype=q.qtype, name=q.name)
    if (packed.out_features, packed.in_features) != q.shape:
        raise ValueError(f"{q.name}: {q.qtype} blocks hold ({packed.out_features}, {packed.in_features}), the model "
                         f"expects {q.shape}")
    return packed
