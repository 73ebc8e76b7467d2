"""Model registry: ``register_model``, ``create_model`` and ``list_models``.

Every network of the paper (Liu et al., NIPS 2017, Sec. 5: SphereNet-9/18/36/69, the wide
SphereResNet-32 and the ImageNet SphereResNets) is a plain builder function registered under a
lower-case name, so the command line and configuration files can build any of them from a string
plus keyword arguments. What a builder accepts and returns is :mod:`sphereconv.models.contract`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar, get_args, get_origin

from torch import nn

from .._validation import check_choice
from ..errors import InvalidArgumentError, InvalidArgumentTypeError
from .contract import Unpack

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def _normalise_name(name: str) -> str:
    """Registry key of a model name: lower case, ``-`` read as ``_`` (``sphere-resnet32`` works)."""
    return name.strip().lower().replace("-", "_")


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering a model builder (a function or class returning an ``nn.Module``).

    ``create_model(name, **kwargs)`` then calls ``builder(**kwargs)``; the builder is returned
    unchanged, so it stays importable and callable as itself. Registering a name twice raises
    ``ValueError``.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgumentTypeError(f"invalid model name={name!r}: expected a non-empty string")
    key = _normalise_name(name)

    def decorator(builder: F) -> F:
        if not callable(builder):
            raise InvalidArgumentTypeError(
                f"register_model({name!r}) must decorate a callable; got {type(builder).__name__}"
            )
        if key in _REGISTRY:
            raise InvalidArgumentError(f"a model named {key!r} is already registered")
        _REGISTRY[key] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def get_model_factory(name: str) -> ModelFactory:
    """The builder registered as ``name``; ``ValueError`` listing the registered names otherwise."""
    key = _normalise_name(name) if isinstance(name, str) else name
    return _REGISTRY[check_choice("model", key, list_models())]


def accepted_kwargs(factory: ModelFactory) -> list[str] | None:
    """Keyword arguments ``factory`` accepts, or ``None`` if it takes any ``**kwargs``.

    ``**options: Unpack[SomeTypedDict]`` (PEP 692) accepts exactly the keys of the ``TypedDict``.
    """
    try:
        params = inspect.signature(factory, eval_str=True).parameters.values()
    except NameError:  # an annotation that does not evaluate: read the names only
        params = inspect.signature(factory).parameters.values()
    named_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in params if p.kind in named_kinds]
    for param in params:
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            if get_origin(param.annotation) is not Unpack:
                return None
            names += list(get_args(param.annotation)[0].__annotations__)
    return names


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs``; arguments given as ``None`` are left out.

    Leaving out ``None`` lets a caller pass optional settings straight through: the builder's own
    default applies. Raises ``ValueError`` for an unknown name (listing the registered ones) and
    ``TypeError`` naming any keyword argument the model does not take (listing those it does).
    Values are validated by the model itself.
    """
    factory = get_model_factory(name)
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    accepted = accepted_kwargs(factory)
    if accepted is not None:
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise InvalidArgumentTypeError(
                f"model {_normalise_name(name)!r} got unknown keyword argument(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(accepted)}"
            )
    return factory(**kwargs)
