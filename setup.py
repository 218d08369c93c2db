"""Builds ``fastxai._C``: the C++ CPU ops always, the CUDA ops when ``FASTXAI_CUDA=1``.

Every schema is declared once in ``csrc/fastxai.cpp``; each backend lives in its own folder with
the same file stem (``csrc/cpu/<op>.cpp``, ``csrc/cuda/<op>.cu``) and calls the shared math in
``csrc/include/fastxai``.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    sources = ["csrc/fastxai.cpp", *_sources("csrc/cpu/*.cpp")]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-fopenmp", "-std=c++20"]
    if os.environ.get("FASTXAI_CUDA", "0") == "1":
        return CUDAExtension(
            "fastxai._C",
            sources + _sources("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            define_macros=[("FASTXAI_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "fastxai._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)}
)
