"""Sampler: filters never emit excluded tokens, plain sampling follows softmax, penalties match vLLM's formulas,
seeded rows don't depend on the batch, logprobs are the raw log-softmax; SamplingParams validation."""

from __future__ import annotations

import math
import time

import pytest
import torch

from fastinfer.engine import SamplingParams
from fastinfer.engine.sampler import Sampler
from fastinfer.engine.sequence import Sequence

_ids = iter(range(10**9))


def seqs_for(params: SamplingParams, n: int, prompt=(1, 2), output=()) -> list[Sequence]:
    out = []
    for i in range(n):
        s = Sequence(next(_ids), "r", [*prompt, *output], len(prompt), params, index=i)
        out.append(s)
    return out


def draws(params: SamplingParams, logits: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """n samples of one logits row, drawn as one batch of n rows."""
    sampler = Sampler(generator=torch.Generator().manual_seed(seed))
    return torch.tensor(sampler(logits.expand(n, -1).contiguous(), seqs_for(params, n)).token_ids)


def test_greedy_is_argmax():
    logits = torch.randn(9, 50, generator=torch.Generator().manual_seed(1))
    out = Sampler()(logits, seqs_for(SamplingParams(temperature=0.0), 9))
    assert out.token_ids == logits.argmax(-1).tolist()
    # greedy rows next to random rows stay argmax
    mixed = [*seqs_for(SamplingParams(temperature=0.0), 5), *seqs_for(SamplingParams(temperature=1.0), 4)]
    assert Sampler()(logits, mixed).token_ids[:5] == logits[:5].argmax(-1).tolist()


def test_plain_temperature_matches_softmax_chi_square():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2, -2.0, 0.8])
    n, temp = 20000, 0.7
    got = torch.bincount(draws(SamplingParams(temperature=temp), logits, n), minlength=10).double()
    expected = (logits.double() / temp).softmax(-1) * n
    chi2 = ((got - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.88  # chi-square, 9 degrees of freedom, p = 0.001
    # and a wrong temperature is detected by the same statistic
    wrong = (logits.double() / 1.0).softmax(-1) * n
    assert ((got - wrong) ** 2 / wrong).sum().item() > 27.88


@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_top_k_top_p_min_p_never_emit_excluded_tokens(temp):
    logits = torch.randn(40, generator=torch.Generator().manual_seed(3)) * 2
    scaled = (logits / temp).softmax(-1)
    order = scaled.argsort(descending=True)
    # top-k
    got = set(draws(SamplingParams(temperature=temp, top_k=5), logits, 3000).tolist())
    assert got <= set(order[:5].tolist()) and len(got) > 1
    # top-p: the smallest prefix of the sorted distribution reaching p
    p = 0.6
    keep = int((scaled[order].cumsum(0) < p).sum()) + 1
    got = set(draws(SamplingParams(temperature=temp, top_p=p), logits, 3000).tolist())
    assert got <= set(order[:keep].tolist()) and len(got) >= min(keep, 2)
    # min-p relative to the most likely token
    allowed = set(torch.nonzero(scaled >= 0.1 * scaled.max()).flatten().tolist())
    got = set(draws(SamplingParams(temperature=temp, min_p=0.1), logits, 3000).tolist())
    assert got <= allowed
    # all three together, mixed in one batch with unfiltered rows
    sampler = Sampler(generator=torch.Generator().manual_seed(5))
    both = seqs_for(SamplingParams(temperature=temp, top_k=5, top_p=p), 2000)
    plain = seqs_for(SamplingParams(temperature=temp), 2000)
    batch = [s for pair in zip(both, plain) for s in pair]
    ids = torch.tensor(sampler(logits.expand(4000, -1).contiguous(), batch).token_ids)
    assert set(ids[0::2].tolist()) <= set(order[: min(5, keep)].tolist())
    assert len(set(ids[1::2].tolist())) > min(5, keep)


def test_penalties_match_formula():
    g = torch.Generator().manual_seed(7)
    vocab = 12
    prompts = [[1, 2, 2], [3], [4, 5]]
    outputs = [[2, 6, 6, 6], [3, 3, 7], []]
    params = [
        SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25, temperature=0.0),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5, temperature=0.0),
        SamplingParams(presence_penalty=1.0, temperature=0.0),
    ]
    seqs = [Sequence(next(_ids), "r", p + o, len(p), sp) for p, o, sp in zip(prompts, outputs, params)]
    logits = torch.randn(3, vocab, generator=g) * 3
    expected = logits.clone().double()
    for r, (p, o, sp) in enumerate(zip(prompts, outputs, params)):
        for t in range(vocab):
            x = expected[r, t].item()
            if t in p or t in o:
                x = x / sp.repetition_penalty if x > 0 else x * sp.repetition_penalty
            c = o.count(t)
            x -= sp.frequency_penalty * c + sp.presence_penalty * (c > 0)
            expected[r, t] = x
    from fastinfer.engine.sampler import _apply_penalties

    got = _apply_penalties(logits.clone(), seqs, [0, 1, 2])
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    # end to end: a penalised favourite loses the argmax
    fav = torch.zeros(1, vocab)
    fav[0, 6] = 1.0
    fav[0, 8] = 0.9
    s = Sequence(next(_ids), "r", [1, 6], 1, SamplingParams(temperature=0.0, presence_penalty=0.2))
    assert Sampler()(fav, [s]).token_ids == [8]
    assert Sampler()(fav, seqs_for(SamplingParams(temperature=0.0), 1, output=[6])).token_ids == [6]


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(3, 10)
    logits[:, 9] = 10.0  # eos is the favourite
    logits[:, 4] = 9.0  # then a stop token id
    sampler = Sampler(eos_token_ids=[9])
    below = Sequence(next(_ids), "r", [1, 2], 1, SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[4]))
    done = Sequence(next(_ids), "r", [1, 2, 3, 3], 1, SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[4]))
    keep_eos = Sequence(next(_ids), "r", [1], 1, SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True))
    assert sampler(logits, [below, done, keep_eos]).token_ids == [0, 9, 9]


def test_seeded_rows_do_not_depend_on_the_batch():
    vocab = 30
    g = torch.Generator().manual_seed(11)
    steps = [torch.randn(vocab, generator=g) for _ in range(5)]

    def run(batch_size: int, position: int, seed_others: bool) -> list[int]:
        target = Sequence(next(_ids), "r", [1], 1, SamplingParams(seed=1234, top_k=20, top_p=0.95))
        others = [
            Sequence(next(_ids), "o", [1], 1, SamplingParams(seed=i if seed_others else None, temperature=0.9))
            for i in range(batch_size - 1)
        ]
        batch = others[:position] + [target] + others[position:]
        sampler = Sampler(generator=torch.Generator().manual_seed(batch_size))
        got = []
        for row in steps:
            logits = torch.randn(len(batch), vocab)
            logits[position] = row
            got.append(sampler(logits, batch).token_ids[position])
        return got

    alone = run(1, 0, False)
    assert run(8, 3, False) == alone and run(5, 4, True) == alone and run(3, 0, True) == alone
    # n > 1: sequence i uses seed + i, so the streams differ but each is reproducible
    row = torch.zeros(vocab)
    a = Sampler()(row.expand(2, -1).contiguous(), seqs_for(SamplingParams(seed=5), 2)).token_ids
    b = Sampler()(row.expand(2, -1).contiguous(), seqs_for(SamplingParams(seed=5), 2)).token_ids
    assert a == b
    many = [Sampler()(row.unsqueeze(0), seqs_for(SamplingParams(seed=5), 2)[1:]).token_ids[0] for _ in range(3)]
    assert len(set(many)) == 1


def test_logprobs_are_raw_log_softmax_with_ranks():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    seqs = [
        Sequence(next(_ids), "r", [1, 5], 1, SamplingParams(logprobs=3, temperature=0.0, repetition_penalty=2.0)),
        Sequence(next(_ids), "r", [1], 1, SamplingParams(temperature=1.0)),
        Sequence(next(_ids), "r", [1], 1, SamplingParams(logprobs=0, temperature=1.0)),
    ]
    out = Sampler(generator=torch.Generator().manual_seed(0))(logits, seqs)
    ref = logits.log_softmax(-1)
    assert out.logprobs[1] is None
    top = ref[0].argsort(descending=True)[:3].tolist()
    d0 = out.logprobs[0]
    assert set(top) <= set(d0) and out.token_ids[0] in d0 and len(d0) in (3, 4)
    for rank, t in enumerate(top, 1):
        assert d0[t].rank == rank and math.isclose(d0[t].logprob, ref[0, t].item(), rel_tol=1e-5)
    t2 = out.token_ids[2]
    assert list(out.logprobs[2]) == [t2]
    assert out.logprobs[2][t2].rank == int((ref[2] > ref[2, t2]).sum()) + 1
    assert math.isclose(out.logprobs[2][t2].logprob, ref[2, t2].item(), rel_tol=1e-5)


def test_batch_64_decode_overhead():
    """Per-call cost of a batch-64 decode beyond the logits passes themselves: measured on a tiny vocabulary (so the
    tensor math is ~free) with one torch thread (so waking a worker on a loaded machine isn't timed); best of 30."""
    logits = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    cases = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for params in cases:
            seqs = seqs_for(params, 64, prompt=list(range(100)), output=list(range(20)))
            sampler = Sampler()
            cost = min(_timed(sampler, logits, seqs) for _ in range(30))
            assert cost < 1e-3, (params, cost)
        seeded = [*seqs_for(SamplingParams(seed=1), 32), *seqs_for(SamplingParams(), 32)]  # per-row draws
        assert min(_timed(Sampler(), logits, seeded) for _ in range(30)) < 1e-3
    finally:
        torch.set_num_threads(threads)


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"n": 0}, "n"), ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"), ({"min_p": 1.1}, "min_p"), ({"seed": 1.5}, "seed"), ({"stop": [""]}, "stop"),
        ({"stop": 3}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 20}, "min_tokens"), ({"logprobs": -1}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"n": True}, "n"),
    ],
)
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == (1, 1.0, 1.0, 0, 0.0, 16, 0)
    assert p.stop == [] and p.stop_token_ids == [] and p.logprobs is None and p.skip_special_tokens
    assert SamplingParams(stop="x").stop == ["x"] and SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.5).greedy
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


def test_logprobs_larger_than_vocab_returns_every_token():
    logits = torch.randn(1, 6)
    out = Sampler()(logits, seqs_for(SamplingParams(logprobs=50, temperature=0.0), 1))
    assert sorted(out.logprobs[0]) == list(range(6))
    assert sorted(lp.rank for lp in out.logprobs[0].values()) == list(range(1, 7))
