"""Filling a built model's parameters from Hugging Face-named tensors (``load_weights``), whatever file they came
from: separate q/k/v and gate/up tensors go into their slices of the fused parameters (the architecture's
registry entry names them), and every problem is reported at once as one WeightError line."""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from fastinfer.models import registry
import fastinfer.ops
from fastinfer.models.quantized import QuantizedTensor, join, pack, split_by_type


class WeightError(ValueError):
    """A checkpoint's tensors do not match the model: missing, unexpected or wrongly shaped tensors."""


def _shards(model: nn.Module, fused: dict) -> dict[str, tuple[str, int, int]]:
    """HF name -> (our parameter name, row offset, rows) for every tensor the model needs."""
    c, d = model.config, model.config.head_dim
    sizes = {".self_attn.qkv_proj.": [c.num_attention_heads * d, c.num_key_value_heads * d, c.num_key_value_heads * d],
             ".mlp.gate_up_proj.": [c.intermediate_size] * 2}
    out = {}
    for name, p in model.named_parameters():
        pieces = [(hf, i, piece) for hf, (piece, i) in fused.items() if piece in name]
        for hf_piece, i, piece in pieces:
            rows = sizes[piece]
            out[name.replace(piece, hf_piece)] = (name, sum(rows[:i]), rows[i])
        if not pieces:
            out[name] = (name, 0, p.shape[0])
    return out


def load_weights(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Fill every parameter of ``model`` from (Hugging Face name, tensor) pairs, converting dtype.

    All tensors are checked before this returns: an unknown name, a shape mismatch or a tensor that never
    arrived raises WeightError listing every problem. ``lm_head.weight`` is accepted and ignored for tied models.
    """
    arch = registry.BY_NAME[model.config.architecture]
    targets = _shards(model, registry.fused_names(arch))
    ignored = arch.hf_tensors.ignored
    params = dict(model.named_parameters())
    seen: set[str] = set()
    problems: list[str] = []
    quantized: dict[str, list] = {}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in named_tensors:
        if name.endswith(ignored) or (tied and name == "lm_head.weight"):
            continue
        if name not in targets:
            problems.append(f"unexpected tensor {name!r} {tuple(tensor.shape)}")
            continue
        pname, start, rows = targets[name]
        dest = params[pname].data.narrow(0, start, rows)
        if name in seen:
            problems.append(f"{name}: given twice")
        seen.add(name)  # a wrongly shaped tensor is that problem, not also a missing one
        if tuple(tensor.shape) != tuple(dest.shape):
            problems.append(f"{name}: shape {tuple(tensor.shape)} in the checkpoint, model expects {tuple(dest.shape)}")
            continue
        if isinstance(tensor, QuantizedTensor):  # kept quantised: packed below, once its pieces are all here
            quantized.setdefault(pname, []).append((start, tensor))
            continue
        dest.copy_(tensor)
    problems += [f"missing tensor {name!r}" for name in targets if name not in seen]
    if problems:  # one line
        shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise WeightError(f"{len(problems)} weight problem(s): {shown}")
    _attach_quantized(model, params, quantized)
    for m in model.modules():
        if hasattr(m, "post_load"):
            m.post_load()


def _attach_quantized(model: nn.Module, params: dict, quantized: dict[str, list]) -> None:
    """Pack each quantised weight once and hand it to its module (``qweight``; a Linear runs it as ``packed``),
    releasing the float parameter. A fused weight whose pieces differ in block type becomes one packed part per
    run of pieces of one type (``ops.QuantizedParts``: a Linear runs it as one projection); a module that is
    not a Linear (an embedding) gets such a weight dequantised into its parameter, with one warning."""
    mixed = []
    for pname, pieces in quantized.items():
        param = params[pname]
        owner = model.get_submodule(pname.rsplit(".", 1)[0])
        joined = join(pieces, param.shape[0])
        if joined is None:
            runs = split_by_type(pieces, param.shape[0])
            if runs is not None and hasattr(owner, "packed"):
                owner.qweight = owner.packed = fastinfer.ops.QuantizedParts(tuple(pack(r) for r in runs))
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
                continue
            for start, piece in pieces:
                param.data.narrow(0, start, piece.shape[0]).copy_(piece.dequantize())
            mixed.append(f"{pname} ({'+'.join(p.qtype for _, p in sorted(pieces, key=lambda x: x[0]))})")
            continue
        owner.qweight = pack(joined)
        if hasattr(owner, "packed"):
            owner.packed = owner.qweight
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    if mixed:
        shown = ", ".join(mixed[:4]) + (f" and {len(mixed) - 4} more" if len(mixed) > 4 else "")
        warnings.warn(f"{len(mixed)} fused weight(s) mix block types and run dequantised: {shown}", stacklevel=3)
