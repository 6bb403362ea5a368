"""Build script.

All metadata lives in pyproject.toml. This file exists for the native extension built from
``csrc/`` (fused CPU and CUDA kernels); until those sources exist, the install is pure Python and
the ``"triton"`` and ``"reference"`` backends are the ones available.
"""

from setuptools import setup

setup()
