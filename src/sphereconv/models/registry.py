"""Model registry: ``register_model``, ``create_model`` and ``list_models``.

Every network of the paper (Liu et al., NIPS 2017, Sec. 5: SphereNet-9/18/36/69, the wide
SphereResNet-32 and the ImageNet SphereResNets) is registered under a lower-case name, so the
command line and configuration files can build any of them from a string plus keyword arguments.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from torch import nn

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def _normalise_name(name: str) -> str:
    """Registry key of a model name: lower case, ``-`` read as ``_`` (``sphere-resnet32`` works)."""
    return name.strip().lower().replace("-", "_")


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering a model factory (a function or class returning an ``nn.Module``).

    ``create_model(name, **kwargs)`` then calls ``factory(**kwargs)``. Keyword arguments the
    factory's signature does not accept are rejected by :func:`create_model` with a ``TypeError``.
    Registering a name twice raises ``ValueError``.
    """
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"model name must be a non-empty string; got {name!r}")
    key = _normalise_name(name)

    def decorator(factory: F) -> F:
        if not callable(factory):
            raise TypeError(f"register_model({name!r}) must decorate a callable; got {type(factory).__name__}")
        if key in _REGISTRY:
            raise ValueError(f"a model named {key!r} is already registered")
        _REGISTRY[key] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def get_model_factory(name: str) -> ModelFactory:
    """The factory registered as ``name``; ``ValueError`` listing the registered names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string; got {type(name).__name__} {name!r}")
    key = _normalise_name(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _REGISTRY[key]


def accepted_kwargs(factory: ModelFactory) -> list[str] | None:
    """Keyword arguments ``factory`` accepts, or ``None`` if it takes ``**kwargs`` (anything)."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs``.

    Raises ``ValueError`` for an unknown name (listing the registered ones) and ``TypeError``
    naming any keyword argument the model does not take (listing those it does). Values are
    validated by the model itself.
    """
    factory = get_model_factory(name)
    accepted = accepted_kwargs(factory)
    if accepted is not None:
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(
                f"model {_normalise_name(name)!r} got unknown keyword argument(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(accepted)}"
            )
    return factory(**kwargs)


def register_variant(name: str, cls: type[nn.Module], doc: str, fixed: dict[str, Any],
                     defaults: dict[str, Any] | None = None) -> ModelFactory:
    """Register ``name`` as ``cls`` with architecture arguments ``fixed`` bound.

    ``fixed`` arguments disappear from the factory's signature (they define the variant);
    ``defaults`` only change default values, which callers may still override. The factory's
    ``__signature__`` is the class's, so :func:`create_model` checks keyword arguments exactly.
    """
    defaults = dict(defaults or {})
    class_sig = inspect.signature(cls)
    for arg in (*fixed, *defaults):
        if arg not in class_sig.parameters:
            raise TypeError(f"{cls.__name__} has no argument {arg!r}")
    params = [
        p.replace(default=defaults[p.name]) if p.name in defaults else p
        for p in class_sig.parameters.values()
        if p.name not in fixed
    ]

    def factory(**kwargs: Any) -> nn.Module:
        return cls(**fixed, **{**defaults, **kwargs})

    factory.__name__ = factory.__qualname__ = _normalise_name(name)
    factory.__doc__ = doc
    factory.__signature__ = class_sig.replace(parameters=params, return_annotation=cls)  # type: ignore[attr-defined]
    return register_model(name)(factory)
