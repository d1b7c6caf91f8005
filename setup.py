"""Packages: ``streamguard`` and its subpackages, found, plus the shipped data as packages.

The top-level ``weights/`` and ``pipelines/`` folders are installed as ``streamguard.weights`` and
``streamguard.pipelines`` (``package-dir`` and ``package-data`` in ``pyproject.toml``), so a wheel
or a plain ``pip install .`` carries the shipped checkpoints and recipes. ``pyproject.toml`` can
either list packages or find them, not both; everything else is configured there.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["streamguard", "streamguard.*"]), "streamguard.weights", "streamguard.pipelines"])
