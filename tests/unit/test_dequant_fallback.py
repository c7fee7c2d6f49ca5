"""int4 dequantization when the Triton kernel cannot run: the torch path gives the same bits,
and the failure is reported once.

Triton builds its kernel launcher with a C compiler at the first launch; an image without one
(python:3.11-slim) made the first int4 dequantization fail. Here the failure is forced two
ways: on any machine the kernel call raises Triton's own "no C compiler" error (injected), and
on a CUDA machine a child process runs the real Triton with no compiler to be found and an
empty Triton cache."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
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


CHILD = textwrap.dedent("""
    import torch
    from expert_store.quant import dequantize, quantize
    g = torch.Generator().manual_seed(5)
    for shape in ((4096, 1024), (1024, 4096), (96, 384)):
        q, s = quantize(torch.randn(shape, generator=g) * 0.02, 4, 128)
        q, s = q.cuda(), s.cuda()
        got = dequantize(q, s, 4, 128, shape, torch.bfloat16)
        want = dequantize(q, s, 4, 128, shape, torch.bfloat16, kernel="torch")
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), shape
    from expert_store import dequant_kernels
    print("fallback:", dequant_kernels._failure)
""")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the real Triton launcher build)")
@pytest.mark.timeout(240)
def test_real_triton_without_a_c_compiler_falls_back(tmp_path):
    """The real thing: Triton, an empty cache, no compiler on PATH and no CC."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "TRITON_CACHE_DIR")}
    env.update(PATH=str(empty_bin), HOME=str(tmp_path), TRITON_CACHE_DIR=str(tmp_path / "triton-cache"),
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=220,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fallback: " in r.stdout and "fallback: None" not in r.stdout, r.stdout
    warned = [ln for ln in r.stderr.splitlines() if "int4 dequantization" in ln]
    assert len(warned) == 1, r.stderr[-3000:]
