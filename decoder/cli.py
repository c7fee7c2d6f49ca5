"""`moe-decoder` console script.

    moe-decoder generate --store DIR_OR_ADDR --model NAME --prompt TEXT [options]
    moe-decoder train-demo ...   -> decoder.train_demo.main(argv)
    moe-decoder demo ...         -> decoder.demo.main(argv)
    moe-decoder calibrate ...    -> decoder.calibrate.main(argv)
    moe-decoder serve ...        -> cmd_serve(argv): its flags here, the service in decoder.serving

Delegated subcommands are imported lazily and receive the arguments after their name; `serve`
has its own parser here (prog "moe-decoder serve") and runs `decoder.serving.launch`. The CLI
only parses and checks flags: decoder.serving never imports it.
Errors are one line on stderr ("moe-decoder: error: ...") with a non-zero exit status and no
traceback (set MOE_DECODER_DEBUG=1 to see tracebacks).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from decoder.wire import TOKEN_ENV

PROG = "moe-decoder"

# name -> (module, help). Each module provides main(argv: list[str]) -> int | None.
DELEGATED: dict[str, tuple[str, str]] = {
    "train-demo": ("decoder.train_demo", "train the small demo Mixtral-layout model and save an HF checkpoint"),
    "demo": ("decoder.demo", "the embedded default: train/reuse, pack, serve, generate with stats"),
    "calibrate": ("decoder.calibrate", "measure per-layer sensitivity and write a calibration profile"),
    "serve": ("decoder.cli", "serve Generate over gRPC (decoder.proto)"),  # cmd_serve
}

EXIT_ERROR = 1
EXIT_USAGE = 2

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1000', '64MiB', '1.5G', '512k' -> bytes (k/M/G/T are powers of 1024 with or without 'i')."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 1000000, 64MiB, 2G)")
    value, unit = float(m.group(1)), m.group(2).lower()
    return int(value * (1024 ** " kmgt".index(unit if unit else " ")))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# Flags that mean one thing on `expert-store` and could mean either of two on the decoder
# (it is a client of the store and a server to its own clients): refused with the two names.
AMBIGUOUS_FLAGS: dict[str, str] = {
    "--token-file": "--token-file is ambiguous on moe-decoder: use --store-token-file F for the token sent "
                    "to the store, or --auth-token-file F (serve) for the token clients must send",
    "--tls-ca": "--tls-ca is ambiguous on moe-decoder: use --store-tls-ca F for the CA of the store's "
                "certificate, or --tls-client-ca F (serve) to require client certificates",
}


class _Refused(argparse.Action):
    """An option that is an error, with the message of AMBIGUOUS_FLAGS."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(AMBIGUOUS_FLAGS[self.option_strings[0]])


def refuse_ambiguous_flags(p: argparse.ArgumentParser, flags: Sequence[str] = tuple(AMBIGUOUS_FLAGS)) -> None:
    """Make these AMBIGUOUS_FLAGS options one-line usage errors (hidden from --help)."""
    for flag in flags:
        p.add_argument(flag, action=_Refused, nargs="?", help=argparse.SUPPRESS)


def read_store_token(path: str | None) -> str | None:
    """The bearer token sent to the store: from --store-token-file (stripped), else
    $EXPERT_STORE_TOKEN, else None."""
    from expert_store.grpc_serving import read_token_file
    from expert_store.wire import TOKEN_ENV as STORE_TOKEN_ENV

    return read_token_file(path, STORE_TOKEN_ENV)



GATING_HELP = "topk | uniform | adaptive | cost-aware"
# gatings that read the model's calibration profile (per-layer sensitivity, default budget)
PROFILE_GATINGS = ("adaptive", "cost-aware")
BUDGET_HELP = ("gating budget: T for adaptive / cost-aware (default: the calibrated one for --single-expert-ratio), "
               "the w2 threshold for uniform (top-k: the dropped tail weight W)")


def add_adapmoe_options(p: argparse.ArgumentParser) -> None:
    """The AdapMoE knobs `generate` and `serve` share (turned into Engine.from_store's
    cache/gating/prefetch options by `engine_options`)."""
    p.add_argument("--cache-plan", default=None, choices=["uniform", "popularity"],
                   help="GPU slots per layer: AdapMoE's DP under uniform expert choice, or the DP on the "
                        "calibrated expert popularity (needs cache budgets; default uniform)")
    p.add_argument("--eviction", default=None, choices=["lru", "lfru"],
                   help="which GPU expert gives its slot up: least recently used, or by recency and frequency "
                        "(default lfru: fewer copies per token on the H200, benchmarks/README 'Against lru')")
    p.add_argument("--gpu-prefetch", action="store_true",
                   help="also copy predicted experts into GPU slots ahead of use (the AdapMoE paper's prefetch; "
                        "off by default: on a link-bound GPU its wrong guesses cost more copies than its overlap "
                        "saves, benchmarks/README 'Against lru'). A store behind a partial host tier is prefetched "
                        "from either way")
    p.add_argument("--lookahead", type=int, default=None, metavar="N",
                   help="prefetch into GPU slots a fixed N layers ahead (implies --gpu-prefetch; default: adaptive, "
                        "from measured load/compute time)")
    p.add_argument("--loss-bound", type=float, default=None,
                   help="cost-aware gating: cap on the estimated loss added per token")
    p.add_argument("--miss-precision", default=None, choices=["int8", "int4"],
                   help="HOBBIT: serve demand misses of low-weight experts at this lower precision (needs cache budgets)")
    p.add_argument("--miss-threshold", type=float, default=None,
                   help="routing weight below which a missing expert may load at --miss-precision (default 0.3)")
    p.add_argument("--miss-compute", default=None, choices=["copy", "cpu", "auto"],
                   help="a missed expert: copied to the GPU (copy, the default), computed on the host's cores "
                        "from the host tier when it can (cpu), or whichever finishes first by measured cost "
                        "(auto); needs cache budgets")
    p.add_argument("--cpu-workers", type=int, default=None, metavar="W",
                   help="with --miss-compute cpu/auto: host experts computed at once, each on cores / W threads "
                        "(default 1)")
    p.add_argument("--fetch-workers", type=int, default=None, metavar="N",
                   help="receive the host tier's store fetches in N processes that write straight into it (a "
                        "shared-memory arena under /dev/shm of --host-cache-bytes plus staging): one Python "
                        "process receives ~0.7-0.9 GB/s from a remote store; 0 or unset: fetches in this "
                        "process. Needs --host-cache-bytes and a store address or directory, not local-shm://")
    p.add_argument("--fetch-demand-parts", type=int, default=None, metavar="K",
                   help="with --fetch-workers: fetch each demand miss (what a token waits for) in up to K byte "
                        "ranges received side by side by the processes that free up first, checked once "
                        "joined (parts of at least 4 MiB; default 1: one process per blob)")
    p.add_argument("--fetch-fill-parts", type=int, default=None, metavar="K",
                   help="with --fetch-workers: the same for the host tier's fill at start, so its blobs arrive one "
                        "after another at the processes' whole rate, most wanted first (default 1)")
    p.add_argument("--single-expert-ratio", type=float, default=None, metavar="R",
                   help="adaptive / cost-aware gating: use the budget the model's calibration profile stores "
                        "for this share of single-expert decisions (top-k > 2: of the droppable expert uses, "
                        "all but each token's first, dropped; `moe-decoder calibrate --upload` stores "
                        "0.1, 0.25 and 0.5; without --budget the default is 0.25); --budget T overrides it")


def engine_options(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """cache_options / gating_options / prefetch_options for Engine.from_store from the flags of
    `add_adapmoe_options` (plus --gpu-cache-bytes/--host-cache-bytes/--no-prefetch/--gating).
    ValueError for combinations that would silently do nothing."""
    cache_options: dict[str, Any] = {}
    gating_options: dict[str, Any] = {}
    prefetch_options: dict[str, Any] = {}
    has_cache = args.gpu_cache_bytes is not None or args.host_cache_bytes is not None
    if args.miss_precision:
        if not has_cache:
            raise ValueError("--miss-precision needs the expert cache: give --gpu-cache-bytes/--host-cache-bytes")
        cache_options["miss_precision"] = args.miss_precision
        gating_options["miss_precision_threshold"] = 0.3 if args.miss_threshold is None else args.miss_threshold
    elif args.miss_threshold is not None:
        raise ValueError("--miss-threshold goes with --miss-precision")
    if args.single_expert_ratio is not None:
        if getattr(args, "budget", None) is not None:
            raise ValueError("give --budget T or --single-expert-ratio R, not both (--budget overrides the "
                             "calibrated budget)")
        if args.gating not in ("adaptive", "cost-aware"):
            raise ValueError("--single-expert-ratio applies to --gating adaptive and cost-aware")
        if not 0 < args.single_expert_ratio < 1:
            raise ValueError("--single-expert-ratio must be in (0, 1)")
        gating_options["single_expert_ratio"] = args.single_expert_ratio
    if args.loss_bound is not None:
        if args.gating != "cost-aware":
            raise ValueError("--loss-bound applies to --gating cost-aware")
        gating_options["loss_bound"] = args.loss_bound
    if getattr(args, "miss_compute", None) is not None:
        if not has_cache:
            raise ValueError("--miss-compute needs the expert cache: give --gpu-cache-bytes/--host-cache-bytes")
        cache_options["miss_compute"] = args.miss_compute
    if getattr(args, "cpu_workers", None) is not None:
        if getattr(args, "miss_compute", None) in (None, "copy"):
            raise ValueError("--cpu-workers applies to --miss-compute cpu or auto")
        if args.cpu_workers < 1:
            raise ValueError("--cpu-workers must be >= 1")
        cache_options["cpu_workers"] = args.cpu_workers
    fetch_workers = getattr(args, "fetch_workers", None) or 0
    if fetch_workers < 0:
        raise ValueError("--fetch-workers must be >= 0")
    if fetch_workers:
        if not args.host_cache_bytes:
            raise ValueError("--fetch-workers receives into the host tier: give --host-cache-bytes")
        if str(getattr(args, "store", "")).startswith("local-shm://"):
            raise ValueError("--fetch-workers receives from a remote store; a local-shm:// store is read in place")
        cache_options["fetch_workers"] = fetch_workers
    for flag, option in (("--fetch-demand-parts", "fetch_demand_parts"), ("--fetch-fill-parts", "fetch_fill_parts")):
        k = getattr(args, option, None)
        if k is None:
            continue
        if k < 1:
            raise ValueError(f"{flag} must be >= 1")
        if k > 1 and not fetch_workers:
            raise ValueError(f"{flag} stripes store fetches over --fetch-workers' processes: give --fetch-workers")
        cache_options[option] = k
    if args.cache_plan is not None:
        if not has_cache:
            raise ValueError("--cache-plan needs the expert cache: give --gpu-cache-bytes/--host-cache-bytes")
        cache_options["plan"] = args.cache_plan
    for flag, given in (("--eviction", args.eviction is not None), ("--gpu-prefetch", args.gpu_prefetch)):
        if given and not has_cache:
            raise ValueError(f"{flag} needs the expert cache: give --gpu-cache-bytes/--host-cache-bytes")
    if args.gpu_prefetch and getattr(args, "no_prefetch", False):
        raise ValueError("--gpu-prefetch and --no-prefetch contradict each other")
    if has_cache:
        cache_options["eviction"] = args.eviction or "lfru"
        if not getattr(args, "no_prefetch", False):
            prefetch_options["gpu"] = bool(args.gpu_prefetch or args.lookahead is not None)
    if args.lookahead is not None:
        if args.lookahead < 1:
            raise ValueError("--lookahead must be >= 1")
        if getattr(args, "no_prefetch", False):
            raise ValueError("--lookahead and --no-prefetch contradict each other")
        if not has_cache:
            raise ValueError("--lookahead needs the expert cache (the prefetcher feeds it): "
                             "give --gpu-cache-bytes/--host-cache-bytes")
        prefetch_options["lookahead"] = args.lookahead
    return {"cache_options": cache_options, "gating_options": gating_options, "prefetch_options": prefetch_options}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Mixtral-family MoE decoder streaming experts from an expert store.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("--store", required=True, help="store directory (in-process), gRPC address host:port[,...], "
                   "or a co-located store's arena local-shm://PATH?control=HOST:PORT")
    g.add_argument("--model", required=True, help="model name in the store")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--gating", default="topk", help=GATING_HELP)
    g.add_argument("--budget", type=float, default=None, help=BUDGET_HELP)
    g.add_argument("--gpu-cache-bytes", type=parse_size, default=None, help="GPU expert cache budget (e.g. 256MiB)")
    g.add_argument("--host-cache-bytes", type=parse_size, default=None, help="host (pinned) expert cache budget")
    add_adapmoe_options(g)
    g.add_argument("--no-prefetch", action="store_true", help="disable the cross-layer prefetcher")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32 on cpu, bfloat16 on cuda)")
    g.add_argument("--precision", default="bf16", choices=["bf16", "int8", "int4"], help="expert precision to fetch")
    g.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming it")
    g.add_argument("--no-stats", action="store_true", help="do not print the statistics table")
    g.add_argument("--stats-json", default=None, metavar="PATH", help="also write engine.stats() as JSON")
    g.add_argument("--store-token-file", default=None, metavar="F",
                   help="bearer token sent to the store (default: $EXPERT_STORE_TOKEN, if set)")
    refuse_ambiguous_flags(g, ["--token-file"])  # generate talks to the store only, without TLS options
    g.add_argument("-v", "--verbose", action="store_true", help="log warnings (store failover, ...) to stderr")
    g.set_defaults(func=cmd_generate)

    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    from expert_store.cli import show_defaults

    return show_defaults(p)  # --help lists the defaults


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from expert_store.client import is_remote_target

    if args.max_tokens < 0:
        raise ValueError("--max-tokens must be >= 0")
    if not is_remote_target(args.store) and not os.path.isdir(args.store):
        raise ValueError(f"store directory {args.store} does not exist (or give an address: grpc://HOST:PORT)")
    refuse_checkpoint_dir(args.store)
    dtype_name = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    token = read_store_token(args.store_token_file)
    if args.store_token_file is None:
        return _generate(args, args.store, dtype, token)
    if not is_remote_target(args.store):
        raise ValueError("--store-token-file goes with a store address (a store directory is read in-process)")
    from expert_store.client import StoreClient

    client = StoreClient.open(args.store, token=token)
    try:
        return _generate(args, client, dtype, token)
    finally:
        client.close()


def with_fetch_credentials(options: dict[str, dict[str, Any]], **credentials: Any) -> dict[str, dict[str, Any]]:
    """engine_options plus, with --fetch-workers, what each receiving process opens the store
    with (token, TLS, deadline: the decoder's own), so the processes authenticate as it does."""
    if options["cache_options"].get("fetch_workers"):
        options["cache_options"]["fetch_options"] = {k: v for k, v in credentials.items() if v is not None}
    return options


def _generate(args: argparse.Namespace, store: Any, dtype: Any, token: str | None) -> int:
    """Build the engine on `store` (a target or an open StoreClient), generate, print; `token`:
    the store token, for --fetch-workers' processes."""
    from decoder.engine import Engine

    options = with_fetch_credentials(engine_options(args), token=token)
    with quiet_store_retries(enabled=not args.verbose):
        engine = Engine.from_store(store, args.model, device=args.device, dtype=dtype, gating=args.gating,
                                   gpu_cache_bytes=args.gpu_cache_bytes, host_cache_bytes=args.host_cache_bytes,
                                   precision=args.precision, budget=args.budget,
                                   prefetch=False if args.no_prefetch else None, **options)
    with engine:
        if engine.tokenizer is None:
            raise ValueError(f"model {args.model!r} has no tokenizer.json in the store")
        stream = not args.no_stream

        def on_token(delta: str, token_id: int) -> None:
            if delta:
                sys.stdout.write(delta)
                sys.stdout.flush()

        result = engine.generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed, stop=args.stop,
                                 on_token=on_token if stream else None)
        if not stream:
            sys.stdout.write(result.text)
        sys.stdout.write("\n")
        stats = engine.stats()
        stats["finish_reason"] = result.finish_reason
        if not args.no_stats:
            sys.stdout.write("\n" + format_stats(stats) + "\n")
        sys.stdout.flush()
        if args.stats_json:
            with open(args.stats_json, "w") as f:
                json.dump(stats, f, indent=2, default=str)
    return 0


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def format_stats(s: dict[str, Any]) -> str:
    """engine.stats() as a two-column table."""
    rows: list[tuple[str, str]] = [
        ("model", f"{s.get('model', '')} ({s.get('precision', '')} experts, {s.get('dtype', '')} on {s.get('device', '')})"),
        ("gating", str(s.get("gating", ""))),
        ("prompt / generated tokens", f"{s.get('prompt_tokens', 0)} / {s.get('generated_tokens', 0)}"
                                      + (f" ({s['finish_reason']})" if s.get("finish_reason") else "")),
        ("prefill", f"{s.get('prefill_s', 0.0):.3f} s ({s.get('prefill_tokens_per_s', 0.0):.1f} tokens/s)"),
        ("decode tokens/s", f"{s.get('tokens_per_s', 0.0):.2f}"),
        ("experts per token (per layer)", f"{s.get('experts_per_token', 0.0):.3f}"),
        ("single-expert ratio", f"{100 * s.get('single_expert_ratio', 0.0):.1f} %"),
        ("bytes fetched from store", f"{_bytes(s.get('bytes_fetched', 0))} in {s.get('fetches', 0)} blobs"
                                     f" ({_bytes(s.get('bytes_fetched_per_token', 0.0))} per token)"),
        ("stall per token", f"{1000 * s.get('stall_s_per_token', 0.0):.2f} ms"),
    ]
    for name, t in (s.get("tiers") or {}).items():
        moved = f"; {_bytes(t['bytes_per_token'])}/token loaded" if "bytes_per_token" in t else ""
        rows.append((f"{name} hit rate", f"{100 * t.get('hit_rate', 0.0):.1f} % "
                                         f"({t.get('hits', 0)} hits, {t.get('misses', 0)} misses{moved})"))
    for key in ("prefetch", "prefetcher"):
        pf = s.get(key)
        if isinstance(pf, dict) and pf.get("gpu", True) and ("precision" in pf or "recall" in pf):
            rows.append(("prefetch precision / recall",
                         f"{100 * float(pf.get('precision', 0.0)):.1f} % / {100 * float(pf.get('recall', 0.0)):.1f} %"))
        if isinstance(pf, dict) and pf.get("max_store_lookahead"):
            nt = pf.get("store_next_token_precision")
            rows.append(("store prefetches into host tier",
                         f"{pf.get('store_prefetches', 0)} ({pf.get('store_prefetches_next_token', 0)} for the next "
                         f"token" + (f", {100 * float(nt):.1f} % of those used" if nt is not None else "") + ")"))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k.ljust(width)}  {v}" for k, v in rows] + [line])


def build_serve_parser() -> argparse.ArgumentParser:
    """The flags of `moe-decoder serve` (its own parser: the subcommand gets its argv as is)."""
    from decoder.serving.launch import DEFAULT_MAX_SEQ_LEN

    p = _Parser(prog="moe-decoder serve", description="Serve Generate over gRPC (adapmoe.v1.Decoder).")
    p.add_argument("--store", required=True, help="store address (host:port[,...], grpc://, dns:///, k8s://), "
                                                  "a co-located store's arena (local-shm://PATH?control=HOST:PORT) "
                                                  "or a store directory (in-process)")
    p.add_argument("--model", required=True, help="model name in the store")
    p.add_argument("--listen", default="127.0.0.1:50052", help="HOST:PORT to serve on (port 0: any free port)")
    p.add_argument("--http-listen", default=None, metavar="HOST:PORT",
                   help="also serve the OpenAI HTTP API (/v1/models, /v1/completions, /v1/chat/completions, "
                        "/health, /metrics) here, on the same scheduler and limits (port 0: any free port)")
    p.add_argument("--max-active", type=int, default=4, help="sequences decoded together (KV-cache rows)")
    p.add_argument("--max-queue", type=int, default=16, help="sequences that may wait for a row; "
                                                              "beyond: RESOURCE_EXHAUSTED")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="positions per KV-cache row (prompt + generated; longer prompts are "
                        f"INVALID_ARGUMENT); default: the model's context, at most {DEFAULT_MAX_SEQ_LEN}")
    p.add_argument("--default-max-tokens", type=int, default=128, help="for requests with max_tokens 0")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default=None, help="metrics bind address (default: the --listen host)")
    p.add_argument("--store-token-file", default=None, metavar="F",
                   help="bearer token sent to the store (default: $EXPERT_STORE_TOKEN, if set)")
    p.add_argument("--store-deadline", type=float, default=30.0, help="seconds per store RPC attempt")
    p.add_argument("--store-tls-ca", default=None, metavar="F", help="CA (PEM) of the store's TLS certificate")
    p.add_argument("--store-tls-cert", default=None, metavar="F", help="client certificate (PEM) for store mTLS")
    p.add_argument("--store-tls-key", default=None, metavar="F", help="client key (PEM) for store mTLS")
    p.add_argument("--store-tls-server-name", default=None, help="expected name in the store's certificate")
    p.add_argument("--auth-token-file", default=None, metavar="F",
                   help=f"require this bearer token from clients (default: ${TOKEN_ENV}, if set)")
    p.add_argument("--tls-cert", default=None, metavar="F", help="serve TLS with this certificate chain (PEM)")
    p.add_argument("--tls-key", default=None, metavar="F", help="private key (PEM) of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, metavar="F",
                   help="require client certificates signed by this CA (mTLS)")
    refuse_ambiguous_flags(p)  # --token-file, --tls-ca: which of the two is meant?
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "int8", "int4"], help="expert precision")
    p.add_argument("--gating", default="topk", help=GATING_HELP)
    p.add_argument("--budget", type=float, default=None, help=BUDGET_HELP)
    p.add_argument("--gpu-cache-bytes", type=parse_size, default=None, help="GPU expert cache budget")
    p.add_argument("--host-cache-bytes", type=parse_size, default=None, help="host (pinned) expert cache budget")
    p.add_argument("--host-fill-threads", type=int, default=8, metavar="N",
                   help="at start, fill the host tier from the store on N threads in the background, the "
                        "calibration profile's most used experts first, while serving (demand misses pass "
                        "it; progress in the cache stats' host_fill); 0: fetch experts only when used")
    add_adapmoe_options(p)  # --cache-plan, --lookahead, --loss-bound, --miss-precision, --miss-threshold,
    #                         --single-expert-ratio
    p.add_argument("--no-prefetch", action="store_true", help="disable the cross-layer prefetcher")
    p.add_argument("--wait-for-model", action="store_true",
                   help="serve at once (health NOT_SERVING, Generate UNAVAILABLE) and wait for the model to "
                        "appear in the store (and for the store to be reachable; with adaptive or cost-aware "
                        "gating, for its calibration profile too), then load it and serve; without: a model "
                        "not in the store is an error")
    p.add_argument("--wait-timeout", type=float, default=None, metavar="S",
                   help="with --wait-for-model: give up (exit 1) after S seconds (default: wait forever)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--drain", type=float, default=1.0,
                   help="seconds between NOT_SERVING and refusing new requests on SIGTERM")
    p.add_argument("--log-level", default="INFO")
    from expert_store.cli import show_defaults

    return show_defaults(p)  # --help lists the defaults


def setup_serve_logging(level: str) -> None:
    """Service logs at `level` on stderr, and the per-request JSON lines ("decoder.requests")
    bare, one per line."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(message)s"))
    request_log = logging.getLogger("decoder.requests")
    request_log.addHandler(h)
    request_log.propagate = False
    request_log.setLevel(logging.INFO)


def read_auth_token(path: str | None) -> str | None:
    """The token `serve` requires from its clients: from a file (stripped), else
    $MOE_DECODER_TOKEN, else None."""
    from expert_store.grpc_serving import read_token_file

    return read_token_file(path, TOKEN_ENV)


def read_pem(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError(f"--{what} {path} is empty")
    return data


def cmd_serve(argv: list[str]) -> int:
    """`moe-decoder serve`: check the flags (bad ones fail before anything loads or binds), read
    the token and certificate files, then run the service (decoder.serving.launch)."""
    import torch

    from decoder.engine import Engine
    from decoder.serving import launch
    from decoder.serving.config import ServiceConfig
    from decoder.serving.service import split_host_port
    from expert_store import grpc_serving
    from expert_store.client import StoreClient

    args = build_serve_parser().parse_args(argv)
    if args.wait_timeout is not None:
        if not args.wait_for_model:
            raise ValueError("--wait-timeout goes with --wait-for-model")
        if not args.wait_timeout > 0:
            raise ValueError("--wait-timeout must be > 0")
    setup_serve_logging(args.log_level)
    for name in ("max_active", "default_max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_queue < 0:
        raise ValueError("--max-queue must be >= 0")
    refuse_checkpoint_dir(args.store)
    split_host_port(args.listen)
    if args.http_listen is not None:
        grpc_serving.split_host_port(args.http_listen, example_port=8000)  # a bad address fails before loading
    options = engine_options(args)  # bad flag combinations fail before anything starts
    if args.host_fill_threads < 0:
        raise ValueError(f"--host-fill-threads must be >= 0 (0: no fill at start), got {args.host_fill_threads}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32"))
    token = read_store_token(args.store_token_file)
    options = with_fetch_credentials(options, token=token, deadline_s=args.store_deadline, tls_ca=args.store_tls_ca,
                                     tls_cert=args.store_tls_cert, tls_key=args.store_tls_key,
                                     tls_server_name=args.store_tls_server_name)
    auth_token = read_auth_token(args.auth_token_file)
    tls = {name: read_pem(getattr(args, name), name.replace("_", "-"))
           for name in ("tls_cert", "tls_key", "tls_client_ca")}
    config = ServiceConfig(listen=args.listen, default_max_tokens=args.default_max_tokens,
                           grace_s=args.grace, drain_s=args.drain, token=auth_token, http_listen=args.http_listen,
                           model=args.model, **tls)
    settings = launch.ProcessSettings(
        model=args.model, store=args.store, device=args.device, max_active=args.max_active,
        max_queue=args.max_queue, max_seq_len=args.max_seq_len, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host, wait_for_model=args.wait_for_model, wait_timeout_s=args.wait_timeout,
        needs_profile=args.gating in PROFILE_GATINGS,
        # a store that is down: one error line, not one per retry (unless debugging)
        quiet_first_load=lambda: quiet_store_retries(enabled=args.log_level.upper() != "DEBUG"))

    def open_client() -> StoreClient:
        return StoreClient.open(args.store, token=token, deadline_s=args.store_deadline,
                                tls_ca=args.store_tls_ca, tls_cert=args.store_tls_cert,
                                tls_key=args.store_tls_key, tls_server_name=args.store_tls_server_name)

    def load_engine(client: StoreClient) -> Engine:
        engine = Engine.from_store(client, args.model, device=args.device, dtype=dtype, gating=args.gating,
                                   gpu_cache_bytes=args.gpu_cache_bytes, host_cache_bytes=args.host_cache_bytes,
                                   precision=args.precision, budget=args.budget,
                                   prefetch=False if args.no_prefetch else None, **options)
        start_fill = getattr(engine.provider, "start_host_fill", None)
        if args.host_fill_threads > 0 and start_fill is not None:
            start_fill(threads=args.host_fill_threads)   # serving starts meanwhile: demand first
        return engine

    return launch.run(config, settings, open_client, load_engine)


def _describe(e: BaseException, args: argparse.Namespace | None) -> str:
    """One line for an error, with context for the common ones."""
    from expert_store.errors import StoreError

    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, StoreError):
        store = getattr(args, "store", None)
        model = getattr(args, "model", None)
        if e.code == "NOT_FOUND":
            if model and repr(model) not in msg and model not in msg:
                return f"model {model!r} not found in store {store}: {msg}"
            return msg
        if e.code == "UNAVAILABLE":
            return f"store {store} is unavailable (is `expert-store serve` running there?): {msg}"
        return f"store error ({e.code}): {msg}"
    if isinstance(e, KeyError):
        return f"bad checkpoint: {msg}"
    if isinstance(e, (ValueError, OSError)):
        return msg
    return f"{type(e).__name__}: {msg}"


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of `flag` in a delegated command's argv (`--flag V` or `--flag=V`), for messages."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return None


@contextlib.contextmanager
def quiet_store_retries(enabled: bool = True) -> Iterator[None]:
    """While a command's first contact with the store runs: the store client's per-attempt
    warnings ("...; failing over") are not shown; if it fails, its error says it once.
    enabled=False (--verbose, debug logging) shows them."""
    if not enabled:
        yield
        return
    log = logging.getLogger("expert_store.client")
    level = log.level
    log.setLevel(max(logging.ERROR, level))
    try:
        yield
    finally:
        log.setLevel(level)


def refuse_checkpoint_dir(store: str) -> None:
    """ValueError naming the pack command when `store` is an HF checkpoint directory rather
    than a store (a store directory holds models/, a checkpoint config.json and safetensors)."""
    path = Path(store)
    if not path.is_dir() or (path / "models").is_dir():
        return
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        raise ValueError(f"{store} is a Hugging Face checkpoint, not an expert store: pack it first with "
                         f"`expert-store pack {store} --store STORE_DIR --model NAME`, then give "
                         f"--store STORE_DIR --model NAME")


def _run_delegated(name: str, argv: list[str]) -> int:
    if name == "serve":
        return cmd_serve(argv)
    module_name, _ = DELEGATED[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise RuntimeError(f"`{PROG} {name}` is not available in this build ({module_name} is missing)") from None
        raise
    main: Callable[[list[str]], Any] = getattr(module, "main")
    rc = main(argv)
    return int(rc or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("MOE_DECODER_DEBUG"))
    args: argparse.Namespace | None = None
    try:
        if argv and argv[0] in DELEGATED:
            args = argparse.Namespace(store=_flag_value(argv[1:], "--store"), model=_flag_value(argv[1:], "--model"))
            return _run_delegated(argv[0], argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        # library warnings (e.g. the store client failing over) stay quiet unless --verbose:
        # an error reaches the user as the one line below
        logging.basicConfig(level=logging.DEBUG if debug else (logging.WARNING if getattr(args, "verbose", False)
                                                               else logging.ERROR),
                            format=f"{PROG}: %(name)s: %(message)s")
        if not (debug or getattr(args, "verbose", False)):
            logging.getLogger("expert_store").setLevel(logging.CRITICAL)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    except SystemExit:
        raise
    except Exception as e:  # one clear line, no traceback
        if debug:
            raise
        sys.stderr.write(f"{PROG}: error: {_describe(e, args)}\n")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
