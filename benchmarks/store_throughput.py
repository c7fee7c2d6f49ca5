"""Expert store throughput: MB/s of blobs landing in a client buffer over gRPC, for 1 and 4
concurrent streams, against `expert-store serve --workers 1` and `--workers 2`, side by
side with a raw `readinto` of the same blob files (the local limit).

    .venv/bin/python benchmarks/store_throughput.py --total-mb 200

Builds a store of random bf16 experts (about --blob-mb each, --total-mb in all) in a temp
directory, starts real server processes on loopback, and fetches every blob into one
preallocated arena (StoreClient.fetch_expert(out=...)), one thread per stream, with one
client (one connection per stream, so SO_REUSEPORT can spread them over the workers).
Each figure is the best of --repeats passes after a warm-up pass (page cache warm for both
the server and the readinto baseline). Writes benchmarks/results/store_throughput.json and
.png and prints a table with ratios to the local limit.

FetchPool rows (--pool S:P,...): `expert-store serve --workers S` and an
expert_store.fetch_pool.FetchPool with P receiving processes (one gRPC channel each) that
write every blob into one shared-memory arena (what a decoder that needs more than one
process's ~1 GB/s uses); MB/s and the ratio to one gRPC process (--workers 1, 1 stream).

Demand under a fill (--demand-parts 1,4,...; with --pool): what a decoder's first token meets
while its host tier fills. The pool is given every blob but --demand-count as prefetches (the
fill), then the others as demand fetches one after another (a token's layers in turn: each
waits for the one before), each in up to K parts (`FetchPool.submit(parts=K)`); prints the
demand fetches' seconds, in all and each, beside the fill's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import torch  # noqa: E402
import xxhash  # noqa: E402

from benchmarks._common import cpu_model  # noqa: E402
from expert_store import format as blob_format  # noqa: E402
from expert_store.client import StoreClient  # noqa: E402
from expert_store.launch import ServerProcess, start_store  # noqa: E402
from expert_store.quant import expert_to_blob  # noqa: E402
from expert_store.store import ModelStore  # noqa: E402

MODEL = "bench"
RESULTS = ROOT / "benchmarks" / "results"


def build_store(root: Path, total_mb: int, blob_mb: float,
                codec: str = "auto") -> list[tuple[tuple[int, int, str], Path, int]]:
    """Random bf16 experts, ~blob_mb each, total_mb in all, packed with `codec` ("auto": byte
    planes + lz4 where that saves; "none": as a codec-none copy serves them); returns
    [(ref, file, size)]."""
    hidden = 1024
    ffn = max(64, int(blob_mb * 2**20 / (3 * hidden * 2)) // 64 * 64)
    count = max(4, round(total_mb / blob_mb))
    experts = 8
    layers = -(-count // experts)
    store = ModelStore.open(root, ram_bytes=0)

    def put(kind, data, **ref):
        store.put_file(MODEL, kind, data, xxhash.xxh3_128_hexdigest(data), **ref)

    put("config", json.dumps({"num_hidden_layers": layers, "num_local_experts": experts,
                              "hidden_size": hidden, "intermediate_size": ffn}).encode())
    g = torch.Generator().manual_seed(0)
    entries, out = [], []
    for i in range(count):
        layer, expert = divmod(i, experts)
        w = {"w1": torch.randn(ffn, hidden, generator=g), "w3": torch.randn(ffn, hidden, generator=g),
             "w2": torch.randn(hidden, ffn, generator=g)}
        blob = expert_to_blob(MODEL, layer, expert, "bf16", w, codec=codec)
        put("expert", blob, layer=layer, expert=expert, precision="bf16")
        entries.append({"layer": layer, "expert": expert, "precision": "bf16", "size": len(blob),
                        "xxh3": blob_format.blob_checksum(blob)})
        out.append(((layer, expert, "bf16"), store.nvme.path(blob_format.expert_key(MODEL, layer, expert, "bf16")),
                    len(blob)))
    put("manifest", json.dumps({"model": MODEL, "num_layers": layers, "num_experts": experts,
                                "precisions": ["bf16"], "blobs": entries}).encode())
    store.close()
    return out


def split(items: list, n: int) -> list[list]:
    return [items[i::n] for i in range(n)]


def timed_threads(work: list, fn) -> float:
    """Run fn(share) for each share in its own thread; seconds for all of them."""
    threads = [threading.Thread(target=fn, args=(share,)) for share in work]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def layout(blobs) -> tuple[bytearray, list[tuple]]:
    arena = bytearray(sum(size for _, _, size in blobs))
    placed, off = [], 0
    for ref, path, size in blobs:
        placed.append((ref, path, off, size))
        off += size
    return arena, placed


def bench_readinto(blobs, streams: int, repeats: int) -> float:
    arena, placed = layout(blobs)
    view = memoryview(arena)

    def read(share):
        for _, path, off, size in share:
            with open(path, "rb", buffering=0) as f:
                got = 0
                while got < size:
                    n = f.readinto(view[off + got: off + size])
                    if not n:
                        raise IOError(f"short read of {path}")
                    got += n

    best = float("inf")
    for _ in range(repeats + 1):  # first pass warms the page cache
        best = min(best, timed_threads(split(placed, streams), read))
    return len(arena) / best / 1e6


def bench_grpc(address: str, blobs, streams: int, repeats: int, check: bool) -> float:
    arena, placed = layout(blobs)
    view = memoryview(arena)
    with StoreClient.open(address, max_streams=streams, channels_per_replica=streams, deadline_s=120) as client:
        def fetch(share):
            for ref, _, off, size in share:
                client.fetch_expert(MODEL, *ref, out=view[off: off + size])

        best = float("inf")
        for i in range(repeats + 1):  # first pass: warm-up (connections, server page cache)
            seconds = timed_threads(split(placed, streams), fetch)
            if i:
                best = min(best, seconds)
        if check:
            for _, path, off, size in placed:
                assert view[off: off + size] == path.read_bytes(), f"{path}: bytes differ"
    return len(arena) / best / 1e6


def head(path: Path, n: int = 1 << 16) -> bytes:
    """The first n bytes of a blob file (its header), without reading the rest."""
    with open(path, "rb") as f:
        return f.read(n)


def raw_slot_bytes(blobs) -> int:
    """Slots for the decoded blobs, as the decoder's host tier sizes them (raw mode)."""
    return max(blob_format.raw_blob_size(blob_format.read_header(head(path))[0]) for _, path, _ in blobs)


def check_landed(pool, c, path: Path, size: int, raw: bool) -> None:
    """A completion's bytes in the arena against the blob file: the payload in raw mode (the
    blob may have been decoded into its slot), else every byte."""
    if raw:
        got = blob_format.decode_raw(bytes(pool.arena[c.offset: c.offset + c.size]))[1]
        assert bytes(got) == bytes(blob_format.decode_raw(path.read_bytes())[1]), f"{path}: payload differs"
    else:
        assert c.size == size and pool.arena[c.offset: c.offset + size] == path.read_bytes(), f"{path}: bytes differ"


def bench_pool(address: str, blobs, receivers: int, repeats: int, check: bool, raw: bool = False) -> float:
    """MB/s of FetchPool(workers=receivers): every blob submitted at once (demand), timed until
    the last completion; best of `repeats` after a warm-up pass. raw: the decoder's host tier's
    mode (coded bf16 blobs land in their slots decoded; the check then compares payloads)."""
    from expert_store.fetch_pool import FetchPool

    total = sum(size for _, _, size in blobs)
    slot_bytes = raw_slot_bytes(blobs) if raw else None
    with FetchPool(address, MODEL, workers=receivers, slots=len(blobs), deadline_s=120, raw=raw,
                   **({"slot_bytes": slot_bytes} if slot_bytes else {})) as pool:
        best = float("inf")
        for i in range(repeats + 1):  # first pass: warm-up (connections, server page cache)
            t0 = time.perf_counter()
            done = [f.result(timeout=600) for f in [pool.submit(*ref) for ref, _, _ in blobs]]
            seconds = time.perf_counter() - t0
            if i:
                best = min(best, seconds)
            if check and i == 0:
                for c, (_, path, size) in zip(done, blobs):
                    check_landed(pool, c, path, size, raw)
            for c in done:
                pool.release(c.slot)
    return total / best / 1e6


def bench_demand(address: str, blobs, receivers: int, parts: int, demand_count: int, raw: bool = False,
                 min_part_bytes: int | None = None, fill_parts: int = 1) -> dict:
    """The first `demand_count` blobs fetched as demand one after another, each in up to `parts`
    parts, while the others fill the pool as prefetches in up to `fill_parts` parts each (after a
    warm-up pass over all of them):
    {demand_s: [seconds each], demand_total_s, fill_s, fill_mb_s, parts_received}. The demand
    blobs are checked against their files."""
    from expert_store.fetch_pool import MIN_PART_BYTES, FetchPool

    if not 0 < demand_count < len(blobs):
        raise ValueError(f"--demand-count must be in 1..{len(blobs) - 1}")
    slot_bytes = raw_slot_bytes(blobs) if raw else None
    demand, fill = blobs[:demand_count], blobs[demand_count:]
    with FetchPool(address, MODEL, workers=receivers, slots=len(blobs), deadline_s=120, raw=raw,
                   min_part_bytes=min_part_bytes or MIN_PART_BYTES,
                   **({"slot_bytes": slot_bytes} if slot_bytes else {})) as pool:
        for c in [f.result(timeout=600) for f in [pool.submit(*ref) for ref, _, _ in blobs]]:  # warm-up
            pool.release(c.slot)
        parts0 = pool.stats()["parts"]
        t0 = time.perf_counter()
        filling = [pool.submit(*ref, priority="prefetch", parts=fill_parts) for ref, _, _ in fill]
        ends: list[float] = []      # when each fill fetch completed (the fill may end before the demands)
        for f in filling:
            f.add_done_callback(lambda _f: ends.append(time.perf_counter()))
        each, done = [], []
        for ref, _, _ in demand:
            t = time.perf_counter()
            done.append(pool.submit(*ref, priority="demand", parts=parts).result(timeout=600))
            each.append(time.perf_counter() - t)
        demand_total = time.perf_counter() - t0
        filled = [f.result(timeout=600) for f in filling]
        fill_s = max(ends) - t0
        for c, (_, path, size) in zip(done, demand):
            check_landed(pool, c, path, size, raw)
        parts_received = pool.stats()["parts"] - parts0
        for c in done + filled:
            pool.release(c.slot)
    return {"demand_s": each, "demand_total_s": demand_total, "fill_s": fill_s,
            "fill_mb_s": sum(size for _, _, size in fill) / fill_s / 1e6, "parts_received": parts_received}


def start_server(store: Path, workers: int, log: Path) -> ServerProcess:
    """`expert-store serve --workers N --ram-bytes 0` on a free loopback port, serving."""
    return start_store(store, "--workers", str(workers), "--ram-bytes", "0", cwd=ROOT, stderr=log)


def machine() -> dict:
    return {"cpu": cpu_model()["model"] or "unknown", "cores": os.cpu_count(), "python": platform.python_version(),
            "grpcio": grpc.__version__, "platform": platform.platform()}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{s} stream{'s' if s > 1 else ''}" for s in result["streams"]]
    series = [("readinto (local limit)", "readinto", None)] + [
        (f"gRPC --workers {w}", "grpc", w) for w in result["workers"]]
    pool_rows = [r for r in rows if r["mode"] == "fetchpool"]
    if pool_rows:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
        bars = ax2.bar(range(len(pool_rows)), [r["mb_s"] for r in pool_rows], color="#2ca02c")
        # the ratio when the run had the one-process row (--workers 1, 1 stream) to divide by
        ax2.bar_label(bars, labels=[f"{r['mb_s']:.0f}" + (f"\n{r['ratio_to_one_process']:.2f}x"
                                                          if "ratio_to_one_process" in r else "")
                                    for r in pool_rows], fontsize=8)
        ax2.set_xticks(range(len(pool_rows)),
                       [f"--workers {r['workers']}\n{r['receivers']} recv proc" for r in pool_rows], fontsize=8)
        ax2.set_ylim(0, 1.25 * max(r["mb_s"] for r in pool_rows))
        ax2.set_ylabel("MB/s into the shared-memory arena")
        ax2.set_title("FetchPool (ratio to one gRPC process)", fontsize=9)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (name, mode, workers) in enumerate(series):
        vals = [next(r["mb_s"] for r in rows if r["mode"] == mode and r["streams"] == s and r["workers"] == workers)
                for s in result["streams"]]
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, vals, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("MB/s into a client buffer")
    ax.set_title(f"expert store throughput ({result['total_mb']:.0f} MB of blobs, "
                 f"{result['machine']['cores']} cores)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_demand(result: dict, path: Path) -> None:
    """Demand under a fill: the demand fetches in turn beside the fill, per pool and parts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["demand_rows"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    xs = range(len(rows))
    a = ax.bar([x - 0.2 for x in xs], [r["demand_total_s"] for r in rows], 0.4,
               label=f"{result['demand_count']} demand fetches in turn")
    b = ax.bar([x + 0.2 for x in xs], [r["fill_s"] for r in rows], 0.4, label="the fill around them")
    ax.bar_label(a, fmt="%.2f", fontsize=8)
    ax.bar_label(b, fmt="%.2f", fontsize=8)
    ax.set_xticks(list(xs), [f"{r['workers']}:{r['receivers']}\nfill {r.get('fill_parts', 1)}, demand {r['parts']}"
                             for r in rows], fontsize=8)
    ax.set_ylim(0, 1.3 * max(max(r["demand_total_s"], r["fill_s"]) for r in rows))
    ax.set_ylabel("seconds")
    ax.set_title(f"demand fetches under a fill (server workers : receiving processes; "
                 f"{result['machine']['cores']} cores)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--total-mb", type=int, default=200)
    ap.add_argument("--blob-mb", type=float, default=8.0)
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--workers", default="1,2", help="gRPC rows: server workers ('' for none)")
    ap.add_argument("--pool", default="", help="FetchPool rows: server workers:receiving processes, e.g. 1:1,2:2,4:4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--codec", choices=("auto", "none"), default="auto",
                    help="how the store packs its bf16 blobs (none: a codec-none copy, read where it lies)")
    ap.add_argument("--raw", action="store_true",
                    help="FetchPool rows in the decoder's host-tier mode (coded blobs decoded into the slots)")
    ap.add_argument("--demand-parts", default="",
                    help="with --pool: demand fetches under a fill, each in up to K parts, e.g. 1,4,12")
    ap.add_argument("--fill-parts", default="1",
                    help="with --demand-parts: the fill's fetches in up to K parts each, e.g. 1,12 (a row per value)")
    ap.add_argument("--demand-count", type=int, default=8,
                    help="demand fetches one after another under the fill (a token's MoE layers)")
    ap.add_argument("--out", type=Path, default=RESULTS / "store_throughput.json")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    pool_pairs = [tuple(int(x) for x in p.split(":")) for p in args.pool.split(",") if p.strip()]
    demand_parts = [int(k) for k in args.demand_parts.split(",") if k.strip()]
    fill_parts = [int(k) for k in args.fill_parts.split(",") if k.strip()] or [1]
    if demand_parts and not pool_pairs:
        ap.error("--demand-parts needs --pool")

    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        tmp = Path(tmp)
        print(f"building a store of ~{args.total_mb} MB of random bf16 experts ...", flush=True)
        blobs = build_store(tmp / "store", args.total_mb, args.blob_mb, args.codec)
        total = sum(size for _, _, size in blobs)
        rows, demand_rows = [], []
        for s in streams:
            rows.append({"mode": "readinto", "workers": None, "streams": s, "mb_s": bench_readinto(blobs, s, args.repeats)})
        for w in workers:
            server = start_server(tmp / "store", w, tmp / f"server-{w}.log")
            try:
                for s in streams:
                    mb_s = bench_grpc(server.address, blobs, s, args.repeats, check=(s == streams[0]))
                    rows.append({"mode": "grpc", "workers": w, "streams": s, "mb_s": mb_s})
            finally:
                server.stop()
        for w, p in pool_pairs:
            server = start_server(tmp / "store", w, tmp / f"server-pool-{w}.log")
            try:
                mb_s = bench_pool(server.address, blobs, p, args.repeats, check=True, raw=args.raw)
                rows.append({"mode": "fetchpool", "workers": w, "receivers": p, "streams": p, "mb_s": mb_s})
                for fk in fill_parts:
                    for k in demand_parts:
                        d = bench_demand(server.address, blobs, p, k, args.demand_count, raw=args.raw, fill_parts=fk)
                        demand_rows.append({"workers": w, "receivers": p, "parts": k, "fill_parts": fk, **d})
            finally:
                server.stop()

    limit = {r["streams"]: r["mb_s"] for r in rows if r["mode"] == "readinto"}
    one = next((r["mb_s"] for r in rows if r["mode"] == "grpc" and r["workers"] == 1 and r["streams"] == 1),
               next((r["mb_s"] for r in rows if r["mode"] == "fetchpool" and r["workers"] == r["receivers"] == 1),
                    None))
    for r in rows:
        r["ratio_to_readinto"] = r["mb_s"] / limit[r["streams"]] if r["streams"] in limit else None
        if r["mode"] == "fetchpool" and one:
            r["ratio_to_one_process"] = r["mb_s"] / one
    result = {"total_mb": total / 1e6, "blobs": len(blobs), "blob_mb": total / len(blobs) / 1e6, "streams": streams,
              "codec": args.codec, "raw": args.raw,
              "workers": workers, "pool": [list(p) for p in pool_pairs], "one_process_mb_s": one,
              "repeats": args.repeats, "machine": machine(), "rows": rows, "demand_rows": demand_rows,
              "demand_count": args.demand_count,
              "command": "python benchmarks/store_throughput.py " + " ".join(sys.argv[1:])}

    print(f"\n{len(blobs)} blobs, {total / 1e6:.0f} MB, best of {args.repeats}; "
          f"{result['machine']['cores']} cores ({result['machine']['cpu']})")
    header = f"| {'path':<22} | {'streams':>7} | {'MB/s':>8} | {'vs readinto':>11} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        if r["mode"] == "fetchpool":
            continue
        name = "readinto (local)" if r["mode"] == "readinto" else f"gRPC --workers {r['workers']}"
        print(f"| {name:<22} | {r['streams']:>7} | {r['mb_s']:>8.0f} | {r['ratio_to_readinto']:>10.2f}x |")
    pool_rows = [r for r in rows if r["mode"] == "fetchpool"]
    if pool_rows:
        print("\n| FetchPool: server --workers | receiving processes | MB/s | vs one gRPC process |")
        print("|---:|---:|---:|---:|")
        for r in pool_rows:
            ratio = f"{r['ratio_to_one_process']:.2f}x" if "ratio_to_one_process" in r else "-"
            print(f"| {r['workers']} | {r['receivers']} | {r['mb_s']:.0f} | {ratio} |")
    if demand_rows:
        print(f"\n| demand under a fill: server --workers | receiving processes | fill parts | demand parts | "
              f"{args.demand_count} demand fetches in turn, s | each, median s | the fill, s | fill MB/s |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in demand_rows:
            med = sorted(r["demand_s"])[len(r["demand_s"]) // 2]
            print(f"| {r['workers']} | {r['receivers']} | {r['fill_parts']} | {r['parts']} | {r['demand_total_s']:.3f} | "
                  f"{med:.3f} | "
                  f"{r['fill_s']:.3f} | {r['fill_mb_s']:.0f} |")
    grpc_rows = {(r["workers"], r["streams"]): r["mb_s"] for r in rows if r["mode"] == "grpc"}
    if len(workers) > 1:
        for s in streams:
            ratio = grpc_rows[(workers[-1], s)] / grpc_rows[(workers[0], s)]
            print(f"{s} stream(s): --workers {workers[-1]} / --workers {workers[0]} = {ratio:.2f}x")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    plot(result, png)
    if demand_rows:
        plot_demand(result, args.out.with_name(args.out.stem + "_demand.png"))
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} and {png.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
