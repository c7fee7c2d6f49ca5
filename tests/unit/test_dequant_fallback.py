"""int4 dequantization when the Triton kernel cannot run: the torch path gives the same bits,
and the failure is reported once.

Triton builds its kernel launcher with a C compiler at the first launch, so in an image without
one (python:3.11-slim) the first int4 dequantization's kernel fails. Here the kernel call raises
Triton's own "no C compiler" error (injected); on a CUDA machine,
tests/integration/test_child_processes.py runs the real Triton in a child process with no
compiler to be found and an empty Triton cache."""

from __future__ import annotations

import logging

import torch

from expert_store import dequant_kernels
from expert_store.quant import dequantize, quantize

NO_CC = "Failed to find C compiler. Please specify via CC environment variable or set triton.knobs.build.impl."


def _int4(shape: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(shape, generator=g) * 0.02, 4, 128)


def test_a_failing_kernel_falls_back_to_the_same_bits_with_one_warning(monkeypatch, caplog):
    calls = []

    def kernel_without_compiler(q, scales, group_size, out):
        calls.append(tuple(out.shape))
        out.fill_(float("nan"))  # whatever a failed launch left behind must not leak into the result
        raise RuntimeError(NO_CC)

    monkeypatch.setattr(dequant_kernels, "_failure", None)
    monkeypatch.setattr(dequant_kernels, "available", lambda q, in_f, gs, out: dequant_kernels._failure is None)
    monkeypatch.setattr(dequant_kernels, "dequantize_int4", kernel_without_compiler)
    caplog.set_level(logging.WARNING, logger="expert_store.dequant_kernels")
    for seed, shape, dtype in ((1, (96, 384), torch.bfloat16), (2, (64, 256), torch.float16),
                               (3, (32, 512), torch.float32)):
        q, s = _int4(shape, seed)
        got = dequantize(q, s, 4, 128, shape, dtype)
        want = dequantize(q, s, 4, 128, shape, dtype, kernel="torch")
        assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           want.view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert calls == [(96, 384)], "after the first failure the kernel must not be tried again"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "Failed to find C compiler" in warnings[0].getMessage() and "torch path" in warnings[0].getMessage()
