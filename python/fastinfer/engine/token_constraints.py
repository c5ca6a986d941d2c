"""The batched sampler's first stage: grammar masks, allowed_token_ids and logit_bias on the rows that ask for them.

Rows that ask for none of these are never written, so an unconstrained request samples from exactly the logits
it would have had alone. Grammar masks are computed by llguidance for all constrained rows at once (its executor
spreads them over threads, without the GIL) into one bitmask of 32 tokens per int32, then expanded and applied
in one masked fill.
"""

from __future__ import annotations

import numpy as np
import torch

from .sequence import Sequence


class TokenConstraints:
    """Applies each row's token constraints to a logits batch (float32 [rows, vocab])."""

    def __init__(self, mask_vocab: int | None = None) -> None:
        self.mask_vocab = mask_vocab  # ids in the grammars' masks (GrammarCompiler.vocab_size); None = logits width
        self._executor = None  # llguidance.LLExecutor, made on the first grammar row

    def apply(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """``x`` with the constraints applied: the same tensor when no row has any, else a modified copy."""
        grammar_rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        allowed_rows = [i for i, s in enumerate(seqs) if s.params.allowed_token_ids is not None]
        bias_rows = [i for i, s in enumerate(seqs) if s.params.logit_bias]
        if not (grammar_rows or allowed_rows or bias_rows):
            return x
        if x.device.type != "cpu":
            return self._apply_torch(x.clone(), seqs, grammar_rows, allowed_rows, bias_rows)
        # On the CPU in numpy: single-threaded, so no torch thread-pool wake-ups for these small passes (on a busy
        # machine each of those can cost milliseconds), and row views instead of gathers and scatters of the batch.
        ninf = np.float32(-np.inf)
        if grammar_rows:
            allowed = self._grammar_masks([seqs[i].grammar.matcher for i in grammar_rows], x.shape[1])
            if len(grammar_rows) == len(seqs):
                xn = np.where(allowed, x.numpy(), ninf)  # one pass: the copy and the mask together
            else:
                xn = x.numpy().copy()
                xn[grammar_rows] = np.where(allowed, xn[grammar_rows], ninf)
        else:
            xn = x.numpy().copy()
        vocab = xn.shape[1]
        for i in allowed_rows:
            keep = np.zeros(vocab, dtype=np.bool_)
            keep[seqs[i].params.allowed_token_ids] = True
            xn[i] = np.where(keep, xn[i], ninf)
        for i in bias_rows:
            bias = seqs[i].params.logit_bias
            xn[i, list(bias)] += np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
        return torch.from_numpy(xn)

    def _apply_torch(self, x: torch.Tensor, seqs: list[Sequence], grammar_rows: list[int], allowed_rows: list[int],
                     bias_rows: list[int]) -> torch.Tensor:
        """apply() on a copy of the logits on an accelerator (one transfer of the grammar masks per step)."""
        vocab = x.shape[1]
        if grammar_rows:
            allowed = self._grammar_masks([seqs[i].grammar.matcher for i in grammar_rows], vocab)
            rows = torch.tensor(grammar_rows, device=x.device)
            x[rows] = x[rows].masked_fill_(~torch.from_numpy(allowed).to(x.device), float("-inf"))
        for i in allowed_rows:
            keep = torch.zeros(vocab, dtype=torch.bool, device=x.device)
            keep[seqs[i].params.allowed_token_ids] = True
            x[i].masked_fill_(~keep, float("-inf"))
        for i in bias_rows:
            bias = seqs[i].params.logit_bias
            ids = torch.tensor(list(bias), device=x.device)
            x[i, ids] += torch.tensor(list(bias.values()), dtype=x.dtype, device=x.device)
        return x

    def _grammar_masks(self, matchers: list, vocab: int) -> np.ndarray:
        """bool [len(matchers), vocab]: True where the matcher's grammar allows the token next (never for ids the
        tokenizer does not have, past mask_vocab)."""
        words = ((self.mask_vocab or vocab) + 31) // 32
        bitmask = np.zeros((len(matchers), words), dtype=np.int32)
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)
        else:
            if self._executor is None:
                import llguidance

                self._executor = llguidance.LLExecutor()
            self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.ctypes.data,
                                                   words * 4, len(matchers))
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, count=min(vocab, words * 32), bitorder="little")
        if bits.shape[1] < vocab:
            bits = np.pad(bits, ((0, 0), (0, vocab - bits.shape[1])))
        return bits.view(np.bool_)
