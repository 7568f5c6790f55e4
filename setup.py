"""Build script: the Cython core lives in minray/_core, and the plain-Python
modules on every task's path are compiled as they are (see docs/architecture.md)."""
import os
import runpy

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CORE_MODULES = ["allocator", "table", "store", "scheduler"]

extensions = [
    Extension(
        f"minray._core.{name}",
        [f"minray/_core/{name}.pyx"],
        extra_compile_args=["-O3", "-std=gnu11"],
        libraries=["pthread"],
    )
    for name in CORE_MODULES
]


def compiled_python_modules():
    """The plain-Python modules on every task's path, compiled unchanged
    (minray/_core/compiled.py says which and why); MINRAY_PURE_PYTHON=1
    leaves them as source, e.g. to profile them line by line."""
    if os.environ.get("MINRAY_PURE_PYTHON"):
        return []
    # (read without importing minray: its dependencies may not be installed yet)
    names = runpy.run_path(os.path.join(HERE, "minray", "_core", "compiled.py"))["COMPILED_MODULES"]
    # (-O2 without debug info: a third less build time than -O3 -g)
    return [Extension(name, [name.replace(".", "/") + ".py"], extra_compile_args=["-O2", "-g0"])
            for name in names]


def read(path):
    with open(os.path.join(HERE, path), encoding="utf-8") as f:
        return f.read()


setup(
    name="minray",
    version="0.1.0",
    description="A small, fast distributed execution framework with Ray's API",
    long_description=read("README.md"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["minray", "minray.*"]),
    package_data={"minray._core": ["*.pxd", "*.pyx", "*.h"]},
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ) + cythonize(
        # Python semantics kept whole: negative indexes, bounds checks, division.
        compiled_python_modules(),
        language_level=3,
        nthreads=os.cpu_count() or 1,
    ),
    options={"build_ext": {"parallel": os.cpu_count() or 1}},   # (pip builds serially)
    python_requires=">=3.9",
    install_requires=[
        "numpy",
        "cloudpickle>=2.0",
        "lmdb",
        "pyarrow",
        "psutil",
        "paramiko>=3.1",         # minray-cluster (SSH); 3.1 added connect(channel_timeout=)
    ],
    extras_require={
        # The suite runs every example's smoke mode, so it needs their extras.
        "test": ["pytest>=7", "pytest-timeout", "scipy", "scikit-learn", "gymnasium",
                 "torch==2.13.0"],
        # What docs/examples need beyond the core (torch pinned to the CPU
        # build these machines carry; an unpinned torch pulls a CUDA build).
        "examples": ["scipy", "scikit-learn", "gymnasium", "torch==2.13.0"],
    },
    entry_points={"console_scripts": ["minray = minray.scripts.cli:main",
                                     "minray-cluster = minray.cluster_tool.cli:main"]},
    zip_safe=False,
)
