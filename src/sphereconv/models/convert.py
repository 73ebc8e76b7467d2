"""Turn the convolutions (and optionally linear layers) of any network into Sphere layers.

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017), Sec. 2.1: SphereConv keeps the
convolution's filters and geometry and only replaces ``<w, x>`` by ``g(theta)``. So an existing
network (a ResNet from another library, say) becomes a SphereNet by swapping each layer for a
``SphereConv1d/2d/3d`` (or ``SphereLinear``) that adopts the original parameters.

Which layers are converted:

- *Candidates* are modules whose type is exactly ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``,
  plus exactly ``nn.Linear`` when ``convert_linear=True``. Subclasses (Sphere layers, SphereNorm,
  decoupled convolutions, weight-standardised or "same"-padding convolutions of other libraries)
  are left untouched, since their forward differs from the plain layer's.
- ``include`` keeps only the candidates it matches, ``exclude`` drops those it matches. Each is a
  glob pattern (``fnmatch``, e.g. ``"layer4.*"``), a list of patterns matched against the
  qualified module name of ``model.named_modules()``, or a predicate ``f(name, module) -> bool``.
  A pattern is matched against each layer's own name, so it must match at least one convolution
  or linear layer: one that names only a container (``"layer4"``) raises ``ValueError`` pointing
  to ``"layer4.*"`` instead of selecting nothing.
- ``skip_classifier=True`` (default) keeps the *classifier* plain: the layer (any ``nn.Linear`` or
  convolution, Sphere or not) registered last among ``model``'s submodules (a bare layer passed as
  ``model`` is converted), in ``model.named_modules()`` order, which for the
  usual networks (``fc`` of a ResNet, the 1x1 score conv of a fully convolutional net, the
  ``classifier`` of this package's models) is the one producing the logits. Networks that register
  their head earlier, or have several heads, should name them in ``exclude``.
- A selected layer whose ``weight`` is not a Parameter but recomputed by a forward pre-hook (the
  hook-based ``torch.nn.utils.weight_norm`` and ``spectral_norm``) or by a parametrization
  (``torch.nn.utils.parametrizations.weight_norm``/``spectral_norm``, ``torch.nn.utils.parametrize``,
  whose generated ``ParametrizedConv2d`` etc. count as the plain layer they wrap) cannot be adopted:
  that raises ``ValueError`` naming it (remove the reparametrisation, or leave the layer out with
  ``exclude``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._validation import check_bool, fail
from ..errors import InvalidArgumentError
from ..nn.angular import DEFAULT_EPS, DEFAULT_SIGMOID_K, SPHERE_OPERATORS, canonical_operator, check_positive
from ..nn.conv import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear

LayerSelector = str | Iterable[str] | Callable[[str, nn.Module], bool] | None

_CONV_TO_SPHERE: dict[type, type] = {nn.Conv1d: SphereConv1d, nn.Conv2d: SphereConv2d, nn.Conv3d: SphereConv3d}
_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _selector(
    value: LayerSelector, argument: str, names: list[str], layer_names: list[str]
) -> Callable[[str, nn.Module], bool] | None:
    """Turn ``include``/``exclude`` into a predicate; a pattern matching no module, or only modules
    that are not layers (``layer_names``: convolutions and linear layers), raises ``ValueError``."""
    if value is None:
        return None
    if callable(value):
        return value
    patterns = [value] if isinstance(value, str) else list(value) if isinstance(value, Iterable) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise fail(
            argument,
            value,
            "None, a glob pattern, a list of glob patterns or a predicate f(name, module) -> bool",
            wrong_type=True,
        )
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise fail(f"{argument} pattern", pattern, f"a pattern matching a module of the model, such as: {sample}")
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layer_names):
            # Patterns are matched against the layers' own names: one naming only a container (a
            # stage, a block) would select nothing and be ignored without a word.
            raise fail(
                f"{argument} pattern",
                pattern,
                "a pattern matching a convolution or linear layer, not only modules around them "
                f"(for the layers inside {pattern!r}, write {pattern + '.*'!r})",
            )
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _layer_type(module: nn.Module) -> type:
    """The type of ``module``; for a parametrized layer, the type ``torch.nn.utils.parametrize`` wrapped."""
    cls = type(module)
    # register_parametrization swaps the class for a generated subclass ("ParametrizedConv2d").
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _sphere_copy(layer: nn.Module, operator: str, sigmoid_k: float, eps: float) -> nn.Module:
    """A Sphere layer with ``layer``'s geometry that adopts its ``weight``/``bias`` Parameters."""
    weight = layer.weight
    assert isinstance(weight, Tensor)  # a candidate layer: nn.Linear or nn.ConvNd
    device, dtype = weight.device, weight.dtype
    sphere: nn.Module
    if isinstance(layer, nn.Linear):
        sphere = SphereLinear(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device=device,
            dtype=dtype,
            operator=operator,
            sigmoid_k=sigmoid_k,
            eps=eps,
        )
    else:
        sphere = _CONV_TO_SPHERE[type(layer)](
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            layer.padding_mode,
            device=device,
            dtype=dtype,
            operator=operator,
            sigmoid_k=sigmoid_k,
            eps=eps,
        )
    # Adopt the very Parameter objects: values, requires_grad and optimizer references carry over.
    sphere.weight = layer.weight
    sphere.bias = layer.bias
    sphere.train(layer.training)
    return sphere


def convert_model(
    model: nn.Module,
    operator: str = "linear",
    *,
    sigmoid_k: float = DEFAULT_SIGMOID_K,
    eps: float = DEFAULT_EPS,
    include: LayerSelector = None,
    exclude: LayerSelector = None,
    skip_classifier: bool = True,
    convert_linear: bool = False,
) -> nn.Module:
    """Replace the plain convolutions of ``model`` by SphereConv layers, in place.

    Each selected ``nn.ConvNd`` becomes ``SphereConvNd`` (and each selected ``nn.Linear`` a
    ``SphereLinear`` if ``convert_linear``) computing ``g(theta)``, ``cos(theta) = <w, x> / (|w| |x|)``,
    with the same geometry (kernel, stride, padding, dilation, groups, padding mode), device and
    dtype, adopting the original ``weight`` and ``bias`` Parameter objects (an optimizer built
    before the conversion keeps working). ``operator`` is ``linear`` (the SphereResNet default),
    ``cosine``, ``sigmoid`` or ``learnable_sigmoid``; ``sigmoid_k`` and ``eps`` as in
    ``SphereConv2d``. Selection (``include``, ``exclude``, ``skip_classifier``) is described in
    the module docstring. A layer shared by several parents is replaced everywhere.

    Returns ``model`` (or the new layer when ``model`` itself is a selected plain layer).
    Forward hooks registered on replaced layers are not carried over.
    """
    if not isinstance(model, nn.Module):
        raise fail("model", model, "a torch.nn.Module", wrong_type=True)
    operator = canonical_operator(operator, SPHERE_OPERATORS)
    sigmoid_k = check_positive("sigmoid_k", sigmoid_k)
    eps = check_positive("eps", eps)
    check_bool("skip_classifier", skip_classifier)
    check_bool("convert_linear", convert_linear)

    named = list(model.named_modules())
    names = [name for name, _ in named]
    layer_names = [name for name, module in named if isinstance(module, _LAYER_TYPES)]
    include_fn = _selector(include, "include", names, layer_names)
    exclude_fn = _selector(exclude, "exclude", names, layer_names)
    classifier = None
    if skip_classifier:
        # Among the submodules only: a bare layer passed as ``model`` is what the user asks to convert.
        layers = [module for name, module in named if name and isinstance(module, _LAYER_TYPES)]
        classifier = layers[-1] if layers else None

    replacements: dict[int, nn.Module] = {}
    for name, module in named:
        layer_type = _layer_type(module)
        plain_type = layer_type in _CONV_TO_SPHERE or (convert_linear and layer_type is nn.Linear)
        if not plain_type or module is classifier:
            continue
        if include_fn is not None and not include_fn(name, module):
            continue
        if exclude_fn is not None and exclude_fn(name, module):
            continue
        if parametrize.is_parametrized(module):
            raise InvalidArgumentError(
                f"cannot convert layer {name!r} ({layer_type.__name__}): it is parametrized "
                f"({', '.join(module.parametrizations)} computed by torch.nn.utils.parametrize, e.g. "
                "parametrizations.weight_norm or spectral_norm), so its weight is not a Parameter to adopt; remove "
                f"the parametrization first (parametrize.remove_parametrizations) or leave the layer out with "
                f"exclude=[{name!r}]"
            )
        if not isinstance(module.weight, nn.Parameter):
            # weight_norm / spectral_norm (hook-based) rebuild ``weight`` from other parameters before
            # every forward; the Sphere layer could adopt neither that tensor nor the hook.
            raise InvalidArgumentError(
                f"cannot convert layer {name!r} ({type(module).__name__}): its weight is recomputed by a "
                "reparametrisation hook (torch.nn.utils.weight_norm or spectral_norm), not a Parameter; "
                f"remove the reparametrisation first or leave the layer out with exclude=[{name!r}]"
            )
        replacements[id(module)] = _sphere_copy(module, operator, sigmoid_k, eps)

    if id(model) in replacements:
        return replacements[id(model)]
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return model
