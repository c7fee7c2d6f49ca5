"""The transfer path against its physical limits: store -> decoder pinned memory -> GPU.

    python3 benchmarks/transfer.py --out-dir benchmarks/results                 # on the GPU host
    python3 benchmarks/transfer.py --tiny --device cpu --out-dir /tmp/t         # plumbing check

Store: random Mixtral-8x7B-shaped experts (hidden 4096, ffn 14336) quantized to int4 and packed
with the store's real packer (benchmarks/decode.py: pack_random_mixtral), `--layers` x 8 blobs.

1. H2D of fetched experts. The decoder's ExpertCache (decoder/experts/cache.py) with every
   expert in its pinned host tier loads all of them into its GPU slots (prefetch requests,
   its loader thread, one dedicated copy stream, one event per expert). Reported: the wall
   rate of the whole batch (bytes / time until the last copy is done), and the copy rate its
   CUDA events measured per expert; both against the measured pinned copy rate of one buffer
   of the same size (`torch.Tensor.copy_` from pinned memory). Target: >= 90%.
2. Store -> decoder pinned memory. `expert-store serve --workers N` on loopback; the decoder
   side receives with P fetch processes that each own a StoreClient and write their share of
   the blobs straight into one `multiprocessing.shared_memory` arena (fetch_expert(out=...));
   the GPU process registers the arena with cudaHostRegister once, after which it is pinned
   memory for the copy engine (its H2D rate is measured too). Pairs (N servers, P receivers):
   (1, 1) = one gRPC process on each end, then (4, 4) and (8, 8). Target: >= 3 GB/s and
   >= 2x the (1, 1) rate.
Results: transfer.json, transfer.md, transfer.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODEL = "transfer-b"
ALIGN = 4096


def log(msg: str) -> None:
    print(f"[transfer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_rate(src: torch.Tensor, dst: torch.Tensor, device: torch.device, repeats: int = 6) -> float:
    """Best GB/s of dst.copy_(src) over `repeats`."""
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        best = max(best, src.numel() / (time.perf_counter() - t0) / 1e9)
    return best


def pinned_rate(nbytes: int, device: torch.device) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8)
    if device.type == "cuda":
        src = src.pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return copy_rate(src, dst, device)


def pageable_rate(nbytes: int, device: torch.device) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return copy_rate(src, dst, device, repeats=3)


# ---------------------------------------------------------------------------------------------
# 1. H2D of fetched experts through the ExpertCache
# ---------------------------------------------------------------------------------------------
def cache_h2d(store: Path, device: torch.device, passes: int) -> dict[str, Any]:
    from decoder.experts.cache import ExpertCache
    from decoder.experts.provider import ExpertSource
    from decoder.model.config import ModelConfig
    from expert_store.client import StoreClient

    from benchmarks.decode import slot_sizes

    out: dict[str, Any] = {"passes": []}
    with StoreClient.open(str(store)) as client:
        manifest = client.manifest(MODEL)
        config = ModelConfig.from_hf(manifest.config)
        L, E = config.num_hidden_layers, config.num_local_experts
        for i in range(passes):
            source = ExpertSource(client=client, model=MODEL, config=config, manifest=manifest, precision="int4",
                                  device=device, dtype=torch.bfloat16)
            _, _, host_slot, n_experts = slot_sizes(client, MODEL, "int4")
            cache = ExpertCache(source, gpu_slots=[E] * L, host_cache_bytes=n_experts * host_slot,
                                dense_slots=False)   # the raw payload's H2D copy alone
            cache.fill_host([(l, e) for l in range(L) for e in range(E)], progress=True)
            cache.reset_stats()
            sync(device)
            t0 = time.perf_counter()
            for l in range(L):
                cache.prefetch(l, list(range(E)))
            cache.wait_idle(timeout=600)
            sync(device)
            wall = time.perf_counter() - t0
            st = cache.stats()
            n = L * E
            raw = cache.raw_size
            per_copy_s = st["load_cost_s"]["host"]   # EWMA of CUDA-event-timed copies (memcpy time on the CPU)
            out["passes"].append({"experts": n, "bytes": n * raw, "wall_s": wall,
                                  "wall_gbps": n * raw / wall / 1e9,
                                  "event_gbps": raw / per_copy_s / 1e9 if per_copy_s else None,
                                  "gpu_loads": st["tiers"]["gpu"]["loads"], "host_hits": st["prefetch_tiers"]["host"]["hits"]})
            out["expert_raw_bytes"] = raw
            out["pinned_host"] = cache.pinned
            cache.close()
            del cache
            torch.cuda.empty_cache() if device.type == "cuda" else None
    best = max(out["passes"], key=lambda p: p["wall_gbps"])
    out.update(wall_gbps=best["wall_gbps"], event_gbps=max((p["event_gbps"] or 0) for p in out["passes"]))
    return out


# ---------------------------------------------------------------------------------------------
# 2. Store -> shared-memory arena with P receiver processes
# ---------------------------------------------------------------------------------------------
def _receiver(rank: int, address: str, shm_name: str, jobs: list[tuple[int, int, int, int]], barrier: Any,
              results: Any, passes: int) -> None:
    from expert_store.client import StoreClient

    shm = shared_memory.SharedMemory(name=shm_name)
    try:
        view = shm.buf
        with StoreClient.open(f"grpc://{address}", max_streams=1) as client:
            client.manifest(MODEL)                       # connect before the clock starts
            for p in range(passes):
                barrier.wait()
                t0 = time.monotonic()
                n = 0
                for layer, expert, off, size in jobs:
                    client.fetch_expert(MODEL, layer, expert, "int4", out=view[off:off + size])
                    n += size
                t1 = time.monotonic()
                results.put((p, rank, t0, t1, n))
        del view
    finally:
        shm.close()


def start_server(store: Path, workers: int, log_path: Path) -> Any:
    """`expert-store serve --workers N --ram-bytes 0` on a free loopback port, serving."""
    from expert_store.launch import start_store

    return start_store(store, "--workers", str(workers), "--ram-bytes", "0", cwd=ROOT, stderr=log_path)


def store_to_arena(store: Path, pairs: Sequence[tuple[int, int]], passes: int, device: torch.device,
                   work: Path) -> list[dict[str, Any]]:
    from expert_store.client import StoreClient

    with StoreClient.open(str(store)) as c:
        m = c.manifest(MODEL)
        blobs = sorted((k[0], k[1], v[0] if isinstance(v, (tuple, list)) else v.size)
                       for k, v in m.blobs.items() if k[2] == "int4")
    layout, off = [], 0
    for l, e, size in blobs:
        layout.append((l, e, off, size))
        off += (size + ALIGN - 1) // ALIGN * ALIGN
    total = sum(s for *_, s in layout)
    shm = shared_memory.SharedMemory(create=True, size=off)
    ctx = mp.get_context("spawn")
    rows = []
    registered = None
    try:
        for servers, receivers in pairs:
            srv = start_server(store, servers, work / f"serve-{servers}.log")
            try:
                barrier = ctx.Barrier(receivers + 1)
                q = ctx.Queue()
                shares = [layout[i::receivers] for i in range(receivers)]
                procs = [ctx.Process(target=_receiver, args=(r, srv.address, shm.name, shares[r], barrier, q, passes))
                         for r in range(receivers)]
                for p in procs:
                    p.start()
                per_pass = []
                for p in range(passes):
                    barrier.wait(timeout=300)
                    got = [q.get(timeout=600) for _ in range(receivers)]
                    start = min(g[2] for g in got)
                    end = max(g[3] for g in got)
                    nbytes = sum(g[4] for g in got)
                    per_pass.append(nbytes / (end - start) / 1e9)
                for p in procs:
                    p.join(60)
                    if p.exitcode != 0:
                        raise RuntimeError(f"receiver exited with {p.exitcode}")
            finally:
                srv.stop()
            rows.append({"servers": servers, "receivers": receivers, "gbps": max(per_pass), "passes_gbps": per_pass,
                         "bytes": total, "blobs": len(layout)})
            log(f"store -> arena: {servers} server procs, {receivers} receiver procs: {max(per_pass):.2f} GB/s")
        # check the arena holds the blobs the store has (first and last), then H2D from it
        from expert_store import format as blob_format
        for l, e, o, size in (layout[0], layout[-1]):
            blob_format.decode_raw(bytes(shm.buf[o:o + size]))
        arena = torch.frombuffer(shm.buf, dtype=torch.uint8)
        h2d = None
        reg_ms = None
        if device.type == "cuda":
            t0 = time.perf_counter()
            rc = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), arena.numel(), 0)
            reg_ms = (time.perf_counter() - t0) * 1e3
            registered = arena if int(rc) == 0 else None
            dst = torch.empty(arena.numel(), dtype=torch.uint8, device=device)
            h2d = copy_rate(arena, dst, device)
            del dst
        else:
            dst = torch.empty(arena.numel(), dtype=torch.uint8)
            h2d = copy_rate(arena, dst, device)
        rows.append({"arena_h2d_gbps": h2d, "cudaHostRegister_ms": reg_ms, "arena_bytes": arena.numel(),
                     "registered": registered is not None})
        if registered is not None:
            torch.cuda.cudart().cudaHostUnregister(registered.data_ptr())
        del arena, registered
    finally:
        shm.close()
        shm.unlink()
    return rows


# ---------------------------------------------------------------------------------------------
# 3. The packaged path: FetchPool, and ExpertCache(fetch_workers=P) store -> GPU slots
# ---------------------------------------------------------------------------------------------
def fetch_pool_rows(store: Path, pairs: Sequence[tuple[int, int]], passes: int, device: torch.device,
                    work: Path) -> list[dict[str, Any]]:
    """expert_store.fetch_pool.FetchPool with P worker processes against `serve --workers S`:
    every blob submitted at once into its own arena slot, timed to the last checked completion
    (the arena registered with cudaHostRegister first, as the decoder does). Then, per pair,
    the decoder's ExpertCache with fetch_workers=P (its host tier *is* a FetchPool arena):
    every expert prefetched from the store into its GPU slots, wall rate to the last copy."""
    from decoder.experts.cache import ExpertCache
    from decoder.experts.provider import ExpertSource
    from decoder.model.config import ModelConfig
    from expert_store.client import StoreClient
    from expert_store.fetch_pool import FetchPool

    rows = []
    for servers, procs in pairs:
        srv = start_server(store, servers, work / f"serve-pool-{servers}.log")
        try:
            target = f"grpc://{srv.address}"
            with StoreClient.open(target, deadline_s=120.0) as c:
                n_blobs = sum(1 for k in c.manifest(MODEL).blobs if k[2] == "int4")
            with FetchPool(target, MODEL, workers=procs, slots=n_blobs, deadline_s=120.0) as pool:
                pinned = pool.pin()
                refs = sorted(k for k in pool.manifest.blobs if k[2] == "int4")
                if len(refs) > pool.slots:
                    raise RuntimeError(f"{len(refs)} blobs, {pool.slots} arena slots")
                nbytes = sum(pool.manifest.blobs[r][0] for r in refs)
                per_pass = []
                for _ in range(passes):
                    t0 = time.perf_counter()
                    futs = [pool.submit(*r, priority="prefetch", slot=i) for i, r in enumerate(refs)]
                    for f in futs:
                        f.result(timeout=600)
                    per_pass.append(nbytes / (time.perf_counter() - t0) / 1e9)
            with StoreClient.open(target, deadline_s=120.0) as client:
                manifest = client.manifest(MODEL)
                config = ModelConfig.from_hf(manifest.config)
                L, E = config.num_hidden_layers, config.num_local_experts
                source = ExpertSource(client=client, model=MODEL, config=config, manifest=manifest,
                                      precision="int4", device=device, dtype=torch.bfloat16)
                largest = max(size for size, _ in manifest.blobs.values())
                cache_rates = []
                for _ in range(passes):
                    cache = ExpertCache(source, gpu_slots=[E] * L, host_cache_bytes=L * E * (largest + (1 << 20)),
                                        fetch_workers=procs, fetch_target=target, dense_slots=False)
                    try:
                        sync(device)
                        t0 = time.perf_counter()
                        for l in range(L):
                            cache.prefetch(l, list(range(E)))
                        if not cache.wait_idle(timeout=600):
                            raise RuntimeError("ExpertCache(fetch_workers) did not finish loading")
                        sync(device)
                        wall = time.perf_counter() - t0
                        cache_rates.append(L * E * cache.raw_size / wall / 1e9)
                    finally:
                        cache.close()
        finally:
            srv.stop()
        rows.append({"servers": servers, "fetch_workers": procs, "pool_gbps": max(per_pass), "pool_passes_gbps": per_pass,
                     "pool_pinned": pinned, "cache_store_to_gpu_gbps": max(cache_rates),
                     "cache_passes_gbps": cache_rates, "blobs": len(refs), "bytes": nbytes})
        log(f"FetchPool {servers} srv + {procs} workers: {max(per_pass):.2f} GB/s into the arena; "
            f"ExpertCache(fetch_workers={procs}) store -> GPU {max(cache_rates):.2f} GB/s")
    return rows


# ---------------------------------------------------------------------------------------------
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pool = result.get("fetch_pool") or []
    fig, axes = plt.subplots(1, 3 if pool else 2, figsize=(16 if pool else 11, 4))
    a1, a2 = axes[0], axes[1]
    h = result["h2d"]
    labels = ["pinned copy\n(one buffer)", "ExpertCache\nbatch (wall)", "ExpertCache\nper copy (events)",
              "arena after\ncudaHostRegister", "pageable"]
    vals = [h["pinned_gbps_expert_size"], h["cache"]["wall_gbps"], h["cache"]["event_gbps"] or 0,
            result["arena"].get("arena_h2d_gbps") or 0, h["pageable_gbps"]]
    a1.bar(range(len(vals)), vals, color=["#777", "#1f77b4", "#aec7e8", "#2ca02c", "#d62728"])
    a1.set_xticks(range(len(vals)))
    a1.set_xticklabels(labels, fontsize=7)
    a1.set_ylabel("GB/s")
    a1.set_title("host -> GPU", fontsize=9)
    for i, v in enumerate(vals):
        a1.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    st = result["store"]
    a2.bar(range(len(st)), [r["gbps"] for r in st], color="#ff7f0e")
    a2.set_xticks(range(len(st)))
    a2.set_xticklabels([f"{r['servers']} srv\n{r['receivers']} recv" for r in st], fontsize=8)
    a2.axhline(3.0, color="k", ls="--", lw=0.8)
    a2.set_ylabel("GB/s into the shared-memory arena")
    a2.set_title("store (gRPC loopback) -> decoder host memory", fontsize=9)
    for i, r in enumerate(st):
        a2.text(i, r["gbps"], f"{r['gbps']:.2f}", ha="center", va="bottom", fontsize=7)
    if pool:
        a3 = axes[2]
        x = range(len(pool))
        a3.bar([i - 0.2 for i in x], [r["pool_gbps"] for r in pool], width=0.4, color="#9467bd",
               label="FetchPool -> pinned arena")
        a3.bar([i + 0.2 for i in x], [r["cache_store_to_gpu_gbps"] for r in pool], width=0.4, color="#8c564b",
               label="ExpertCache(fetch_workers) -> GPU")
        a3.set_xticks(list(x))
        a3.set_xticklabels([f"{r['servers']} srv\n{r['fetch_workers']} workers" for r in pool], fontsize=8)
        a3.axhline(3.0, color="k", ls="--", lw=0.8)
        a3.set_ylabel("GB/s")
        a3.set_title("packaged path: FetchPool / ExpertCache", fontsize=9)
        a3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    h, st, ar = result["h2d"], result["store"], result["arena"]
    lines = ["| host -> GPU path | GB/s | of pinned copy |", "|---|---|---|"]
    ref = h["pinned_gbps_expert_size"]
    for name, v in (("pinned copy, one buffer of one expert's size", ref),
                    (f"pinned copy, {h['pinned_big_mb']} MB buffer", h["pinned_gbps_big"]),
                    ("ExpertCache: all experts, batch wall rate", h["cache"]["wall_gbps"]),
                    ("ExpertCache: per copy (CUDA events)", h["cache"]["event_gbps"]),
                    ("shared-memory arena after cudaHostRegister", ar.get("arena_h2d_gbps")),
                    ("pageable memory", h["pageable_gbps"])):
        lines.append(f"| {name} | {v:.2f} | {v / ref:.0%} |" if v else f"| {name} | - | - |")
    lines += ["", "| store servers (--workers) | receiver processes | GB/s into pinned arena | vs 1+1 |", "|---|---|---|---|"]
    base = st[0]["gbps"] if st else None
    for r in st:
        lines.append(f"| {r['servers']} | {r['receivers']} | {r['gbps']:.2f} | {r['gbps'] / base:.2f}x |")
    pool = result.get("fetch_pool") or []
    if pool:
        lines += ["", "| store servers (--workers) | FetchPool workers | GB/s into the pinned arena | vs 1+1 "
                  "| ExpertCache(fetch_workers) store -> GPU GB/s |", "|---|---|---|---|---|"]
        base = pool[0]["pool_gbps"]
        for r in pool:
            lines.append(f"| {r['servers']} | {r['fetch_workers']} | {r['pool_gbps']:.2f} | {r['pool_gbps'] / base:.2f}x "
                         f"| {r['cache_store_to_gpu_gbps']:.2f} |")
    lines.append("")
    for t in result["targets"]:
        lines.append(f"- {'MET' if t['met'] else 'MISSED'}: {t['target']}: measured {t['measured']}")
    return "\n".join(lines) + "\n"


def store_targets(rows: list[dict[str, Any]], rate: str, procs: str, how: str) -> list[dict[str, Any]]:
    """The store -> pinned memory targets for one family of rows: >= 3 GB/s at its best, and
    >= 2x its 1 server + 1 receiver row (only when that row was run)."""
    if not rows:
        return []
    best = max(rows, key=lambda r: r[rate])
    out = [{"target": f"store -> decoder pinned memory >= 3 GB/s with --workers ({how})",
            "measured": f"{best[rate]:.2f} GB/s ({best['servers']} srv + {best[procs]} receiving procs)",
            "met": best[rate] >= 3.0}]
    if (rows[0]["servers"], rows[0][procs]) == (1, 1):
        one = rows[0][rate]
        out.append({"target": f">= 2x one gRPC process ({how}, 1 server + 1 receiver)",
                    "measured": f"{best[rate] / one:.2f}x", "met": best[rate] >= 2 * one})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", default="/tmp/adapmoe-transfer")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="transfer")
    ap.add_argument("--layers", type=int, default=2, help="layers of 8 Mixtral-shaped int4 experts in the store")
    ap.add_argument("--pairs", default="1:1,4:4,8:8", help="server procs:receiver procs, comma list")
    ap.add_argument("--pool-pairs", default="1:1,4:4,8:8",
                    help="server procs:FetchPool workers for the FetchPool / ExpertCache(fetch_workers) rows ('' = none)")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(list(argv) if argv is not None else None)
    device = torch.device(args.device)
    hidden, ffn, heads, vocab = 4096, 14336, 32, 32000
    if args.tiny:
        hidden, ffn, heads, vocab, args.pairs, args.passes = 256, 512, 4, 256, "1:1,2:2", 2
        args.pool_pairs = "1:1,2:2"
    pairs = [tuple(int(x) for x in p.split(":")) for p in args.pairs.split(",")]
    pool_pairs = [tuple(int(x) for x in p.split(":")) for p in args.pool_pairs.split(",") if p.strip()]
    work = Path(args.work)
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from benchmarks.decode import pack_random_mixtral

    t0 = time.perf_counter()
    pack_random_mixtral(work, work / "store", MODEL, hidden=hidden, ffn=ffn, layers=args.layers, heads=heads,
                        vocab=vocab, precision="int4", device=device)
    log(f"packed {args.layers * 8} int4 experts ({time.perf_counter() - t0:.0f} s)")
    cache = cache_h2d(work / "store", device, args.passes)
    raw = cache["expert_raw_bytes"]
    h2d = {"pinned_gbps_expert_size": pinned_rate(raw, device), "pinned_big_mb": 256,
           "pinned_gbps_big": pinned_rate(256 << 20, device), "pageable_gbps": pageable_rate(256 << 20, device),
           "cache": cache}
    log(f"H2D: pinned {h2d['pinned_gbps_expert_size']:.1f} GB/s, cache batch {cache['wall_gbps']:.1f}, "
        f"per copy {cache['event_gbps'] or 0:.1f}")
    st = store_to_arena(work / "store", pairs, args.passes, device, work)
    arena = st.pop()
    pool = fetch_pool_rows(work / "store", pool_pairs, args.passes, device, work)
    ref = h2d["pinned_gbps_expert_size"]
    targets = [{"target": "H2D of fetched experts (ExpertCache batch wall rate) >= 90% of the pinned copy rate",
                "measured": f"{cache['wall_gbps'] / ref:.0%}", "met": cache["wall_gbps"] >= 0.9 * ref},
               {"target": "H2D per expert copy (CUDA events) >= 90% of the pinned copy rate",
                "measured": f"{(cache['event_gbps'] or 0) / ref:.0%}", "met": (cache["event_gbps"] or 0) >= 0.9 * ref}]
    targets += store_targets(st, "gbps", "receivers", "hand-rolled receivers")
    targets += store_targets(pool, "pool_gbps", "fetch_workers", "FetchPool")
    result = {"command": "python3 " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:] if argv is None
                                               else [os.path.relpath(__file__, ROOT)] + list(argv)),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "cpu_cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
              "experts": args.layers * 8, "expert_blob_bytes": st[0]["bytes"] // st[0]["blobs"] if st else None,
              "h2d": h2d, "store": st, "arena": arena, "fetch_pool": pool, "targets": targets,
              "seconds": round(time.perf_counter() - t0, 1)}
    (out_dir / f"{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{args.tag}.md").write_text(markdown(result))
    try:
        plot(result, out_dir / f"{args.tag}.png")
    except Exception as e:  # pragma: no cover
        log(f"plot failed: {e}")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
