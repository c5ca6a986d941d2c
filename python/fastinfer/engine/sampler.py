"""Batched next-token sampling: penalties, min_tokens, temperature, top-k / top-p / min-p, logprobs.

Every filter is one tensor op over the whole batch, with neutral values for rows that don't use it, and is skipped
entirely when no row uses it, so a plain greedy or temperature-only batch costs a few kernels. Random rows draw with
the exponential race (``argmax(p / q)`` with ``q ~ Exp(1)``, an exact sample of ``p``): seeded sequences fill their row
of ``q`` from their own generator, so a seed gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .outputs import Logprob
from .sequence import Sequence


@dataclass(slots=True)
class SamplerOutput:
    """One token per input row."""

    token_ids: list[int]  # sampled token of each row
    logprobs: list[dict[int, Logprob] | None]  # per row: top-k candidates + the sampled token (None when not asked)


class Sampler:
    """Samples one token per row of a logits batch according to each row's sequence settings."""

    def __init__(self, eos_token_ids: list[int] = (), generator: torch.Generator | None = None) -> None:
        self.eos_token_ids = list(eos_token_ids)  # masked while a sequence is below min_tokens (unless ignore_eos)
        self.generator = generator  # draws of unseeded random rows (None = torch's default generator)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: float32 [N, vocab], row i belongs to seqs[i]."""
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits must be [len(seqs)={len(seqs)}, vocab], got {tuple(logits.shape)}")
        logits = logits.float()
        params = [s.params for s in seqs]
        logprobs = self._logprobs(logits, seqs) if any(p.logprobs is not None for p in params) else None

        x = logits
        pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
        if pen_rows:
            x = _apply_penalties(x.clone(), [seqs[i] for i in pen_rows], pen_rows)
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
            tokens = x.argmax(dim=-1)
        else:
            tokens = self._sample_random(x, seqs)
            if any(greedy):
                g = torch.tensor(greedy, device=x.device)
                tokens = torch.where(g, x.argmax(dim=-1), tokens)
        token_list = tokens.tolist()
        if logprobs is not None:
            logprobs = logprobs(token_list)
        return SamplerOutput(token_list, logprobs if logprobs is not None else [None] * len(seqs))

    def _sample_random(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        dev, (n, vocab) = x.device, x.shape
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)
        x = x / temps.unsqueeze(1)
        if any(p.top_k > 0 for p in params):
            ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
            kmax = max(ks)
            if kmax > 0:
                top = x.topk(kmax, dim=-1).values
                kth = top.gather(1, torch.tensor([max(k, 1) - 1 for k in ks], device=dev).unsqueeze(1))
                kth = kth.masked_fill(torch.tensor([k == 0 for k in ks], device=dev).unsqueeze(1), float("-inf"))
                x = x.masked_fill(x < kth, float("-inf"))
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], device=dev)
            sorted_x, order = x.sort(dim=-1, descending=True)
            sorted_p = sorted_x.softmax(dim=-1)
            drop = (sorted_p.cumsum(dim=-1) - sorted_p) > top_p.unsqueeze(1)  # mass before the token already >= p
            drop[:, 0] = False
            x = x.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))
        probs = x.softmax(dim=-1)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev)
            probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True), 0.0)
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, s in enumerate(seqs):
            if s.generator is not None and not s.params.greedy:
                g = s.generator
                q[i] = torch.empty(vocab, device=g.device).exponential_(generator=g).to(dev)
        return (probs / q.clamp_min_(1e-30)).argmax(dim=-1)

    @staticmethod
    def _logprobs(logits: torch.Tensor, seqs: list[Sequence]):
        """Raw-logit log-softmax of the rows that asked; returns a function of the sampled tokens giving the dicts."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        lp = logits[rows].log_softmax(dim=-1)
        k = min(max(seqs[i].params.logprobs for i in rows), lp.shape[1])
        top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (None, None)

        def build(tokens: list[int]) -> list[dict[int, Logprob] | None]:
            sampled = torch.tensor([tokens[i] for i in rows], device=lp.device).unsqueeze(1)
            sampled_lp = lp.gather(1, sampled)
            ranks = ((lp > sampled_lp).sum(dim=-1) + 1).tolist()
            sampled_lp = sampled_lp.squeeze(1).tolist()
            tv, ti = (top_v.tolist(), top_i.tolist()) if top_v is not None else (None, None)
            result: list[dict[int, Logprob] | None] = [None] * len(seqs)
            for r, i in enumerate(rows):
                want = seqs[i].params.logprobs
                d = {tokens[i]: Logprob(sampled_lp[r], ranks[r])}
                for j in range(want):
                    d.setdefault(ti[r][j], Logprob(tv[r][j], j + 1))
                result[i] = d
            return result

        return build


def _apply_penalties(x: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> torch.Tensor:
    """vLLM's penalties in place on rows of x: repetition over prompt + output, presence / frequency over output."""
    dev, vocab = x.device, x.shape[1]
    r = torch.tensor(rows, device=dev)
    sub = x[r]

    def padded(lists: list[list[int]]) -> torch.Tensor:
        width = max(max((len(t) for t in lists), default=0), 1)
        return torch.tensor([t + [vocab] * (width - len(t)) for t in lists], device=dev)  # pad id = vocab

    counts = torch.zeros(len(rows), vocab + 1, device=dev)
    out_ids = padded([s.output_token_ids for s in seqs])
    counts.scatter_add_(1, out_ids, torch.ones(out_ids.shape, device=dev))
    counts = counts[:, :vocab]
    rep = torch.tensor([s.params.repetition_penalty for s in seqs], device=dev).unsqueeze(1)
    if (rep != 1.0).any():
        seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=dev)
        seen.scatter_(1, padded([s.prompt_token_ids for s in seqs]), True)
        seen = seen[:, :vocab] | (counts > 0)
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor([s.params.frequency_penalty for s in seqs], device=dev).unsqueeze(1)
    pres = torch.tensor([s.params.presence_penalty for s in seqs], device=dev).unsqueeze(1)
    sub = sub - freq * counts - pres * (counts > 0).float()
    x[r] = sub
    return x
