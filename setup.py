"""Builds the native runtime (runtime/*.c) as the extension `structc._runtime`;
everything else is declared in pyproject.toml."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "structc._runtime",
            sources=["runtime/structc_rt.c", "runtime/pymodule.c", "runtime/sc_profile.c", "runtime/sc_pools.c"],
            include_dirs=["runtime"],
            extra_compile_args=["-O2", "-std=c11"],
            extra_link_args=["-pthread"],
        )
    ]
)
