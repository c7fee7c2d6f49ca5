"""`expert-store`: pack a checkpoint, serve a store, inspect and verify it.

    expert-store pack CHECKPOINT_DIR --store DIR [--model NAME] [--precisions bf16,int8,int4]
                      [--group-size 128] [--redis URL]
    expert-store pack hf://ORG/NAME[@REVISION] [--hf-cache DIR] --store ...   ($HF_TOKEN for gated repos)
    expert-store pack CHECKPOINT_DIR --store grpc://H:P[,H:P] | dns:///H:P | k8s://NS/SVC:PORT
                      [--placement all|owner] [--token-file F] [--tls-ca F [--tls-cert F --tls-key F]]
                      [--deadline S] [--model NAME] [--precisions ...] [--group-size 128]
    expert-store serve --store DIR [--redis URL] [--listen HOST:PORT] [--workers N]
                       [--max-refs N] [--max-streams N] [--token-file F]
                       [--tls-cert F --tls-key F [--tls-client-ca F]] [--metrics-port P] [--ram-bytes N]
                       [--stream-above-bytes N]
    expert-store colocate --upstream DIR|grpc://H:P[,H:P] --arena PATH --arena-bytes N (--model NAME | --slot-bytes N)
                          [--listen HOST:PORT] [--token-file F] [--upstream-token-file F]
    expert-store inspect --store DIR [--model NAME]
    expert-store verify --store DIR [--model NAME]

`serve` prints "listening on HOST:PORT" on stdout once it serves (start it on port 0 and
read the port from that line). Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from expert_store import families
from expert_store import format as blob_format
from expert_store.errors import StoreError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_VERIFY_FAILED = 3


class CliError(Exception):
    """A user-facing error: printed as one line, exit code EXIT_ERROR."""


def _size(text: str) -> int:
    """'1073741824', '512M', '4G', '0'."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 268435456, 256M, 4G)") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _precisions(text: str) -> tuple[str, ...]:
    out = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in out if p not in blob_format.PRECISIONS]
    if not out or bad:
        raise argparse.ArgumentTypeError(
            f"precisions must be a comma list of {','.join(blob_format.PRECISIONS)}, got {text!r}")
    return out


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help lists each option's default, unless it has none (None, False) or its help already
    names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not _worth_showing(default) or "default" in text.lower()
                or not action.option_strings or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: {_shown(default)})"


def _worth_showing(default: object) -> bool:
    """None, False and empty values say nothing a reader needs."""
    if isinstance(default, str):
        return bool(default) and default != argparse.SUPPRESS
    return default is not None and default is not False and default != [] and default != ()


def _shown(default: object) -> str:
    """A default as --help prints it (a list as its comma list), %-escaped for argparse."""
    text = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
    return text.replace("%", "%%")


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give `parser` and its subcommands DefaultsHelpFormatter, and a help line to options
    without one whose default is worth showing (argparse prints nothing for them)."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
        elif action.help is None and action.option_strings and _worth_showing(action.default):
            action.help = f"(default: {_shown(action.default)})"
    return parser


def build_parser() -> argparse.ArgumentParser:
    return show_defaults(_build_parser())


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="expert-store", description="Pack a checkpoint into an expert store, serve it, inspect and verify it.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pack", help=f"import an HF safetensors MoE checkpoint ({families.supported_list()}) "
                                    f"into a store",
                       description="Import a checkpoint into a store directory, or into running store replicas "
                                   "over gRPC (PutBlob; the manifest goes last, so nothing is visible before "
                                   "the pack is complete; a re-run skips files a replica already holds).")
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR|hf://ORG/NAME[@REVISION]",
                   help="a local HF checkpoint directory, or a hub repository to download (only safetensors, "
                        "config and tokenizer files; $HF_TOKEN for gated or private ones; resumable)")
    p.add_argument("--hf-cache", metavar="DIR", default=None,
                   help="(hf://) hub cache directory to download into (default: $HF_HUB_CACHE or "
                        "~/.cache/huggingface/hub)")
    p.add_argument("--store", required=True, metavar="DIR|grpc://H:P[,H:P]|dns:///H:P|k8s://NS/SVC:PORT",
                   help="a store directory, or the replicas to upload to")
    p.add_argument("--model", help="model name in the store (default: the checkpoint directory's name)")
    p.add_argument("--precisions", type=_precisions, default=("bf16",), help="comma list of bf16,int8,int4")
    p.add_argument("--group-size", type=_positive, default=128, help="quantization group size (int8/int4)")
    p.add_argument("--codec", choices=("auto", "none"), default="auto",
                   help="auto: bf16 blobs as byte planes + lz4 where that saves >= 3%%; none: every blob as its "
                        "raw payload (about a fifth larger for bf16, but a co-located store publishes it at read "
                        "speed and a decoder uses it where it lies, with no decode)")
    p.add_argument("--redis", metavar="URL", help="(directory) also write through to this Redis tier")
    p.add_argument("--redis-password-file", metavar="F",
                   help="(directory) password of --redis (else $REDIS_PASSWORD, if set)")
    p.add_argument("--placement", choices=("all", "owner"), default="all",
                   help="(replicas) all: every file to every replica (each serves the whole model); owner: each "
                        "expert blob and the dense file only to its rendezvous owner (1/N disk, no redundancy, "
                        "fixed replica set)")
    p.add_argument("--token-file", metavar="F", help="(replicas) bearer token (else $EXPERT_STORE_TOKEN, if set)")
    p.add_argument("--tls-ca", metavar="F", help="(replicas) CA of the servers' certificates: use TLS "
                                                 "(with --tls-cert alone: the system roots)")
    p.add_argument("--tls-cert", metavar="F", help="(replicas) client certificate (mTLS)")
    p.add_argument("--tls-key", metavar="F", help="(replicas) client key (mTLS)")
    p.add_argument("--tls-server-name", metavar="NAME", help="(replicas) name to check the certificates against")
    p.add_argument("--deadline", type=float, default=30.0, metavar="S",
                   help="(replicas) deadline of each RPC; uploads get this plus their size at 16 MiB/s")
    p.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("serve", help="serve a store over gRPC")
    s.add_argument("--store", required=True, metavar="DIR")
    s.add_argument("--redis", metavar="URL", help="redis://, rediss:// or redis+cluster:// URL of the Redis tier")
    s.add_argument("--redis-password-file", metavar="F",
                   help="password of the Redis tier (else $REDIS_PASSWORD, if set; a password in the URL wins)")
    s.add_argument("--listen", default="127.0.0.1:50051", metavar="HOST:PORT", help="port 0 picks a free one")
    s.add_argument("--workers", type=_positive, default=1, metavar="N",
                   help="server processes sharing the port (SO_REUSEPORT)")
    s.add_argument("--max-refs", type=_positive, default=64, metavar="N", help="refs per FetchExperts call")
    s.add_argument("--max-streams", type=_positive, default=64, metavar="N", help="concurrent streams per worker")
    s.add_argument("--token-file", metavar="F", help="require this bearer token (else $EXPERT_STORE_TOKEN, if set)")
    s.add_argument("--tls-cert", metavar="F", help="server certificate chain (PEM)")
    s.add_argument("--tls-key", metavar="F", help="server private key (PEM)")
    s.add_argument("--tls-client-ca", metavar="F", help="require client certificates signed by this CA (mTLS)")
    s.add_argument("--metrics-port", type=int, metavar="P", help="serve Prometheus metrics on this port")
    s.add_argument("--ram-bytes", type=_size, default=256 << 20, metavar="BYTES",
                   help="RAM tier budget per worker, e.g. 268435456, 256M, 4G (0 = none)")
    s.add_argument("--stream-above-bytes", type=_size, default=16 << 20, metavar="BYTES",
                   help="blobs larger than this stream from NVMe in chunks, checked on the way "
                        "(server memory per stream: a few chunks); smaller ones are read whole and cached")
    s.add_argument("--grace", type=float, default=5.0, metavar="S", help="shutdown grace for in-flight streams")
    s.add_argument("--inject-latency-ms", type=float, default=0.0, metavar="MS",
                   help="fault injection (tests, benchmarks): delay every expert blob served, and every "
                        "Verify (it re-reads a blob), by this much")

    from expert_store import colocate

    colocate.add_parser(sub, _size, _positive, _precisions)

    for name, help_ in (("inspect", "list models, blobs and sizes"), ("verify", "check every checksum")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--store", required=True, metavar="DIR")
        c.add_argument("--model", help="only this model")
    return ap


def _read_file(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _redis_password(args: argparse.Namespace) -> str | None:
    """--redis-password-file (stripped), else $REDIS_PASSWORD, else None."""
    from expert_store.grpc_serving import read_token_file

    if args.redis_password_file is not None and not args.redis:
        raise CliError("--redis-password-file goes with --redis")
    try:
        return read_token_file(args.redis_password_file, "REDIS_PASSWORD")
    except OSError as e:
        raise CliError(f"cannot read Redis password file {args.redis_password_file}: {e.strerror or e}") from None


def _existing_store(path: str) -> str:
    if not Path(path).is_dir():
        raise CliError(f"store directory {path} does not exist")
    return path


def cmd_pack(args: argparse.Namespace) -> int:
    from expert_store import hub
    from expert_store.client import is_remote_target

    ref = hub.parse_hub_ref(args.checkpoint) if hub.is_hub_ref(args.checkpoint) else None
    if ref is None and not Path(args.checkpoint).is_dir():
        raise CliError(f"checkpoint directory {args.checkpoint} does not exist")
    if args.hf_cache is not None and ref is None:
        raise CliError("--hf-cache goes with an hf://ORG/NAME checkpoint")
    if args.model is None and ref is not None:
        args.model = ref.name  # not the snapshot directory's name (a commit hash)
    if args.model is not None:
        blob_format.validate_model_name(args.model)
    remote = is_remote_target(args.store)
    if remote:
        _check_remote_args(args)
    if ref is not None:
        args.checkpoint = str(hub.download(ref, args.hf_cache, progress=not args.no_progress))
        logging.getLogger("expert_store.hub").info("%s: snapshot %s", ref, args.checkpoint)
    if remote:
        return _pack_remote(args)
    from expert_store.pack import pack_checkpoint  # torch: imported only once the arguments are sound
    from expert_store.store import ModelStore
    password = _redis_password(args)
    redis_options = {"password": password} if args.redis else {}
    with ModelStore.open(args.store, redis_url=args.redis, ram_bytes=0, **redis_options) as store:
        result = pack_checkpoint(args.checkpoint, store.tiered, model=args.model, precisions=args.precisions,
                                 group_size=args.group_size, progress=not args.no_progress, codec=args.codec)
    print(f"packed {result.model} into {args.store}: {result.blobs_written} blobs written "
          f"({result.bytes_written / 1e6:.1f} MB), {result.blobs_skipped} already present")
    return 0


def _check_remote_args(args: argparse.Namespace) -> None:
    """The replica-only flags, checked before any download."""
    if args.redis or args.redis_password_file:
        raise CliError("--redis is for a store directory; replicas write through to their own Redis tier")
    if args.deadline <= 0:
        raise CliError("--deadline must be positive")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CliError("--tls-cert and --tls-key go together")


def _pack_remote(args: argparse.Namespace) -> int:
    from expert_store.grpc_serving import read_token_file

    try:
        token = read_token_file(args.token_file, "EXPERT_STORE_TOKEN")
    except OSError as e:
        raise CliError(f"cannot read token file {args.token_file}: {e.strerror or e}") from None
    from expert_store.pack import pack_remote  # torch: imported only once the arguments are sound

    result = pack_remote(args.checkpoint, args.store, model=args.model, precisions=args.precisions,
                         group_size=args.group_size, codec=args.codec, placement=args.placement, token=token,
                         tls_ca=_read_file(args.tls_ca, "TLS CA"), tls_cert=_read_file(args.tls_cert, "TLS certificate"),
                         tls_key=_read_file(args.tls_key, "TLS key"), tls_server_name=args.tls_server_name,
                         deadline_s=args.deadline, progress=not args.no_progress)
    print(f"packed {result.model} into {len(result.replicas)} replica(s) {', '.join(result.replicas)} "
          f"(placement {result.placement}): {sum(result.uploaded.values())} files uploaded "
          f"({result.bytes_uploaded / 1e6:.1f} MB), {sum(result.skipped.values())} already there")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from expert_store.server import ServerConfig, read_token
    from expert_store.workers import StoreSpec, run_single, run_workers

    _existing_store(args.store)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CliError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise CliError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
    try:
        token = read_token(args.token_file)
    except OSError as e:
        raise CliError(f"cannot read token file {args.token_file}: {e.strerror or e}") from None
    config = ServerConfig(
        listen=args.listen, max_refs=args.max_refs, max_streams=args.max_streams, grace_s=args.grace,
        token=token, tls_cert=_read_file(args.tls_cert, "TLS certificate"),
        tls_key=_read_file(args.tls_key, "TLS key"), tls_client_ca=_read_file(args.tls_client_ca, "client CA"),
        metrics_port=args.metrics_port, inject_latency_s=args.inject_latency_ms / 1000.0)
    spec = StoreSpec(args.store, redis_url=args.redis, ram_bytes=args.ram_bytes,
                     stream_above_bytes=args.stream_above_bytes, redis_password=_redis_password(args))
    if args.workers == 1:
        run_single(spec, config)
        return 0
    return run_workers(spec, config, args.workers)


def cmd_inspect(args: argparse.Namespace) -> int:
    from expert_store.store import ModelStore

    with ModelStore.open(_existing_store(args.store), ram_bytes=0) as store:
        unfinished = [] if args.model else store.inspect_unfinished()
        rows = store.inspect(args.model)
        if not rows and not unfinished:
            print(f"no models in {args.store}")
            return 0
        if rows:
            _print_rows(rows)
        if unfinished:
            _print_unfinished(unfinished, args.store, complete=bool(rows))
        for model in sorted({r["model"] for r in rows}):
            try:
                m = store.manifest(model)
                print(f"{model}: {m.num_layers} layers x {m.num_experts} experts, "
                      f"precisions {','.join(m.precisions)}, dense {m.dense_size:,} bytes")
            except Exception as e:  # a model without a sound manifest is still listed above
                print(f"{model}: no usable manifest ({e})")
    return 0


def _print_rows(rows: list[dict]) -> None:
    print(f"{'model':<24} {'kind':<7} {'precision':<9} {'count':>7} {'bytes':>14}")
    for r in rows:
        print(f"{r['model']:<24} {r['kind']:<7} {r['precision'] or '-':<9} {r['count']:>7} {r['bytes']:>14,}")


def _print_unfinished(rows: list[dict], store: str, complete: bool) -> None:
    """What an unfinished pack left on disk, and how to finish it."""
    print(("" if not complete else "\n") + f"unfinished (no manifest yet, not served): in {store}")
    _print_rows(rows)
    for model in sorted({r["model"] for r in rows}):
        blobs = sum(r["count"] for r in rows if r["model"] == model and r["kind"] == "expert")
        nbytes = sum(r["bytes"] for r in rows if r["model"] == model)
        print(f"{model}: a pack that did not finish left {blobs} expert blobs ({nbytes / 1e6:.1f} MB) on disk; "
              f"run the same `expert-store pack CHECKPOINT --store {store} --model {model}` again to finish it "
              f"(blobs already written are kept and skipped)")


def cmd_verify(args: argparse.Namespace) -> int:
    from expert_store.store import ModelStore

    with ModelStore.open(_existing_store(args.store), ram_bytes=0) as store:
        models = [args.model] if args.model else store.models()
        bad = store.verify_details(args.model, progress=sys.stderr.isatty())
    for key, reason in bad:
        print(f"BAD {key}: {reason}")
    if bad:
        print(f"verify: {len(bad)} bad file(s) in {args.store}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    print(f"verify: all checksums ok ({len(models)} model(s))")
    return 0


def cmd_colocate(args: argparse.Namespace) -> int:
    from expert_store.colocate import cmd_colocate as run

    return run(args)


COMMANDS = {"pack": cmd_pack, "serve": cmd_serve, "colocate": cmd_colocate, "inspect": cmd_inspect,
            "verify": cmd_verify}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (CliError, ValueError, OSError) as e:  # ValueError: CheckpointError, bad names; OSError: disk, port
        print(f"expert-store {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except StoreError as e:
        print(f"expert-store {args.command}: error: {e} ({e.code})", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug: one line unless --verbose asks for the traceback
        if args.verbose:
            raise
        print(f"expert-store {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
