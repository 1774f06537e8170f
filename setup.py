"""Packaging. The C++/CUDA extensions are built just in time on first use (see
kdkernels/backends/README or the README "Backends" section), so this stays pure Python and
pip's build isolation never has to fetch a second torch."""

from setuptools import setup

setup()
