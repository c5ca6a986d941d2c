"""Batched next-token sampling: token constraints (grammar masks, allowed_token_ids, logit_bias), penalties,
min_tokens, temperature, top-k / top-p / min-p, logprobs; and prompt logprobs.

Every filter is one tensor op over the whole batch, with neutral values for rows that don't use it, and is skipped
entirely when no row uses it, so a plain greedy or temperature-only batch costs a few passes over the logits. Random
rows are drawn by inverse CDF (one uniform per row, searched in the row's cumulative weights; an exact sample, and on
CPU ~10x cheaper than an exponential race or torch.multinomial): a seeded sequence draws its uniform from its own
generator, so a seed gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .outputs import Logprob
from .sequence import Sequence
from .token_constraints import TokenConstraints


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax (first index of the maximum, NaN counting as the maximum, as torch's). On CPU
    through numpy: measured 0.57 ms for 64 x 49152 float32 logits where torch.argmax took 3.5 ms."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
        return torch.from_numpy(np.argmax(x.contiguous().numpy(), axis=-1))
    return x.argmax(dim=-1)


@dataclass(slots=True)
class SamplerOutput:
    """One token per input row."""

    token_ids: list[int]  # sampled token of each row
    logprobs: list[dict[int, Logprob] | None]  # per row: top-k candidates + the sampled token (None when not asked)


class Sampler:
    """Samples one token per row of a logits batch according to each row's sequence settings."""

    def __init__(self, eos_token_ids: list[int] = (), generator: torch.Generator | None = None,
                 constraints: TokenConstraints | None = None) -> None:
        self.eos_token_ids = list(eos_token_ids)  # masked while a sequence is below min_tokens (unless ignore_eos)
        self.generator = generator  # draws of unseeded random rows (None = torch's default generator)
        self.constraints = constraints if constraints is not None else TokenConstraints()

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: float32 [N, vocab], row i belongs to seqs[i]."""
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits must be [len(seqs)={len(seqs)}, vocab], got {tuple(logits.shape)}")
        logits = logits.float()
        params = [s.params for s in seqs]
        logprobs = self._logprobs(logits, seqs) if any(p.logprobs is not None for p in params) else None

        # Masks and biases first, so that everything after (penalties, temperature, filters) sees them.
        x = self.constraints.apply(logits, seqs)
        pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
        if pen_rows:
            x = _apply_penalties(x.clone() if x is logits else x, [seqs[i] for i in pen_rows], pen_rows)
        masked = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
        if masked:
            x = x.clone() if x is logits else x
            for i in masked:
                p = params[i]
                ids = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                if ids:
                    x[i, ids] = float("-inf")

        greedy = [p.greedy for p in params]
        if all(greedy):
            tokens = _argmax(x)
        else:
            tokens = self._sample_random(x, seqs)
            if any(greedy):
                g = torch.tensor(greedy, device=x.device)
                tokens = torch.where(g, _argmax(x), tokens)
        token_list = tokens.tolist()
        if logprobs is not None:
            logprobs = logprobs(token_list)
        return SamplerOutput(token_list, logprobs if logprobs is not None else [None] * len(seqs))

    def _sample_random(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Inverse-CDF sampling from softmax(x / T), filtered in vLLM's order: min-p, top-k, top-p."""
        params = [s.params for s in seqs]
        dev, (n, vocab) = x.device, x.shape
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev).unsqueeze(1)
        w = torch.softmax(x / temps, dim=-1)  # filters zero out weights; rows are not renormalised
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev).unsqueeze(1)
            w.masked_fill_(w < min_p * w.amax(dim=-1, keepdim=True), 0.0)
        if any(0 < p.top_k < vocab for p in params):
            ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
            top = w.topk(max(ks), dim=-1).values
            kth = top.gather(1, torch.tensor([max(k, 1) - 1 for k in ks], device=dev).unsqueeze(1))
            kth.masked_fill_(torch.tensor([k == 0 for k in ks], device=dev).unsqueeze(1), 0.0)  # no top-k: keep all
            w.masked_fill_(w < kth, 0.0)
        if any(p.top_p < 1.0 for p in params):
            _top_p_(w, torch.tensor([p.top_p for p in params], device=dev).unsqueeze(1))
        shared = self.generator
        u = torch.rand(n, 1, generator=shared, device=shared.device if shared is not None else dev).to(dev)
        for i, s in enumerate(seqs):
            if s.generator is not None and not s.params.greedy:
                u[i] = torch.rand(1, generator=s.generator, device=s.generator.device).to(dev)
        cdf = w.cumsum(dim=-1)
        # first index whose cdf exceeds u * total: zero-weight tokens (flat cdf) can never be picked
        picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
        overflow = picked >= vocab  # u * total rounded up to total: take the last token with weight
        if bool(overflow.any()):
            last = vocab - 1 - (cdf.flip(-1) < cdf[:, -1:]).int().argmax(dim=-1)
            picked = torch.where(overflow, last, picked)
        return picked

    @staticmethod
    def _logprobs(logits: torch.Tensor, seqs: list[Sequence]):
        """Raw-logit log-softmax of the rows that asked; returns a function of the sampled tokens giving the dicts."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        lp = (logits if len(rows) == len(seqs) else logits[rows]).log_softmax(dim=-1)
        k = min(max(seqs[i].params.logprobs for i in rows), lp.shape[1])
        top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (None, None)

        def build(tokens: list[int]) -> list[dict[int, Logprob] | None]:
            sampled = torch.tensor([tokens[i] for i in rows], device=lp.device).unsqueeze(1)
            sampled_lp = lp.gather(1, sampled)
            ranks = (torch.count_nonzero(lp > sampled_lp, dim=-1) + 1).tolist()
            sampled_lp = sampled_lp.squeeze(1).tolist()
            tv, ti = (top_v.tolist(), top_i.tolist()) if top_v is not None else (None, None)
            result: list[dict[int, Logprob] | None] = [None] * len(seqs)
            for r, i in enumerate(rows):
                want = seqs[i].params.logprobs
                d = {tokens[i]: Logprob(sampled_lp[r], ranks[r])}
                for j in range(min(want, k)):
                    d.setdefault(ti[r][j], Logprob(tv[r][j], j + 1))
                result[i] = d
            return result

        return build


def prompt_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[dict[int, Logprob]]:
    """Per row of ``logits`` (float32 [rows, vocab], the positions before ``tokens``): the top ``k`` log-softmax
    entries and always the actual next token's, with their ranks (1 = most likely)."""
    lp = logits.float().log_softmax(dim=-1)
    actual = torch.tensor(tokens, device=lp.device).unsqueeze(1)
    actual_lp = lp.gather(1, actual)
    ranks = (torch.count_nonzero(lp > actual_lp, dim=-1) + 1).tolist()
    actual_lp = actual_lp.squeeze(1).tolist()
    k = min(k, lp.shape[1])
    tv, ti = lp.topk(k, dim=-1) if k > 0 else (None, None)
    tv, ti = (tv.tolist(), ti.tolist()) if k > 0 else ([[]] * len(tokens), [[]] * len(tokens))
    out = []
    for r, token in enumerate(tokens):
        d = {token: Logprob(actual_lp[r], ranks[r])}
        for j in range(k):
            d.setdefault(ti[r][j], Logprob(tv[r][j], j + 1))
        out.append(d)
    return out


def _apply_penalties(x: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> torch.Tensor:
    """vLLM's penalties in place on rows of x: repetition over prompt + output, presence / frequency over output.

    Only the logits of tokens that occur are gathered, changed and scattered back (duplicates write equal values).
    """
    dev, vocab = x.device, x.shape[1]

    def padded(lists: list[list[int]], pad: list[int]) -> torch.Tensor:
        width = max(max(len(t) for t in lists), 1)
        return torch.tensor([t + [p] * (width - len(t)) for t, p in zip(lists, pad)], device=dev)

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=dev).unsqueeze(1)

    r = torch.tensor(rows, device=dev).unsqueeze(1)
    ids = padded([s.token_ids for s in seqs], [s.token_ids[0] for s in seqs])  # padded with a real (seen) token
    vals = x[r, ids]
    rep = column([s.params.repetition_penalty for s in seqs])
    if any(s.params.repetition_penalty != 1.0 for s in seqs):
        vals = torch.where(vals > 0, vals / rep, vals * rep)
    if any(s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0 for s in seqs):
        out_ids = padded([s.output_token_ids for s in seqs], [vocab] * len(seqs))  # pad counts in column vocab
        counts = torch.zeros(len(rows), vocab + 1, device=dev)
        counts.scatter_add_(1, out_ids, torch.ones(out_ids.shape, device=dev))
        counts = counts.gather(1, ids)  # output count of each seen token
        freq = column([s.params.frequency_penalty for s in seqs])
        pres = column([s.params.presence_penalty for s in seqs])
        vals = vals - freq * counts - pres * (counts > 0).to(vals.dtype)
    x[r, ids] = vals
    return x


def _top_p_(w: torch.Tensor, top_p: torch.Tensor) -> None:
    """Zero the weights outside each row's smallest most-likely set holding top_p of the row's mass (top_p 1 = off).

    Only candidates are sorted, not the whole vocabulary: tokens below c = total * (1 - p) / vocab hold less than
    (1 - p) of the mass together, so the kept set lies inside {w >= c}, which is small for peaked distributions.
    """
    n, vocab = w.shape
    on = top_p < 1.0
    total = w.sum(dim=-1, keepdim=True)
    cand = (w >= total * (1.0 - top_p) / vocab) & (w > 0) & on
    rows, cols = cand.nonzero(as_tuple=True)
    counts = cand.sum(dim=-1)
    first = counts.cumsum(0) - counts
    packed = torch.zeros(n, int(counts.max()), dtype=w.dtype, device=w.device)
    packed[rows, torch.arange(rows.numel(), device=w.device) - first[rows]] = w[rows, cols]
    packed = packed.sort(dim=-1, descending=True).values
    mass_before = packed.cumsum(dim=-1) - packed
    num_kept = ((mass_before < top_p * total) & (packed > 0)).sum(dim=-1, keepdim=True).clamp_min(1)
    threshold = packed.gather(1, num_kept - 1)
    w.masked_fill_((w < threshold) & on, 0.0)
