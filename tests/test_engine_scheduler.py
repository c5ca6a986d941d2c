"""Scheduler + block manager + engine loop on fake block counts, driven by FakeRunner (see test_engine_fakes.py)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastinfer.engine import CacheConfig, LLMEngine, SamplingParams, SchedulerConfig
from fastinfer.engine.sequence import SequenceStatus
from test_engine_fakes import FakeRunner

EOS = 0


def make_engine(cfg: SchedulerConfig, cache: CacheConfig, vocab: int = 64, peaked: bool = True) -> LLMEngine:
    runner = FakeRunner(cache.num_blocks, cache.block_size, vocab, peaked)
    return LLMEngine(runner, None, cfg, cache, eos_token_ids=[EOS], seed=0)


def check_blocks(engine: LLMEngine) -> None:
    """Every block is either free with no users or held by exactly ref_count live sequences."""
    sched, bm = engine.scheduler, engine.scheduler.block_manager
    users = Counter()
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(set(seq.block_table)) == len(seq.block_table), "a block twice in one table"
        assert len(seq.block_table) == bm.blocks_needed(seq.num_computed_tokens) or seq.num_computed_tokens == 0
        users.update(seq.block_table)
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING and not seq.block_table and seq.num_computed_tokens == 0
    for block in bm.blocks:
        assert block.ref_count == users[block.block_id]
        assert (block.block_id in bm.free) == (block.ref_count == 0)
    for h, block_id in bm.hash_to_block.items():
        assert bm.blocks[block_id].hash == h


def run(engine: LLMEngine, requests: list, max_steps: int = 5000) -> dict:
    """requests: (request_id, arrival_step, prompt ids, SamplingParams). Returns request_id -> final RequestOutput."""
    pending = sorted(requests, key=lambda r: r[1])
    cfg = engine.config
    finished: dict = {}
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][1] <= step:
            rid, _, prompt, params = pending.pop(0)
            engine.add_request(rid, prompt, params)
        outs = engine.step()
        check_blocks(engine)
        assert len(engine.scheduler.running) <= cfg.max_num_seqs
        assert engine.runner.max_batch_tokens <= cfg.max_num_batched_tokens
        for out in outs:
            assert out.request_id not in finished, "output after the request finished"
            if out.finished:
                finished[out.request_id] = out
        step += 1
        assert step < max_steps, "no progress"
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == engine.cache_config.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    assert set(finished) == {r[0] for r in requests}
    return finished


request_st = st.tuples(
    st.integers(0, 6),  # arrival step
    st.lists(st.integers(1, 3), min_size=1, max_size=24),  # prompt over a tiny alphabet: shared prefixes are common
    st.integers(1, 8),  # max_tokens
    st.integers(1, 2),  # n
    st.booleans(),  # ignore_eos
    st.sampled_from([None, 7, 8]),  # seed: None = greedy, else temperature-1 sampling with that seed
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=st.lists(request_st, min_size=1, max_size=6),
    num_blocks=st.integers(1, 14),
    block_size=st.integers(1, 4),
    budget=st.integers(1, 20),
    max_num_seqs=st.integers(1, 4),
    max_model_len=st.integers(4, 40),
    prefix=st.booleans(),
)
def test_tiny_cache_matches_huge_cache(reqs, num_blocks, block_size, budget, max_num_seqs, max_model_len, prefix):
    """Random arrivals, prompts, budgets and tiny caches: no block leaks or double use, every request finishes
    exactly once, rejected ones alone, and the tokens equal a run that never preempts."""
    requests = []
    for i, (arrival, prompt, max_tokens, n, ignore_eos, seed) in enumerate(reqs):
        params = SamplingParams(
            n=n, max_tokens=max_tokens, ignore_eos=ignore_eos, seed=seed, temperature=0.0 if seed is None else 1.0
        )
        requests.append((f"r{i}", arrival, prompt, params))
    tiny_engine = make_engine(SchedulerConfig(max_num_seqs, budget, max_model_len),
                              CacheConfig(block_size, num_blocks, enable_prefix_caching=prefix))
    tiny = run(tiny_engine, requests)
    cap = tiny_engine.scheduler.max_seq_len
    huge_engine = make_engine(SchedulerConfig(64, 4096, cap),
                              CacheConfig(block_size, 4096, enable_prefix_caching=not prefix))
    huge = run(huge_engine, [(rid, 0, p, sp) for rid, _, p, sp in requests])
    for rid, _, prompt, params in requests:
        a, b = tiny[rid], huge[rid]
        if len(prompt) > cap:
            assert a.error and str(cap) in a.error
            assert all(o.finish_reason == "error" and not o.token_ids for o in a.outputs)
            continue
        assert a.error is None and len(a.outputs) == params.n
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs], rid
        for o in a.outputs:
            assert o.finish_reason in ("stop", "length")
            # a prompt of exactly the cap still samples one token (its position is never computed)
            assert 1 <= len(o.token_ids) <= params.max_tokens
            assert len(prompt) + len(o.token_ids) <= max(cap, len(prompt) + 1)
            if o.finish_reason == "stop":
                assert o.token_ids[-1] == EOS and not params.ignore_eos
            else:
                assert len(o.token_ids) == params.max_tokens or len(prompt) + len(o.token_ids) >= cap


def test_preemption_recomputes_and_matches():
    """Four long requests in a 12-block cache must preempt; outputs equal the unconstrained run."""
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0)
    requests = [(f"r{i}", 0, [i + 1] * 5 + [9, i + 2], params) for i in range(4)]
    small = make_engine(SchedulerConfig(8, 64, 64), CacheConfig(2, 12, enable_prefix_caching=False))
    got = run(small, requests)
    assert small.scheduler.num_preemptions > 0
    roomy = make_engine(SchedulerConfig(8, 64, 64), CacheConfig(2, 100, enable_prefix_caching=False))
    ref = run(roomy, requests)
    for rid in got:
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
        assert len(got[rid].outputs[0].token_ids) == 12


def test_chunked_prefill_mixes_with_decodes():
    """A long prompt is split into budget-sized chunks while an earlier request keeps decoding every step."""
    engine = make_engine(SchedulerConfig(4, 4, 64), CacheConfig(4, 64, enable_prefix_caching=False))
    engine.add_request("a", [5, 6], SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0))
    engine.step()
    engine.add_request("b", list(range(1, 12)), SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0))
    chunks = []
    for _ in range(4):
        out = engine.scheduler.schedule()
        chunks.append([(c.seq.request_id, c.start, c.num_tokens, c.sample) for c in out.scheduled])
        engine.scheduler.update(out, [7] * len(out.sampled))
    # a decodes 1 token per step; b gets the remaining 3 of the 4-token budget until its 11-token prompt is done
    assert chunks[0] == [("a", 2, 1, True), ("b", 0, 3, False)]
    assert chunks[1] == [("a", 3, 1, True), ("b", 3, 3, False)]
    assert chunks[2] == [("a", 4, 1, True), ("b", 6, 3, False)]
    assert chunks[3] == [("a", 5, 1, True), ("b", 9, 2, True)]


def test_rejected_request_does_not_disturb_others():
    engine = make_engine(SchedulerConfig(4, 16, 10), CacheConfig(2, 16, enable_prefix_caching=True))
    params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0)
    got = run(engine, [("ok1", 0, [1, 2, 3], params), ("long", 0, list(range(1, 12)), params), ("ok2", 1, [4], params)])
    assert got["long"].error == "prompt of 11 tokens is longer than max_model_len (10 tokens)"
    assert got["long"].finished and got["long"].outputs[0].finish_reason == "error"
    assert len(got["ok1"].outputs[0].token_ids) == 3 and len(got["ok2"].outputs[0].token_ids) == 3
    engine = make_engine(SchedulerConfig(4, 16, 100), CacheConfig(2, 3, enable_prefix_caching=True))
    got = run(engine, [("big", 0, list(range(1, 8)), params), ("ok", 0, [1], params)])
    assert "KV cache capacity (6 tokens)" in got["big"].error and got["ok"].error is None


def test_max_num_seqs_and_abort():
    engine = make_engine(SchedulerConfig(2, 64, 64), CacheConfig(2, 64, enable_prefix_caching=True))
    params = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.0)
    for i in range(3):
        engine.add_request(f"r{i}", [i + 1, 2], params)
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["r0", "r1"]
    engine.abort("r1")
    engine.abort("r2")
    outs = {o.request_id: o for o in engine.step()}
    assert outs["r1"].finished and outs["r1"].outputs[0].finish_reason == "abort"
    assert outs["r2"].finished and outs["r2"].outputs[0].token_ids == []
    assert not outs["r0"].finished
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == "r0"
    assert engine.scheduler.block_manager.num_free_blocks == 64
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("r0", [1], params)
        engine.add_request("r0", [1], params)


def test_metrics_and_n_sequences_share_prompt_blocks():
    engine = make_engine(SchedulerConfig(8, 64, 64), CacheConfig(2, 64, enable_prefix_caching=True), peaked=False)
    engine.add_request("r", [1, 2, 3, 4, 5, 6, 7], SamplingParams(n=3, max_tokens=4, seed=1, ignore_eos=True))
    engine.step()
    tables = [s.block_table for s in engine.scheduler.running]
    assert tables[0][:3] == tables[1][:3] == tables[2][:3]  # the 3 full prompt blocks are shared
    assert engine.prefix_cache_stats.block_hits == 6
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    final = outs[-1]
    assert final.finished and len({tuple(o.token_ids) for o in final.outputs}) > 1  # seed + index differ
    m = final.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_max_tokens_none_runs_to_max_model_len():
    engine = make_engine(SchedulerConfig(4, 64, 12), CacheConfig(4, 64, enable_prefix_caching=True))
    got = run(engine, [("r", 0, [1, 2, 3], SamplingParams(max_tokens=None, ignore_eos=True, temperature=0.0))])
    assert got["r"].outputs[0].finish_reason == "length" and len(got["r"].outputs[0].token_ids) == 9


@pytest.mark.parametrize("fail_at", [1, 2, 5])
def test_failed_step_recovers(fail_at):
    """A step whose runner raises leaves blocks consistent, registers no unwritten prefix block (FakeRunner checks
    what it reads back), loses no output and changes no token."""
    params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0)
    shared = [5, 6, 7, 8, 9, 10, 11]
    requests = [(f"r{i}", 0, shared + [i + 1] * (i + 1), params) for i in range(4)]
    cfg = SchedulerConfig(4, 12, 64), CacheConfig(2, 64, enable_prefix_caching=True)
    want = run(make_engine(*cfg), requests)
    engine = make_engine(*cfg)
    for rid, _, prompt, sp in requests:
        engine.add_request(rid, prompt, sp)
    real, steps = engine.runner.execute, [0]

    def flaky(sched):
        steps[0] += 1
        if steps[0] == fail_at:
            raise RuntimeError("boom")
        return real(sched)

    engine.runner.execute = flaky
    got = {}
    while engine.has_unfinished():
        try:
            outs = engine.step()
        except RuntimeError:
            check_blocks(engine)
            continue
        check_blocks(engine)
        for o in outs:
            assert o.request_id not in got, "reported finished twice"
            if o.finished:
                got[o.request_id] = o
    assert {r: o.outputs[0].token_ids for r, o in got.items()} == {r: o.outputs[0].token_ids for r, o in want.items()}
    assert engine.scheduler.block_manager.num_free_blocks == cfg[1].num_blocks
