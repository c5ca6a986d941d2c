"""torch.autograd.gradcheck through the custom ops: finite differences against the backward kernel.

The kernels have no float64, so the check runs in float32 with a step and tolerances sized for
float32 rounding (a wrong gradient term is off by O(1), far outside them)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from fastinfer import flash_attn_func, flash_attn_varlen_func  # noqa: E402

TOL = dict(eps=1e-2, atol=2e-3, rtol=2e-2)


def leaves(*shapes, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g).requires_grad_() for s in shapes)


def gradcheck(fn, inputs) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "inputs are not double precision": deliberate, see the module doc
        return torch.autograd.gradcheck(fn, inputs, **TOL)


@pytest.mark.parametrize("causal,window,softcap", [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0),
                                                   (True, (2, 0), 0.0), (False, (-1, -1), 4.0)])
def test_dense_gqa(causal, window, softcap):
    q, k, v = leaves((2, 5, 4, 16), (2, 7, 2, 16), (2, 7, 2, 16), seed=hash((causal, window, softcap)) % 1000)
    assert gradcheck(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap),
                     (q, k, v))


def test_varlen():
    q, k, v = leaves((9, 2, 16), (11, 1, 16), (11, 1, 16), seed=7)
    cu_q = torch.tensor([0, 3, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 11], dtype=torch.int32)
    assert gradcheck(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 6, causal=True), (q, k, v))


def test_detects_a_wrong_gradient():
    # The check itself must be able to fail: scale the true gradient of q and it does.
    q, k, v = leaves((1, 4, 2, 16), (1, 4, 2, 16), (1, 4, 2, 16), seed=3)

    class Skewed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 1.5 * g

    from torch.autograd.gradcheck import GradcheckError

    with pytest.raises(GradcheckError):
        gradcheck(lambda q, k, v: flash_attn_func(Skewed.apply(q), k, v), (q, k, v))
