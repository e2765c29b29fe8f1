# Copyright (c) mmnorm contributors. All rights reserved.
"""Install mmnorm.

``pip install -e .`` installs the plugin with its runtime requirements (torch, mmengine). Extras:
``[mm]`` the OpenMMLab codebases (mmcv with ops must be built first, see README), ``[tests]``,
``[deploy]`` (ONNX export and ONNX Runtime), ``[analysis]`` (scikit-learn, for the digits dataset
of ``tools/analysis/``), ``[all]``.
"""
import os.path as osp
import re

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


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


setup(
    name='mmnorm',
    version=read_version(),
    description='Switchable and Batch-Channel Normalization for OpenMMLab',
    long_description=read_readme(),
    long_description_content_type='text/markdown',
    license='Apache License 2.0',
    packages=find_packages(exclude=('configs', 'tools', 'tests')),
    python_requires='>=3.8',
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
        'License :: OSI Approved :: Apache Software License',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
    zip_safe=False,
)
