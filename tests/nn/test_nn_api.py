"""API contract of ``sphereconv.nn``: argument validation, state-dict compatibility with plain
convolutions, exports and docstrings."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from torch import nn

import sphereconv.nn as snn
from sphereconv.nn import (
    DecoupledConv2d,
    SphereConv1d,
    SphereConv2d,
    SphereConv3d,
    SphereLinear,
    SphereNorm2d,
    decoupled_conv2d,
)
from sphereconv.nn import functional as SF

LAYERS = {
    "conv2d": lambda **kw: SphereConv2d(3, 4, 3, **kw),
    "linear": lambda **kw: SphereLinear(3, 4, **kw),
    "norm2d": lambda **kw: SphereNorm2d(3, 4, 3, **kw),
    "decoupled": lambda **kw: DecoupledConv2d(3, 4, 3, **kw),
}


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("make", list(LAYERS.values()), ids=list(LAYERS))
def test_unknown_operator_names_value_and_allowed_set(make):
    with pytest.raises(ValueError, match=r"'tangent'.*linear, cosine, sigmoid, learnable_sigmoid"):
        make(operator="tangent")
    with pytest.raises(TypeError, match=r"invalid operator=3: expected one of linear, cosine"):
        make(operator=3)


def test_unknown_operator_in_functional_forms():
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match=r"invalid operator='tangent': expected one of linear, cosine"):
        SF.sphere_conv2d(x, w, operator="tangent")
    sphere_operators = r"expected one of linear, cosine, sigmoid, learnable_sigmoid \("
    with pytest.raises(ValueError, match=rf"'square_cosine': {sphere_operators}"):
        SF.sphere_conv2d(x, w, operator="square_cosine")  # a decoupled-only g
    with pytest.raises(ValueError, match=r"'tangent'"):
        SF.sphere_linear(torch.randn(2, 3), torch.randn(4, 3), operator="tangent")
    with pytest.raises(ValueError, match=r"'tangent'.*square_cosine"):
        decoupled_conv2d(x, w, operator="tangent")


@pytest.mark.parametrize("bad", [0, -0.3, float("nan")])
@pytest.mark.parametrize("make", list(LAYERS.values()), ids=list(LAYERS))
def test_non_positive_sigmoid_k_and_eps_are_rejected(make, bad):
    with pytest.raises(ValueError, match=rf"invalid sigmoid_k={bad!r}: expected a number > 0"):
        make(operator="sigmoid", sigmoid_k=bad)
    with pytest.raises(ValueError, match=rf"invalid eps={bad!r}: expected a number > 0"):
        make(eps=bad)


def test_functional_k_and_eps_validation():
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match=r"invalid sigmoid_k=\[0.5, 0.0, 0.5, 0.5\]: expected positive finite values"):
        SF.sphere_conv2d(x, w, operator="sigmoid", sigmoid_k=torch.tensor([0.5, 0.0, 0.5, 0.5]))
    with pytest.raises(ValueError, match=r"invalid eps=0: expected a number > 0"):
        SF.sphere_conv2d(x, w, eps=0)
    with pytest.raises(ValueError, match=r"invalid eps=-1: expected a number > 0"):
        decoupled_conv2d(x, w, eps=-1)
    with pytest.raises(TypeError, match=r"invalid sigmoid_k='0.3': expected a number > 0"):
        SF.sphere_linear(torch.randn(2, 3), torch.randn(4, 3), operator="sigmoid", sigmoid_k="0.3")


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("shape", [(5, 5), (1, 1, 3, 5, 5)])
def test_wrong_input_rank_names_the_shape(mode, shape):
    for layer in (
        SphereConv2d(3, 4, 3, padding=1, padding_mode=mode),
        SphereNorm2d(3, 4, 3, padding=1, padding_mode=mode),
        DecoupledConv2d(3, 4, 3, padding=1, padding_mode=mode),
    ):
        with pytest.raises(ValueError, match=rf"input must have 4 dimensions.*got shape {re.escape(str(shape))}"):
            layer(torch.randn(shape))


def test_wrong_input_rank_in_1d_3d_and_linear():
    with pytest.raises(ValueError, match=r"input must have 3 dimensions .* got shape \(2, 3, 4, 4\)"):
        SphereConv1d(3, 4, 3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"input must have 5 dimensions .* got shape \(3, 4\)"):
        SphereConv3d(3, 4, 3)(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"in_features = 3; got shape \(2, 5\)"):
        SphereLinear(3, 4)(torch.randn(2, 5))


@pytest.mark.parametrize(
    "make",
    [
        lambda: SphereConv2d(3, 4, 3),
        lambda: SphereNorm2d(3, 4, 3),
        lambda: DecoupledConv2d(3, 4, 3),
        lambda: SphereConv2d(4, 4, 3, groups=2),
    ],
)
def test_channel_mismatch_names_both_counts(make):
    layer = make()
    with pytest.raises(ValueError, match=r"input has 5 channels but weight expects in_channels = \d x groups \d = \d"):
        layer(torch.randn(2, 5, 6, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [1, 2, 5])
@pytest.mark.parametrize("call", ["conv2d", "linear", "decoupled"])
def test_bias_of_the_wrong_size_is_rejected_on_every_path(call, size, dtype, impl):
    # A bias with other than one value per output channel must not be broadcast, cut short or read
    # past (the fused kernels read one value per channel): the error names the shape and the count.
    x, w = torch.randn(2, 4, 5, 5, dtype=dtype), torch.randn(3, 4, 3, 3, dtype=dtype)
    forms = {
        "conv2d": lambda b: SF.sphere_conv2d(x, w, b, operator="linear"),
        "linear": lambda b: SF.sphere_linear(x.flatten(1)[:, :4], w.flatten(1)[:, :4], b),
        "decoupled": lambda b: decoupled_conv2d(x, w, b),
    }
    expected = rf"bias must be 1-d with one value per output channel \(3\); got shape \({size},\)"
    with pytest.raises(ValueError, match=expected):
        forms[call](torch.ones(size, dtype=dtype))
    with pytest.raises(ValueError, match=r"got shape \(3, 1\)"):
        forms[call](torch.ones(3, 1, dtype=dtype))
    assert forms[call](torch.ones(3, dtype=dtype)).shape[1] == 3


def test_unknown_magnitude_and_bad_decoupled_coefficients():
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    allowed = r"expected one of sphere, ball, tanh, linear, seg, log, mix"
    with pytest.raises(ValueError, match=rf"invalid magnitude='cube': {allowed}"):
        DecoupledConv2d(3, 4, 3, magnitude="cube")
    with pytest.raises(ValueError, match=rf"invalid magnitude='cube': {allowed}"):
        decoupled_conv2d(x, w, magnitude="cube")
    with pytest.raises(TypeError, match=rf"invalid magnitude=None: {allowed}"):
        decoupled_conv2d(x, w, magnitude=None)
    with pytest.raises(ValueError, match=r"invalid rho=-1.0: expected a number > 0"):
        DecoupledConv2d(3, 4, 3, magnitude="ball", rho=-1.0)
    with pytest.raises(ValueError, match=r"invalid rho=\[1.0, 0.0, 1.0, 1.0\]: expected positive finite values"):
        decoupled_conv2d(x, w, magnitude="tanh", rho=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"invalid alpha=inf: expected a finite number"):
        decoupled_conv2d(x, w, alpha=float("inf"))
    with pytest.raises(TypeError, match=r"invalid weighted=1: expected true or false"):
        DecoupledConv2d(3, 4, 3, weighted=1)
    with pytest.raises(ValueError, match=r"invalid momentum=0: expected a number in \(0, 1\]"):
        DecoupledConv2d(3, 4, 3, momentum=0)
    with pytest.raises(ValueError, match=r"alpha has 3 values; expected 1 or out_channels = 4"):
        decoupled_conv2d(x, w, alpha=torch.ones(3))


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (1.0, ValueError), (-0.5, ValueError), (True, TypeError)])
def test_sphere_norm_magnitude_init_must_lie_in_open_unit_interval(bad, error):
    with pytest.raises(error, match=rf"invalid magnitude_init={bad!r}: expected a number in \(0, 1\)"):
        SphereNorm2d(3, 4, 3, magnitude_init=bad)


# ---------------------------------------------------------------- state dicts


@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid", "learnable_sigmoid"])
def test_plain_conv_state_dict_loads_into_sphere_conv(operator):
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 4, 3, bias=False)
    layer = SphereConv2d(3, 4, 3, operator=operator)
    result = layer.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.weight, plain.weight)
    if operator == "learnable_sigmoid":
        assert torch.equal(layer.sigmoid_k_raw.detach(), torch.full((4,), 0.7))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(
        layer(x), SF.sphere_conv2d(x, plain.weight, operator=operator, sigmoid_k=layer.effective_k())
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: SphereConv2d(3, 4, 3, operator="learnable_sigmoid"),
        lambda: SphereNorm2d(3, 4, 3, operator="learnable_sigmoid"),
        lambda: SphereNorm2d(3, 4, 3, learn_magnitude=False),
        lambda: DecoupledConv2d(3, 4, 3, magnitude="seg", learnable=True, operator="learnable_sigmoid"),
        lambda: DecoupledConv2d(3, 4, 3, magnitude="mix"),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_state_dicts_are_compatible_both_ways(make, bias):
    torch.manual_seed(1)
    layer = make()
    if bias:  # same layer with a bias, matching a plain Conv2d(bias=True)
        layer.bias = nn.Parameter(torch.zeros(4))
    plain = nn.Conv2d(3, 4, 3, bias=bias)
    initial = {k: v.clone() for k, v in layer.state_dict().items() if k not in plain.state_dict()}
    layer.load_state_dict(plain.state_dict(), strict=True)  # plain -> sphere: extras keep their init
    for key, value in layer.state_dict().items():
        if key in initial:
            assert torch.equal(value, initial[key]), key
        else:
            assert torch.equal(value, plain.state_dict()[key]), key
    # sphere -> plain: every shared key has the same shape; only the extras are unexpected
    back = nn.Conv2d(3, 4, 3, bias=bias)
    result = back.load_state_dict(layer.state_dict(), strict=False)
    assert not result.missing_keys
    assert sorted(result.unexpected_keys) == sorted(initial)
    assert torch.equal(back.weight, layer.weight)


def test_loading_still_rejects_wrong_shapes_and_unknown_keys():
    layer = SphereNorm2d(3, 4, 3)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        layer.load_state_dict(nn.Conv2d(3, 5, 3, bias=False).state_dict())
    state = dict(nn.Conv2d(3, 4, 3, bias=False).state_dict(), stray=torch.zeros(1))
    with pytest.raises(RuntimeError, match="Unexpected key.*stray"):
        layer.load_state_dict(state)


def test_sphere_state_dict_round_trip_keeps_learnt_extras():
    torch.manual_seed(2)
    source = DecoupledConv2d(3, 4, 3, magnitude="tanh", learnable=True)
    source(torch.randn(2, 3, 5, 5))  # one running-average update
    with torch.no_grad():
        source.radius.mul_(3.0)
    target = DecoupledConv2d(3, 4, 3, magnitude="tanh", learnable=True)
    target.load_state_dict(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert int(target.num_batches_tracked) == 1


# ---------------------------------------------------------------- exports and docs


def test_exports():
    assert snn.MAGNITUDES == ("sphere", "ball", "tanh", "linear", "seg", "log", "mix")
    for name in snn.__all__:
        assert hasattr(snn, name), name
    for name in ("SphereNorm2d", "DecoupledConv2d", "decoupled_conv2d", "sphere_conv2d", "sphere_cosine"):
        assert name in snn.__all__
    assert isinstance(SphereNorm2d(3, 4, 3), snn.SPHERE_CONV_TYPES)  # penalties apply to SphereNorm too
    assert not isinstance(DecoupledConv2d(3, 4, 3), snn.SPHERE_CONV_TYPES)


_MODULES = [snn.angular, snn.functional, snn.conv, snn.norm, snn.decoupled]


def _public_objects():
    for module in _MODULES:
        for name, obj in vars(module).items():
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if obj.__module__ != module.__name__:
                continue  # imported from elsewhere
            yield f"{module.__name__}.{name}", obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and inspect.isfunction(member):
                        yield f"{module.__name__}.{name}.{attr}", member


@pytest.mark.parametrize("qualname,obj", list(_public_objects()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_objects_have_docstrings(qualname, obj):
    assert inspect.getdoc(obj), f"{qualname} has no docstring"


@pytest.mark.parametrize("module", _MODULES, ids=lambda m: m.__name__)
def test_module_docstrings_cite_the_paper(module):
    doc = module.__doc__ or ""
    assert "Liu et al." in doc or "Sec." in doc, module.__name__


@pytest.mark.parametrize(
    "obj", [SF.sphere_conv2d, snn.decoupled_conv2d, snn.magnitude_function, SphereConv2d, SphereNorm2d, DecoupledConv2d]
)
def test_operator_docstrings_state_formula_and_section(obj):
    doc = inspect.getdoc(obj)
    assert "=" in doc and "Sec" in doc, obj


@pytest.mark.parametrize(
    "make",
    [
        lambda: SphereConv2d(3, 4, 3, bias=True, operator="learnable_sigmoid"),
        lambda: SphereLinear(3, 4, operator="learnable_sigmoid"),
        lambda: SphereNorm2d(3, 4, 3, operator="learnable_sigmoid", magnitude_init=0.3),
        lambda: SphereNorm2d(3, 4, 3, learn_magnitude=False),
        lambda: DecoupledConv2d(3, 4, 3, magnitude="seg", learnable=True, alpha=2.0, operator="learnable_sigmoid"),
        lambda: DecoupledConv2d(3, 4, 3, magnitude="mix", learnable=True, beta=0.25),
    ],
    ids=["conv", "linear", "norm", "norm-no-magnitude", "decoupled-seg", "decoupled-mix"],
)
def test_reset_parameters_restores_every_extra_to_its_initial_value(make):
    # reset_parameters() of a torch layer re-initialises all of its state; the extras kept their
    # trained values (and the decoupled layer its running mean).
    torch.manual_seed(9)
    layer = make()
    initial = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 3, 5, 5) if not isinstance(layer, SphereLinear) else torch.randn(2, 3)
    layer(x).sum().backward()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5)
    layer.reset_parameters()
    for key, value in layer.state_dict().items():
        if key in ("weight", "bias"):  # drawn afresh, as by the torch layer
            assert not torch.equal(value, initial[key] + 0.5), key
        else:
            assert torch.equal(value, initial[key]), key
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize(
    "call",
    [
        lambda x: SphereConv2d(3, 4, 1)(x),
        lambda x: SphereConv2d(3, 4, 1, padding=1, padding_mode="reflect")(x),
        lambda x: SphereNorm2d(3, 4, 1)(x),
        lambda x: DecoupledConv2d(3, 4, 1)(x),
        lambda x: SphereLinear(5, 4)(x),
        lambda x: SF.sphere_conv2d(x, torch.randn(4, 3, 1, 1), impl="reference"),
    ],
    ids=["conv", "conv-reflect", "norm", "decoupled", "linear", "functional"],
)
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_floating_input_names_its_dtype(call, dtype):
    # torch's own errors spoke of a failed cast, a bool negation or an unimplemented max.
    x = torch.ones(2, 3, 5, 5).to(dtype)
    with pytest.raises(TypeError, match=f"floating-point tensors; got {dtype}"):
        call(x)


@pytest.mark.parametrize(
    "call",
    [
        lambda: SphereLinear(2, 3)([1.0, 2.0]),
        lambda: SF.sphere_linear(torch.ones(2), [[1.0, 2.0]]),
        lambda: SF.sphere_conv2d(torch.ones(1, 1, 3, 3), [[[[1.0]]]]),
    ],
)
def test_non_tensor_arguments_are_a_type_error(call):
    with pytest.raises(TypeError, match="input and weight must be tensors; got"):
        call()


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: SphereConv2d(3, 4, 3, **kw),
        lambda **kw: SphereNorm2d(3, 4, 3, **kw),
        lambda **kw: DecoupledConv2d(3, 4, 3, **kw),
        lambda **kw: lambda x: SF.sphere_conv2d(x, torch.randn(4, 3, 3, 3), impl="reference", **kw),
        lambda **kw: lambda x: decoupled_conv2d(x, torch.randn(4, 3, 3, 3), **kw),
    ],
    ids=["conv", "norm", "decoupled", "reference", "decoupled-functional"],
)
@pytest.mark.parametrize(
    "kwargs, shape, message",
    [
        ({"stride": 0}, (2, 3, 6, 6), r"stride and dilation must be positive; got stride=\(?0"),
        ({"dilation": (1, 0)}, (2, 3, 6, 6), r"stride and dilation must be positive; got .*dilation=\(1, 0\)"),
        ({"padding": -1}, (2, 3, 6, 6), r"padding must be non-negative; got \(?-1"),
        ({}, (2, 3, 2, 6), r"input spatial size \(2, 6\) .* smaller than the dilated kernel \(3, 3\)"),
        ({"padding": 1}, (2, 3, 0, 6), r"input spatial size \(0, 6\) \(padded by \(1, 1\)\) is smaller than"),
    ],
    ids=["stride", "dilation", "padding", "kernel", "empty-spatial"],
)
def test_impossible_geometry_is_one_line_on_every_path(make, kwargs, shape, message):
    # SphereNorm, the decoupled layers and the reference path handed these to torch, whose errors
    # name no value ("non-positive stride is not supported") or come from an empty amax.
    with pytest.raises(ValueError, match=message):
        make(**kwargs)(torch.randn(*shape))


@pytest.mark.parametrize(
    "make, shown, hidden",
    [
        (lambda: DecoupledConv2d(3, 4, 3, magnitude="tanh", rho=2.5, alpha=0.5), ["rho=2.5", "alpha=0.5"], ["beta"]),
        (lambda: DecoupledConv2d(3, 4, 3, magnitude="seg", beta=0.25), ["beta=0.25"], ["alpha", "rho"]),
        (lambda: DecoupledConv2d(3, 4, 3, magnitude="ball", learnable=True, momentum=0.1), ["momentum=0.1"], ["rho"]),
        (lambda: DecoupledConv2d(3, 4, 3, magnitude="mix"), [], ["alpha", "beta", "rho", "momentum"]),
        (lambda: SphereNorm2d(3, 4, 3, magnitude_init=0.5), ["magnitude_init=0.5"], []),
        (lambda: SphereNorm2d(3, 4, 3), [], ["magnitude_init"]),
    ],
)
def test_repr_shows_the_non_default_coefficients(make, shown, hidden):
    # Two layers printed alike computed different functions (rho=1 and rho=2.5 looked the same).
    text = repr(make())
    for part in shown:
        assert part in text, text
    for part in hidden:
        assert part + "=" not in text, text


@pytest.mark.parametrize(
    "sphere, plain, args, shape",
    [
        (snn.SphereLinear, nn.Linear, (0, 3), (2, 0)),
        (snn.SphereConv1d, nn.Conv1d, (0, 3, 3), (2, 0, 5)),
        (snn.SphereConv2d, nn.Conv2d, (0, 3, 3), (2, 0, 5, 5)),
    ],
)
@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid", "learnable_sigmoid"])
@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_no_inputs_per_output_gives_the_bias_as_the_plain_layer(sphere, plain, args, shape, operator, impl):
    # torch's layers accept in_features / in_channels 0; the angle of an empty vector is that of a
    # zero vector (cosine 0, g(0) = 0), so the output is the bias. It raised an IndexError.
    torch.manual_seed(0)
    layer = sphere(*args, bias=True, operator=operator)
    reference = plain(*args, bias=True)
    reference.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(*shape, requires_grad=True)
    with SF.use_reference_impl(impl == "reference"):
        out = layer(x)
    expected = reference(x)
    assert out.shape == expected.shape and torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    assert torch.equal(layer.bias.grad, reference.bias.grad)
