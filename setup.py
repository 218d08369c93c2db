"""Builds ``fastxai._C``: the C++ CPU ops always, and the CUDA ops where they can run.

The CUDA kernels are built when torch has CUDA, the CUDA toolkit is found and a GPU is visible,
or when ``FASTXAI_CUDA=1`` (e.g. to build on a machine without a GPU); ``FASTXAI_CUDA=0`` skips
them. Without a GPU to read the architecture from, and ``TORCH_CUDA_ARCH_LIST`` unset, they are
built for ``8.0;9.0+PTX`` (A100, H100, and PTX that newer GPUs compile at load time).

Every schema is declared once in ``csrc/fastxai.cpp``; each backend lives in its own folder with
the same file stem (``csrc/cpu/<op>.cpp``, ``csrc/cuda/<op>.cu``) and calls the shared math in
``csrc/include/fastxai``.

The torch version the extension is compiled against goes into ``fastxai/_torch_build.py`` beside
it, which ``fastxai.ops`` compares with the running torch before it loads the extension.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _build_cuda() -> bool:
    choice = os.environ.get("FASTXAI_CUDA", "")
    if choice in ("0", "1"):
        return choice == "1"
    if choice:
        raise SystemExit(f"FASTXAI_CUDA: expected 0 or 1, got {choice!r}")
    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def _extension():
    sources = ["csrc/fastxai.cpp", *_sources("csrc/cpu/*.cpp")]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-fopenmp", "-std=c++20"]
    if _build_cuda():
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
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


class BuildRecordingTorch(BuildExtension.with_options(use_ninja=True)):
    """``build_ext`` that also writes ``fastxai/_torch_build.py`` beside the built extension."""

    def run(self) -> None:
        super().run()
        folder = os.path.dirname(self.get_ext_fullpath("fastxai._C"))
        with open(os.path.join(folder, "_torch_build.py"), "w", encoding="utf-8") as f:
            f.write(
                '"""The torch that fastxai._C was built against (written by setup.py)."""\n\n'
                f"TORCH_VERSION = {torch.__version__!r}\n"
            )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildRecordingTorch})
