"""Build: a pure-Python install everywhere; the CUDA C++ extension (csrc/) only where a CUDA toolkit and a CUDA
build of torch are both present (or FROD_BUILD_CUDA=1 forces it, FROD_BUILD_CUDA=0 skips it)."""

import os
import re
import sys

from setuptools import find_packages, setup


def cuda_extensions():
    """The csrc/ extension, or [] (with the reason on stderr) where it cannot be built here.

    Built when torch is a CUDA build and a CUDA toolkit is found (CUDA_HOME, else torch's guess from nvcc), for the
    GPUs in TORCH_CUDA_ARCH_LIST (default "8.0;9.0"). torch must be importable at build time, so build it with
    ``pip install --no-build-isolation -e .``. See csrc/README.md.
    """
    flag = os.environ.get("FROD_BUILD_CUDA")

    def skip(reason):
        print(f"frod-kernels: not building the CUDA C++ extension: {reason}", file=sys.stderr)
        return [], {}

    if flag == "0":
        return skip("FROD_BUILD_CUDA=0")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        if flag == "1":
            raise
        return skip(f"torch is not importable here ({e}); use pip install --no-build-isolation")
    if flag != "1":
        if torch.version.cuda is None:
            return skip(f"torch {torch.__version__} is not a CUDA build")
        if CUDA_HOME is None:
            return skip("no CUDA toolkit found (set CUDA_HOME)")
        if not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
            return skip(f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (set CUDA_HOME to the toolkit folder)")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # frod_kernels/backends/cuda.py reads this tag from the binary and refuses a build for another torch.
    torch_tag = re.sub(r"[^A-Za-z0-9._]", "_", torch.__version__)
    ext = CUDAExtension(
        name="frod_kernels._C",
        sources=["csrc/ops.cpp", "csrc/row_gather_diag.cu", "csrc/sampled_dot_diag.cu"],
        extra_compile_args={
            "cxx": ["-O3", f"-DFROD_TORCH_VERSION={torch_tag}"],
            "nvcc": ["-O3", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="frod-kernels",
    version="0.1.0",
    description="Fast FRoD fine-tuning: fused Triton and CUDA C++ kernels for W' = U (diag(lambda) + S) V^T",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["frod_kernels", "frod_kernels.*"]),
    # the cpu backend's C source, compiled on first use (frod_kernels/backends/cpu.py)
    package_data={"frod_kernels.backends": ["cpu_kernels.c"]},
    python_requires=">=3.11",
    # The floors are the oldest versions CI tests (.ci/run, the "oldest" row: the H200 machine's stack). Older ones
    # failed there: Triton < 3.4 lacks triton.knobs and 3.2's autotuner wants a driver even when interpreting; torch
    # 2.6's fully_shard has no ignored_params; transformers 4.45's gradient checkpointing and PEFT 0.20's saving of
    # bias="frod_only" and load_adapter trainability differ from what the tests hold.
    install_requires=["torch>=2.11", "transformers>=5.17", "peft>=0.21.2", "tqdm", "safetensors"],
    extras_require={
        # matplotlib: the tests run frod-bench end to end, plots included
        "test": ["pytest>=8", "pytest-xdist", "hypothesis>=6.100", "matplotlib>=3.8",
                 "triton>=3.6; platform_system == 'Linux'"],
        "bench": ["matplotlib>=3.8", "triton>=3.6; platform_system == 'Linux'"],
        # what PEFT's own FRoD tests import (tests/peft_suite/run.py runs them with and without acceleration)
        "peft-tests": ["pytest>=8", "diffusers", "datasets", "parameterized", "attrs", "scipy"],
    },
    entry_points={"console_scripts": ["frod-bench = frod_kernels.bench.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
