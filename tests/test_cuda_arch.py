"""Which CUDA devices can run fastinfer's kernels (issue 21, point 7), testable without a GPU.

``_C.cuda_arch_problem(device, name, major, minor, archs)`` is the check as a pure function: the
kernels' minimum (compute capability 8.0: cp.async, bf16 mma.sync) and the architectures compiled
in (CMake's CUDA_ARCHITECTURES entries: "80" = sm_80 code + compute_80 PTX, "-real" code only,
"-virtual" PTX only, "a" that exact device, "f" that family). ``cuda_available()`` is False, with a
one-time warning, when no device passes; a kernel call on a device that does not pass raises
RuntimeError with the same text (check_devices in the bindings, CUDA builds).
"""

from __future__ import annotations

import warnings

import pytest

import fastinfer
from fastinfer import _C
from fastinfer.kernels import runtime
from conftest import requires_cuda

BUILD_ARCHS = "80,90a"  # CMakeLists.txt's default FASTINFER_CUDA_ARCHS


def problem(major, minor, archs=BUILD_ARCHS, name="GPU", device=0):
    return _C.cuda_arch_problem(device, name, major, minor, archs)


def test_pre_sm80_device_names_itself_and_its_capability():
    assert problem(7, 5, name="Tesla T4") == ("fastinfer's CUDA kernels need compute capability 8.0 or newer; "
                                              "device 0 (Tesla T4) is 7.5")
    assert problem(6, 0, name="Tesla P100-PCIE-16GB", device=3) == (
        "fastinfer's CUDA kernels need compute capability 8.0 or newer; device 3 (Tesla P100-PCIE-16GB) is 6.0")
    assert problem(7, 0, archs="") != ""  # the minimum holds whatever was compiled
    assert problem(7, 5, archs="75") != ""  # ... and whatever a build claims


@pytest.mark.parametrize("major,minor", [(8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_default_build_runs_on_every_sm80_or_newer_device(major, minor):
    # sm_80 code runs on 8.x, sm_90a code on 9.0, and the compute_80 PTX is compiled by the driver for newer ones.
    assert problem(major, minor) == ""


@pytest.mark.parametrize("archs,major,minor,runs", [
    ("90a", 8, 0, False),              # arch-specific code: only that exact device
    ("90a", 9, 0, True),
    ("90a", 10, 0, False),
    ("80-real", 8, 6, True),           # machine code runs on the same major, equal or newer minor
    ("86-real", 8, 0, False),
    ("80-real", 9, 0, False),          # ... not on another major, and no PTX to compile for it
    ("80-virtual", 9, 0, True),        # PTX: any newer device
    ("80-real,90a-real", 9, 0, True),
    ("80-real,90a-real", 12, 0, False),
    ("100f", 10, 3, True),             # family code: same major
    ("100f", 12, 0, False),
    (" 80 , 90a ", 8, 9, True),        # spaces around entries
    ("native", 12, 0, True),           # a list this check cannot read: no verdict beyond the minimum
    ("", 9, 0, True),
])
def test_compiled_architectures_decide(archs, major, minor, runs):
    got = problem(major, minor, archs=archs, name="X")
    if runs:
        assert got == ""
    else:
        assert got == (f"fastinfer's CUDA kernels were compiled for {archs} (FASTINFER_CUDA_ARCHS), none of which "
                       f"runs on device 0 (X) of compute capability {major}.{minor}; rebuild with "
                       f"FASTINFER_CUDA_ARCHS including {10 * major + minor}")


# ----------------------------------------------------------------------------- cuda_available


@pytest.fixture
def fake_devices(monkeypatch):
    """A CUDA build on a machine with the given (name, major, minor) devices, as _C reports them."""
    def install(*devices):
        info = dict(_C.build_info(), cuda_compiled=True, cuda_archs=BUILD_ARCHS)
        monkeypatch.setattr(_C, "build_info", lambda: dict(info))
        monkeypatch.setattr(_C, "cuda_device_count", lambda: len(devices))
        monkeypatch.setattr(_C, "cuda_device_problem",
                            lambda d: _C.cuda_arch_problem(d, *devices[d], BUILD_ARCHS), raising=False)
        monkeypatch.setattr(runtime, "_warned_devices", set())
    return install


def test_only_an_old_device_means_no_cuda_with_one_warning(fake_devices):
    fake_devices(("Tesla T4", 7, 5))
    with pytest.warns(RuntimeWarning) as record:
        assert fastinfer.cuda_available() is False
    assert [str(w.message) for w in record] == [
        "fastinfer's CUDA kernels need compute capability 8.0 or newer; device 0 (Tesla T4) is 7.5: "
        "cuda_available() is False"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: a second call is silent
        assert fastinfer.cuda_available() is False


def test_an_old_device_beside_a_new_one(fake_devices):
    fake_devices(("Tesla T4", 7, 5), ("NVIDIA A100-SXM4-80GB", 8, 0))
    with pytest.warns(RuntimeWarning, match=r"device 0 \(Tesla T4\) is 7\.5: calls on that device raise RuntimeError$"):
        assert fastinfer.cuda_available() is True


def test_new_devices_are_available_silently(fake_devices):
    fake_devices(("NVIDIA H100 80GB HBM3", 9, 0), ("NVIDIA L4", 8, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastinfer.cuda_available() is True


def test_no_device_is_not_available(fake_devices):
    fake_devices()
    assert fastinfer.cuda_available() is False


def test_llm_auto_device_is_the_cpu_on_an_old_gpu(fake_devices):
    from fastinfer.entrypoints.llm import _resolve_device
    fake_devices(("Tesla T4", 7, 5))
    with pytest.warns(RuntimeWarning, match="Tesla T4"):
        assert _resolve_device("auto").type == "cpu"


@requires_cuda
def test_this_machines_devices():
    problems = [_C.cuda_device_problem(d) for d in range(_C.cuda_device_count())]
    assert any(p == "" for p in problems)
