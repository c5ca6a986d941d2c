"""The CPU runtime under concurrent callers and after fork()."""
from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
import torch

import fastinfer
from reference import randn


def test_concurrent_calls_from_python_threads(gen):
    # The kernels release the GIL; calls from several threads share one pool and per-thread scratch.
    q, k, v = randn((2, 300, 8, 64), torch.float32, gen), randn((2, 300, 2, 64), torch.float32, gen), \
        randn((2, 300, 2, 64), torch.float32, gen)
    expected = fastinfer.flash_attn_func(q, k, v, causal=True)
    mismatches, failures = [], []

    def worker():
        try:
            for _ in range(10):
                if not torch.equal(fastinfer.flash_attn_func(q, k, v, causal=True), expected):
                    mismatches.append(1)
        except Exception as err:  # surfaced below; a thread's exception would otherwise vanish
            failures.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and not mismatches


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="needs fork()")
def test_fork_child_gets_a_working_pool(gen):
    # A forked child has none of the parent's pool threads; it must not wait for them.
    # The child uses numpy only: torch's own OpenMP pool is not fork-safe.
    q = randn((1, 200, 4, 64), torch.float32, gen).numpy()
    expected = fastinfer.flash_attn_func(q, q, q, causal=True)  # the parent's pool is running now
    pid = os.fork()
    if pid == 0:
        ok = bool(np.array_equal(fastinfer.flash_attn_func(q, q, q, causal=True), expected))
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
