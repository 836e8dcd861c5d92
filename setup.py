"""Build script for the native hot path; metadata lives in pyproject.toml.

There is no pure-Python fallback: without Cython and a C compiler the install
fails here, loudly, instead of producing a slow daemon.
"""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

extra_compile_args = ["-O3"]
if os.environ.get("EVENTBROKER_DEBUG_BUILD"):
    extra_compile_args = ["-O0", "-g"]

extensions = [
    Extension(
        "eventbroker._fastpath",
        ["src/eventbroker/_fastpath.pyx"],
        include_dirs=["src/eventbroker/_native"],
        depends=sorted(str(p) for p in Path("src/eventbroker/_native").iterdir()),
        extra_compile_args=extra_compile_args,
        libraries=["crypto"],  # OpenSSL's libcrypto: AES-256-GCM for personal fields (personal.pxi)
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3"},
        annotate=bool(os.environ.get("EVENTBROKER_ANNOTATE")),
    )
)
