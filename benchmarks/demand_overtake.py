"""How long a demand copy waits behind prefetch copies already queued, on CUDA.

An expert cache copies prefetches and demand loads host -> GPU. When prefetches are queued on
the same stream, a demand load (the token is waiting for it) starts only after all of them.
This measures, side by side in one process, the demand copy's latency (from its enqueue to
its completion, wall clock) behind N queued prefetch copies of the same size, for:

- `one-stream`: prefetches and the demand on one copy stream (FIFO),
- `two-streams`: the demand on its own stream, prefetches whole,
- `two-streams-chunked`: the demand on its own stream, prefetches split into CHUNK-MB copies,
- `two-streams-chunked-prio`: as above, the demand stream created with high priority,

plus the time until every copy has finished (the link's throughput must not drop). Each
configuration: median of REPEATS runs after one warm-up. Pinned host memory, 88 MB copies
(one bf16 expert of the benchmarks' model A; ~1.6 ms at 55 GB/s).

    python3 benchmarks/demand_overtake.py [--mb 88] [--prefetches 4] [--chunk-mb 8] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def one_run(src: list[torch.Tensor], dst: list[torch.Tensor], pf_stream: torch.cuda.Stream,
            demand_stream: torch.cuda.Stream, chunk: int | None) -> tuple[float, float]:
    """Queue len(src)-1 prefetch copies, then one demand copy -> (demand latency s, all done s)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(pf_stream):
        for s, d in zip(src[:-1], dst[:-1]):
            if chunk is None:
                d.copy_(s, non_blocking=True)
            else:
                for a in range(0, s.numel(), chunk):
                    d[a:a + chunk].copy_(s[a:a + chunk], non_blocking=True)
    t_demand = time.perf_counter()
    done = torch.cuda.Event()
    with torch.cuda.stream(demand_stream):
        dst[-1].copy_(src[-1], non_blocking=True)
        done.record(demand_stream)
    done.synchronize()
    t_done = time.perf_counter()
    torch.cuda.synchronize()
    return t_done - t_demand, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=88, help="size of each copy (MB)")
    p.add_argument("--prefetches", type=int, default=4, help="prefetch copies queued before the demand")
    p.add_argument("--chunk-mb", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/demand_overtake.py needs CUDA", file=sys.stderr)
        return 2
    n = args.mb << 20
    src = [torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(i) for i in range(args.prefetches + 1)]
    dst = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in src]
    copy_s = torch.cuda.Stream()
    configs = {
        "one-stream": (copy_s, copy_s, None),
        "two-streams": (copy_s, torch.cuda.Stream(), None),
        "two-streams-chunked": (copy_s, torch.cuda.Stream(), args.chunk_mb << 20),
        "two-streams-chunked-prio": (copy_s, torch.cuda.Stream(priority=-1), args.chunk_mb << 20),
    }
    rows = []
    for name, (pf, dem, chunk) in configs.items():
        one_run(src, dst, pf, dem, chunk)   # warm-up
        runs = [one_run(src, dst, pf, dem, chunk) for _ in range(args.repeats)]
        lat = statistics.median(r[0] for r in runs) * 1e3
        total = statistics.median(r[1] for r in runs) * 1e3
        gbps = (args.prefetches + 1) * n / (total / 1e3) / 1e9
        assert torch.equal(dst[-1][:16].cpu(), src[-1][:16]), "demand copy landed wrong"
        rows.append({"config": name, "demand_latency_ms": round(lat, 3), "all_copies_ms": round(total, 3),
                     "all_copies_gbps": round(gbps, 1), "prefetches": args.prefetches, "mb": args.mb,
                     "chunk_mb": None if chunk is None else args.chunk_mb})
        print(f"{name:>26}: demand latency {lat:7.3f} ms, all {args.prefetches + 1} copies {total:7.3f} ms "
              f"({gbps:.1f} GB/s)", flush=True)
    one = rows[0]["demand_latency_ms"]
    for r in rows[1:]:
        print(f"{r['config']}: demand latency {one / r['demand_latency_ms']:.2f}x shorter than one-stream")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
