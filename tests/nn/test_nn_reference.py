"""Every operator equals the slow per-patch computation (float64, 1e-10 relative) and the g values of
the reference table below (values of g computed from the paper's Sec. 2.1 formulas)."""

from __future__ import annotations

import math

import nn_reference as ref
import pytest
import torch

from sphereconv.nn import (
    DecoupledConv2d,
    SphereConv1d,
    SphereConv2d,
    SphereConv3d,
    SphereLinear,
    SphereNorm2d,
    decoupled_conv2d,
)
from sphereconv.nn import (
    functional as SF,
)
from sphereconv.nn.angular import angle_to_g, angular_function

OPERATORS = ["linear", "cosine", "sigmoid", "learnable_sigmoid"]
RTOL = 1e-10


def assert_matches(actual, expected):
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * float(scale))


# Layer geometries: stride 2, padding, dilation 2, groups > 1, every padding mode, unbatched input.
CONFIGS_2D = [
    dict(cin=3, cout=4, k=3, stride=1, padding=0, dilation=1, groups=1, mode="zeros", hw=(7, 6)),
    dict(cin=3, cout=5, k=3, stride=2, padding=1, dilation=1, groups=1, mode="zeros", hw=(8, 9)),
    dict(cin=4, cout=6, k=(3, 2), stride=(1, 2), padding=(2, 1), dilation=2, groups=2, mode="reflect", hw=(9, 8)),
    dict(cin=6, cout=3, k=3, stride=2, padding=1, dilation=(2, 1), groups=3, mode="replicate", hw=(8, 7)),
    dict(cin=2, cout=4, k=3, stride=1, padding=(1, 2), dilation=1, groups=2, mode="circular", hw=(6, 6)),
    dict(cin=3, cout=2, k=2, stride=2, padding=1, dilation=2, groups=1, mode="zeros", hw=(7, 7), unbatched=True),
]


def _layer_input(cfg, seed):
    torch.manual_seed(seed)
    shape = (cfg["cin"], *cfg["hw"]) if cfg.get("unbatched") else (2, cfg["cin"], *cfg["hw"])
    return torch.randn(shape, dtype=torch.float64)


def _conv_kwargs(cfg):
    return dict(
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        groups=cfg["groups"],
        padding_mode=cfg["mode"],
    )


def _batched(x, cfg):
    return x.unsqueeze(0) if cfg.get("unbatched") else x


def _unbatched(y, cfg):
    return y.squeeze(0) if cfg.get("unbatched") else y


@pytest.mark.parametrize("cfg", CONFIGS_2D, ids=lambda c: f"{c['mode']}-s{c['stride']}-g{c['groups']}")
@pytest.mark.parametrize("operator", OPERATORS)
def test_sphere_conv2d_layer_matches_per_patch_reference(cfg, operator, impl):
    x = _layer_input(cfg, seed=0)
    layer = SphereConv2d(
        cfg["cin"], cfg["cout"], cfg["k"], **_conv_kwargs(cfg), operator=operator, sigmoid_k=0.45, dtype=torch.float64
    )
    if layer.sigmoid_k_raw is not None:
        with torch.no_grad():  # distinct learnt k per channel
            layer.sigmoid_k_raw.copy_(torch.linspace(-0.9, 1.3, cfg["cout"], dtype=torch.float64))
    k = layer.effective_k().detach() if operator == "learnable_sigmoid" else 0.45
    expected = ref.sphere_conv_reference(_batched(x, cfg), layer.weight.detach(), operator, k, **{**_conv_kwargs(cfg)})
    assert_matches(layer(x).detach(), _unbatched(expected, cfg))


@pytest.mark.parametrize("operator", ["linear", "sigmoid"])
def test_functional_conv2d_with_per_channel_k_and_bias_matches_reference(operator, impl):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 7, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    k = torch.linspace(0.1, 0.9, 6, dtype=torch.float64)
    out = SF.sphere_conv2d(x, w, b, stride=2, padding=(1, 2), dilation=(2, 1), groups=2, operator=operator, sigmoid_k=k)
    expected = ref.sphere_conv_reference(x, w, operator, k, stride=2, padding=(1, 2), dilation=(2, 1), groups=2)
    assert_matches(out, expected + b.reshape(-1, 1, 1))


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("operator", OPERATORS)
def test_sphere_conv1d_matches_reference(mode, operator, impl):
    torch.manual_seed(2)
    layer = SphereConv1d(
        4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode=mode, operator=operator, dtype=torch.float64
    )
    x = torch.randn(3, 4, 11, dtype=torch.float64)
    k = layer.effective_k().detach() if operator == "learnable_sigmoid" else 0.3
    expected = ref.sphere_conv_reference(
        x, layer.weight.detach(), operator, k, stride=2, padding=2, dilation=2, groups=2, padding_mode=mode
    )
    assert_matches(layer(x).detach(), expected)
    assert_matches(layer(x[0]).detach(), expected[0])  # unbatched


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("operator", OPERATORS)
def test_sphere_conv3d_matches_reference(mode, operator, impl):
    torch.manual_seed(3)
    layer = SphereConv3d(
        2,
        4,
        (2, 3, 2),
        stride=(1, 2, 1),
        padding=1,
        dilation=(1, 1, 2),
        groups=2,
        padding_mode=mode,
        operator=operator,
        dtype=torch.float64,
    )
    x = torch.randn(2, 2, 4, 6, 5, dtype=torch.float64)
    k = layer.effective_k().detach() if operator == "learnable_sigmoid" else 0.3
    expected = ref.sphere_conv_reference(
        x,
        layer.weight.detach(),
        operator,
        k,
        stride=(1, 2, 1),
        padding=1,
        dilation=(1, 1, 2),
        groups=2,
        padding_mode=mode,
    )
    assert_matches(layer(x).detach(), expected)
    assert_matches(layer(x[1]).detach(), expected[1])


@pytest.mark.parametrize("operator", OPERATORS)
def test_sphere_linear_matches_reference(operator, impl):
    torch.manual_seed(4)
    layer = SphereLinear(7, 5, bias=True, operator=operator, dtype=torch.float64)
    x = torch.randn(3, 2, 7, dtype=torch.float64)
    k = layer.effective_k().detach() if operator == "learnable_sigmoid" else 0.3
    expected = ref.sphere_linear_reference(x, layer.weight.detach(), operator, k) + layer.bias.detach()
    assert_matches(layer(x).detach(), expected)
    assert_matches(layer(x[0, 0]).detach(), expected[0, 0])  # a single vector


@pytest.mark.parametrize("cfg", CONFIGS_2D, ids=lambda c: f"{c['mode']}-s{c['stride']}-g{c['groups']}")
@pytest.mark.parametrize("operator", ["cosine", "sigmoid"])
def test_sphere_norm2d_matches_reference(cfg, operator):
    x = _layer_input(cfg, seed=5)
    layer = SphereNorm2d(
        cfg["cin"], cfg["cout"], cfg["k"], **_conv_kwargs(cfg), bias=True, operator=operator, dtype=torch.float64
    )
    torch.manual_seed(6)
    with torch.no_grad():
        for p in (layer.gamma, layer.beta, layer.magnitude_logit, layer.bias):
            p.copy_(torch.randn_like(p))
    cos, xn, wn = ref.patch_cosines(_batched(x, cfg), layer.weight.detach(), **_conv_kwargs(cfg))
    view = lambda v: ref.channel_view(v.detach(), cos)  # noqa: E731
    s = torch.sigmoid(view(layer.magnitude_logit))
    expected = view(layer.gamma) * (s * view(wn) * xn + 1 - s) * ref.g_of_cosine(cos, operator) + view(layer.beta)
    expected = expected + view(layer.bias)
    assert_matches(layer(x).detach(), _unbatched(expected, cfg))


MAGNITUDES = ["sphere", "ball", "tanh", "linear", "seg", "log", "mix"]
DECOUPLED_OPERATORS = ["linear", "cosine", "sigmoid", "square_cosine"]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("operator", DECOUPLED_OPERATORS)
@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_decoupled_conv2d_matches_reference(magnitude, operator, weighted):
    torch.manual_seed(7)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    alpha, beta = torch.linspace(0.5, 2.0, 6, dtype=torch.float64), -0.3
    rho = 2.5  # patch norms here spread around 3, so ball/seg see both branches
    out = decoupled_conv2d(
        x,
        w,
        stride=(2, 1),
        padding=1,
        dilation=(1, 2),
        groups=2,
        magnitude=magnitude,
        operator=operator,
        weighted=weighted,
        alpha=alpha,
        beta=beta,
        rho=rho,
        sigmoid_k=0.6,
    )
    cos, xn, wn = ref.patch_cosines(x, w, stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    if magnitude in ("ball", "seg"):
        assert (xn < rho).any() and (xn > rho).any()
    h = ref.magnitude_reference(xn, magnitude, ref.channel_view(alpha, cos), beta, rho)
    if weighted:
        h = h * ref.channel_view(wn, cos)
    assert_matches(out, h * ref.g_of_cosine(cos, operator, 0.6))


@pytest.mark.parametrize("magnitude", ["ball", "tanh", "seg"])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
def test_learnable_decoupled_layer_matches_reference_in_train_and_eval(magnitude, mode):
    torch.manual_seed(8)
    layer = DecoupledConv2d(
        3,
        4,
        3,
        padding=1,
        padding_mode=mode,
        bias=True,
        magnitude=magnitude,
        operator="cosine",
        learnable=True,
        dtype=torch.float64,
    )
    with torch.no_grad():
        layer.radius.copy_(torch.tensor([0.5, 1.0, 1.5, -2.0]))
        layer.alpha.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
        layer.bias.copy_(torch.randn(4))
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    cos, xn, _ = ref.patch_cosines(x, layer.weight.detach(), padding=1, padding_mode=mode)
    view = lambda v: ref.channel_view(v.detach(), cos)  # noqa: E731
    beta = view(layer.beta) if magnitude == "seg" else 0.0

    def expected(mean):
        rho = (view(layer.radius) ** 2 + 1e-4) * view(mean)
        return ref.magnitude_reference(xn, magnitude, view(layer.alpha), beta, rho) * cos + view(layer.bias)

    batch_mean = xn.mean(dim=(0, 2, 3))
    assert_matches(layer(x).detach(), expected(batch_mean))  # training: the batch's own mean |x|
    # The first update of the bias-corrected running average is the batch mean itself.
    torch.testing.assert_close(layer.x_norm_estimate(), batch_mean, rtol=1e-12, atol=0)
    layer(2 * x)
    second_mean = ref.patch_cosines(2 * x, layer.weight.detach(), padding=1, padding_mode=mode)[1].mean(dim=(0, 2, 3))
    layer.eval()
    m = layer.momentum
    running = ((1 - m) * m * batch_mean + m * second_mean) / (1 - (1 - m) ** 2)
    assert_matches(layer(x).detach(), expected(running))  # eval: the running average


def test_untrained_learnable_layer_uses_unit_mean_in_eval():
    layer = DecoupledConv2d(2, 3, 3, magnitude="tanh", learnable=True, dtype=torch.float64).eval()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    cos, xn, _ = ref.patch_cosines(x, layer.weight.detach())
    assert_matches(layer(x).detach(), torch.tanh(xn / (1 + 1e-4)) * cos)
    assert int(layer.num_batches_tracked) == 0  # eval never updates the statistics


# Reference table of g (paper Sec. 2.1 formulas, evaluated independently):
# theta -> (linear, cosine, sigmoid k=0.1, 0.3, 0.7, 0.75).
REFERENCE_TABLE = {
    math.pi / 6: (0.666667, 0.866025, 0.999944, 0.950909, 0.784341, 0.772601),
    math.pi / 3: (0.333333, 0.5, 0.989414, 0.710245, 0.442288, 0.429795),
    2 * math.pi / 3: (-0.333333, -0.5, -0.989414, -0.710245, -0.442288, -0.429795),
}
COLUMNS = [("linear", None), ("cosine", None), ("sigmoid", 0.1), ("sigmoid", 0.3), ("sigmoid", 0.7), ("sigmoid", 0.75)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("column", range(len(COLUMNS)))
def test_g_hits_reference_table(column, dtype):
    operator, k = COLUMNS[column]
    thetas = torch.tensor(list(REFERENCE_TABLE), dtype=dtype)
    expected = torch.tensor([row[column] for row in REFERENCE_TABLE.values()], dtype=torch.float64)
    kwargs = {} if k is None else {"sigmoid_k": k}
    from_angle = angle_to_g(thetas, operator, **kwargs).double()
    from_cosine = angular_function(torch.cos(thetas), operator, **kwargs).double()
    torch.testing.assert_close(from_angle, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_cosine, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid", "square_cosine"])
def test_g_endpoints_and_monotone(operator):
    theta = torch.linspace(0, math.pi, 721, dtype=torch.float64)
    g = angle_to_g(theta, operator, sigmoid_k=0.3)
    torch.testing.assert_close(
        g[[0, 360, 720]], torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert (g.diff() < 0).all()
    torch.testing.assert_close(g, ref.g_of_angle(theta, operator, 0.3), rtol=1e-12, atol=1e-12)
