"""What one forward step needs to know about its batch: built by the model runner, read by every attention layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Attention layout of one flattened batch (prefill chunks and decodes mixed, no modes).

    Sequence b owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of the flattened batch; those rows are
    the newest tokens of the sequence, so causal masking is bottom-right aligned against ``seqlens_k[b]``.
    """

    cu_seqlens_q: torch.Tensor  # (num_seqs + 1,) int32: prefix sums of new tokens per sequence
    cu_seqlens_k: torch.Tensor  # (num_seqs + 1,) int32: prefix sums of cached tokens per sequence after this step's write
    max_seqlen_q: int  # longest query chunk in the batch (launch sizing only)
    max_seqlen_k: int  # longest cached sequence after this step (launch sizing only)
    block_table: torch.Tensor  # (num_seqs, max_blocks_per_seq) int32: cache block of each logical block
    slot_mapping: torch.Tensor  # (num_tokens,) int64: cache slot (block * block_size + offset) each new token writes
    # (num_tokens,) bool, or None (no row is): rows that are prompt tokens. Quantised projections keep their
    # activations float there and quantise the others' to int8 (ops.linear's ``activations``).
    prompt_rows: Optional[torch.Tensor] = None
