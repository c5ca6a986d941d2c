"""Shared fixtures: CUDA marker, CPU ISA iteration, per-test RNG, output poisoning.

Random inputs: every test gets its own ``torch.Generator`` seeded from its node id
(``tests/test_x.py::test_y[case]``), so each parametrized case sees different
inputs but a failure reproduces exactly. Set ``FASTINFER_TEST_SEED=<int>`` to draw
a different set of inputs for the whole run.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

import fastinfer
import fastinfer.kernels.forward

# The SIMD levels of the API ("auto" picks the best), lowest first. "amx" is a newer level
# that some builds know; a level this build or CPU lacks is skipped, not failed. "avx_vnni" (VEX
# int8 dot products) is absent from the earlier AVX-512 CPUs, so it may be missing below the best.
ALL_ISAS = ("scalar", "avx2", "avx_vnni", "avx512", "avx512_bf16", "amx")
# Levels with kernels of their own only in the CPU linear family (isa_list.h): elsewhere they run
# the level below's, which that level's own case already tests.
LINEAR_ONLY_ISAS = {"avx_vnni"}
LINEAR_TEST_MODULES = {"test_linear", "test_qlinear"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Parametrize a test over every input dtype: @dtypes, then take a `dtype` argument.
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])


def _supported_isas() -> tuple:
    """The levels set_cpu_isa accepts here, found by trying each one."""
    before = fastinfer.get_cpu_isa()
    ok = []
    for name in ALL_ISAS:
        try:
            fastinfer.set_cpu_isa(name)
        except ValueError:
            continue
        ok.append(name)
    fastinfer.set_cpu_isa(before)
    return tuple(ok)


SUPPORTED_ISAS = _supported_isas()


def requires_cuda(fn):
    """Mark a test as needing a usable CUDA device (``-m 'not cuda'`` deselects it; skipped without one)."""
    fn = pytest.mark.cuda(fn)
    return pytest.mark.skipif(not fastinfer.cuda_available(), reason="needs a CUDA device")(fn)


def pytest_collection_modifyitems(config, items):
    # Anything marked `cuda` directly (not through requires_cuda) is skipped the same way.
    if fastinfer.cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------- RNG


@pytest.fixture
def seed(request) -> int:
    base = int(os.environ.get("FASTINFER_TEST_SEED", "0"))
    return (zlib.crc32(request.node.nodeid.encode()) ^ base) & 0x7FFFFFFF


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A torch.Generator seeded from the test's node id."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def np_rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- global state


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Tests may force an ISA or a thread count; put both back afterwards."""
    isa, threads = fastinfer.get_cpu_isa(), fastinfer.get_num_threads()
    yield
    fastinfer.set_cpu_isa(isa)
    fastinfer.set_num_threads(threads)


@pytest.fixture(params=ALL_ISAS)
def cpu_isa(request):
    """Run the test once per forced CPU SIMD level, restoring the previous level afterwards."""
    name = request.param
    if name not in SUPPORTED_ISAS:
        pytest.skip(f"this build/CPU does not support {name}")
    if name in LINEAR_ONLY_ISAS and request.module.__name__.rpartition(".")[2] not in LINEAR_TEST_MODULES:
        pytest.skip(f"{name} runs the level below's kernels outside the linear family")
    before = fastinfer.get_cpu_isa()
    fastinfer.set_cpu_isa(name)
    assert fastinfer.get_cpu_isa() == name
    yield name
    fastinfer.set_cpu_isa(before)


# ----------------------------------------------------------------------------- poisoned outputs


def _poisoned_like(x):
    # Only floating dtypes hold NaN; anything else is a bad input the kernels will reject.
    if isinstance(x, torch.Tensor):
        if not x.dtype.is_floating_point:
            return torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
    if not np.issubdtype(x.dtype, np.floating):
        return np.empty(x.shape, dtype=x.dtype)
    return np.full(x.shape, np.nan, dtype=x.dtype)


def _poisoned_float32(like, shape):
    if isinstance(like, torch.Tensor):
        return torch.full(shape, float("nan"), dtype=torch.float32, device=like.device)
    return np.full(shape, np.nan, dtype=np.float32)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """The public API allocates out/lse itself with an uninitialised `empty`, which may
    happen to hold plausible values. Make every such allocation NaN instead, so that an
    element the kernels never write shows up as NaN in every test."""
    monkeypatch.setattr(fastinfer.kernels.forward, "empty_like", _poisoned_like)
    monkeypatch.setattr(fastinfer.kernels.forward, "empty_float32", _poisoned_float32)
