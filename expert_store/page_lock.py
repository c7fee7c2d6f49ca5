"""Page-locking host memory in place for DMA: cudaHostRegister on a tensor's bytes (the
FetchPool arena, the co-located shared-memory arena), so that copies from slices of it to
the GPU run at the pinned rate without a staging copy. flags 0 = cudaHostRegisterDefault."""

from __future__ import annotations

from typing import Any


def register(tensor: Any) -> int | None:
    """Page-lock `tensor`'s bytes; returns the registered pointer, or None without torch/CUDA.
    RuntimeError when CUDA refuses."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    rc = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
    if int(rc) != 0:
        raise RuntimeError(f"cudaHostRegister of the {tensor.numel()}-byte arena failed (cudaError {int(rc)})")
    return tensor.data_ptr()


def unregister(ptr: int) -> None:
    """Undo register(): waits for the device first, since a copy still reading the memory must
    finish before its pages stop being locked (and the memory may be unmapped right after)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.cudart().cudaHostUnregister(ptr)
