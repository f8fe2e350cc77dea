"""The `Example:` blocks of the library's docstrings run as written (doctest), and every public class and function
(``peft_recast.__all__``) has one."""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import peft_recast

MODULES = sorted(info.name for info in pkgutil.iter_modules(peft_recast.__path__, "peft_recast.") if not info.ispkg)
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

PUBLIC = sorted(
    name for name in peft_recast.__all__
    if inspect.isclass(getattr(peft_recast, name)) or inspect.isfunction(getattr(peft_recast, name))
)  # fmt: skip

def check_examples(obj, name: str) -> doctest.TestResults:
    """Run the doctest examples of ``obj``'s own docstring (not those of its methods); raise ``AssertionError`` when it
    has no ``Example:`` block, no ``>>>`` example, or an example whose output differs (the report names it)."""
    doc = inspect.getdoc(obj) or ""
    assert any(line.strip().startswith("Example") for line in doc.splitlines()), f"{name} has no `Example:` block"
    module = inspect.getmodule(obj)
    globs = dict(vars(module)) if module is not None else {}
    tests = [test for test in doctest.DocTestFinder(recurse=False).find(obj, name, globs=globs) if test.examples]
    assert tests, f"the `Example:` block of {name} holds no doctest (`>>>` lines)"
    report = []
    runner = doctest.DocTestRunner(optionflags=OPTIONS, verbose=False)
    for test in tests:
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.attempted == sum(len(test.examples) for test in tests) > 0, results
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples of {name} failed:\n{''.join(report)}"
    return results


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_of_each_module_run(name):
    """Every doctest anywhere in the module (public or not) passes; a module may have none (see the test below)."""
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=OPTIONS, verbose=False, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring example lines of {name} failed"


def test_the_public_names_are_checked():
    assert {"RecastConfig", "RecastModel", "prune_gates", "rank_channels"} <= set(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_each_public_class_and_function_has_a_running_example(name):
    results = check_examples(getattr(peft_recast, name), name)
    assert results.attempted > 0 and results.failed == 0


def _example_with_wrong_output():
    """Add.

    Example:
        >>> 1 + 1
        3
    """


def _example_that_raises():
    """Example:
    >>> undefined_name
    """


def _no_example_block():
    """Add two numbers (no example)."""


def _literal_block_only():
    """Example::

    total = 1 + 1
    """


def _good_example():
    """Example:
    >>> [1 + 1, "x" * 3]
    [2, 'xxx']
    >>> None
    """


def test_the_checker_fails_a_wrong_example_and_reports_it():
    with pytest.raises(AssertionError, match=r"1 of 1 examples of broken failed:(.|\n)*Expected:\s+3\s+Got:\s+2"):
        check_examples(_example_with_wrong_output, "broken")
    with pytest.raises(AssertionError, match=r"1 of 1 examples of raising failed(.|\n)*NameError"):
        check_examples(_example_that_raises, "raising")


def test_the_checker_fails_a_docstring_without_a_doctest():
    with pytest.raises(AssertionError, match="has no `Example:` block"):
        check_examples(_no_example_block, "plain")
    with pytest.raises(AssertionError, match="holds no doctest"):
        check_examples(_literal_block_only, "literal")


def test_the_checker_runs_every_example():
    assert check_examples(_good_example, "good") == doctest.TestResults(failed=0, attempted=2)
