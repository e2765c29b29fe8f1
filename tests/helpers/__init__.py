# Copyright (c) mmnorm contributors. All rights reserved.
"""Helpers imported by test configs (``custom_imports``) in subprocess runs."""
