"""Build: a pure-Python install everywhere; the CUDA C++ extension (csrc/) only where a CUDA toolkit and a CUDA
build of torch are both present (or FROD_BUILD_CUDA=1 forces it, FROD_BUILD_CUDA=0 skips it)."""

import os

from setuptools import find_packages, setup


def cuda_extensions():
    """The csrc/ extension, or [] (with the reason on stderr) where it cannot be built here."""
    # Filled in by the CUDA C++ backend (csrc/): see frod_kernels/cuda_backend.py for how it is loaded.
    return [], {}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="frod-kernels",
    version="0.1.0",
    description="Fast FRoD fine-tuning: fused Triton and CUDA C++ kernels for W' = U (diag(lambda) + S) V^T",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["frod_kernels", "frod_kernels.*"]),
    python_requires=">=3.11",
    install_requires=["torch>=2.6", "transformers>=4.45", "peft>=0.20", "tqdm", "safetensors"],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist", "hypothesis>=6.100", "triton>=3.2; platform_system == 'Linux'"],
        "bench": ["matplotlib>=3.8", "triton>=3.2; platform_system == 'Linux'"],
    },
    entry_points={"console_scripts": ["frod-bench = frod_kernels.bench.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
