"""Patches (im2col) (`ops/patches.py`, `lower/patches.py`): the ops against a
loop-by-loop im2col and float64 finite differences."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from structc.ops import REGISTRY
from structc.ops.base import Sample
from structc.testing import check_native, check_vjp

SOME = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def im2col(x, kernel, stride, padding):
    """P[n, c·KH·KW + kh·KW + kw, i, j] = x[n, c, i·sh + kh - pt, j·sw + kw - pl], 0 off the input:
    the definition, element by element."""
    (KH, KW), (sh, sw), (pt, pb, pl, pr) = kernel, stride, padding
    N, C, H, W = x.shape
    OH, OW = (H + pt + pb - KH) // sh + 1, (W + pl + pr - KW) // sw + 1
    P = np.zeros((N, C * KH * KW, OH, OW), x.dtype)
    for c in range(C):
        for kh in range(KH):
            for kw in range(KW):
                for i in range(OH):
                    for j in range(OW):
                        h, w = i * sh + kh - pt, j * sw + kw - pl
                        if 0 <= h < H and 0 <= w < W:
                            P[:, c * KH * KW + kh * KW + kw, i, j] = x[:, c, h, w]
    return P


@st.composite
def patch_cases(draw):
    """(x shape, attrs) with at least one patch: kernel == stride half the time."""
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    if draw(st.booleans()):
        (sh, sw), pad = (kh, kw), (0, 0, 0, 0)
    else:
        sh, sw = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        pad = tuple(draw(st.integers(0, k - 1)) for k in (kh, kh, kw, kw))
    h = draw(st.integers(max(1, kh - pad[0] - pad[1]), 12))
    w = draw(st.integers(max(1, kw - pad[2] - pad[3]), 40))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return (n, c, h, w), {"kernel": (kh, kw), "stride": (sh, sw), "padding": pad}


@SOME
@given(patch_cases())
def test_patches_are_im2col(case):
    shape, attrs = case
    x = np.random.default_rng(0).normal(size=shape)
    want = im2col(x, attrs["kernel"], attrs["stride"], attrs["padding"])
    np.testing.assert_array_equal(REGISTRY["patches"].reference(x, **attrs), want)
    check_native(REGISTRY["patches"], Sample((shape,), attrs))         # native forward and gradient


@SOME
@given(patch_cases())
def test_patches_vjp_matches_finite_differences(case):
    shape, attrs = case
    check_vjp(REGISTRY["patches"], Sample((shape,), attrs))

