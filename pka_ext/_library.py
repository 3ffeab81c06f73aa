"""Loads the compiled library, which registers torch.ops.pka_ext.* on import."""

import importlib
import os
import warnings

import torch

try:
    # Not `from pka_ext import _C`: while pka_ext is still importing, a missing _C would be
    # reported as "most likely due to a circular import".
    importlib.import_module("pka_ext._C")
except ImportError as err:
    raise ImportError(
        "pka_ext's compiled library (pka_ext._C) is missing or failed to load "
        f"({err}). This pka_ext was imported from {os.path.dirname(os.path.abspath(__file__))}: "
        "a source checkout shadows an installed copy when Python runs inside it (run elsewhere, or "
        "install it with -e). Build it from the repository root with\n"
        "    pip install \"setuptools>=70.1\" ninja\n"
        "    pip install --no-build-isolation -e .\n"
        "(set CUDA_HOME=/usr/local/cuda and TORCH_CUDA_ARCH_LIST for a CUDA build; see the README, "
        "'Install'). The pure-PyTorch reference `python_ref` works without it."
    ) from err


def built_with_cuda() -> bool:
    """True when the compiled library carries the CUDA implementation."""
    return bool(torch.ops.pka_ext.built_with_cuda())


# setup.py falls back to a CPU-only build where it finds no CUDA toolkit, and pip hides its notice;
# on a GPU machine that is almost never what was meant. (A CUDA build never asks for the device,
# which would initialise CUDA at import.)
if not built_with_cuda() and torch.version.cuda is not None and torch.cuda.is_available():
    warnings.warn("pka_ext was built without its CUDA kernels although a GPU is visible: the op "
                  "refuses CUDA tensors. Rebuild with PKA_REQUIRE_CUDA=1 and CUDA_HOME set (README, "
                  "'Install').", stacklevel=2)
