"""Build the Cython I/O core; everything else is declared in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "sllm_plugin._fastio",
        ["cython_ext/_fastio.pyx"],
        include_dirs=["cython_ext/third_party/xxhash"],
        extra_compile_args=["-O3"],
    )
]

setup(ext_modules=cythonize(extensions, language_level=3))
