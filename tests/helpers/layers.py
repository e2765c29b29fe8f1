# Copyright (c) mmnorm contributors. All rights reserved.
"""Moved to :mod:`mmnorm.testing.layers` (tools/gpu_check.py needs it in the installed package);
kept for the test files that still import it from here."""
from mmnorm.testing.layers import *  # noqa: F401,F403
from mmnorm.testing.layers import __all__  # noqa: F401
