"""Registry: names, unknown names and keyword arguments, custom registration."""

from __future__ import annotations

import pytest
from torch import nn

import sphereconv.models.registry as registry
from sphereconv.models import SphereNet, SphereResNet, create_model, list_models, register_model

PAPER_MODELS = {
    "spherenet9",
    "spherenet18",
    "spherenet36",
    "spherenet69",
    "sphere_resnet32",
    "sphere_resnet18",
    "sphere_resnet34",
}


def test_list_models_names_every_paper_network_sorted():
    names = list_models()
    assert PAPER_MODELS <= set(names)
    assert names == sorted(names)


def test_create_model_builds_the_right_class_and_accepts_dashed_or_upper_names():
    assert isinstance(create_model("spherenet9", width_mult=0.125), SphereNet)
    assert isinstance(create_model("Sphere-ResNet32", width_mult=0.125), SphereResNet)


def test_unknown_model_name_lists_registered_names():
    with pytest.raises(ValueError, match="invalid model='spherenet10': expected one of") as info:
        create_model("spherenet10")
    for name in PAPER_MODELS:
        assert name in str(info.value)


def test_non_string_model_name_is_a_type_error():
    with pytest.raises(TypeError, match="invalid model=9: expected one of"):
        create_model(9)


def test_unknown_keyword_arguments_are_named():
    with pytest.raises(TypeError, match="unknown keyword argument\\(s\\) colour, depth") as info:
        create_model("spherenet9", depth=9, colour="red", width_mult=0.125)
    # The message lists what is accepted, and the fixed architecture argument is not among them.
    assert "width_mult" in str(info.value)
    assert "layers_per_stage" not in str(info.value).split("accepted:")[1]


def test_fixed_architecture_arguments_cannot_be_overridden():
    with pytest.raises(TypeError, match="stage_widths"):
        create_model("sphere_resnet18", stage_widths=(8, 8, 8, 8))


def test_common_keyword_arguments_are_accepted_by_every_model():
    common = dict(
        num_classes=3,
        in_channels=1,
        image_size=28,
        operator="none",
        sigmoid_k=0.3,
        width_mult=0.125,
        batch_norm=True,
        sphere_norm=False,
        fc_operator=None,
        feature_dim=None,
    )
    for name in PAPER_MODELS:
        model = create_model(name, **common)
        assert model.num_classes == 3 and model.in_channels == 1


def test_register_model_decorates_a_factory_and_rejects_duplicates(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_model("tiny_test_net")
    def tiny_test_net(num_classes: int = 10) -> nn.Module:
        return nn.Linear(4, num_classes)

    assert "tiny_test_net" in list_models()
    assert create_model("tiny_test_net", num_classes=5).out_features == 5
    with pytest.raises(TypeError, match="unknown keyword argument\\(s\\) width"):
        create_model("tiny_test_net", width=2)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_test_net")(tiny_test_net)
    with pytest.raises(TypeError, match="non-empty string"):
        register_model("")
