"""Triton kernels built on first use, so that Triton (an optional, CUDA-only dependency) is
imported only where a kernel runs, and the test of where they run (CUDA, or Triton's
interpreter on the CPU with TRITON_INTERPRET=1, which the tests use)."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_kernel(build: Callable[[Any, Any], Any]) -> Callable[[], Any]:
    """`build(triton, tl)` -> kernel, called once on first use; the getter returns None when
    Triton cannot be imported."""
    @functools.lru_cache(maxsize=1)
    def get() -> Any:
        try:
            import triton
            import triton.language as tl
        except Exception:  # pragma: no cover - depends on the install
            return None
        return build(triton, tl)
    return get


def runs_on(x: torch.Tensor, kernel: Callable[[], Any]) -> bool:
    """Whether `kernel` runs for tensors like `x`: on CUDA, or anywhere under the interpreter."""
    if interpreting():
        return kernel() is not None
    return x.is_cuda and kernel() is not None
