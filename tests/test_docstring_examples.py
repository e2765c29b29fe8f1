# Copyright (c) mmnorm contributors. All rights reserved.
"""The ``Examples:`` of every public docstring run as written and print what they show."""
import doctest
import importlib
import pkgutil

import pytest
import torch

import mmnorm


def _examples():
    found = []
    for info in pkgutil.walk_packages(mmnorm.__path__, 'mmnorm.'):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # (a codebase's integration, where that codebase is missing)
            continue
        for test in doctest.DocTestFinder(exclude_empty=True).find(
                module, info.name, globs=dict(vars(module), torch=torch)):
            # (a name re-exported by a package is found again there: keep its own module's)
            if test.examples and getattr(test, 'lineno', None) is not None \
                    and test.filename == module.__file__:
                found.append(test)
    return found


EXAMPLES = _examples()


def test_examples_are_found():
    # The layers' docstrings hold examples (a finder that found none would pass vacuously).
    names = {test.name for test in EXAMPLES}
    assert {'mmnorm.layers.switchable_norm.SwitchableNorm',
            'mmnorm.layers.sparse_switchable_norm.SparseSwitchableNorm'} <= names


@pytest.mark.parametrize('test', EXAMPLES, ids=lambda test: test.name)
def test_docstring_example(test):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    runner.run(test, out=report.append)
    assert not runner.failures, ''.join(report)
