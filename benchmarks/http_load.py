"""Serving benchmark of the OpenAI HTTP API (`moe-decoder serve --http-listen`), in the shape of
vLLM's serving benchmark: `load_test.py --http` runs it.

For each concurrency level (e.g. 1,2,4,...,64) it sends --num-prompts streamed requests
(`/v1/completions` or `/v1/chat/completions`, `stream_options.include_usage`) with at most
that many in flight, and reports per level:

- TTFT: request sent -> first content chunk; ITL: the gaps between content chunks (the server
  puts the tokens decoded since the last chunk into one chunk, so a gap may cover several
  tokens, as in vLLM's measurement); TPOT: (latency - TTFT) / (output tokens - 1); E2E latency.
  p50 / p99 / mean of each over the successful requests.
- requests/s, output tokens/s (from the streams' `usage`) and total tokens/s over the level's
  wall time.
- errors by HTTP status ("429", "503", ...), or by what went wrong on a 200 stream
  ("stream_error": an error event, "incomplete": no usage or no [DONE]) or below HTTP
  ("timeout", "connect_error", ...).

Requests carry a seed drawn from --seed, so a run with temperature > 0 is repeatable. A client
answered 429 waits about --backoff-ms before sending its next request (as the gRPC mode does).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks._stats import percentile

MAX_CONCURRENCY = 512
MAX_PROMPTS = 100_000
LEVEL_SLACK_S = 60.0  # a level ends at most this long after the per-request deadlines


@dataclass
class HttpLoadSpec:
    target: str                          # host:port (loopback) of --http-listen
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    num_prompts: int = 0                 # requests per level; 0: 4 x concurrency, at least 8
    endpoint: str = "completions"        # completions | chat
    model: str = ""                      # "": the first of GET /v1/models
    prompt: str = ""
    max_tokens: int = 32
    temperature: float = 0.0
    deadline_s: float = 60.0             # per request
    backoff_ms: float = 50.0             # after a 429
    seed: int = 0
    token: str | None = field(default=None, repr=False)

    def validate(self) -> "HttpLoadSpec":
        if not self.concurrency or any(not 1 <= c <= MAX_CONCURRENCY for c in self.concurrency):
            raise ValueError(f"--concurrency levels must be in [1, {MAX_CONCURRENCY}]")
        if not 0 <= self.num_prompts <= MAX_PROMPTS:
            raise ValueError(f"--num-prompts must be in [0, {MAX_PROMPTS}]")
        if self.endpoint not in ("completions", "chat"):
            raise ValueError("--endpoint must be 'completions' or 'chat'")
        if not self.prompt:
            raise ValueError("--prompt must not be empty")
        if self.max_tokens < 1:
            raise ValueError("--max-tokens must be >= 1")
        if self.deadline_s <= 0:
            raise ValueError("--deadline must be > 0")
        return self

    def prompts_for(self, concurrency: int) -> int:
        return self.num_prompts or max(8, 4 * concurrency)


def parse_levels(text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); ValueError naming the bad part."""
    levels = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"--concurrency {text!r}: {part!r} is not a positive integer")
        levels.append(int(part))
    return tuple(levels)


@dataclass
class RequestRecord:
    """One request as the client saw it (times in seconds from sending it)."""

    status: str                          # "OK" or the error class (see the module docstring)
    latency_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0


class _Failed(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def _body(spec: HttpLoadSpec, model: str, seed: int) -> tuple[str, dict[str, Any]]:
    common = {"model": model, "max_tokens": spec.max_tokens, "temperature": spec.temperature, "seed": seed,
              "stream": True, "stream_options": {"include_usage": True}}
    if spec.endpoint == "chat":
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": spec.prompt}]}
    return "/v1/completions", {**common, "prompt": spec.prompt}


def _content(event: dict[str, Any]) -> str:
    out = []
    for choice in event.get("choices") or ():
        out.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(out)


async def one_request(session: Any, spec: HttpLoadSpec, model: str, seed: int) -> RequestRecord:
    """Send one streamed request; a RequestRecord whatever happens (errors included)."""
    import aiohttp

    path, body = _body(spec, model, seed)
    t0 = time.perf_counter()
    ttft, last, itl, usage, done = None, None, [], None, False
    try:
        async with session.post(path, json=body, timeout=aiohttp.ClientTimeout(total=spec.deadline_s)) as r:
            if r.status != 200:
                await r.read()
                raise _Failed(str(r.status))
            async for raw in r.content:  # one line at a time
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    raise _Failed("stream_error")
                if event.get("usage"):
                    usage = event["usage"]
                if _content(event):
                    now = time.perf_counter() - t0
                    if ttft is None:
                        ttft = now
                    else:
                        itl.append(now - last)
                    last = now
    except _Failed as e:
        return RequestRecord(e.status, time.perf_counter() - t0)
    except asyncio.TimeoutError:
        return RequestRecord("timeout", time.perf_counter() - t0)
    except aiohttp.ClientError as e:
        return RequestRecord(_snake(type(e).__name__), time.perf_counter() - t0)
    except (ValueError, UnicodeDecodeError):  # not JSON / not UTF-8: not the API's SSE
        return RequestRecord("bad_stream", time.perf_counter() - t0)
    latency = time.perf_counter() - t0
    if not done or usage is None:
        return RequestRecord("incomplete", latency)
    return RequestRecord("OK", latency, ttft, itl, int(usage.get("prompt_tokens", 0)),
                         int(usage.get("completion_tokens", 0)))


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))


def _session(spec: HttpLoadSpec, concurrency: int) -> Any:
    """An aiohttp session on the target with `concurrency` connections (as vLLM's benchmark
    client), the bearer token in every request."""
    import aiohttp

    headers = {"Authorization": f"Bearer {spec.token}"} if spec.token else {}
    return aiohttp.ClientSession(base_url=f"http://{spec.target}", headers=headers,
                                 connector=aiohttp.TCPConnector(limit=concurrency),
                                 timeout=aiohttp.ClientTimeout(total=spec.deadline_s))


async def served_model(spec: HttpLoadSpec) -> str:
    """spec.model, or the first model GET /v1/models lists."""
    if spec.model:
        return spec.model
    import aiohttp

    async with _session(spec, 1) as session:
        try:
            async with session.get("/v1/models") as r:
                text = await r.text()
                if r.status != 200:
                    raise ValueError(f"GET /v1/models answered {r.status}: {text[:200]}")
                models = [m["id"] for m in json.loads(text).get("data", [])]
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise ValueError(f"cannot reach http://{spec.target}/v1/models: {type(e).__name__}: {e}") from None
    if not models:
        raise ValueError("GET /v1/models lists no model")
    return models[0]


async def run_level(spec: HttpLoadSpec, model: str, concurrency: int) -> tuple[list[RequestRecord], float]:
    """Send spec.prompts_for(concurrency) requests, at most `concurrency` in flight; -> (records,
    wall seconds)."""
    total = spec.prompts_for(concurrency)
    rng = random.Random(spec.seed * 1_000_003 + concurrency)
    seeds = [rng.randrange(2 ** 31) for _ in range(total)]
    next_i = 0
    records: list[RequestRecord] = []
    async with _session(spec, concurrency) as session:
        t0 = time.perf_counter()

        async def worker() -> None:
            nonlocal next_i
            while next_i < total:
                i, next_i = next_i, next_i + 1
                rec = await one_request(session, spec, model, seeds[i])
                records.append(rec)
                if rec.status == "429" and spec.backoff_ms > 0:
                    await asyncio.sleep(spec.backoff_ms / 1000 * (0.5 + rng.random() / 2))

        # every request has its deadline; the level as a whole gets the worst case plus slack
        budget = spec.deadline_s * (total / concurrency + 1) + LEVEL_SLACK_S
        try:
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), budget)
        except asyncio.TimeoutError:
            raise TimeoutError(f"concurrency {concurrency}: {total} requests did not end within {budget:.0f}s") \
                from None
        wall = time.perf_counter() - t0
    return records, wall


def _dist(values: list[float]) -> dict[str, float]:
    return {"count": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "mean": (sum(values) / len(values)) if values else 0.0}


def summarize_level(concurrency: int, records: list[RequestRecord], wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.status == "OK"]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    per = (lambda n: n / wall_s) if wall_s > 0 else (lambda n: 0.0)
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "completed": len(ok),
        "errors": {k: v for k, v in sorted(statuses.items()) if k != "OK"},
        "duration_s": wall_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": per(len(ok)),
        "output_throughput": per(out_tokens),
        "total_token_throughput": per(in_tokens + out_tokens),
        "ttft_s": _dist([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": _dist([(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in ok
                         if r.ttft_s is not None and r.output_tokens > 1]),
        "itl_s": _dist([gap for r in ok for gap in r.itl_s]),
        "e2e_latency_s": _dist([r.latency_s for r in ok]),
    }


def run_http_load(spec: HttpLoadSpec) -> dict[str, Any]:
    """Every concurrency level of `spec`, one after the other; the summary of the run."""
    spec.validate()

    async def main() -> tuple[str, list[dict[str, Any]]]:
        model = await served_model(spec)
        levels = []
        for c in spec.concurrency:
            records, wall = await run_level(spec, model, c)
            levels.append(summarize_level(c, records, wall))
        return model, levels

    model, levels = asyncio.run(main())
    params = {k: v for k, v in asdict(spec).items() if k != "token"}
    params["concurrency"] = list(spec.concurrency)
    return {"kind": "http", "target": spec.target, "model": model, "endpoint": spec.endpoint, "params": params,
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "levels": levels}


def format_http_summary(s: dict[str, Any]) -> str:
    """One row per concurrency level (milliseconds, tokens/s)."""
    head = (f"{'conc':>4} {'ok/sent':>9} {'req/s':>7} {'out tok/s':>9} {'TTFT p50/p99 ms':>17} "
            f"{'ITL p50/p99 ms':>16} {'TPOT p50/p99 ms':>17} {'E2E p50/p99 ms':>17}  errors")
    lines = [f"HTTP serving benchmark on {s['target']} ({s['model']}, /v1/"
             f"{'chat/completions' if s['endpoint'] == 'chat' else 'completions'}, "
             f"max_tokens {s['params']['max_tokens']})", head, "-" * len(head)]

    def pair(d: dict[str, float]) -> str:
        return f"{1000 * d['p50']:.1f} / {1000 * d['p99']:.1f}"

    for lv in s["levels"]:
        errors = ", ".join(f"{k}: {v}" for k, v in lv["errors"].items()) or "none"
        lines.append(f"{lv['concurrency']:>4} {lv['completed']:>4}/{lv['requests']:<4} "
                     f"{lv['request_throughput']:>7.2f} {lv['output_throughput']:>9.1f} {pair(lv['ttft_s']):>17} "
                     f"{pair(lv['itl_s']):>16} {pair(lv['tpot_s']):>17} {pair(lv['e2e_latency_s']):>17}  {errors}")
    return "\n".join(lines)
