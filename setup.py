"""Build script. The package is pure Python; the CUDA extension (csrc/) is optional."""
from setuptools import setup

setup()
