"""Build for pka-ext.

Builds a CUDAExtension when torch is a CUDA build and a CUDA toolkit is found (no GPU needed),
otherwise a CPU-only CppExtension.

Environment switches:
  PKA_FORCE_CPU=1       build the CPU-only extension even if CUDA is available
  PKA_REQUIRE_CUDA=1    fail unless the CUDA extension can be built
  CUDA_HOME             the toolkit (default: found from nvcc on PATH, then /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST  target GPUs, e.g. "9.0" or "8.0;9.0" (default without a visible GPU: 9.0)
  MAX_JOBS              parallel compile jobs (ninja)
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _resolve_cuda_home():
    """Find the toolkit before torch.utils.cpp_extension guesses one at import time.

    torch derives CUDA_HOME from the nvcc on PATH by going two directories up, which yields
    /usr/local for a /usr/local/bin/nvcc wrapper and then fails to link -lcudart; we accept only a
    folder that holds both nvcc and libcudart.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        # A real toolkit has nvcc and the runtime library; an nvcc wrapper script in
        # /usr/local/bin would otherwise make /usr/local look like one.
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and (
            glob.glob(os.path.join(home, "lib64", "libcudart.so*"))
            or glob.glob(os.path.join(home, "lib", "libcudart.so*"))
        ):
            return home
    return None


_cuda_home = None if _flag("PKA_FORCE_CPU") else _resolve_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CPP_SOURCES = ["csrc/pka_ops.cpp", "csrc/pka_cpu.cpp"]
# The fused kernels are instantiated in one file per dtype, so that they compile in parallel (the
# backward's, for all three dtypes in one file, took 192 s of one core).
CUDA_SOURCES = ["csrc/pka_cuda.cu", "csrc/pka_fused.cu", "csrc/pka_fused_f32.cu",
                "csrc/pka_fused_f16.cu", "csrc/pka_fused_bf16.cu"]


def _use_cuda():
    if _flag("PKA_FORCE_CPU"):
        if _flag("PKA_REQUIRE_CUDA"):
            sys.exit("pka-ext: PKA_FORCE_CPU and PKA_REQUIRE_CUDA are both set")
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if _cuda_home is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME)")
    if reasons:
        if _flag("PKA_REQUIRE_CUDA"):
            sys.exit("pka-ext: PKA_REQUIRE_CUDA=1 but " + "; ".join(reasons))
        print("pka-ext: building the CPU-only extension: " + "; ".join(reasons))
        return False
    return True


# Some toolchains link libstdc++ into the extension statically (the GPU machine's did: its copy's
# std:: symbols showed up in the extension). Exported, those symbols mix with the process's shared
# libstdc++, and formatting a number into an error message then crashed the process (on the GPU
# machine) or cut the message short (reproduced here by linking with -static-libstdc++). Hidden,
# the copy stays self-consistent; without a static libstdc++ the flag does nothing.
# tests/test_build.py builds with -static-libstdc++ and checks the messages.
LINK_ARGS = ["-Wl,--exclude-libs,libstdc++.a"] if sys.platform.startswith("linux") else []


def _extension():
    cxx = ["-O3"]  # torch adds the C++ standard it was built with
    if not _use_cuda():
        return CppExtension("pka_ext._C", CPP_SOURCES, extra_compile_args={"cxx": cxx},
                            extra_link_args=LINK_ARGS)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Without a visible GPU torch cannot pick the architecture. Hopper is our target; its PTX
        # lets newer GPUs compile the kernels when they load (older ones need the list set).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
        print("pka-ext: no GPU visible and TORCH_CUDA_ARCH_LIST unset; building for sm_90 + PTX")
    print(f"pka-ext: building the CUDA extension with CUDA_HOME={_cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}")
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "pka_ext._C",
        CPP_SOURCES + CUDA_SOURCES,
        define_macros=[("PKA_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=LINK_ARGS,
    )


setup(
    name="pka-ext",
    version="0.1.0",
    description="Positional-kernel attention (PSA) as a PyTorch C++/CUDA extension, "
    "with a sequential recommender",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pka_ext", "pka_ext.*", "python_ref", "python_ref.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    install_requires=["torch>=2.11", "numpy", "tqdm"],
    extras_require={"plot": ["matplotlib"], "test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["pka-rec=pka_ext.rec.cli:main"]},
    zip_safe=False,
)
