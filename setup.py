"""Packaging. The C++/CUDA extensions are built just in time on first use (kdkernels/_build.py
and the README "Backends" section), so this stays pure Python and pip's build isolation never
has to fetch a second torch."""

from setuptools import setup

setup()
