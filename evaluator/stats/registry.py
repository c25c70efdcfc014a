"""Drift methods by name, so a rule says `method: psi` and the loader can check it before the first evaluation.

A rule names a method; the attribute it reads decides whether the numeric or the categorical variant applies, so
the registry is keyed by (name, categorical): `psi` exists for numbers and for strings, `ks` only for numbers,
`chi2` only for strings. The flags let the loader decide what to fetch from the store without calling anything:
`needs_raw_values` methods cannot run on pipeline-sent histograms (`<name>.histogram.bounds` / `.counts`), and
`p_value` methods are the only ones a condition on a p-value makes sense for.

Like NannyML's `MethodFactory.register`: the built-in methods register themselves when their module is imported,
and `get` / `names` import them first, so callers never depend on import order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from evaluator.stats.drift import DriftResult

F = TypeVar("F", bound=Callable[..., "DriftResult"])

_BUILTIN_MODULES = ("evaluator.stats.drift",)


@dataclass(frozen=True)
class DriftMethod:
    """A registered method: `func(baseline, current, **params) -> DriftResult`."""

    name: str
    func: Callable[..., DriftResult]
    needs_raw_values: bool  # True: histograms are not enough (ks, wasserstein)
    categorical: bool  # True: string values or per-category counts; False: numbers or numeric histograms
    p_value: bool  # True: the result carries a p-value (a significance test), not only an effect size
    summary: str  # the first line of the function's docstring, for `--help`-style listings

    def __call__(self, baseline: Any, current: Any, /, **params: Any) -> DriftResult:
        return self.func(baseline, current, **params)


_METHODS: dict[tuple[str, bool], DriftMethod] = {}


def register(name: str, *, needs_raw_values: bool, categorical: bool, p_value: bool = False) -> Callable[[F], F]:
    """Register the decorated function as drift method `name` (numeric or categorical variant).

    Registering the same (name, categorical) twice is a ValueError: two modules silently replacing each other's
    method would change what existing rules compute.
    """

    def decorate(func: F) -> F:
        key = (name, categorical)
        if key in _METHODS:
            kind = "categorical" if categorical else "numeric"
            raise ValueError(f"drift method {name!r} ({kind}) is already registered")
        doc = (func.__doc__ or "").strip().splitlines()
        _METHODS[key] = DriftMethod(name, func, needs_raw_values, categorical, p_value, doc[0] if doc else "")
        return func

    return decorate


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def get(name: str, *, categorical: bool = False) -> DriftMethod:
    """The method `name` for numeric (default) or categorical values; an unknown pair is a ValueError naming
    what exists, worded for a rule file's validation message."""
    _load_builtins()
    method = _METHODS.get((name, categorical))
    if method is not None:
        return method
    kind = "categorical" if categorical else "numeric"
    other = _METHODS.get((name, not categorical))
    if other is not None:
        other_kind = "categorical" if other.categorical else "numeric"
        raise ValueError(f"drift method {name!r} is only for {other_kind} values, not {kind} ones "
                         f"(known {kind} methods: {', '.join(names(categorical=categorical))})")
    raise ValueError(f"unknown drift method {name!r} for {kind} values "
                     f"(known: {', '.join(names(categorical=categorical))})")


def names(*, categorical: bool | None = None) -> list[str]:
    """Registered method names, sorted; `categorical` None lists both kinds (a name appears once)."""
    _load_builtins()
    return sorted({n for (n, cat) in _METHODS if categorical is None or cat == categorical})
