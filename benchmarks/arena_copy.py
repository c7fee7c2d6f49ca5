"""Host -> GPU copy rate from a shared-memory arena page-locked in place, against torch pinned
memory and the same mapping left pageable: what a co-located store's arena (expert_store/
shm_arena.py, registered by expert_store/page_lock.py) gives the decoder's copies.

    python3 benchmarks/arena_copy.py                      # on the GPU host
    python3 benchmarks/arena_copy.py --mb 88 --slots 16 --out benchmarks/results/arena_copy.json

A file of `--slots` slots of `--mb` MB on /dev/shm is mapped, then every slot is copied to one
GPU buffer twice over on one copy stream, back to back or each waited for (`sync_each`, as a
loader thread that checks the arena's seqlock after its copy does). Rows: pinned (torch
pin_memory), shm-pageable, shm-registered (cudaHostRegister). Prints one JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from expert_store import page_lock  # noqa: E402


def rate(src: torch.Tensor, dst: torch.Tensor, stream: torch.cuda.Stream, label: str, sync_each: bool) -> dict:
    slots, n = src.shape
    torch.cuda.synchronize()
    t0, issue = time.perf_counter(), 0.0
    for i in range(2 * slots):
        with torch.cuda.stream(stream):
            a = time.perf_counter()
            dst.copy_(src[i % slots], non_blocking=True)
            issue += time.perf_counter() - a
            end = torch.cuda.Event()
            end.record(stream)
        if sync_each:
            end.synchronize()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"label": label, "sync_each": sync_each, "gbps": 2 * slots * n / dt / 1e9,
            "issue_ms": issue / (2 * slots) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=88, help="MB per slot (a bf16 expert of model A: 88)")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("arena_copy.py needs CUDA", file=sys.stderr)
        return 2
    n, slots = args.mb << 20, args.slots
    path = f"/dev/shm/adapmoe-arena-copy-{os.getpid()}"
    with open(path, "wb") as f:
        f.truncate(n * slots)
    rows = []
    try:
        fd = os.open(path, os.O_RDWR)
        m = mmap.mmap(fd, n * slots)
        os.close(fd)
        shm = torch.frombuffer(m, dtype=torch.uint8).view(slots, n)
        shm.fill_(1)
        pool = torch.ones(slots, n, dtype=torch.uint8).pin_memory()
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")
        stream = torch.cuda.Stream()
        rows += [rate(pool, dst, stream, "pinned", False), rate(pool, dst, stream, "pinned", True),
                 rate(shm, dst, stream, "shm-pageable", True)]
        ptr = page_lock.register(shm)
        try:
            rows += [rate(shm, dst, stream, "shm-registered", s) for s in (False, True, False, True)]
        finally:
            page_lock.unregister(ptr)
        del shm
    finally:
        os.unlink(path)
    for r in rows:
        print(json.dumps(r))
    if args.out is not None:
        args.out.write_text(json.dumps({"mb": args.mb, "slots": slots, "device": torch.cuda.get_device_name(),
                                        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
