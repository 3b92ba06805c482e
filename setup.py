"""Build of attnfused. The C++/CUDA extension sources and flags live in
attnfused/backends/extension.py (one list for this ahead-of-time build and the JIT build)."""
from setuptools import setup

setup()
