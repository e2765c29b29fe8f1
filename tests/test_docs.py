# Copyright (c) mmnorm contributors. All rights reserved.
"""The docs cannot rot: their commands are checked against the tools, and the marked ones run.

- Every fenced ``bash``/``sh``/``shell`` block of ``README.md``, ``docs/**/*.md`` and the configs'
  READMEs (the model-zoo pages) is read command by command: a ``python tools/X.py``, a
  ``bash tools/X.sh`` (whose arguments go on to the Python tool it wraps), a ``make TARGET`` and a
  ``mim train|test|run mmnorm ...`` must name an existing tool or Makefile target, and every
  ``--flag`` it passes must be one that tool's argument parser accepts (read from the parsers
  themselves by ``docs/_ext/mmnorm_tools.py``). Every ``configs/....py`` a page names must exist.
- A ``bash`` or ``python`` block directly after a ``<!-- runnable -->`` line is run: bash with
  ``bash -euo pipefail`` from the repository root with the environment's ``bin`` first on
  ``PATH``, Python with the environment's interpreter; it must succeed and leave no new file in
  the repository root (``work_dirs/`` and the other ignored folders are fine).
- The docs build with Sphinx, warnings as errors and every cross-reference checked (as
  ``make docs`` builds them), and the README stays a landing page.
"""
import json
import os
import os.path as osp
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from glob import glob
from typing import Dict, List, Optional

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MARKER = '<!-- runnable -->'
SHELL_LANGS = ('bash', 'sh', 'shell')
#: Seconds one runnable block may take (the guides keep theirs to quick modes).
BLOCK_TIMEOUT = 300
#: The README is a landing page: at most this many lines.
README_MAX_LINES = 250


def doc_files() -> List[str]:
    """Repository-relative paths of the Markdown pages whose blocks are checked."""
    pages = ['README.md']
    pages += sorted(osp.relpath(p, ROOT) for p in glob(osp.join(ROOT, 'docs', '**', '*.md'),
                                                        recursive=True)
                    if not osp.relpath(p, ROOT).startswith(('docs/_build', 'docs/model_zoo')))
    pages += sorted(osp.relpath(p, ROOT) for p in glob(osp.join(ROOT, 'configs', '**', 'README.md'),
                                                        recursive=True))
    return pages


@dataclass
class Block:
    path: str  # repository-relative
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    runnable: bool

    @property
    def id(self) -> str:
        return f'{self.path}:{self.line}'


_FENCE = re.compile(r'^(\s*)(`{3,}|~{3,})\s*([^`\s]*)')


def parse_blocks(path: str, text: Optional[str] = None) -> List[Block]:
    """The fenced code blocks of a Markdown file (MyST directive fences included, as blocks of
    their own language, e.g. ``{toctree}``)."""
    if text is None:
        with open(osp.join(ROOT, path), encoding='utf-8') as f:
            text = f.read()
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match.groups()
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), '')
        body, j = [], i + 1
        while j < len(lines):
            closing = lines[j].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        blocks.append(Block(path, i + 1, lang.lower(), '\n'.join(body) + '\n',
                            previous == MARKER))
        i = j + 1
    return blocks


def all_blocks() -> List[Block]:
    return [block for page in doc_files() for block in parse_blocks(page)]


# --------------------------------------------------------------------------------------------
# Reading shell commands


def logical_lines(script: str) -> List[str]:
    """The script's commands as lines: continuations joined, heredoc bodies left out, a quoted
    string that spans lines kept whole."""
    out, pending, heredoc = [], '', None
    for line in script.replace('\\\n', ' ').splitlines():
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        pending = f'{pending}\n{line}' if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        match = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", pending)
        if match:
            heredoc = match.group(1)
        out.append(pending)
        pending = ''
    if pending:
        out.append(pending)
    return out


def simple_commands(line: str) -> List[List[str]]:
    """A line's simple commands (split at ``;``, ``&&``, ``||``, ``|``, ``&``, parentheses) as
    word lists, without leading variable assignments and ``time`` / ``exec`` / ``env``."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=';&|()<>')
    lexer.whitespace_split = True
    lexer.commenters = '#'
    try:
        tokens = list(lexer)
    except ValueError:
        return []
    commands, current = [], []
    for token in tokens + [';']:
        if token and set(token) <= set(';&|()'):
            if current:
                commands.append(current)
            current = []
        elif token and set(token) <= set('<>'):
            current.append(token)
        else:
            current.append(token)
    cleaned = []
    for words in commands:
        while words and (re.match(r'^[A-Za-z_][A-Za-z0-9_]*=', words[0])
                         or words[0] in ('time', 'exec', 'env', 'nohup', 'command')):
            words = words[1:]
        if words:
            cleaned.append(words)
    return cleaned


def flags_of(words: List[str]) -> List[str]:
    """The options passed in ``words``: ``--name`` / ``-x`` (the ``=value`` and the brackets of
    a usage line such as ``[--resume [CKPT]]`` taken off); negative numbers are not options."""
    flags = []
    for word in words:
        word = word.strip('[]')
        if word in ('-', '--') or not word.startswith('-') or re.match(r'^-\.?\d', word):
            continue
        flags.append(word.split('=', 1)[0])
    return flags


def makefile_targets() -> set:
    with open(osp.join(ROOT, 'Makefile')) as f:
        text = f.read()
    targets = set()
    for match in re.finditer(r'^([A-Za-z0-9_.-][A-Za-z0-9_. -]*):(?!=)', text, re.M):
        targets.update(match.group(1).split())
    return targets


#: Shell wrappers and the tool their remaining arguments go to (docs/_ext/mmnorm_tools.py).
sys.path.insert(0, osp.join(ROOT, 'docs', '_ext'))
from mmnorm_tools import SHELL_WRAPPERS  # noqa: E402


def check_command(words: List[str], options: dict, targets: set) -> List[str]:
    """Problems with one simple command (an empty list when it is fine or not one of ours)."""
    problems = []
    exe, args = words[0], words[1:]

    def check_tool(tool: str, passed: List[str], extra=()):
        if not osp.isfile(osp.join(ROOT, tool)):
            problems.append(f'{tool} does not exist')
            return
        accepted = set(options['tools'].get(tool, ())) | set(extra)
        for flag in flags_of(passed):
            if flag not in accepted:
                problems.append(f'{tool} has no option {flag}')

    def tool_path(word: str) -> Optional[str]:
        word = word[2:] if word.startswith('./') else word
        return word if word.startswith('tools/') else None

    if exe in ('python', 'python3') or re.search(r'(^|/)python3?$', exe) or exe in ('$PY',
                                                                                     '${PY}'):
        if not args or args[0] in ('-c', '-m', '-') or not tool_path(args[0]):
            return problems
        check_tool(tool_path(args[0]), args[1:])
    elif exe in ('bash', 'sh') or tool_path(exe):
        script = tool_path(exe) or (tool_path(args[0]) if args else None)
        rest = args if tool_path(exe) else args[1:]
        if not script:
            return problems
        if not osp.isfile(osp.join(ROOT, script)):
            problems.append(f'{script} does not exist')
        elif script in SHELL_WRAPPERS:
            check_tool(SHELL_WRAPPERS[script], rest)
        elif script == 'tools/dist_run.sh' and len(rest) >= 2:
            check_tool(f'tools/{rest[1]}', rest[2:], extra=('--launcher',))
    elif exe == 'make':
        if '-C' in args or '-f' in args:
            return problems  # another Makefile
        for word in args:
            if not word.startswith('-') and '=' not in word and word not in targets:
                problems.append(f'the Makefile has no target {word}')
    elif exe == 'mim' and len(args) >= 3 and args[1] == 'mmnorm':
        command, rest = args[0], args[2:]
        if command in ('train', 'test'):
            check_tool(f'tools/{command}.py', rest[1:], extra=options['mim'].get(command, ()))
        elif command == 'run':
            found = [t for t in options['tools'] if osp.basename(t) == rest[0] + '.py']
            if not found:
                problems.append(f'mim run mmnorm {rest[0]}: no tool {rest[0]}.py')
            else:
                check_tool(found[0], rest[1:])
    return problems


_CONFIG = re.compile(r'(?<![\w/.:+-])configs/[\w.+/-]+?\.py\b')


def config_paths(text: str) -> List[str]:
    """The configs ``configs/....py`` of this repository that ``text`` names (a path inside
    another project, ``mmdet/configs/...`` or ``mmdet::...``, is not one)."""
    return [path for path in _CONFIG.findall(text) if not re.search(r'[*{}<>]', path)]


# --------------------------------------------------------------------------------------------
# The tools' options


@pytest.fixture(scope='module')
def options() -> Dict[str, dict]:
    """Every tool's accepted options and mim's own (one process imports every tool)."""
    result = subprocess.run([sys.executable, osp.join(ROOT, 'docs', '_ext', 'mmnorm_tools.py')],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_command_reader():
    """The reader finds the tool, the flags, make targets and mim commands of usage lines."""
    line = ('GPUS=16 bash tools/slurm_train.sh P J CONFIG W --amp && python tools/test.py C K '
            '[--out preds.pkl] [--resume [CKPT]] --cfg-options a=-1 # --not-this')
    assert simple_commands(line) == [
        ['bash', 'tools/slurm_train.sh', 'P', 'J', 'CONFIG', 'W', '--amp'],
        ['python', 'tools/test.py', 'C', 'K', '[--out', 'preds.pkl]', '[--resume', '[CKPT]]',
         '--cfg-options', 'a=-1']]
    assert flags_of(simple_commands(line)[1]) == ['--out', '--resume', '--cfg-options']
    assert logical_lines('a \\\n  --b\ncat <<EOF\n--x\nEOF\npython -c "1\n2"\n') == [
        'a    --b', 'cat <<EOF', 'python -c "1\n2"']
    assert config_paths('configs/a/b.py mmdet/configs/c.py mmdet::configs/d.py configs/*/x.py') \
        == ['configs/a/b.py']
    fake = dict(tools={'tools/train.py': ['--amp']}, mim={'train': ['--gpus']})
    assert check_command(['python', 'tools/train.py', 'C', '--amp'], fake, {'demo'}) == []
    assert check_command(['python', 'tools/train.py', 'C', '--ampp'], fake, set()) == [
        'tools/train.py has no option --ampp']
    assert check_command(['bash', 'tools/dist_train.sh', 'C', '2', '--amp=1'], fake, set()) == []
    assert check_command(['make', 'demo', 'QUICK=1'], fake, {'demo'}) == []
    assert check_command(['make', 'demoo'], fake, {'demo'}) == ['the Makefile has no target demoo']
    assert check_command(['mim', 'train', 'mmnorm', 'C', '--gpus', '2', '--amp'], fake, set()) \
        == []
    assert check_command(['python', 'tools/nope.py'], fake, set()) == [
        'tools/nope.py does not exist']


def test_blocks_name_existing_tools_flags_targets_and_configs(options):
    """Every shell command of the pages uses tools, flags, targets and configs that exist."""
    targets = makefile_targets()
    problems, commands = [], 0
    for block in all_blocks():
        if block.lang not in SHELL_LANGS:
            continue
        for line in logical_lines(block.text):
            for words in simple_commands(line):
                commands += 1
                problems += [f'{block.id}: {p}  [{" ".join(words)[:120]}]'
                             for p in check_command(words, options, targets)]
    for page in doc_files():
        with open(osp.join(ROOT, page), encoding='utf-8') as f:
            for path in config_paths(f.read()):
                if not osp.isfile(osp.join(ROOT, path)):
                    problems.append(f'{page}: {path} does not exist')
    assert commands > 50, f'only {commands} commands found: is the block reader broken?'
    assert not problems, '\n'.join(problems)


def test_every_tool_is_in_the_api_reference():
    from mmnorm_tools import tool_paths
    with open(osp.join(ROOT, 'docs', 'api.md'), encoding='utf-8') as f:
        api = f.read()
    missing = [tool for tool in tool_paths()
               if f':func: {tool[:-3].replace("/", "__")}' not in api]
    missing += [script for script in glob(osp.join('tools', '[!_]*.sh'), root_dir=ROOT)
                if f'`{script}`' not in api]
    assert not missing, f'docs/api.md does not document: {missing}'


# --------------------------------------------------------------------------------------------
# The runnable blocks


def _untracked() -> set:
    result = subprocess.run(['git', 'ls-files', '--others', '--exclude-standard'], cwd=ROOT,
                            capture_output=True, text=True)
    return set(result.stdout.split()) if result.returncode == 0 else set()


RUNNABLE = [block for block in all_blocks() if block.runnable]


def test_runnable_blocks_are_marked_on_bash_or_python():
    wrong = [b.id for b in RUNNABLE if b.lang not in SHELL_LANGS + ('python',)]
    assert not wrong, f'{MARKER} marks blocks that are neither bash nor python: {wrong}'
    assert RUNNABLE, f'no block is marked {MARKER}'


@pytest.mark.parametrize('block', RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_runnable_block(block, tmp_path):
    env = dict(os.environ)
    bin_dir = osp.dirname(sys.executable)  # the environment's bin (.venv/bin under make test)
    env['PATH'] = bin_dir + os.pathsep + env.get('PATH', '')
    env['VENV'] = sys.prefix  # make targets of the block use this environment
    env.pop('MAKEFLAGS', None)
    env.pop('MAKELEVEL', None)
    if block.lang == 'python':
        script = tmp_path / 'block.py'
        script.write_text(block.text)
        command = [sys.executable, str(script)]
    else:
        command = ['bash', '-euo', 'pipefail', '-c', block.text]
    before = _untracked()
    start = time.time()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=BLOCK_TIMEOUT)
    seconds = time.time() - start
    output = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, (f'{block.id} failed (exit {result.returncode}, {seconds:.0f} '
                                    f's):\n{block.text}\n--- output (end) ---\n{output}')
    # A block runs from the repository root, so what it leaves behind lands there; files that
    # appear in the source folders meanwhile are a developer's own work in progress.
    left = sorted(path for path in _untracked() - before if '/' not in path)
    assert not left, (f'{block.id} left files in the repository root (write under work_dirs/ '
                      f'or a temporary folder): {left}')


# --------------------------------------------------------------------------------------------
# The build and the README


def test_docs_build_without_warnings(tmp_path):
    """What ``make docs`` builds, built here with warnings as errors and nitpicky references
    (about 15 s)."""
    result = subprocess.run(
        [sys.executable, '-m', 'sphinx', '-E', '-W', '--keep-going', '-n', '-q', '-b', 'html',
         '-d', str(tmp_path / 'doctrees'), osp.join(ROOT, 'docs'), str(tmp_path / 'html')],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert osp.isfile(tmp_path / 'html' / 'index.html')


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r'[`*_]|\[([^\]]*)\]\([^)]*\)', r'\1', heading.strip().lower())
    return re.sub(r'\s', '-', re.sub(r'[^\w\s-]', '', text))


def test_readme_is_a_landing_page_with_working_links():
    with open(osp.join(ROOT, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f'README.md has {len(lines)} lines'
    # the README's two commands
    assert re.search(r'^make demo\b', text, re.M) and re.search(r'^make test\b', text, re.M)
    anchors = {_slug(line.lstrip('#')) for line in lines if line.startswith('#')}
    broken = []
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if re.match(r'^[a-z][a-z0-9+.-]*:', target):
            continue
        path, _, anchor = target.partition('#')
        if path and not osp.exists(osp.join(ROOT, path)):
            broken.append(target)
        elif not path and anchor not in anchors:
            broken.append(target)
    assert not broken, f'README.md links to what does not exist: {broken}'
