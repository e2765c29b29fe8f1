# Copyright (c) mmnorm contributors. All rights reserved.
"""The command-line parsers of mmnorm's tools, for the docs and for ``tests/test_docs.py``.

Each tool builds its :class:`argparse.ArgumentParser` inside ``main()`` / ``parse_args()`` and
parses at once, so there is no function that returns it. :func:`tool_parser` loads the tool's
file without running it as ``__main__``, calls its entry point with
``ArgumentParser.parse_known_args`` replaced by a function that hands back the parser instead of
parsing, and restores it: nothing of the tool runs past its argument parsing.

Used three ways:

- by ``sphinx-argparse`` in ``docs/api.md``: ``:module: mmnorm_tools`` with ``:func:`` naming a
  tool as ``tools__analysis__get_flops`` (the path's ``/`` as ``__``; see :func:`__getattr__`);
- by ``docs/conf.py``'s tool table (:func:`tool_paths`);
- from the command line, ``python docs/_ext/mmnorm_tools.py``, which prints every tool's options
  (and the options of ``mim train`` / ``mim test`` when openmim is installed) as JSON; the docs
  test checks the flags that the guides' commands pass against it.
"""
import argparse
import glob
import json
import os
import os.path as osp
import runpy
import sys

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
#: Folders whose ``*.py`` files are command-line tools (private ``_*.py`` helpers excluded).
TOOL_DIRS = ('tools', 'tools/analysis', 'tools/deploy')
#: Shell wrappers and the Python tool whose arguments they pass on (after their positionals).
SHELL_WRAPPERS = {
    'tools/dist_train.sh': 'tools/train.py',
    'tools/slurm_train.sh': 'tools/train.py',
    'tools/dist_test.sh': 'tools/test.py',
    'tools/slurm_test.sh': 'tools/test.py',
}


class _Captured(Exception):

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__('parser captured')
        self.parser = parser


def tool_paths() -> list:
    """Repository-relative paths of the Python tools, sorted."""
    paths = []
    for folder in TOOL_DIRS:
        for path in sorted(glob.glob(osp.join(ROOT, folder, '*.py'))):
            if not osp.basename(path).startswith('_'):
                paths.append(osp.relpath(path, ROOT).replace(os.sep, '/'))
    return paths


def tool_parser(relpath: str) -> argparse.ArgumentParser:
    """The argument parser of the tool ``relpath`` (e.g. ``'tools/train.py'``)."""
    path = osp.join(ROOT, relpath)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    namespace = runpy.run_path(path, run_name='mmnorm_tools_' + relpath.replace('/', '_')[:-3])
    entries = [namespace[name] for name in ('parse_args', 'main') if callable(namespace.get(name))]
    if not entries:
        raise LookupError(f'{relpath} has neither parse_args() nor main()')

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    original = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = capture
    try:
        try:
            entries[0]()
        except _Captured as captured:
            parser = captured.parser
            parser.prog = relpath
            return parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise LookupError(f'{relpath}: {entries[0].__name__}() returned without parsing arguments')


def option_strings(parser: argparse.ArgumentParser) -> list:
    """Every option string the parser accepts (``-h``, ``--help``, ``--work-dir``, ...)."""
    return sorted({option for action in parser._actions for option in action.option_strings})


def __getattr__(name: str):
    """``tools__analysis__get_flops`` -> the parser of ``tools/analysis/get_flops.py``."""
    if name.startswith('tools__'):
        relpath = name.replace('__', '/') + '.py'
        if osp.isfile(osp.join(ROOT, relpath)):
            return tool_parser(relpath)
    raise AttributeError(name)


def mim_options() -> dict:
    """The options of ``mim train`` / ``mim test`` themselves (they pass the rest on to
    tools/train.py / tools/test.py); empty when openmim is not installed."""
    try:
        from mim.commands.test import cli as test_cli
        from mim.commands.train import cli as train_cli
    except ImportError:
        return {}
    return {name: sorted({opt for param in command.params
                          for opt in param.opts + param.secondary_opts if opt.startswith('-')})
            for name, command in (('train', train_cli), ('test', test_cli))}


def main() -> None:
    options = {}
    for relpath in tool_paths():
        options[relpath] = option_strings(tool_parser(relpath))
    json.dump(dict(tools=options, mim=mim_options()), sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == '__main__':
    main()
