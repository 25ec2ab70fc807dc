"""The ``>>>`` examples in the package's docstrings run and print what they say.

Every module of the package is collected (a new module is checked without being listed here); each
example runs on one CPU thread, with NumPy-style whitespace and ``...`` allowed in the expected output.
A module whose examples fail fails here with doctest's report (the example, what was expected, what
came out).
"""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import hessianflow


def _modules() -> list[str]:
    names = [hessianflow.__name__]
    for info in pkgutil.walk_packages(hessianflow.__path__, prefix=hessianflow.__name__ + "."):
        names.append(info.name)
    return sorted(names)


MODULES = _modules()


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name):
        if test.examples:
            runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} docstring examples in {name} failed"


def test_public_functions_have_examples():
    """Every function and class exported by ``hessianflow`` carries at least one ``>>>`` example.

    Exceptions and warnings are not asked for one (raising them is shown where they are raised).
    """
    finder = doctest.DocTestFinder(recurse=False)
    missing = []
    for name in hessianflow.__all__:
        obj = getattr(hessianflow, name)
        if not callable(obj) or (inspect.isclass(obj) and issubclass(obj, BaseException)):
            continue
        tests = finder.find(obj, name, module=False, globs={})
        if not any(t.examples for t in tests):
            missing.append(name)
    assert not missing, f"public names without a >>> example in their docstring: {missing}"
