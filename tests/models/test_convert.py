"""convert_model: plain layers of any network become Sphere layers in place, keeping weights."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from sphereconv.models import convert_model, create_model
from sphereconv.nn import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear
from sphereconv.nn import functional as SF


class TorchvisionStyleBlock(nn.Module):
    """A basic block laid out like torchvision's (conv1/bn1/conv2/bn2/downsample)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchvisionStyleResNet(nn.Module):
    """A small network with torchvision ResNet's module names: conv1, bn1, layer1..2, avgpool, fc."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(TorchvisionStyleBlock(8, 8, 1), TorchvisionStyleBlock(8, 8, 1))
        self.layer2 = nn.Sequential(TorchvisionStyleBlock(8, 16, 2), TorchvisionStyleBlock(16, 16, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def conv_names(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_converts_every_conv_keeps_weights_and_skips_the_classifier():
    model = TorchvisionStyleResNet()
    before = conv_names(model)
    weights = {name: m.weight for name, m in before.items()}
    fc = model.fc
    result = convert_model(model, "cosine")
    assert result is model
    after = conv_names(model)
    assert after.keys() == before.keys()
    for name, layer in after.items():
        assert layer.weight is weights[name]  # the very same Parameter
        if name == "fc":
            assert layer is fc and type(layer) is nn.Linear
        else:
            assert isinstance(layer, SphereConv2d) and layer.operator == "cosine"
            old = before[name]
            assert (layer.kernel_size, layer.stride, layer.padding) == (old.kernel_size, old.stride, old.padding)
    assert len(after) == 1 + 8 + 1 + 1  # stem, 2 per block, one downsample, fc
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    out.sum().backward()
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_converted_layer_computes_sphereconv_of_the_original_filters():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=True, padding_mode="reflect")
    wrapper = nn.Sequential(conv, nn.Flatten(), nn.Linear(6 * 5 * 5, 3))  # 9x9 input -> 5x5 maps
    convert_model(wrapper, "sigmoid", sigmoid_k=0.5)
    sphere = wrapper[0]
    assert isinstance(sphere, SphereConv2d)
    assert (sphere.groups, sphere.dilation, sphere.padding_mode, sphere.sigmoid_k) == (2, (2, 2), "reflect", 0.5)
    x = torch.randn(2, 4, 9, 9)
    padded = nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    expected = SF.sphere_conv2d(padded, conv.weight, conv.bias, 2, 0, 2, 2, operator="sigmoid", sigmoid_k=0.5)
    torch.testing.assert_close(sphere(x), expected)


def test_converted_resnet18_equals_the_native_sphere_resnet18():
    """Converting the plain ResNet-18's residual branches gives exactly SphereResNet-18."""
    plain = create_model("sphere_resnet18", operator="none", width_mult=0.125).eval()
    native = create_model("sphere_resnet18", operator="cosine", width_mult=0.125).eval()
    convert_model(plain, "cosine", exclude=["stem.*", "*.shortcut.*"])
    assert [type(m) for m in plain.modules()] == [type(m) for m in native.modules()]
    native.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(plain(x), native(x))


def test_classifier_rule_for_a_fully_convolutional_network():
    # The last registered layer is a 1x1 score conv: it stays plain; all convs before it convert.
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 10, 1))
    convert_model(net, "linear")
    assert [type(net[i]) for i in (0, 2, 3)] == [SphereConv2d, SphereConv2d, nn.Conv2d]
    everything = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 10, 1))
    convert_model(everything, "linear", skip_classifier=False)
    assert all(isinstance(m, SphereConv2d) for m in everything)


def test_convert_linear_converts_hidden_linear_layers_but_not_the_classifier():
    mlp = nn.Sequential(nn.Linear(8, 16, bias=True), nn.ReLU(), nn.Linear(16, 4))
    convert_model(mlp)
    assert type(mlp[0]) is nn.Linear  # linear layers only with convert_linear=True
    hidden_weight = mlp[0].weight
    convert_model(mlp, "cosine", convert_linear=True)
    assert isinstance(mlp[0], SphereLinear) and mlp[0].weight is hidden_weight and mlp[0].bias is not None
    assert type(mlp[2]) is nn.Linear
    x = torch.randn(5, 8)
    expected = SF.sphere_linear(x, hidden_weight, mlp[0].bias, operator="cosine")
    torch.testing.assert_close(mlp[0](x), expected)


def test_include_and_exclude_globs_and_predicates():
    model = TorchvisionStyleResNet()
    convert_model(model, include=["layer2.*"], exclude="*.downsample.*")
    converted = {name for name, m in conv_names(model).items() if isinstance(m, SphereConv2d)}
    assert converted == {"layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2"}

    model = TorchvisionStyleResNet()
    convert_model(model, include=lambda name, m: m.kernel_size == (3, 3) and name.endswith("conv2"))
    converted = {name for name, m in conv_names(model).items() if isinstance(m, SphereConv2d)}
    assert converted == {f"layer{i}.{j}.conv2" for i in (1, 2) for j in (0, 1)}


@pytest.mark.parametrize("argument", ["include", "exclude"])
@pytest.mark.parametrize("pattern", ["layer2", "layer2.0", "*.bn1"])
def test_a_pattern_naming_only_containers_is_an_error_not_ignored(argument, pattern):
    # exclude="layer2" used to convert layer2 anyway (and include="layer2" to convert nothing):
    # the pattern matched the stage, never a layer's own name.
    model = TorchvisionStyleResNet()
    before = conv_names(model)
    message = rf"invalid {argument} pattern='{re.escape(pattern)}': expected a pattern matching a convolution"
    with pytest.raises(ValueError, match=message + rf".*write '{re.escape(pattern)}\.\*'"):
        convert_model(model, "cosine", **{argument: pattern})
    assert conv_names(model) == before  # nothing converted


def test_a_stage_pattern_with_a_glob_selects_its_layers():
    model = TorchvisionStyleResNet()
    convert_model(model, "cosine", exclude="layer2.*")
    converted = {name for name, m in conv_names(model).items() if isinstance(m, SphereConv2d)}
    assert converted and not any(name.startswith("layer2") for name in converted)


def test_sphere_layers_and_conv_subclasses_are_left_untouched():
    class StandardisedConv(nn.Conv2d):
        pass

    existing = SphereConv2d(3, 4, 3, operator="sigmoid")
    custom = StandardisedConv(4, 4, 3)
    net = nn.Sequential(existing, custom, nn.Conv2d(4, 4, 1), nn.Linear(4, 2))
    convert_model(net, "cosine")
    assert net[0] is existing and existing.operator == "sigmoid"
    assert net[1] is custom
    assert isinstance(net[2], SphereConv2d) and net[2].operator == "cosine"


def _hook_based(reparametrise):
    def apply(layer):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the hook-based weight_norm is deprecated
            return reparametrise(layer)

    return apply


# The hook-based reparametrisations recompute ``weight`` before every forward; the current
# torch.nn.utils.parametrizations swap the class for a generated ParametrizedConv2d, which the
# exact-type rule once took for a foreign subclass (the layer was skipped in silence).
REPARAMETRISATIONS = [
    (_hook_based(torch.nn.utils.weight_norm), "its weight is recomputed"),
    (_hook_based(torch.nn.utils.spectral_norm), "its weight is recomputed"),
    (torch.nn.utils.parametrizations.weight_norm, r"it is parametrized \(weight "),
    (torch.nn.utils.parametrizations.spectral_norm, r"it is parametrized \(weight "),
]


@pytest.mark.parametrize("reparametrise, reason", REPARAMETRISATIONS)
def test_a_reparametrised_layer_is_reported_by_layer_name(reparametrise, reason):
    normed = reparametrise(nn.Conv2d(4, 4, 1))
    net = nn.Sequential(nn.Conv2d(3, 4, 3), normed, nn.Linear(4, 2))
    with pytest.raises(ValueError, match=rf"cannot convert layer '1' \(Conv2d\): {reason}.*exclude=\['1'\]"):
        convert_model(net, "cosine")
    assert type(net[0]) is nn.Conv2d  # nothing was replaced
    convert_model(net, "cosine", exclude="1")
    assert isinstance(net[0], SphereConv2d) and net[1] is normed
    # A reparametrised classifier is still the classifier, left plain without an error.
    head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), reparametrise(nn.Linear(4, 2)))
    convert_model(head, "cosine", convert_linear=True)
    assert isinstance(head[0], SphereConv2d) and not isinstance(head[2], SphereLinear)


def test_keeps_dtype_device_mode_and_other_dimensions():
    net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Conv3d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.Linear(3, 1)).double().eval()
    convert_model(net, "lr_sigmoid")
    assert [type(m) for m in net[:3]] == [SphereConv1d, SphereConv3d, SphereConv2d]
    for layer in net[:3]:
        assert layer.weight.dtype == torch.float64 and layer.sigmoid_k_raw.dtype == torch.float64
        assert not layer.training


def test_a_shared_layer_is_replaced_everywhere():
    shared = nn.Conv2d(3, 3, 3, padding=1)
    net = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared), "head": nn.Conv2d(3, 2, 1)})
    convert_model(net)
    assert isinstance(net["a"][0], SphereConv2d) and net["a"][0] is net["b"][0]


def test_a_single_layer_is_returned_converted():
    conv = nn.Conv2d(3, 3, 3)
    sphere = convert_model(conv, skip_classifier=False)
    assert isinstance(sphere, SphereConv2d) and sphere.weight is conv.weight
    # A bare layer is no network with a classifier: the default converts it too.
    default = convert_model(nn.Conv2d(3, 3, 3))
    assert isinstance(default, SphereConv2d)
    assert convert_model(nn.Linear(4, 2), convert_linear=True).__class__.__name__ == "SphereLinear"


def test_an_optimizer_built_before_conversion_keeps_training_the_layers():
    model = TorchvisionStyleResNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    convert_model(model, "linear")
    before = model.layer1[0].conv1.weight.detach().clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert not torch.equal(model.layer1[0].conv1.weight, before)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"operator": "none"}, ValueError, "invalid operator='none': expected one of linear, cosine"),
        ({"operator": "tanh"}, ValueError, "invalid operator='tanh': expected one of linear, cosine"),
        ({"sigmoid_k": 0}, ValueError, "invalid sigmoid_k=0: expected a number > 0"),
        ({"eps": -1e-4}, ValueError, "invalid eps=-0.0001: expected a number > 0"),
        ({"include": ["layer9.*"]}, ValueError, "invalid include pattern='layer9.\\*': expected a pattern matching"),
        ({"exclude": "bogus"}, ValueError, "invalid exclude pattern='bogus': expected a pattern matching a module"),
        ({"include": [3]}, TypeError, "invalid include=\\[3\\]: expected None, a glob pattern"),
        ({"skip_classifier": "yes"}, TypeError, "invalid skip_classifier='yes': expected true or false"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        convert_model(TorchvisionStyleResNet(), **kwargs)


def test_non_module_is_a_type_error():
    with pytest.raises(TypeError, match="invalid model=.*: expected a torch.nn.Module"):
        convert_model({"conv": nn.Conv2d(1, 1, 1)})
