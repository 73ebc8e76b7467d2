"""Scale invariance (paper Sec. 2.1): multiplying the filters or the input by a
positive constant leaves a SphereConv's output unchanged up to the effect of eps."""

from __future__ import annotations

import nn_reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sphereconv.nn import SphereConv2d, SphereLinear, SphereNorm2d
from sphereconv.nn.angular import angular_function

F64 = torch.float64
OPERATORS = ["linear", "cosine", "sigmoid", "learnable_sigmoid"]


def eps_bound(c0, r_min, operator, k):
    """Largest change eps can cause: |g(c0) - g(c0 * r_min)|, g monotone in the cosine.

    With eps, cos = c0 * r, r = 1/sqrt((1 + eps/|w|^2)(1 + eps/|x|^2)) in (0, 1], so every output
    of the scaled and unscaled layer lies between g(c0 * r_min) and g(c0).
    """
    op = "sigmoid" if operator == "learnable_sigmoid" else operator
    return (angular_function(c0, op, k) - angular_function(c0 * r_min, op, k)).abs()


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2),
    cin=st.integers(1, 4),
    cout=st.integers(1, 3),
    size=st.integers(3, 6),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    operator=st.sampled_from(OPERATORS),
    log_w_scale=st.floats(-1.0, 3.0),
    log_x_scale=st.floats(-1.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_sphere_conv2d_is_scale_invariant(
    batch, cin, cout, size, kernel, stride, operator, log_w_scale, log_x_scale, seed
):
    torch.manual_seed(seed)
    kernel = min(kernel, size)
    layer = SphereConv2d(cin, cout, kernel, stride=stride, operator=operator, dtype=F64)
    x = torch.randn(batch, cin, size, size, dtype=F64)
    w = layer.weight.detach().clone()
    sw, sx = 10.0**log_w_scale, 10.0**log_x_scale
    with torch.no_grad():
        out = layer(x)
        layer.weight.mul_(sw)
        scaled = layer(sx * x)
    k = layer.effective_k().reshape(-1, 1, 1) if operator == "learnable_sigmoid" else layer.sigmoid_k
    # eps-free cosine and the smallest shrink factor eps causes in either evaluation
    c0, xn, wn = ref.patch_cosines(x, w, stride=stride, eps=0.0)
    wn = wn.reshape(-1, 1, 1)
    r = lambda a, b: 1 / torch.sqrt((1 + 1e-4 / (a * wn) ** 2) * (1 + 1e-4 / (b * xn) ** 2))  # noqa: E731
    r_min = torch.minimum(r(1.0, 1.0), r(sw, sx))
    bound = eps_bound(c0, r_min, operator, k)
    assert ((scaled - out).abs() <= bound + 1e-12).all(), float(((scaled - out).abs() - bound).max())


@settings(max_examples=15, deadline=None)
@given(
    operator=st.sampled_from(OPERATORS),
    log_w_scale=st.floats(-1.0, 3.0),
    log_x_scale=st.floats(-1.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_sphere_linear_and_pure_sphere_norm_are_scale_invariant(operator, log_w_scale, log_x_scale, seed):
    # eps = 1e-12 makes the eps effect negligible: the outputs must agree to float64 rounding noise.
    torch.manual_seed(seed)
    sw, sx = 10.0**log_w_scale, 10.0**log_x_scale
    for layer, x in (
        (SphereLinear(6, 4, operator=operator, eps=1e-12, dtype=F64), torch.randn(3, 6, dtype=F64)),
        (
            SphereNorm2d(3, 4, 2, operator=operator, eps=1e-12, learn_magnitude=False, dtype=F64),
            torch.randn(2, 3, 4, 4, dtype=F64),
        ),
    ):
        with torch.no_grad():
            out = layer(x)
            layer.weight.mul_(sw)
            torch.testing.assert_close(layer(sx * x), out, rtol=1e-7, atol=1e-7)


def test_plain_convolution_is_not_scale_invariant_but_sphere_conv_is():
    # Guard against a vacuous property: the same scaling changes a plain convolution by the factor.
    torch.manual_seed(0)
    layer = SphereConv2d(3, 4, 3, operator="cosine", dtype=F64)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    with torch.no_grad():
        plain = torch.nn.functional.conv2d(x, layer.weight)
        torch.testing.assert_close(torch.nn.functional.conv2d(7 * x, layer.weight), 7 * plain)
        torch.testing.assert_close(layer(7 * x), layer(x), rtol=1e-5, atol=1e-5)
