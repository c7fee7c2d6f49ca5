"""One missed expert on the host's cores against copying it to the GPU, per precision and path.

For each precision (int4, int8, bf16) an expert of the given shapes (Mixtral's by default) is
packed into a blob as the store packs it, then built in every kernel path the host can take
for it (decoder/experts/host_compute.py: int4pack / int8pack, int8row = requantized to per-row
int8, dequant = dequantize + F.linear per call; bf16 read in place) and called for 1..4 tokens
with bf16 activations (the GPU's compute dtype), side by side; a "fastest" line per precision
and token count names the quickest path (what HostExperts' calibration would keep). With
--workers, the fastest path at one token is also run on W threads at once (each its own copy
of the expert, threads // W intra-op threads each): ms per expert when W experts share the
cores. Beside them, the pinned host -> device copy of the same raw payload (what the cache's
copy path moves). Prints one JSON line per figure and writes them to --out.

    python3 benchmarks/host_compute.py                         # Mixtral shapes, on the GPU host
    python3 benchmarks/host_compute.py --hidden 2048 --ffn 7168  # model A's shapes
    python3 benchmarks/host_compute.py --hidden 64 --ffn 128 --device cpu   # plumbing check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import threading  # noqa: E402

import torch  # noqa: E402

from decoder.experts.host_compute import HostExpert, candidate_paths, cpu_kernels, set_thread_count  # noqa: E402
from expert_store import format as blob_format  # noqa: E402
from expert_store.quant import expert_to_blob  # noqa: E402


def timed(fn: Any, n: int) -> float:
    """Median seconds of fn() over n calls, after two untimed ones (one slow call, another
    process on the cores, moves a mean more than the kernel choice it is meant to show)."""
    fn()
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def side_by_side(experts: Sequence[HostExpert], x: torch.Tensor, n: int, threads: int) -> float:
    """Wall seconds per expert call with each expert called n times on its own thread (threads
    intra-op threads each), all at once after one untimed call each."""
    start = threading.Barrier(len(experts) + 1)
    errors: list[BaseException] = []

    def run(ex: HostExpert) -> None:
        try:
            set_thread_count(threads)
            with torch.inference_mode():
                ex(x)
                start.wait()
                for _ in range(n):
                    ex(x)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            start.abort()

    ts = [threading.Thread(target=run, args=(ex,)) for ex in experts]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return (time.perf_counter() - t0) / (n * len(experts))


def measure(hidden: int, ffn: int, precisions: Sequence[str], tokens: Sequence[int], device: torch.device,
            group: int = 128, n: int = 10, workers: Sequence[int] = ()) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    w = {"w1": torch.randn(ffn, hidden, generator=g) * 0.02, "w3": torch.randn(ffn, hidden, generator=g) * 0.02,
         "w2": torch.randn(hidden, ffn, generator=g) * 0.02}
    threads = torch.get_num_threads()
    kernels = cpu_kernels()
    rows: list[dict[str, Any]] = [{"what": "setup", "threads": threads, "kernels": kernels,
                                   "cpu": torch.backends.cpu.get_cpu_capability(), "hidden": hidden, "ffn": ffn}]
    cuda = device.type == "cuda"
    for prec in precisions:
        header, raw_view = blob_format.decode_raw(expert_to_blob("m", 0, 0, prec, w, group_size=group))
        raw = torch.empty(header.raw_size, dtype=torch.uint8, pin_memory=cuda)
        raw.copy_(torch.frombuffer(bytearray(raw_view), dtype=torch.uint8))
        mb = round(header.raw_size / 1e6, 1)
        best: dict[int, tuple[float, str]] = {}
        built: dict[str, HostExpert] = {}
        for path in candidate_paths(prec, kernels) or ("native",):
            t0 = time.perf_counter()
            ex = built[path] = HostExpert.from_raw(header, raw, kernels, path)
            pack_s = time.perf_counter() - t0
            for t in tokens:
                x = torch.randn(t, hidden, generator=g).to(torch.bfloat16)
                s = timed(lambda: ex(x), n)
                best[t] = min(best.get(t, (s, path)), (s, path))
                rows.append({"what": "host expert", "precision": prec, "path": path, "kernel": ex.kernel,
                             "tokens": t, "ms": round(s * 1e3, 3), "payload_gbps": round(header.raw_size / s / 1e9, 1),
                             "pack_ms": round(pack_s * 1e3, 1), "payload_mb": mb,
                             "kept_mb": round(ex.nbytes / 1e6, 1)})
        for t, (s, path) in sorted(best.items()):
            rows.append({"what": "fastest", "precision": prec, "tokens": t, "path": path, "ms": round(s * 1e3, 3)})
        path = best[min(best)][1]
        x1 = torch.randn(1, hidden, generator=g).to(torch.bfloat16)
        for nw in workers:
            experts = [built[path]] + [HostExpert.from_raw(header, raw, kernels, path) for _ in range(nw - 1)]
            per = max(1, threads // nw)
            s = side_by_side(experts, x1, n, per)
            rows.append({"what": "workers", "precision": prec, "path": path, "workers": nw, "threads_per_worker": per,
                         "tokens": 1, "ms_per_expert": round(s * 1e3, 3),
                         "payload_gbps": round(header.raw_size / s / 1e9, 1)})
        built.clear()
        if cuda:
            dst = torch.empty(header.raw_size, dtype=torch.uint8, device=device)

            def copy() -> None:
                dst.copy_(raw, non_blocking=True)
                torch.cuda.synchronize(device)
            s = timed(copy, n)
            rows.append({"what": "pinned H2D copy", "precision": prec, "ms": round(s * 1e3, 3),
                         "gbps": round(header.raw_size / s / 1e9, 1)})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--precisions", default="int4,int8,bf16")
    p.add_argument("--tokens", default="1,2,4")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--workers", default="", help="e.g. 1,2,4: the fastest path on W threads at once")
    p.add_argument("--out", default=None, help="JSON file for the figures")
    a = p.parse_args(argv)
    rows = measure(a.hidden, a.ffn, a.precisions.split(","), [int(t) for t in a.tokens.split(",")],
                   torch.device(a.device), n=a.iters, workers=[int(w) for w in a.workers.split(",") if w])
    for r in rows:
        print(json.dumps(r), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
