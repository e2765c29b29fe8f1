# Copyright (c) mmnorm contributors. All rights reserved.
"""Install mmnorm.

``pip install -e .`` installs the plugin with its runtime requirements (torch, mmengine). Extras:
``[mm]`` the OpenMMLab codebases (mmcv with ops must be built first, see docs/get_started.md),
``[tests]``, ``[deploy]`` (ONNX export and ONNX Runtime), ``[analysis]`` (scikit-learn, for the
digits dataset of ``tools/analysis/``), ``[all]``.

The configs, the tools and ``model-index.yml`` travel inside the package, in ``mmnorm/.mim``, as
the OpenMMLab codebases ship them for ``mim`` (``mim train mmnorm CONFIG``, ``mim test``,
``mim run mmnorm TOOL``, ``mim search``): copied into the built wheel, and symbolic links to the
checkout's own folders in an editable install.
"""
import os
import os.path as osp
import re
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

HERE = osp.dirname(osp.abspath(__file__))
#: What ``mmnorm/.mim`` holds: mim looks for configs, tools and the model index there.
MIM_ITEMS = ('configs', 'tools', 'model-index.yml')
_NOT_SHIPPED = shutil.ignore_patterns('__pycache__', '*.pyc', 'work_dirs', 'data')


def read_requirements(name):
    """Requirement lines of ``requirements/<name>.txt`` without comments or blank lines."""
    with open(osp.join(HERE, 'requirements', name + '.txt')) as f:
        lines = (line.split('#', 1)[0].strip() for line in f)
        return [line for line in lines if line]


def read_version():
    with open(osp.join(HERE, 'mmnorm', 'version.py')) as f:
        return re.search(r"^__version__ = '([^']+)'", f.read(), re.M).group(1)


def read_readme():
    with open(osp.join(HERE, 'README.md'), encoding='utf-8') as f:
        return f.read()


def place_mim_items(mim_dir: str, link: bool) -> None:
    """Put :data:`MIM_ITEMS` of the source tree into ``mim_dir``: copies (a wheel), or symbolic
    links to the checkout's own folders (an editable install, so that edits show at once)."""
    os.makedirs(mim_dir, exist_ok=True)
    for name in MIM_ITEMS:
        source, target = osp.join(HERE, name), osp.join(mim_dir, name)
        if not osp.exists(source):
            raise FileNotFoundError(f'{source} is missing: a source tree or sdist of mmnorm '
                                    f'holds {", ".join(MIM_ITEMS)}')
        if osp.islink(target) or osp.isfile(target):
            os.remove(target)
        elif osp.isdir(target):
            shutil.rmtree(target)
        if link:
            os.symlink(osp.relpath(source, mim_dir), target)
        elif osp.isdir(source):
            shutil.copytree(source, target, ignore=_NOT_SHIPPED)
        else:
            shutil.copyfile(source, target)


class BuildPyWithMim(build_py):
    """``build_py`` that also copies the configs, tools and model index into the built package
    (``mmnorm/.mim``); in a PEP 660 editable build it links them in the source package."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            place_mim_items(osp.join(HERE, 'mmnorm', '.mim'), link=True)
        else:
            place_mim_items(osp.join(self.build_lib, 'mmnorm', '.mim'), link=False)


class DevelopWithMim(develop):
    """``setup.py develop`` (``pip install -e .``) that links ``mmnorm/.mim`` to the checkout."""

    def run(self):
        super().run()
        place_mim_items(osp.join(HERE, 'mmnorm', '.mim'), link=True)


setup(
    name='mmnorm',
    version=read_version(),
    description='Switchable, Sparse Switchable and Batch-Channel Normalization for OpenMMLab',
    long_description=read_readme(),
    long_description_content_type='text/markdown',
    author='mmnorm contributors',
    license='Apache-2.0',
    license_files=['LICENSE'],
    packages=find_packages(exclude=('configs', 'tools', 'tests', 'tests.*')),
    cmdclass={'build_py': BuildPyWithMim, 'develop': DevelopWithMim},
    # The oldest Python tested is 3.11; the code uses no feature newer than 3.10.
    python_requires='>=3.10',
    install_requires=read_requirements('runtime'),
    extras_require={
        'mm': read_requirements('mminstall'),
        'deploy': read_requirements('deploy'),
        'analysis': read_requirements('analysis'),
        # The tests export models to ONNX.
        'tests': read_requirements('tests') + read_requirements('deploy'),
        'all': read_requirements('mminstall') + read_requirements('tests') +
        read_requirements('deploy') + read_requirements('analysis'),
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
    zip_safe=False,
)
