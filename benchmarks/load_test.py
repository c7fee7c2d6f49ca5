"""Bounded load test of the decoder (Generate) or the expert store (FetchExperts), loopback only.

    python benchmarks/load_test.py decoder --target 127.0.0.1:50052 --clients 8 --seconds 30 \\
        [--max-tokens 32] [--prompt TEXT] [--temperature 0] [--deadline 60]
    python benchmarks/load_test.py store --target 127.0.0.1:50051 --model tiny --clients 8 --seconds 30 \\
        [--refs 4] [--precision bf16] [--priority demand] [--token-file F] [--processes 4]
    python benchmarks/load_test.py --http --target 127.0.0.1:8000 --concurrency 1,2,4,8,16,32,64 \\
        [--num-prompts N] [--endpoint completions|chat] [--model NAME] [--max-tokens 32] [--token-file F]

--http is the serving benchmark of the OpenAI HTTP API (`moe-decoder serve --http-listen`):
concurrency levels, TTFT / ITL / TPOT / E2E p50 and p99, tokens/s, errors by HTTP status, in
the shape of vLLM's serving benchmark (benchmarks/http_load.py says what each figure is); it
writes benchmarks/results/load_http_<UTC time>.json. The rest of this text is the gRPC modes.

N closed-loop clients (each sends its next request when the previous one is answered) for M
seconds; a request still running at the end is waited for (bounded by --deadline). Clients
run as asyncio tasks on grpc.aio channels, spread over --processes worker processes (the
Python client, not the server, is the bottleneck for multi-GB/s store traffic). A client
answered RESOURCE_EXHAUSTED waits --backoff-ms before its next request.

Prints p50/p95/p99 latency (successful requests and all), throughput (requests/s, plus
tokens/s or bytes/s), time to first token / first chunk, and errors by status; writes the
same as JSON to benchmarks/results/load_<kind>_<UTC time>.json (--out to change).

The target must be a loopback address (127.0.0.0/8, ::1, localhost): this is a load
generator, not a tool to aim at other machines. Limits: --clients <= 512, --seconds <= 3600.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import multiprocessing
import os
import random
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._stats import percentile  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MAX_CLIENTS = 512
MAX_SECONDS = 3600.0
DEFAULT_PROMPT = "Once upon a time, in a land far away, there lived a model that was too large for its machine."


@dataclass
class LoadSpec:
    kind: str                      # "decoder" | "store"
    target: str                    # host:port (loopback)
    clients: int = 4
    seconds: float = 10.0
    processes: int = 1
    deadline_s: float = 60.0       # per request
    backoff_ms: float = 50.0       # after RESOURCE_EXHAUSTED
    # decoder
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 32
    temperature: float = 0.0
    # store
    model: str = ""
    refs: int = 4
    precision: str = "bf16"
    priority: str = "demand"
    token: str | None = field(default=None, repr=False)
    seed: int = 0

    def validate(self) -> "LoadSpec":
        if self.kind not in ("decoder", "store"):
            raise ValueError("kind must be 'decoder' or 'store'")
        check_loopback(self.target)
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise ValueError(f"--clients must be in [1, {MAX_CLIENTS}]")
        if not 0 < self.seconds <= MAX_SECONDS:
            raise ValueError(f"--seconds must be in (0, {MAX_SECONDS:g}]")
        if not 1 <= self.processes <= min(64, self.clients):
            raise ValueError("--processes must be in [1, min(64, clients)]")
        if self.deadline_s <= 0:
            raise ValueError("--deadline must be > 0")
        if self.kind == "store" and not self.model:
            raise ValueError("store load needs --model")
        if self.refs < 1:
            raise ValueError("--refs must be >= 1")
        return self


def check_loopback(target: str) -> None:
    """Refuse any target that is not this machine's loopback interface."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target {target!r}: expected HOST:PORT")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"target {target!r}: cannot resolve {host!r}: {e}") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if not addr.is_loopback:
            raise ValueError(f"target {target!r} resolves to {addr}, not a loopback address: "
                             f"the load test only runs against this machine")


# --------------------------------------------------------------------------------------------
# one request of each kind -> (status, latency, first byte/token latency, units)
# --------------------------------------------------------------------------------------------
async def _generate(stub: Any, pb: Any, spec: LoadSpec) -> tuple[float | None, int]:
    t0 = time.perf_counter()
    first, tokens, usage = None, 0, None
    req = pb.GenerateRequest(prompt=spec.prompt, max_tokens=spec.max_tokens,
                             sampling=pb.SamplingParams(temperature=spec.temperature))
    async for msg in stub.Generate(req, timeout=spec.deadline_s):
        if msg.HasField("delta"):
            if first is None:
                first = time.perf_counter() - t0
            tokens += len(msg.delta.token_ids)
        else:
            usage = msg.usage
    if usage is None or usage.completion_tokens != tokens:
        raise _Failure("INCOMPLETE_STREAM")
    return first, tokens


async def _fetch(stub: Any, pb: Any, spec: LoadSpec, blobs: list[tuple[int, int, int]], rng: random.Random,
                 metadata: Any) -> tuple[float | None, int]:
    picks = rng.sample(blobs, min(spec.refs, len(blobs)))
    prio = pb.PREFETCH if spec.priority == "prefetch" else pb.DEMAND
    req = pb.FetchExpertsRequest(model=spec.model, priority=prio,
                                 refs=[pb.ExpertRef(layer=l, expert=e, precision=spec.precision) for l, e, _ in picks])
    t0 = time.perf_counter()
    first, got = None, 0
    async for chunk in stub.FetchExperts(req, timeout=spec.deadline_s, metadata=metadata):
        if first is None:
            first = time.perf_counter() - t0
        got += len(chunk.data)
    if got != sum(size for _, _, size in picks):
        raise _Failure("SHORT_READ")
    return first, got


class _Failure(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


# --------------------------------------------------------------------------------------------
# the client loop of one process
# --------------------------------------------------------------------------------------------
async def _run_clients(spec: LoadSpec, clients: int, offset: int) -> list[tuple[str, float, float | None, int, float]]:
    """-> [(status, latency_s, first_s, units, start offset_s)] of every request."""
    import grpc

    from decoder._proto.adapmoe.v1 import decoder_pb2, decoder_pb2_grpc
    from expert_store._proto.adapmoe.v1 import expert_store_pb2, expert_store_pb2_grpc

    options = [("grpc.max_receive_message_length", 16 << 20)]
    metadata = (("authorization", f"Bearer {spec.token}"),) if spec.token else None
    records: list[tuple[str, float, float | None, int, float]] = []
    async with grpc.aio.insecure_channel(spec.target, options=options) as channel:
        if spec.kind == "decoder":
            pb, stub = decoder_pb2, decoder_pb2_grpc.DecoderStub(channel)
            blobs: list[tuple[int, int, int]] = []
        else:
            pb, stub = expert_store_pb2, expert_store_pb2_grpc.ExpertStoreStub(channel)
            m = await stub.GetManifest(pb.GetManifestRequest(model=spec.model), timeout=spec.deadline_s,
                                       metadata=metadata)
            blobs = [(b.layer, b.expert, b.size) for b in m.blobs if b.precision == spec.precision]
            if not blobs:
                raise ValueError(f"model {spec.model!r} has no {spec.precision} experts")
        t_start = time.perf_counter()
        end = t_start + spec.seconds

        async def client(i: int) -> None:
            rng = random.Random(spec.seed * 100_003 + offset + i)
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                status, first, units = "OK", None, 0
                try:
                    if spec.kind == "decoder":
                        first, units = await _generate(stub, pb, spec)
                    else:
                        first, units = await _fetch(stub, pb, spec, blobs, rng, metadata)
                except grpc.aio.AioRpcError as e:
                    status = e.code().name
                except _Failure as e:
                    status = e.status
                records.append((status, time.perf_counter() - t0, first, units, t0 - t_start))
                if status == "RESOURCE_EXHAUSTED" and spec.backoff_ms > 0:
                    await asyncio.sleep(spec.backoff_ms / 1000 * (0.5 + rng.random()))

        await asyncio.gather(*(client(i) for i in range(clients)))
    return records


def _worker(spec: LoadSpec, clients: int, offset: int, conn: Any) -> None:
    try:
        conn.send(("ok", asyncio.run(_run_clients(spec, clients, offset))))
    except BaseException as e:  # reported by the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------
def _dist(values: list[float]) -> dict[str, float]:
    return {"count": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99), "mean": (sum(values) / len(values)) if values else 0.0,
            "max": max(values) if values else 0.0}


def summarize(spec: LoadSpec, records: list[tuple[str, float, float | None, int, float]], wall_s: float
              ) -> dict[str, Any]:
    ok = [r for r in records if r[0] == "OK"]
    statuses = Counter(r[0] for r in records)
    units = sum(r[3] for r in ok)
    unit = "tokens" if spec.kind == "decoder" else "bytes"
    params = {k: v for k, v in asdict(spec).items() if k != "token"}
    return {
        "kind": spec.kind,
        "target": spec.target,
        "params": params,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": wall_s,
        "requests": len(records),
        "ok": len(ok),
        "statuses": dict(statuses),
        "errors": {k: v for k, v in statuses.items() if k != "OK"},
        "latency_s": _dist([r[1] for r in ok]),
        "latency_all_s": _dist([r[1] for r in records]),
        "latency_by_status_s": {st: _dist([r[1] for r in records if r[0] == st]) for st in sorted(statuses)},
        "first_s": _dist([r[2] for r in ok if r[2] is not None]),
        "throughput": {"requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
                       f"{unit}_per_s": units / wall_s if wall_s > 0 else 0.0,
                       unit: units},
    }


def run_load(spec: LoadSpec) -> dict[str, Any]:
    """Run the load described by `spec`; return the summary (see `summarize`)."""
    spec.validate()
    t0 = time.perf_counter()
    if spec.processes == 1:
        records = asyncio.run(_run_clients(spec, spec.clients, 0))
    else:
        ctx = multiprocessing.get_context("spawn")
        per = [spec.clients // spec.processes + (1 if i < spec.clients % spec.processes else 0)
               for i in range(spec.processes)]
        procs, conns, offset = [], [], 0
        for n in per:
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, args=(spec, n, offset, child), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
            offset += n
        records = []
        errors = []
        limit = time.monotonic() + spec.seconds + spec.deadline_s + 60
        for p, c in zip(procs, conns):
            if not c.poll(max(0.0, limit - time.monotonic())):
                errors.append(f"worker {p.pid} did not report")
                continue
            kind, payload = c.recv()
            if kind == "ok":
                records.extend(payload)
            else:
                errors.append(payload)
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        if errors:
            raise RuntimeError("; ".join(errors))
    # throughput over the clients' own window (from their first request to the last answer), so
    # that worker process start-up does not count
    window = max((r[4] + r[1] for r in records), default=0.0)
    return summarize(spec, records, window or (time.perf_counter() - t0))


def format_summary(s: dict[str, Any]) -> str:
    lat, lat_all, first, tp = s["latency_s"], s["latency_all_s"], s["first_s"], s["throughput"]
    unit = "tokens" if s["kind"] == "decoder" else "bytes"
    rate = tp[f"{unit}_per_s"]
    rate_text = f"{rate:.1f} tokens/s" if unit == "tokens" else f"{rate / 1e6:.2f} MB/s"
    p = s["params"]
    lines = [
        f"{s['kind']} load on {s['target']}: {p['clients']} clients x {p['seconds']:g}s "
        f"({p['processes']} process{'es' if p['processes'] > 1 else ''}), wall {s['wall_s']:.2f}s",
        f"requests   {s['requests']} ({s['ok']} ok)",
        f"latency ok p50/p95/p99  {1000 * lat['p50']:.1f} / {1000 * lat['p95']:.1f} / {1000 * lat['p99']:.1f} ms",
        f"latency all p50/p95/p99 {1000 * lat_all['p50']:.1f} / {1000 * lat_all['p95']:.1f} / "
        f"{1000 * lat_all['p99']:.1f} ms",
        f"first {'token' if unit == 'tokens' else 'chunk'} p50/p95/p99 {1000 * first['p50']:.1f} / "
        f"{1000 * first['p95']:.1f} / {1000 * first['p99']:.1f} ms",
        f"throughput {tp['requests_per_s']:.2f} requests/s, {rate_text}",
        "errors     " + (", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "none"),
    ]
    return "\n".join(lines)


def write_result(summary: dict[str, Any], out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = out_dir / f"load_{summary['kind']}_{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = out_dir / f"load_{summary['kind']}_{stamp}_{n}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="load_test.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", nargs="?", choices=["decoder", "store"], help="gRPC load on the decoder or the store")
    ap.add_argument("--http", action="store_true",
                    help="the serving benchmark of the OpenAI HTTP API (moe-decoder serve --http-listen) instead")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32,64",
                    help="--http: requests in flight, one level after the other")
    ap.add_argument("--num-prompts", type=int, default=0,
                    help="--http: requests per level (default: 4 x concurrency, at least 8)")
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                    help="--http: /v1/completions or /v1/chat/completions")
    ap.add_argument("--target", required=True, help="HOST:PORT on loopback")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=60.0, help="per-request deadline (s)")
    ap.add_argument("--backoff-ms", type=float, default=50.0)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--model", default="", help="store: the model to fetch; --http: the model "
                                                "(default: the first of /v1/models)")
    ap.add_argument("--refs", type=int, default=4, help="experts per FetchExperts call")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--priority", choices=["demand", "prefetch"], default="demand")
    ap.add_argument("--token-file", default=None, help="bearer token file for the store (default: "
                                                       "$EXPERT_STORE_TOKEN); --http: for the decoder "
                                                       "(default: $MOE_DECODER_TOKEN)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON result")
    args = ap.parse_args(argv)
    if args.http:
        if args.kind is not None:
            ap.error("--http runs against the decoder's HTTP API: give no 'decoder' / 'store'")
        return _main_http(args)
    if args.kind is None:
        ap.error("give 'decoder' or 'store' (gRPC), or --http")
    token = None
    if args.kind == "store":
        token = (Path(args.token_file).read_text().strip() if args.token_file
                 else os.environ.get("EXPERT_STORE_TOKEN") or None)
    spec = LoadSpec(kind=args.kind, target=args.target, clients=args.clients, seconds=args.seconds,
                    processes=args.processes, deadline_s=args.deadline, backoff_ms=args.backoff_ms,
                    prompt=args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                    model=args.model, refs=args.refs, precision=args.precision, priority=args.priority,
                    token=token, seed=args.seed)
    try:
        summary = run_load(spec)
    except ValueError as e:
        print(f"load_test.py: error: {e}", file=sys.stderr)
        return 2
    return _report(format_summary(summary), summary, args.out)


def _report(table: str, summary: dict[str, Any], out: str) -> int:
    """Print the table, write the JSON result next to the others; exit status 0."""
    print(table)
    print(f"wrote {write_result(summary, Path(out))}")
    return 0



def _main_http(args: argparse.Namespace) -> int:
    """load_test.py --http: the HTTP serving benchmark (benchmarks/http_load.py)."""
    from benchmarks.http_load import HttpLoadSpec, format_http_summary, parse_levels, run_http_load

    try:
        token = (Path(args.token_file).read_text().strip() if args.token_file
                 else os.environ.get("MOE_DECODER_TOKEN") or None)
        check_loopback(args.target)
        spec = HttpLoadSpec(target=args.target, concurrency=parse_levels(args.concurrency),
                            num_prompts=args.num_prompts, endpoint=args.endpoint, model=args.model,
                            prompt=args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                            deadline_s=args.deadline, backoff_ms=args.backoff_ms, seed=args.seed, token=token)
        summary = run_http_load(spec)
    except (ValueError, OSError) as e:
        print(f"load_test.py: error: {e}", file=sys.stderr)
        return 2
    return _report(format_http_summary(summary), summary, args.out)


if __name__ == "__main__":
    sys.exit(main())
