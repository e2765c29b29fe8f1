# Copyright (c) mmnorm contributors. All rights reserved.
"""Sphinx configuration of mmnorm's documentation (``make docs``).

Sphinx with MyST-Parser (Markdown pages), as the OpenMMLab codebases build theirs; the theme is
furo (OpenMMLab's own theme is not on the package registry). ``make docs`` builds with ``-W
--keep-going -n``: every warning fails the build, and every cross-reference (a page link, a
heading anchor, an API object) must resolve. The API reference is generated from the
docstrings (autodoc + napoleon for their Google style) and the tools' argument parsers
(sphinx-argparse, through ``docs/_ext/mmnorm_tools.py``).
"""
import glob
import importlib
import logging
import os
import os.path as osp
import pkgutil
import re
import sys

from docutils import nodes
from sphinx.ext.napoleon.docstring import GoogleDocstring
from sphinx.util.docutils import SphinxDirective
from sphinx.util.logging import get_node_location

DOCS = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(DOCS)
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.join(DOCS, '_ext'))

from mmnorm.version import __version__  # noqa: E402

project = 'mmnorm'
author = 'mmnorm contributors'
copyright = '2026, mmnorm contributors'
version = release = __version__

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.viewcode',
    'sphinxarg.ext',
]
source_suffix = {'.md': 'markdown', '.rst': 'restructuredtext'}
root_doc = 'index'
exclude_patterns = ['_build', '_ext', 'Thumbs.db', '.DS_Store']
# No network where the docs are built: nothing is fetched (no intersphinx), see nitpick below.

# MyST: Markdown pages. Headings get anchors down to level 4, so that ``[x](page.md#a-heading)``
# and ``[x](#a-heading)`` are checked like any other cross-reference.
myst_enable_extensions = ['colon_fence', 'deflist', 'dollarmath']
myst_heading_anchors = 4

# autodoc: the modules' ``__all__`` decide what is documented; Google-style docstrings.
autodoc_default_options = {
    'members': True,
    'undoc-members': True,
    'show-inheritance': True,
    'member-order': 'bysource',
}
autodoc_typehints = 'signature'
# A method documents itself or not at all: the docstrings of torch's and mmengine's methods that
# mmnorm overrides (forward, the hooks' before_train, ...) are theirs, not mmnorm's API.
autodoc_inherit_docstrings = False
autodoc_class_signature = 'mixed'
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # 'Attributes:' as fields: NamedTuple fields are documented once
# An attribute's doc comment in mmnorm is prose (``#: Normalizer colours: IN red, ...``), while
# napoleon reads an attribute docstring's first ``text:`` as its type. It still does for a
# type-like text (``int: ...``, ``tuple[str, ...]: ...``); any other line stays prose.
_TYPE_LIKE = re.compile(r'[\w.\[\]()~`:|,]+')


def _attribute_docstring(self):
    first = self._lines.get(0)
    first = first if isinstance(first, str) else ''  # (a sentinel when there is no line)
    text, colon, _ = self._partition_field_on_colon(first)
    if colon and not _TYPE_LIKE.fullmatch(re.sub(r'\s*(,|\||\bor\b)\s*', ',', text.strip())):
        lines = [*self._dedent(self._consume_to_end())]
        return self._format_field('', '', self.__class__(lines, self._config).lines())
    return _napoleon_attribute_docstring(self)


_napoleon_attribute_docstring = GoogleDocstring._parse_attribute_docstring
GoogleDocstring._parse_attribute_docstring = _attribute_docstring
# The environment has the full stack (torch, mmengine, mmcv, the codebases), so nothing is mocked:
# a module that does not import fails the build.

# Nitpicky mode (-n): every reference must resolve. Objects of the libraries mmnorm builds on have
# no inventory here (intersphinx would need the network), so references into them are not
# checked; references into mmnorm, and to pages and headings, always are.
_EXTERNAL = ('torch', 'torchvision', 'mmengine', 'mmcv', 'mmdet', 'mmseg', 'mmpretrain', 'numpy',
             'np', 'onnx', 'onnxruntime', 'sklearn', 'matplotlib', 'nn', 'Tensor')
# Words of the Google-style types ("int, optional", "callable", "sequence of str") that are not
# objects.
nitpick_ignore = [('py:class', word) for word in ('optional', 'callable', 'sequence', 'iterable',
                                                   'mapping', 'module', 'path-like', 'array-like')]
nitpick_ignore_regex = [
    (r'py:.*', rf'({"|".join(_EXTERNAL)})(\..*)?'),
    # the standard library and typing aliases that autodoc writes unqualified in signatures
    (r'py:.*', r'(typing\.)?(Any|Callable|Dict|Iterable|Iterator|List|Mapping|Optional|'
               r'Sequence|Set|Tuple|Type|Union|NamedTuple|Protocol)'),
    (r'py:.*', r'(argparse|collections|contextlib|dataclasses|enum|logging|os|pathlib|types|'
               r'typing|abc)\..*'),
]

html_theme = 'furo'
html_title = f'mmnorm {release}'
html_static_path = []
html_show_sourcelink = False
pygments_style = 'sphinx'
pygments_dark_style = 'monokai'


# ---------------------------------------------------------------------------------------------
# The model zoo: configs/README.md and configs/<family>/README.md are the pages' source (they are
# what GitHub shows next to the configs); each build copies them to docs/model_zoo/ (generated,
# not in git), with their links rewritten to the docs' pages.
ZOO = osp.join(DOCS, 'model_zoo')
#: Repository files outside docs/ that are pages of the docs: a link to one (from a page or from
#: a configs README) is a link to that page.
_PAGE_OF = {'CHANGELOG.md': 'docs/changelog.md', 'configs/README.md': 'docs/model_zoo/index.md'}
for _readme in sorted(glob.glob(osp.join(ROOT, 'configs', '*', 'README.md'))):
    _family = osp.basename(osp.dirname(_readme))
    _PAGE_OF[f'configs/{_family}/README.md'] = f'docs/model_zoo/{_family}.md'
_LINK = re.compile(r'(\]\()([^)\s]+)(\))')


def rewrite_links(text: str, source: str, page: str) -> str:
    """Markdown links of ``text`` (written relative to the repository file ``source``) as the docs
    page ``page`` needs them: links to a repository file that is a page of the docs
    (:data:`_PAGE_OF`) point to that page; others are only made relative to ``page``."""

    def rewrite(match):
        target = match.group(2)
        if re.match(r'^[a-z][a-z0-9+.-]*:', target) or target.startswith('#'):
            return match.group(0)  # a URL, or an anchor in the same page
        path, sep, anchor = target.partition('#')
        resolved = osp.relpath(osp.normpath(osp.join(osp.dirname(source), path)))
        resolved = _PAGE_OF.get(resolved.replace(os.sep, '/'), resolved)
        new = osp.relpath(resolved, osp.dirname(page)).replace(os.sep, '/')
        return f'{match.group(1)}{new}{sep}{anchor}{match.group(3)}'

    return _LINK.sub(rewrite, text)


def _write_model_zoo():
    os.makedirs(ZOO, exist_ok=True)
    families = []
    for rel, page in sorted(_PAGE_OF.items()):
        if not page.startswith('docs/model_zoo/'):
            continue
        with open(osp.join(ROOT, rel), encoding='utf-8') as f:
            text = rewrite_links(f.read(), rel, page)
        if page.endswith('index.md'):
            text = text.replace('# mmnorm configs', '# Model zoo', 1)
        else:
            families.append(osp.basename(page)[:-3])
        text = (f'<!-- Generated by docs/conf.py from {rel}: edit that file, not this one. -->\n'
                + text)
        with open(osp.join(ROOT, page), 'w', encoding='utf-8') as f:
            f.write(text)
    with open(osp.join(ZOO, 'index.md'), 'a', encoding='utf-8') as f:
        f.write('\n```{toctree}\n:hidden:\n\n' + '\n'.join(families) + '\n```\n')
    # pages of families that no longer exist
    for stale in set(glob.glob(osp.join(ZOO, '*.md'))) - {osp.join(ROOT, p) for p in
                                                           _PAGE_OF.values()}:
        os.remove(stale)


_write_model_zoo()


def _rewrite_page_links(app, docname, source):
    """Links of a page to repository files that are pages of the docs (a configs README, the
    changelog) become links to those pages, so that they are checked like any other."""
    if not docname.startswith('model_zoo/'):
        page = f'docs/{docname}.md'
        source[0] = rewrite_links(source[0], page, page)


# ---------------------------------------------------------------------------------------------
# Python cross-references. A docstring may name an mmnorm object by another of its public paths
# (``mmnorm.engine.recompute_batch_stats`` for ``mmnorm.engine.batch_stats.recompute_batch_stats``,
# a name imported into the module): such a reference resolves to where the object is documented.
# A name that the module imported from another library (``Runner``, ``Module`` in a signature)
# is shown as text, like every reference into those libraries (see nitpick_ignore_regex).


def _import_object(name: str):
    parts = name.split('.')
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module('.'.join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _documented(env):
    """id(object) -> the full name it is documented under (built once per build)."""
    cache = getattr(env, '_mmnorm_documented', None)
    if cache is None:
        cache = {}
        for name, entry in env.get_domain('py').objects.items():
            obj = _import_object(name)
            # (numbers and strings share identities: they are found by their own name only)
            if obj is not None and not isinstance(obj, (int, float, str, bytes, bool)):
                cache.setdefault(id(obj), name)
        env._mmnorm_documented = cache
    return cache


def _resolve_python(app, env, node, contnode):
    if node.get('refdomain') != 'py':
        return None
    target = node['reftarget'].lstrip('.~')
    module, cls = node.get('py:module'), node.get('py:class')
    candidates = [target]
    if module:
        candidates[:0] = [f'{module}.{cls}.{target}'] if cls else []
        candidates.insert(len(candidates) - 1, f'{module}.{target}')
    # a docstring names things as its own module sees them, also where a package documents it
    where = re.search(r'docstring of ([\w.]+)', str(get_node_location(node) or ''))
    documented_obj = _import_object(where.group(1)) if where else None
    home = getattr(documented_obj, '__module__', None) or getattr(documented_obj, '__name__', None)
    if isinstance(home, str) and home != module:
        candidates.insert(len(candidates) - 1, f'{home}.{target}')
    for name in candidates:
        obj = _import_object(name)
        if obj is None:
            continue
        # where it comes from: a class's or function's module, a module's name, else (a
        # constant) the path it was found under
        owner = getattr(obj, '__module__', None) or getattr(obj, '__name__', None) or name
        if not str(owner).startswith('mmnorm'):
            return contnode  # another library's object: not checked, shown as text
        documented = _documented(env).get(id(obj))
        if documented and documented != target:
            return env.get_domain('py').resolve_xref(env, node['refdoc'], app.builder, 'obj',
                                                     documented, node, contnode)
        return None
    return None


def _skip_member(app, what, name, obj, skip, options):
    """Methods without a docstring of their own (overrides of torch's and mmengine's API:
    ``forward``, the hooks' ``before_train``, ...) are not listed."""
    if what in ('class', 'exception') and callable(obj) and not isinstance(obj, type):
        doc = getattr(obj, '__doc__', None)
        if not doc or getattr(getattr(obj, '__func__', obj), '__doc__', None) is None:
            return True
    return None


class ModulesDirective(SphinxDirective):
    """``.. mmnorm-modules::`` with the modules documented elsewhere on the page as its content:
    every other module of mmnorm, found by walking the package (a new module is listed without
    editing the page). A package is shown by its docstring; a module with its members, less those
    its package documents (as ``mmnorm.layers`` does ``mmnorm.layers.base.BatchStatsNorm``)."""
    has_content = True

    def run(self):
        import mmnorm
        elsewhere = {line.strip() for line in self.content if line.strip()}
        rst = []
        for info in pkgutil.walk_packages(mmnorm.__path__, 'mmnorm.'):
            name = info.name
            parent, _, leaf = name.rpartition('.')
            module = importlib.import_module(name)
            if name in elsewhere or getattr(sys.modules[parent], leaf, None) is not module:
                continue  # documented above, or the name is a function's (mmnorm.analysis.statdiff)
            rst.append(f'.. automodule:: {name}')
            if info.ispkg:
                rst.append('   :no-members:')
            elif parent in elsewhere:  # only what the package does not document already
                shown = {id(getattr(sys.modules[parent], n, None))  # (its classes, functions)
                         for n in getattr(sys.modules[parent], '__all__', ())
                         if callable(getattr(sys.modules[parent], n, None))}
                rest = [n for n in getattr(module, '__all__', ())
                        if id(getattr(module, n, None)) not in shown]
                rst.append(f'   :members: {", ".join(rest)}' if rest else '   :no-members:')
            rst.append('')
        return self.parse_text_to_nodes('\n'.join(rst))


class ToolFigureDirective(SphinxDirective):
    """A figure that one of mmnorm's tools draws (``make demo``, ``make study``), copied into
    ``docs/images`` by ``make docs-figures``::

        ```{mmnorm-figure} images/demo_sn_ratios.png
        :command: make demo && make docs-figures
        The caption.
        ```

    When the file is there it is shown with its caption; when it is not (the tool has not run
    on this checkout), the page says which command draws it, instead of failing the build."""
    required_arguments = 1
    has_content = True
    option_spec = {'command': lambda text: text.strip(), 'alt': lambda text: text.strip()}

    def run(self):
        path = self.arguments[0]
        caption = ' '.join(self.content).strip()
        source_dir = osp.dirname(self.env.doc2path(self.env.docname))
        if osp.isfile(osp.join(source_dir, path)):
            image = nodes.image(uri=path, alt=self.options.get('alt', caption))
            return [nodes.figure('', image, nodes.caption(caption, caption))]
        command = self.options.get('command', 'make docs-figures')
        text = nodes.paragraph()
        text += [nodes.emphasis(caption, caption),
                 nodes.Text(" This figure is drawn by the project's own tools and is not in this "
                            'checkout yet: run '),
                 nodes.literal(command, command), nodes.Text(', then '),
                 nodes.literal('make docs', 'make docs'), nodes.Text('.')]
        return [nodes.note('', text)]


# ---------------------------------------------------------------------------------------------
# Docstring warnings of mmnorm/functional and mmnorm/layers waiting for a fix in those files.
# Each entry is (where, what), both parts of the warning's text, and filters out exactly the
# warnings that contain both; the build lists what it filtered, and an entry that no longer
# matches anything, so that the list only shrinks. Any other warning fails the build.
KNOWN_DOCSTRING_WARNINGS = []
_known_seen = {}


class _KnownWarnings(logging.Filter):

    def filter(self, record):
        if record.levelno != logging.WARNING:
            return True
        location = getattr(record, 'location', None)
        if isinstance(location, nodes.Node):
            location = get_node_location(location)
        text = f'{location}: {record.getMessage()}'
        for entry in KNOWN_DOCSTRING_WARNINGS:
            if entry[0] in text and entry[1] in text:
                _known_seen[entry] = _known_seen.get(entry, 0) + 1
                return False
        return True


def _report_known(app, exception):
    if exception is not None:
        return
    for entry in KNOWN_DOCSTRING_WARNINGS:
        if entry in _known_seen:
            print(f'[mmnorm docs] known docstring warning, filtered: {entry[0]} {entry[1]}')
        else:
            print(f'[mmnorm docs] KNOWN_DOCSTRING_WARNINGS entry matched nothing (fixed? remove '
                  f'it from docs/conf.py): {entry[0]} {entry[1]}')


def _count_pages(app, exception):
    """``make docs`` prints the page count from this line."""
    if exception is None and app.builder.name == 'html':
        pages = [name for name in app.env.found_docs]
        print(f'[mmnorm docs] {len(pages)} pages built into {os.path.relpath(app.outdir, ROOT)}')


def setup(app):
    for handler in logging.getLogger('sphinx').handlers:
        handler.filters.insert(0, _KnownWarnings())
    app.connect('build-finished', _report_known)
    app.add_directive('mmnorm-modules', ModulesDirective)
    app.add_directive('mmnorm-figure', ToolFigureDirective)
    app.connect('source-read', _rewrite_page_links)
    app.connect('missing-reference', _resolve_python)
    app.connect('autodoc-skip-member', _skip_member)
    app.connect('build-finished', _count_pages)
