"""int4 -> bf16 dequantization of one Mixtral-shaped matrix (14336 x 4096, group 128) on CUDA:
the fused Triton kernel (expert_store/dequant_kernels.py) against the torch path, ms per call
(mean of 20 after 3 warm-up calls), side by side in one process.

    python3 benchmarks/dequant.py          # needs CUDA (and Triton for the fused row)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from expert_store import quant  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/dequant.py needs CUDA", file=sys.stderr)
        return 2
    shape = (14336, 4096)
    w = torch.randn(shape, device="cuda") * 0.02
    q, s = quant.quantize(w, 4, 128)
    out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    for kernel in ("auto", "torch"):
        for _ in range(3):
            quant.dequantize(q, s, 4, 128, shape, out=out, kernel=kernel)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            quant.dequantize(q, s, 4, 128, shape, out=out, kernel=kernel)
        torch.cuda.synchronize()
        print(f"dequant int4 {shape[0]}x{shape[1]} -> bf16 kernel={kernel}: "
              f"{(time.perf_counter() - t) / 20 * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
