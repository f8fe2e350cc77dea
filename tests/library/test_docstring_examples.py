"""The `Example:` blocks of the library's docstrings run as written (doctest)."""

import doctest
import importlib
import pkgutil

import pytest

import peft_recast

MODULES = sorted(info.name for info in pkgutil.iter_modules(peft_recast.__path__, "peft_recast.") if not info.ispkg)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring example lines of {name} failed"


def test_the_public_classes_and_functions_have_examples():
    finder = doctest.DocTestFinder()
    for name in ("RecastConfig", "RecastModel", "prune_gates", "rank_channels"):
        tests = finder.find(getattr(peft_recast, name), name)
        assert any(test.examples for test in tests), f"{name} has no Example"
