"""Builds the cffi API-mode extension ``migrated.kernel._native``.

Everything else lives in pyproject.toml; setuptools needs this file only because
cffi's ``cffi_modules`` hook is a ``setup()`` keyword.
"""

from setuptools import setup

setup(cffi_modules=["migrated/kernel/_build.py:ffibuilder"])
