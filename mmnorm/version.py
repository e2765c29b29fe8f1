# Copyright (c) mmnorm contributors. All rights reserved.
__version__ = '0.1.0'


def _parse_version_info(version_str: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in version_str.split('.'))


version_info = _parse_version_info(__version__)
