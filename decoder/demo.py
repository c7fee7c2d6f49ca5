"""`moe-decoder demo` (what `make demo` runs): the embedded default, end to end on one machine.

1. train the small demo model (`decoder.train_demo`) or reuse the cached checkpoint,
2. pack it into a local store (`expert-store pack`, resumable),
3. calibrate adaptive gating once (`moe-decoder calibrate --upload` on held-out text),
4. start `expert-store serve --listen 127.0.0.1:0` as a child process and read the
   "listening on HOST:PORT" line,
5. run `moe-decoder generate` against that address with GPU/host expert-cache budgets smaller
   than the model's experts: prints the generated text and the statistics table,
6. stop the store (SIGTERM, wait) whatever happened.

Cache directory: $ADAPMOE_DEMO_DIR, else `.demo/` in the repository root (else in the current
directory). It holds `checkpoint/` (the HF checkpoint and train_report.json) and `store/`.
A checkpoint is reused when its training settings match the requested ones; a store packed
from another checkpoint is discarded.

Faster runs (tests, CI): `--train-steps N` / $ADAPMOE_DEMO_STEPS, and `--tiny` /
$ADAPMOE_DEMO_TINY=1 (small corpus, vocabulary and batches: seconds, not minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from typing import Any, Sequence

from decoder import train_demo
from decoder.gating import profile_budget
from expert_store.launch import ServerProcess, console_command, store_command

MODEL_NAME = "stdlib-moe"
DEFAULT_PROMPT = "import os\n\n\ndef read_config(path):\n"
DEFAULT_MAX_TOKENS = 96
MAX_PPL_RISE = 0.01   # the demo's gating budget: the most drops within 1% of top-k's held-out perplexity
PPL_TOKENS = 12288    # held-out tokens that budget is measured on (the model card's perplexity uses as many)
# cache budgets, in experts per layer (of num_local_experts): both tiers smaller than the model
DEFAULT_GPU_EXPERTS_PER_LAYER = 3
DEFAULT_HOST_EXPERTS_PER_LAYER = 5
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

TINY = dict(corpus_mb=0.5, heldout_mb=0.2, vocab_size=512, batch_size=4, seq_len=64, eval_windows=8)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def default_cache_dir() -> pathlib.Path:
    env = os.environ.get("ADAPMOE_DEMO_DIR")
    if env:
        return pathlib.Path(env)
    repo = pathlib.Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file() and os.access(repo, os.W_OK):
        return repo / ".demo"
    return pathlib.Path.cwd() / ".demo"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cli(name: str) -> list[str]:
    return console_command(name, {"expert-store": "expert_store.cli", "moe-decoder": "decoder.cli"}[name])


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # batch-1 decoding of a small model gains nothing from more CPU threads, and spinning
    # OpenMP threads on shared cores make it many times slower
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ---------------------------------------------------------------------------------------------
# 1. the checkpoint
# ---------------------------------------------------------------------------------------------
def _settings_key(s: train_demo.TrainSettings) -> dict[str, Any]:
    d = asdict(s)
    d.pop("threads", None)
    return d


def ensure_checkpoint(ckpt: pathlib.Path, settings: train_demo.TrainSettings, retrain: bool) -> dict[str, Any]:
    """Train into `ckpt` unless a checkpoint trained with the same settings is there."""
    report_path = ckpt / "train_report.json"
    if not retrain and report_path.is_file() and all((ckpt / f).is_file() for f in
                                                      ("config.json", "model.safetensors", "tokenizer.json")):
        try:
            report = json.loads(report_path.read_text())
            cached = report.get("settings", {})
            cached.pop("threads", None)
            cached.setdefault("family", "mixtral")  # reports written before train-demo had --family
            if cached == _settings_key(settings):
                _log(f"reusing the trained model in {ckpt} (delete it or pass --retrain to train again)")
                if not (ckpt / "tokenizer_config.json").is_file():  # trained before it had a chat template
                    train_demo.write_tokenizer_config(ckpt)
                return report
            _log(f"the model in {ckpt} was trained with other settings: training again")
        except (OSError, ValueError):
            _log(f"unreadable {report_path}: training again")
    if ckpt.exists():
        shutil.rmtree(ckpt)
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    _log(f"training the demo model ({settings.steps} steps) into {ckpt}")
    report = train_demo.run(tmp, settings, progress=True, log=lambda m: _log(m))
    os.replace(tmp, ckpt)
    print(train_demo.format_report(report), file=sys.stderr, flush=True)
    return report


def _checkpoint_fingerprint(ckpt: pathlib.Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        with open(ckpt / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# 2. the store
# ---------------------------------------------------------------------------------------------
def ensure_store(ckpt: pathlib.Path, store: pathlib.Path, model: str, precisions: str) -> None:
    """`expert-store pack` (resumable); a store packed from another checkpoint is discarded."""
    stamp = store / ".demo-checkpoint"
    fingerprint = _checkpoint_fingerprint(ckpt) + ":" + precisions
    if store.exists() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        _log(f"{store} holds another checkpoint: packing again")
        shutil.rmtree(store)
    store.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint + "\n")
    _log(f"packing {ckpt} into the store {store} (model {model!r}, {precisions})")
    t0 = time.perf_counter()
    r = subprocess.run(_cli("expert-store") + ["pack", str(ckpt), "--store", str(store), "--model", model,
                                               "--precisions", precisions],
                       env=_child_env(), stdout=subprocess.PIPE, stderr=None, text=True)
    if r.stdout.strip():
        print(r.stdout.rstrip(), file=sys.stderr, flush=True)
    if r.returncode != 0:
        raise RuntimeError(f"expert-store pack failed with exit status {r.returncode}")
    _log(f"packed in {time.perf_counter() - t0:.1f} s")


def ensure_profile(store: pathlib.Path, model: str, cache: pathlib.Path, precision: str,
                   calibration_tokens: int) -> dict[str, Any] | None:
    """`moe-decoder calibrate --upload --max-ppl-rise 1%` on held-out stdlib text, once per
    packed store: the per-layer sensitivities adaptive gating needs and the budget that drops
    the most experts while the perplexity on the text after the calibration tokens stays within
    1% of top-k's (profile.json next to the model; the decoder's default budget).
    Returns the profile, or None (with a warning) when calibration fails."""
    profile_path = cache / "profile.json"
    stamp = store / ".demo-checkpoint"
    stored = store / "models" / model / "profile.json"
    want = stamp.read_text().strip() if stamp.is_file() else ""
    calibration = f"tokens={calibration_tokens} max_ppl_rise={MAX_PPL_RISE} ppl_tokens={PPL_TOKENS}"
    if profile_path.is_file() and stored.is_file():
        try:
            prof = json.loads(profile_path.read_text())
            if prof.get("demo_store") == want and prof.get("demo_calibration") == calibration:
                _log(f"reusing the calibration profile {profile_path}")
                return prof
        except ValueError:
            pass
    text_path = cache / "calibration.txt"
    # calibration tokens, then PPL_TOKENS more held-out tokens for the quality budget (a 1% rise
    # is within the noise of a few thousand)
    text_path.write_text(train_demo.heldout_text(4 * (calibration_tokens + PPL_TOKENS)), encoding="utf-8")
    _log(f"calibrating adaptive gating on {calibration_tokens} held-out tokens (moe-decoder calibrate --upload)")
    t0 = time.perf_counter()
    tmp = cache / "profile.json.tmp"
    r = subprocess.run(_cli("moe-decoder") + ["calibrate", "--store", str(store), "--model", model,
                                              "--text", str(text_path), "--tokens", str(calibration_tokens),
                                              "--seq-len", "128", "--precision", precision, "--upload",
                                              "--max-ppl-rise", f"{MAX_PPL_RISE:.0%}", "--ppl-tokens", str(PPL_TOKENS),
                                              "--out", str(tmp), "--no-progress"],
                       env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0 or not tmp.is_file():
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        _log(f"warning: calibration failed ({last}): generating with plain top-k gating")
        return None
    print(r.stdout.rstrip(), file=sys.stderr, flush=True)
    prof = json.loads(tmp.read_text())
    prof["demo_store"], prof["demo_calibration"] = want, calibration
    profile_path.write_text(json.dumps(prof, indent=1) + "\n")
    tmp.unlink()
    _log(f"calibrated in {time.perf_counter() - t0:.1f} s")
    return prof


# ---------------------------------------------------------------------------------------------
# 3. generation
# ---------------------------------------------------------------------------------------------
def expert_bytes(config: dict[str, Any], precision: str) -> int:
    """Raw bytes of one expert at `precision` (what one cache slot holds)."""
    h, f = int(config["hidden_size"]), int(config["intermediate_size"])
    params = 3 * h * f
    if precision == "bf16":
        return 2 * params
    group = 128
    scales = 2 * (f * -(-h // group) * 2 + h * -(-f // group))  # fp16 scales of w1, w3 and w2
    return (params if precision == "int8" else params // 2) + scales


def run_generate(address: str, model: str, args: argparse.Namespace, gpu_bytes: int, host_bytes: int,
                 stats_path: pathlib.Path) -> int:
    cmd = _cli("moe-decoder") + [
        "generate", "--store", address, "--model", model, "--prompt", args.prompt,
        "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature),
        "--top-p", str(args.top_p), "--seed", str(args.seed),
        "--gpu-cache-bytes", str(gpu_bytes), "--host-cache-bytes", str(host_bytes),
        "--gating", args.gating, "--precision", args.precision, "--device", args.device,
        "--stats-json", str(stats_path)]
    if args.budget is not None:
        cmd += ["--budget", str(args.budget)]
    sys.stdout.flush()
    return subprocess.run(cmd, env=_child_env()).returncode


def _device_default() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover
        return "cpu"


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-decoder demo",
                                description="Train (or reuse) the demo model, pack it, serve it on loopback, "
                                            "generate with a small expert cache and print statistics.")
    p.add_argument("--dir", default=None, help="cache directory (default $ADAPMOE_DEMO_DIR or .demo/ in the repo)")
    p.add_argument("--train-steps", type=int, default=None,
                   help=f"training steps (default $ADAPMOE_DEMO_STEPS or {train_demo.DEFAULT_STEPS})")
    p.add_argument("--tiny", action="store_true", default=None,
                   help="a tiny, fast training setup (also $ADAPMOE_DEMO_TINY=1): for tests")
    p.add_argument("--seed", type=int, default=train_demo.DEFAULT_SEED)
    p.add_argument("--retrain", action="store_true", help="train even if a matching checkpoint is cached")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7, seeded by --seed)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--gating", default="adaptive",
                   help="topk | adaptive | cost-aware (adaptive and cost-aware calibrate first)")
    p.add_argument("--budget", type=float, default=None,
                   help="gating budget T (default: the calibrated T for --single-ratio)")
    p.add_argument("--single-ratio", type=float, default=None,
                   help="share of routing decisions adaptive gating may serve with one expert, one the "
                        "calibration recorded: 0.1, 0.25 or 0.5 (default: as many "
                        "as keep the held-out perplexity within 1%% of top-k's, calibrate --max-ppl-rise 1%%)")
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--precision", default="bf16", choices=["bf16", "int8", "int4"])
    p.add_argument("--gpu-experts-per-layer", type=int, default=DEFAULT_GPU_EXPERTS_PER_LAYER,
                   help="GPU expert cache budget, in experts per layer")
    p.add_argument("--host-experts-per-layer", type=int, default=DEFAULT_HOST_EXPERTS_PER_LAYER,
                   help="host expert cache budget, in experts per layer")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    from expert_store.cli import show_defaults

    return show_defaults(p)  # --help lists the defaults


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    t_start = time.perf_counter()
    cache = pathlib.Path(args.dir) if args.dir else default_cache_dir()
    steps = args.train_steps
    if steps is None:
        steps = int(os.environ.get("ADAPMOE_DEMO_STEPS", train_demo.DEFAULT_STEPS))
    tiny = args.tiny if args.tiny is not None else _env_flag("ADAPMOE_DEMO_TINY")
    settings = train_demo.TrainSettings(steps=steps, seed=args.seed)
    if tiny:
        settings = replace(settings, **TINY)
    args.device = args.device or _device_default()
    args.seed = args.seed if args.seed is not None else 0
    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be >= 1")

    cache.mkdir(parents=True, exist_ok=True)
    ckpt, store = cache / "checkpoint", cache / "store"
    report = ensure_checkpoint(ckpt, settings, args.retrain)
    t_trained = time.perf_counter()
    precisions = "bf16" if args.precision == "bf16" else f"bf16,{args.precision}"
    ensure_store(ckpt, store, MODEL_NAME, precisions)
    if args.gating != "topk":
        profile = ensure_profile(store, MODEL_NAME, cache, args.precision, args.calibration_tokens)
        if profile is None:
            args.gating, args.budget = "topk", None
        elif args.budget is None and args.single_ratio is not None:
            try:
                args.budget = profile_budget(profile, args.single_ratio, args.gating)
            except ValueError as e:
                raise SystemExit(f"--single-ratio: {e}") from None
            _log(f"{args.gating} gating with budget T={args.budget:.3g} "
                 f"(calibrated for about {args.single_ratio:.0%} single-expert decisions)")
        elif args.budget is None:
            q = (profile.get("quality") or {})
            _log(f"{args.gating} gating at the budget calibrate chose for at most a {MAX_PPL_RISE:.0%} perplexity "
                 f"rise: {100 * float(q.get('drop_ratio', 0.0)):.0f}% of the droppable expert uses dropped "
                 f"(held-out perplexity {q.get('ppl_at_budget', float('nan')):.2f} vs top-k's "
                 f"{q.get('ppl_topk', float('nan')):.2f})")
    t_packed = time.perf_counter()

    config = json.loads((ckpt / "config.json").read_text())
    L, E = int(config["num_hidden_layers"]), int(config["num_local_experts"])
    per_expert = expert_bytes(config, args.precision)
    total = per_expert * L * E
    gpu_bytes = per_expert * L * min(E, max(0, args.gpu_experts_per_layer))
    host_bytes = per_expert * L * min(E, max(0, args.host_experts_per_layer))

    # SIGTERM (e.g. from a CI runner) unwinds like Ctrl-C, so the store is stopped on the way out
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # the store gets SIGTERM too if this process dies without stopping it (Linux)
    server = ServerProcess(store_command(store), env=_child_env(), stderr="stdout", ready_timeout=READY_TIMEOUT_S,
                           die_with_parent=True)
    _log("starting expert-store serve on a free loopback port")
    rc = 1
    stats_path = cache / "generate_stats.json"
    with contextlib.ExitStack() as stack:
        server.start()
        stack.callback(server.stop, STOP_TIMEOUT_S)
        _log(f"store pid {server.pid} listening on {server.address}")
        _log(f"experts: {L} layers x {E} x {per_expert / 1024:.0f} KiB ({args.precision}) = "
             f"{total / 2**20:.2f} MiB; cache budgets: GPU {gpu_bytes / 2**20:.2f} MiB "
             f"({args.gpu_experts_per_layer}/{E} per layer), host {host_bytes / 2**20:.2f} MiB "
             f"({args.host_experts_per_layer}/{E} per layer), device {args.device}")
        print(f"\n=== moe-decoder generate --store {server.address} --model {MODEL_NAME} "
              f"(prompt {args.prompt!r}) ===\n", flush=True)
        print(args.prompt, end="", flush=True)
        t_gen = time.perf_counter()
        rc = run_generate(server.address, MODEL_NAME, args, gpu_bytes, host_bytes, stats_path)
        t_gen = time.perf_counter() - t_gen
    code = server.returncode
    h = report.get("heldout", {})
    rt = report.get("routing", {})
    cl = report.get("cross_layer", {})
    print("\n=== demo model ===", flush=True)
    print(f"held-out perplexity {h.get('perplexity', float('nan')):.2f} ({h.get('bits_per_byte', float('nan')):.3f} "
          f"bits/byte); router entropy {rt.get('mean_entropy_bits', float('nan')):.3f} bits "
          f"(uniform {rt.get('uniform_entropy_bits', float('nan')):.2f}); cross-layer recall "
          f"{cl.get('mean_recall_distance_1', float('nan')):.3f} (chance {cl.get('chance_recall', float('nan')):.2f})")
    print(f"time: model {t_trained - t_start:.1f} s, pack+calibrate {t_packed - t_trained:.1f} s, generate {t_gen:.1f} s, "
          f"total {time.perf_counter() - t_start:.1f} s", flush=True)
    stop_note = "cleanly (exit status 0)" if code == 0 else f"with exit status {code}"
    _log(f"store stopped {stop_note}")
    if rc != 0:
        raise RuntimeError(f"moe-decoder generate failed with exit status {rc}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
