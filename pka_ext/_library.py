"""Loads the compiled library, which registers torch.ops.pka_ext.* on import."""

import importlib

import torch

try:
    # Not `from pka_ext import _C`: while pka_ext is still importing, a missing _C would be
    # reported as "most likely due to a circular import".
    importlib.import_module("pka_ext._C")
except ImportError as err:
    raise ImportError(
        "pka_ext's compiled library (pka_ext._C) is missing or failed to load "
        f"({err}). Build it from the repository root with\n"
        "    pip install --no-build-isolation -e .\n"
        "(set CUDA_HOME=/usr/local/cuda and TORCH_CUDA_ARCH_LIST for a CUDA build; see the README, "
        "'Install'). The pure-PyTorch reference `python_ref` works without it."
    ) from err


def built_with_cuda() -> bool:
    """True when the compiled library carries the CUDA implementation."""
    return bool(torch.ops.pka_ext.built_with_cuda())
