"""Build hook for the optional C accelerator (clipfeat._resample); everything else is in
pyproject.toml. Without a C compiler the build goes on without it and clipfeat resizes with
Pillow (same pixels, slower)."""
import sys

from setuptools import Extension, setup

args = [] if sys.platform == "win32" else ["-O3"]
setup(ext_modules=[Extension("clipfeat._resample", ["clipfeat/_resample.c"],
                             extra_compile_args=args, optional=True)])
