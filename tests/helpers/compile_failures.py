# Copyright (c) mmnorm contributors. All rights reserved.
"""Moved to :mod:`mmnorm.testing.compile_failures` (tools/gpu_check.py needs it in the installed
package); kept for the test files that still import it from here."""
from mmnorm.testing.compile_failures import *  # noqa: F401,F403
from mmnorm.testing.compile_failures import __all__  # noqa: F401
