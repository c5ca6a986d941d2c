"""Build metadata, CUDA detection, CPU ISA and thread-count controls."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastinfer
from fastinfer import _C
from conftest import ALL_ISAS, SUPPORTED_ISAS, requires_cuda
from reference import randn


def test_build_info_keys():
    info = fastinfer.build_info()
    assert set(info) >= {"version", "compiler", "cuda_compiled", "cuda_archs", "cuda_runtime_version", "cpu_isa",
                         "cpu_isa_best", "num_threads"}
    assert info["version"] == fastinfer.__version__ and isinstance(info["version"], str) and info["version"]
    assert isinstance(info["compiler"], str) and info["compiler"]
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["cuda_archs"], str)
    if info["cuda_compiled"]:
        assert info["cuda_archs"] and all(a.strip() for a in info["cuda_archs"].split(","))
        assert isinstance(info["cuda_runtime_version"], str)
    else:
        assert info["cuda_runtime_version"] is None
    assert info["cpu_isa"] in ALL_ISAS and info["cpu_isa_best"] in ALL_ISAS
    assert info["cpu_isa"] == fastinfer.get_cpu_isa()
    assert info["num_threads"] == fastinfer.get_num_threads() >= 1


def test_build_info_is_a_copy():
    info = fastinfer.build_info()
    info["version"] = "tampered"
    assert fastinfer.build_info()["version"] == fastinfer.__version__


def test_public_names():
    for name in fastinfer.__all__:
        assert hasattr(fastinfer, name), name


def test_cuda_available_without_a_gpu():
    # Must answer (not crash) whether or not CUDA was compiled in; on this machine there is no device.
    available = fastinfer.cuda_available()
    assert isinstance(available, bool)
    assert _C.cuda_device_count() >= 0
    if not torch.cuda.is_available():
        assert available is False


def test_cuda_probe_without_a_gpu_raises_cleanly():
    if not hasattr(_C, "cuda_probe_arch"):
        pytest.skip("built without CUDA")
    if fastinfer.cuda_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="CUDA"):
        _C.cuda_probe_arch()


@requires_cuda
def test_cuda_probe_arch():
    # __CUDA_ARCH__ of the code that ran, e.g. 900 for sm_90a: one of the compiled architectures.
    arch = _C.cuda_probe_arch()
    compiled = {int("".join(ch for ch in a if ch.isdigit())) for a in fastinfer.build_info()["cuda_archs"].split(",")}
    assert arch // 10 in compiled


@requires_cuda
def test_cuda_tensors_are_rejected_cleanly():
    q = torch.randn(1, 4, 2, 64, device="cuda")
    with pytest.raises(ValueError, match="cuda"):
        fastinfer.flash_attn_func(q, q, q)
    with pytest.raises(ValueError, match="is on"):
        fastinfer.flash_attn_func(q, q.cpu(), q.cpu())


@pytest.mark.parametrize("name", ALL_ISAS + ("auto",))
def test_isa_round_trip(name):
    best = fastinfer.build_info()["cpu_isa_best"]
    if name != "auto" and name not in SUPPORTED_ISAS:
        before = fastinfer.get_cpu_isa()
        with pytest.raises(ValueError, match=f"'{name}'"):
            fastinfer.set_cpu_isa(name)
        assert fastinfer.get_cpu_isa() == before
        return
    fastinfer.set_cpu_isa(name)
    want = best if name == "auto" else name
    assert fastinfer.get_cpu_isa() == want
    assert fastinfer.build_info()["cpu_isa"] == want


def test_isa_levels_are_ordered():
    # Every level up to the best one is available, and the best is what "auto" picks.
    best = fastinfer.build_info()["cpu_isa_best"]
    assert best in SUPPORTED_ISAS
    below = ALL_ISAS[: ALL_ISAS.index(best) + 1]
    assert SUPPORTED_ISAS == tuple(i for i in below if i != "avx_vnni" or _cpu_flag("avx_vnni"))


def _cpu_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


def test_avx_vnni_level_follows_the_cpu():
    """avx_vnni is offered exactly where the CPU has AVX-VNNI (forcing it elsewhere would be an illegal instruction)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64") or not fastinfer.build_info()["cpu_isa_best"].startswith(("avx", "amx")):
        pytest.skip("x86 levels only")
    assert ("avx_vnni" in SUPPORTED_ISAS) == _cpu_flag("avx_vnni")
    if "avx_vnni" not in SUPPORTED_ISAS:
        with pytest.raises(ValueError, match="'avx_vnni' is not supported"):
            fastinfer.set_cpu_isa("avx_vnni")


def test_every_base_level_runs_here():
    # The development machines have AVX-512 BF16, so the per-ISA tests really run every level;
    # on an older CPU those tests skip the levels it lacks, and so does this one.
    if fastinfer.build_info()["cpu_isa_best"] in ("scalar", "avx2", "avx512"):
        pytest.skip("CPU without AVX-512 BF16")
    assert {"scalar", "avx2", "avx512", "avx512_bf16"} <= set(SUPPORTED_ISAS)


@pytest.mark.parametrize("env,want", [("scalar", "scalar"), ("avx2", "avx2"), ("bogus", None)])
def test_isa_environment_variable(env, want):
    if want is not None and want not in SUPPORTED_ISAS:
        pytest.skip(f"CPU without {want}")
    code = "import fastinfer; print(fastinfer.get_cpu_isa(), fastinfer.build_info()['cpu_isa_best'])"
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FASTINFER_CPU_ISA": env},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    active, best = res.stdout.split()
    # A bad value must not break the import: it falls back to the best level.
    assert active == (want if want is not None else best)


def test_num_threads_round_trip():
    default = fastinfer.get_num_threads()
    assert default >= 1
    fastinfer.set_num_threads(1)
    assert fastinfer.get_num_threads() == 1
    fastinfer.set_num_threads(3)
    assert fastinfer.get_num_threads() == 3
    fastinfer.set_num_threads(0)  # <= 0 restores the default
    assert fastinfer.get_num_threads() == default


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_single_thread_matches_default(gen, dtype):
    # Many tiles and fewer than 512 keys per tile: the work is cut the same way whatever the
    # thread count (split-KV, which depends on it, does not engage), so results are bit-identical.
    q = randn((3, 40, 8, 64), dtype, gen)
    k, v = randn((3, 300, 2, 64), dtype, gen), randn((3, 300, 2, 64), dtype, gen)
    cu = torch.tensor([0, 1, 41, 120], dtype=torch.int32)
    default = fastinfer.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    default_varlen = fastinfer.flash_attn_varlen_func(q.reshape(-1, 8, 64), k.reshape(-1, 2, 64), v.reshape(-1, 2, 64),
                                                      cu, cu, 79, 79, window_size=(20, 3))
    fastinfer.set_num_threads(1)
    single = fastinfer.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    single_varlen = fastinfer.flash_attn_varlen_func(q.reshape(-1, 8, 64), k.reshape(-1, 2, 64), v.reshape(-1, 2, 64),
                                                     cu, cu, 79, 79, window_size=(20, 3))
    assert torch.equal(default[0], single[0]) and torch.equal(default[1], single[1])
    assert torch.equal(default_varlen, single_varlen)


def test_many_threads_match_one(gen):
    # More threads than cores, and split-KV forced on: same answer to float32 accuracy.
    q = randn((1, 2, 4, 64), torch.float32, gen)
    kc, vc = randn((1, 2000, 1, 64), torch.float32, gen), randn((1, 2000, 1, 64), torch.float32, gen)
    fastinfer.set_num_threads(1)
    one = fastinfer.flash_attn_with_kvcache(q, kc, vc, num_splits=1)
    fastinfer.set_num_threads(7)
    many = fastinfer.flash_attn_with_kvcache(q, kc, vc, num_splits=0)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)
