"""Machinery that turns PEFT's own generic test classes into RECAST test classes.

For every ``test_*`` method of a PEFT test class, :func:`recast_test_class` does exactly one of:

* **re-parametrise** it: each ``@pytest.mark.parametrize`` whose argument names carry the PEFT method under test
  (``config_cls``, ``test_name, model_id, config_cls, config_kwargs``, ...) gets RECAST values instead; other
  parametrisations (``model_id``, ``dtype``, ``use_reentrant``, ...) are kept as PEFT wrote them;
* **substitute** a hard-wired ``LoraConfig`` by RECAST (tests of generic ``PeftModel`` behaviour that PEFT happens to
  write with LoRA and only generic arguments, see ``LORA_SUBSTITUTED`` in :mod:`recast_peft_exclusions`);
* **exclude** it, with the reason given in :mod:`recast_peft_exclusions` (the one place where exclusions live); the
  test is collected as a skip carrying that reason.

A test listed in ``EXPECTED_FAILURES`` (re-parametrised or substituted) additionally gets ``xfail(strict=True,
raises=...)`` with the RECAST bug as its reason: it must fail, with that exception, until the bug is fixed, and then
fails as XPASS until the entry is removed.

Any test that fits none of these raises at import time, so a new PEFT test cannot be silently dropped.

The test functions are copies of PEFT's (same code object); only their parametrisation and, where documented in
``GATE_OVERRIDES``, a module-level name in their globals differ. PEFT's files are never modified.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Iterable, Mapping, Optional

import pytest

from peft_recast import RecastConfig, RecastModel


def argnames_key(argnames: Any) -> tuple[str, ...]:
    if isinstance(argnames, str):
        return tuple(name.strip() for name in argnames.split(",") if name.strip())
    return tuple(argnames)


def clone_function(func: Callable, global_overrides: Optional[Mapping[str, Any]] = None) -> Callable:
    """A copy of ``func`` (same code) without its pytest marks; ``global_overrides`` replace module-level names."""
    func_globals = func.__globals__
    if global_overrides:
        func_globals = dict(func_globals)
        func_globals.update(global_overrides)
    new = types.FunctionType(func.__code__, func_globals, func.__name__, func.__defaults__, func.__closure__)
    new.__kwdefaults__ = func.__kwdefaults__
    new.__qualname__ = func.__qualname__
    new.__doc__ = func.__doc__
    new.__dict__.update({key: value for key, value in func.__dict__.items() if key != "pytestmark"})
    return new


def _excluded(name: str, reason: str) -> Callable:
    def test_excluded(self):
        pytest.skip(f"RECAST exclusion: {reason}")

    test_excluded.__name__ = name
    return test_excluded


def recast_test_class(
    name: str,
    parent: type,
    module_name: str,
    *,
    recast_params: Mapping[tuple[str, ...], list],
    per_test_params: Optional[Mapping[str, Mapping[tuple[str, ...], list]]] = None,
    kept_params: Optional[Mapping[tuple[str, ...], list]] = None,
    exclusions: Mapping[str, str],
    substituted: Iterable[str] = (),
    as_is: Iterable[str] = (),
    expected_failures: Optional[Mapping[str, tuple[str, type[BaseException]]]] = None,
    test_global_overrides: Optional[Mapping[str, Any]] = None,
    substitution_overrides: Optional[Mapping[str, Any]] = None,
    attrs: Optional[Mapping[str, Any]] = None,
) -> type:
    """Build ``name``, a subclass of PEFT's ``parent`` whose tests run RECAST (see module docstring).

    Args:
        recast_params: argnames -> RECAST values, for the parametrisations that name the method under test.
        per_test_params: test name -> argnames -> values, overriding ``recast_params`` for that test (PEFT tests
            with their own inline method-specific tables).
        kept_params: argnames -> values for parametrisations that do not name the method (e.g. a reduced
            ``model_id`` list); others are kept unchanged.
        exclusions: ``"<Class>::<test>"`` -> reason.
        expected_failures: ``"<Class>::<test>"`` -> (the RECAST bug it shows, the exception it fails with); the test
            runs as ``xfail(strict=True, raises=<exception>)``.
        substituted: tests in which LoRA is replaced by RECAST through ``substitution_overrides``.
        test_global_overrides: module-level names replaced in every re-parametrised test (gates, see
            ``GATE_OVERRIDES``).
    """
    per_test_params = per_test_params or {}
    kept_params = kept_params or {}
    substituted = set(substituted)
    as_is = set(as_is)
    expected_failures = dict(expected_failures or {})
    both = sorted(set(expected_failures) & set(exclusions))
    if both:
        raise RuntimeError(f"tests both excluded and expected to fail: {both}")
    namespace: dict[str, Any] = {"__module__": module_name, "__qualname__": name}
    unclassified = []
    for attr in sorted(dir(parent)):
        if not attr.startswith("test"):
            continue
        func = getattr(parent, attr)
        if not callable(func):
            continue
        key = f"{parent.__name__}::{attr}"
        if key in exclusions:
            namespace[attr] = _excluded(attr, exclusions[key])
            continue
        if key in as_is:  # generic test that already covers every registered method, RECAST included
            namespace[attr] = clone_function(func)
            namespace[attr].pytestmark = list(getattr(func, "pytestmark", []))
            continue
        if key in substituted:
            new = clone_function(func, {**(test_global_overrides or {}), **(substitution_overrides or {})})
            new.pytestmark = list(getattr(func, "pytestmark", []))
            namespace[attr] = new
            continue
        params = {**recast_params, **per_test_params.get(attr, {})}
        marks, replaced = [], False
        for mark in getattr(func, "pytestmark", []):
            if mark.name == "parametrize":
                names = argnames_key(mark.args[0])
                if names in params:
                    marks.append(pytest.mark.parametrize(mark.args[0], params[names]).mark)
                    replaced = True
                    continue
                if names in kept_params:
                    marks.append(pytest.mark.parametrize(mark.args[0], kept_params[names]).mark)
                    continue
            marks.append(mark)
        if not replaced:
            unclassified.append(key)
            continue
        new = clone_function(func, test_global_overrides)
        new.pytestmark = marks
        namespace[attr] = new
    for key, (reason, raises) in expected_failures.items():
        cls, _, attr = key.partition("::")
        if cls != parent.__name__:
            continue
        if attr not in namespace:
            raise RuntimeError(f"EXPECTED_FAILURES names {key}, which {parent.__name__} does not have")
        xfail = pytest.mark.xfail(strict=True, raises=raises, reason=f"RECAST bug: {reason}")
        namespace[attr].pytestmark = [*namespace[attr].pytestmark, xfail.mark]
    if unclassified:
        raise RuntimeError(
            "PEFT tests that are neither re-parametrised with RECAST cases nor listed in recast_peft_exclusions.py "
            f"(add RECAST cases or an exclusion with its reason): {unclassified}"
        )
    namespace.update(attrs or {})
    return type(name, (parent,), namespace)


def lora_as_recast(*args: Any, **kwargs: Any) -> RecastConfig:
    """Stand-in for ``LoraConfig`` in tests of generic ``PeftModel`` behaviour that PEFT writes with LoRA.

    Only method-independent arguments are accepted (``target_modules``, ``modules_to_save``, ``task_type``,
    ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``, ``bias``); ``init_lora_weights`` becomes
    ``init_weights``; the LoRA rank, scaling and dropout (``r``, ``lora_alpha``, ``lora_dropout``) have no RECAST meaning and are dropped. Anything else is an error, so a test
    that depends on LoRA-specific behaviour cannot pass through this by accident.
    """
    if args:
        raise TypeError("lora_as_recast takes keyword arguments only")
    kwargs = dict(kwargs)
    for lora_only in ("r", "lora_alpha", "lora_dropout"):  # size/scale/regularisation of the LoRA update only
        kwargs.pop(lora_only, None)
    if "init_lora_weights" in kwargs:
        kwargs["init_weights"] = bool(kwargs.pop("init_lora_weights"))
    allowed = {
        "target_modules", "modules_to_save", "task_type", "exclude_modules", "layers_to_transform", "layers_pattern",
        "bias", "init_weights", "base_model_name_or_path", "inference_mode",
    }  # fmt: skip
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"lora_as_recast: LoRA-specific arguments {sorted(unknown)} have no RECAST equivalent")
    return RecastConfig(**kwargs)


# The module-level names replaced in ``LORA_SUBSTITUTED`` tests: ``LoraConfig`` by :func:`lora_as_recast`, and ``lora``
# (PEFT's ``peft.tuners.lora``) by a namespace whose only attribute ``LoraLayer`` is RECAST's layer class, so that a
# test's ``isinstance(module, lora.LoraLayer)`` loop runs over RECAST's layers (calling their ``get_delta_weight``)
# instead of finding none and passing vacuously; any other ``lora.<name>`` raises AttributeError.
LORA_SUBSTITUTION: dict[str, Any] = {
    "LoraConfig": lora_as_recast,
    "lora": types.SimpleNamespace(LoraLayer=RecastModel.tuner_layer_cls),
}
