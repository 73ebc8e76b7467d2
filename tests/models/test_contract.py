"""The model contract: every registered builder takes the common keyword arguments, every model is a
ClassifierBackbone, and the builders are plain importable functions."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from sphereconv.models import create_model, list_models
from sphereconv.models.contract import BUILDER_KWARGS, ClassifierBackbone, ModelOptions, require_backbone
from sphereconv.models.registry import accepted_kwargs, get_model_factory
from sphereconv.models.resnet import sphere_resnet18
from sphereconv.models.spherenet import SphereNet, spherenet9
from sphereconv.nn import SPHERE_CONV_TYPES

# A value of each common keyword argument other than its default, so that passing it is observable
# (the paper's networks default to operator cosine or linear, image size 32 and width 1).
COMMON_KWARGS = {"num_classes": 3, "in_channels": 1, "image_size": 28, "operator": "sigmoid", "width_mult": 0.125}


def test_common_kwargs_cover_the_builder_contract():
    assert set(COMMON_KWARGS) == set(BUILDER_KWARGS)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_satisfies_the_contract(name):
    assert set(BUILDER_KWARGS) <= set(accepted_kwargs(get_model_factory(name)))
    model = create_model(name, **COMMON_KWARGS)
    assert isinstance(model, ClassifierBackbone) and isinstance(model.num_features, int)
    assert require_backbone(model, name, "test") is model
    assert model.num_classes == 3 and model.in_channels == 1
    features = model.forward_features(torch.randn(2, 1, 28, 28))
    assert features.shape == (2, model.num_features)
    # The operator reaches the network's SphereConv layers (stem and shortcuts have their own defaults).
    sphere_operators = {m.operator for m in model.modules() if isinstance(m, SPHERE_CONV_TYPES)}
    assert sphere_operators == {"sigmoid"}, sphere_operators
    # The width multiplier scales the network: twice the multiplier, twice the feature width.
    wider = create_model(name, **{**COMMON_KWARGS, "width_mult": 0.25})
    assert wider.num_features == 2 * model.num_features


@pytest.mark.parametrize("name", list_models())
def test_every_paper_model_accepts_the_shared_options(name):
    assert set(ModelOptions.__annotations__) <= set(accepted_kwargs(get_model_factory(name)))


def test_builders_are_plain_functions_with_docstrings():
    assert inspect.isfunction(spherenet9) and spherenet9.__name__ == "spherenet9" and spherenet9.__doc__
    assert get_model_factory("spherenet9") is spherenet9
    model = spherenet9(num_classes=4, width_mult=0.125)
    assert isinstance(model, SphereNet) and model.depth == 9 and model.num_classes == 4
    assert sphere_resnet18(width_mult=0.125).stem_operator == "none"


def test_create_model_leaves_out_none_arguments():
    model = create_model("sphere_resnet18", width_mult=0.125, stem_operator=None, feature_dim=None, colour=None)
    assert model.stem_operator == "none" and model.num_features == 512 // 8  # widest stage of 512 at width 1/8


def test_a_model_without_features_is_named_with_what_it_lacks():
    lacks = r"model 'plain' \(Linear\) lacks forward_features\(x\) and an int num_features"
    with pytest.raises(TypeError, match=lacks):
        require_backbone(nn.Linear(2, 3), "plain", "loss='cosface'")
