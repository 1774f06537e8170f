"""Packaging. The C++/CUDA extensions are built just in time on first use
(kdkernels/backends/extension.py; README "Backends", docs/design.md "Building the extensions"),
so this stays pure Python and pip's build isolation never has to fetch a second torch.
Dependencies and extras are in pyproject.toml."""

from setuptools import setup

setup()
