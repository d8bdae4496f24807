"""Builds the optional C half of the EXI codec (pki/cps/exi/_native.c); everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and the Python codec runs alone
(pki/cps/exi/native.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("pki.cps.exi._native", ["pki/cps/exi/_native.c"], optional=True,
                  extra_compile_args=["-O2", "-std=c11"]),
    ],
)
