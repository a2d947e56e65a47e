"""Builds bwrf_ext._C: CPU kernels always, CUDA kernels when torch has CUDA and a toolkit is found.

Environment switches:
  BWRF_EXT_CPU_ONLY=1   build without CUDA even when a toolkit is present.
  FORCE_CUDA=1          fail instead of falling back to CPU-only when no CUDA toolkit is found.
  TORCH_CUDA_ARCH_LIST  CUDA archs; defaults to the visible GPUs, or DEFAULT_CUDA_ARCHS without one.
  MAX_JOBS              parallel compile jobs (ninja).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

# Turing (T4), Ampere (8.x runs sm_80 code) and Hopper, plus PTX that newer GPUs compile at load.
# CUDA 13 dropped Volta (7.0).
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX"


def _is_toolkit(prefix):
    return bool(prefix) and os.path.isfile(os.path.join(prefix, "bin", "nvcc")) and os.path.isfile(
        os.path.join(prefix, "include", "cuda_runtime.h")
    )


def find_cuda_home():
    """The CUDA toolkit prefix, or None.

    torch guesses dirname(dirname(which nvcc)), which is wrong where nvcc on PATH is a wrapper
    script (here /usr/local/bin/nvcc -> /usr/local); so check each candidate for a real toolkit and
    try the standard install prefixes too.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if _is_toolkit(c)), None)


def pip_cuda_include_dirs(cuda_home):
    """Headers torch's CUDA headers need but a minimal toolkit lacks (cusparse.h, cublas_v2.h):
    the nvidia-* wheels that come with torch ship them under site-packages/nvidia/*/include."""
    if os.path.isfile(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    found = {
        os.path.dirname(h)
        for p in sys.path
        for h in glob.glob(os.path.join(p, "nvidia", "*", "include", "cusparse.h"))
    }
    return sorted(found)


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


cuda_home = None if _flag("BWRF_EXT_CPU_ONLY") else find_cuda_home()
if cuda_home:
    # cpp_extension reads CUDA_HOME when it is imported, so set it first.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = bool(cuda_home) and torch.version.cuda is not None
if _flag("FORCE_CUDA") and not with_cuda:
    sys.exit(
        "FORCE_CUDA=1 but no CUDA build is possible: "
        + ("torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit found")
        + ". Install the toolkit (or set CUDA_HOME) or unset FORCE_CUDA."
    )
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
cuda_archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPUs") if with_cuda else ""

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cxx_flags = [
    "-O3",
    "-fopenmp",  # at::parallel_for is serial in an extension without it
    "-ffp-contract=off",  # no FMA contraction: CPU, CUDA and reference agree bit for bit
]
define_macros = [("BWRF_EXT_CUDA_ARCHS", f'"{cuda_archs}"')]
extension_kwargs = dict(extra_link_args=["-fopenmp"], define_macros=define_macros)
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("BWRF_EXT_WITH_CUDA", None))
    extension = CUDAExtension(
        "bwrf_ext._C",
        sources,
        include_dirs=pip_cuda_include_dirs(cuda_home),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--fmad=false"]},
        **extension_kwargs,
    )
else:
    extension = CppExtension(
        "bwrf_ext._C", sources, extra_compile_args={"cxx": cxx_flags}, **extension_kwargs
    )

print(
    "bwrf_ext build configuration:\n"
    f"  torch {torch.__version__} (CUDA {torch.version.cuda})\n"
    f"  CUDA kernels: {'yes' if with_cuda else 'no'}"
    + (f" (toolkit {cuda_home}, archs {cuda_archs})" if with_cuda else "")
    + f"\n  sources: {len(sources)}, MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}",
    flush=True,
)

setup(
    packages=find_packages(include=["bwrf_ext", "bwrf_ext.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
)
