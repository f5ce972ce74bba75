"""Build albef_fast: the Python package, its Triton kernels and the optional C++/CUDA extension.

The extension (albef_fast._C) is built with ninja from csrc/: the CPU sources always, the
CUDA sources (csrc/cuda/*.cu) whenever nvcc (CUDA_HOME) and a CUDA build of torch are present,
even on a machine with no GPU. ALBEF_FAST_NO_EXTENSION=1 skips it (the PyTorch fallbacks serve).
"""
import glob
import os

from setuptools import setup


def _has_cudart(cuda_home):
    """nvcc and the CUDA runtime library to link: torch may guess a CUDA_HOME that has only nvcc."""
    if not cuda_home:
        return False
    libs = glob.glob(os.path.join(cuda_home, "lib*", "libcudart.so*"))
    if not libs:
        print(f"albef_fast: no libcudart under CUDA_HOME={cuda_home}; building the CPU ops only")
    return bool(libs)


def _extensions():
    if os.environ.get("ALBEF_FAST_NO_EXTENSION", "0") not in ("", "0"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and _has_cudart(cpp_extension.CUDA_HOME)
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]  # the C++ standard: as torch requires
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"  # no GPU to ask: A100, H100/H200, PTX for newer
    if with_cuda:
        nvcc = ["-O3", "--fmad=false", "-DALBEF_FAST_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension(
            "albef_fast._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DALBEF_FAST_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp", "-ldl"],  # dlopen of libcuda (csrc/itc_launch.cpp)
        )
    else:
        ext = cpp_extension.CppExtension("albef_fast._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"])
    build = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = _extensions() if glob.glob("csrc/*.cpp") else ([], {})

setup(
    name="albef_fast",
    version="0.1.0",
    description="Fused, memory-light ITC loss with momentum distillation for ALBEF / BLIP (Triton + C++)",
    packages=["albef_fast", "albef_fast.bench", "albef_fast.integrations"] + (["albef_fast.kernels"] if os.path.exists("kernels/__init__.py") else []),
    package_dir={"albef_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.9", "triton; platform_system == 'Linux'"],
    extras_require={"bench": ["tqdm", "matplotlib"], "lightning": ["pytorch-lightning"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
