"""Host (Python + dispatch) time per decoded token, on a model so small that compute is negligible.

    .venv/bin/python benchmarks/host_overhead.py                      # CPU, ~1 min
    .venv/bin/python benchmarks/host_overhead.py --device cuda        # the same rows on a GPU
    .venv/bin/python benchmarks/host_overhead.py --profile adapmoe    # + cProfile of that row

Batch-1 greedy decode (Engine.generate, `--steps` new tokens, EOS ignored) of a random
Mixtral-layout model (hidden 64, ffn 128, 8 layers, 8 experts, top-2, vocab 512 by default).
Every row times the decode steps only (Engine's decode_s), best of `--repeats` runs after a
warm-up, and reports µs per token and per layer, as wall time and as the CPU time of the
decoding thread (the host work itself; on a loaded machine the wall time stretches):

- resident     Transformer + ResidentExperts (every expert an nn.Parameter), Mixtral top-k
- cache-lru    ExpertCache from a packed store, every expert in the GPU tier, top-k, no prefetch
- adapmoe      ExpertCache with `--gpu-fraction` of the experts in the GPU tier (the rest in
               the host tier), cross-layer prefetcher, `adaptive` gating (~25% single-expert)
- adapmoe-full as adapmoe with every expert in the GPU tier (AdapMoE's overhead when LRU
               would miss nothing)

Results: a table on stdout and benchmarks/results/host_overhead.json (one object per row).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from decoder.engine import Engine  # noqa: E402
from decoder.model.config import ModelConfig  # noqa: E402
from decoder.model.transformer import Transformer  # noqa: E402

ROWS = ("resident", "cache-lru", "adapmoe", "adapmoe-full")
MODEL = "host-overhead"


def make_config(a: argparse.Namespace) -> ModelConfig:
    return ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=a.hidden // 4,
                       num_local_experts=a.experts, num_experts_per_tok=2, max_position_embeddings=4096,
                       eos_token_ids=(2,))


def make_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """Random weights; routers at std 0.5 so routing is peaked (w2 spread over [0, 0.5])."""
    model = Transformer(config)
    model.init_weights(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for l in range(config.num_hidden_layers):
            r = model.router_weight(l)
            r.copy_(torch.randn(r.shape, generator=g) * 0.5)
    return model.eval()


def pack_store(model: Transformer, work: Path) -> Path:
    import safetensors.torch

    from expert_store.pack import pack_checkpoint
    from expert_store.tiers import NvmeTier

    ckpt = work / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps(model.config.to_hf()))
    safetensors.torch.save_file(model.hf_state_dict(), str(ckpt / "model.safetensors"))
    store = work / "store"
    pack_checkpoint(ckpt, NvmeTier(store), model=MODEL, precisions=("bf16",), progress=False)
    return store


def adaptive_budget(model: Transformer, config: ModelConfig, prompt: list[int], single_ratio: float = 0.25) -> float:
    """T with sensitivity 1 for every layer such that about `single_ratio` of the decisions on
    `prompt` use one expert: the single_ratio quantile of w2^2."""
    _, router_logits = model(torch.tensor([prompt]), return_router_logits=True)
    w2 = []
    for r in router_logits:
        p = torch.softmax(r.float(), dim=-1).topk(2, dim=-1).values
        w2.append((p[:, 1] / p.sum(dim=-1)) ** 2)
    return float(torch.quantile(torch.cat(w2), single_ratio))


def build_row(row: str, model: Transformer, store: Path, device: torch.device, dtype: torch.dtype,
              budget: float, gpu_fraction: float, decode_step: str = "auto") -> Engine:
    cfg = model.config
    if row == "resident":
        return Engine.from_model(model.to(device=device, dtype=dtype), device=device, dtype=dtype,
                                 decode_step=decode_step)
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    slot = 3 * cfg.hidden_size * cfg.intermediate_size * 2 + 256       # one bf16 expert, aligned up
    host_all = L * E * (slot + 4096)
    common: dict[str, Any] = dict(device=device, dtype=dtype, precision="bf16", decode_step=decode_step)
    if row == "cache-lru":
        return Engine.from_store(str(store), MODEL, gpu_cache_bytes=L * E * slot, host_cache_bytes=host_all,
                                 gating="topk", prefetch=False,
                                 cache_options={"profile": None, "scratch_slots": 0, "plan": "uniform"}, **common)
    frac = 1.0 if row == "adapmoe-full" else gpu_fraction
    return Engine.from_store(str(store), MODEL, gpu_cache_bytes=max(L, round(frac * L * E)) * slot,
                             host_cache_bytes=host_all, gating="adaptive", budget=budget, prefetch=True,
                             gating_options={"sensitivity": [1.0] * L},
                             cache_options={"profile": None, "scratch_slots": 0, "plan": "uniform"}, **common)


def warm_cache(eng: Engine) -> None:
    """Every expert into the host tier (and the GPU tier up to its quotas), loads finished."""
    cache = eng.provider
    if not hasattr(cache, "wait_idle"):
        return
    cfg = eng.config
    for l in range(cfg.num_hidden_layers):
        cache.prefetch(l, list(range(cfg.num_local_experts)))
    cache.wait_idle(timeout=120)


def time_decode(eng: Engine, prompt: list[int], steps: int, device: torch.device) -> tuple[float, float, list[int]]:
    """-> (wall seconds per decode step, CPU seconds of this thread per decode step, token ids).
    The CPU time is the host work of the decode path alone (a loaded machine stretches the
    wall time, not this): a generate() of steps+1 tokens minus one of 1 token (the prefill)."""
    c0 = time.thread_time()
    eng.generate(prompt, max_tokens=1, stop_at_eos=False)
    c1 = time.thread_time()
    res = eng.generate(prompt, max_tokens=steps + 1, stop_at_eos=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    c2 = time.thread_time()
    return res.decode_s / steps, max(0.0, (c2 - c1) - (c1 - c0)) / steps, res.token_ids


# every way a tensor's value reaches Python: on a GPU each is a synchronisation that stops the
# host from queueing work ahead of the device
HOST_READS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}


class CountHostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += getattr(func, "__name__", "") in HOST_READS
        return func(*args, **(kwargs or {}))


def host_reads_per_step(eng: Engine, prompt: list[int], steps: int = 8) -> float:
    """Host reads of tensor values per decode step (a generate of steps+1 tokens minus one of 1)."""
    counts = []
    for n in (1, steps + 1):
        with CountHostReads() as c:
            eng.generate(prompt, max_tokens=n, stop_at_eos=False)
        counts.append(c.n)
    return (counts[1] - counts[0]) / steps


def run_row(row: str, model: Transformer, store: Path, a: argparse.Namespace, device: torch.device,
            dtype: torch.dtype, budget: float, prompt: list[int], decode_step: str = "auto") -> dict[str, Any]:
    eng = build_row(row, model, store, device, dtype, budget, a.gpu_fraction, decode_step)
    try:
        warm_cache(eng)
        time_decode(eng, prompt, min(a.steps, 20), device)              # warm-up
        eng.reset_stats()
        per_token, cpu_per_token = [], []
        tokens: list[int] = []
        for _ in range(a.repeats):
            s, c, tokens = time_decode(eng, prompt, a.steps, device)
            per_token.append(s)
            cpu_per_token.append(c)
        if a.profile in (row, "all"):
            prof = cProfile.Profile()
            prof.enable()
            time_decode(eng, prompt, a.steps, device)
            prof.disable()
            print(f"\n## cProfile {row}: {a.steps} decode steps, by own time")
            pstats.Stats(prof).sort_stats("tottime").print_stats(a.profile_lines)
        reads = host_reads_per_step(eng, prompt)
        st = eng.stats()
        best, cpu = min(per_token), min(cpu_per_token)
        L = eng.config.num_hidden_layers
        return {"row": row, "decode_step": "step" if eng._step is not None else "eager", "device": str(device), "dtype": str(dtype).replace("torch.", ""), "steps": a.steps,
                "us_per_token": best * 1e6, "us_per_layer": best * 1e6 / L,
                "cpu_us_per_token": cpu * 1e6, "cpu_us_per_layer": cpu * 1e6 / L,
                "us_per_token_runs": [s * 1e6 for s in per_token],
                "host_reads_per_step": reads,
                # the decode steps' routing (the timed part; the engine's top level counts prefill too)
                "experts_per_token": st["routing"].get("decode", st)["experts_per_token"],
                "single_expert_ratio": st["routing"].get("decode", st)["single_expert_ratio"],
                "prefetch_precision": (st.get("prefetch") or {}).get("precision"),
                "token_ids_head": tokens[:16]}
    finally:
        eng.close()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    ap.add_argument("--steps", type=int, default=200, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (best is reported)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--gpu-fraction", type=float, default=0.5, help="adapmoe: share of experts in the GPU tier")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="compute dtype (bfloat16 = the stored experts' dtype, as on a GPU: no per-call casts)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--profile", default=None, help="cProfile one more run of this row (or 'all')")
    ap.add_argument("--profile-lines", type=int, default=25)
    ap.add_argument("--decode-steps", default="auto",
                    help="comma list of Engine decode_step values per row (eager,auto: before/after the GPU-driven step)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "host_overhead.json"))
    a = ap.parse_args(argv)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    for r in rows:
        if r not in ROWS:
            ap.error(f"unknown row {r!r} (rows: {', '.join(ROWS)})")
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    config = make_config(a)
    model = make_model(config)
    prompt = [1] + [int(t) for t in torch.randint(3, a.vocab, (15,), generator=torch.Generator().manual_seed(7))]
    with torch.no_grad():
        budget = adaptive_budget(model, config, prompt * 4)
    results = []
    with tempfile.TemporaryDirectory(prefix="host-overhead-") as tmp:
        store = pack_store(model, Path(tmp))
        steps = [d.strip() for d in a.decode_steps.split(",") if d.strip()]
        for r, ds in [(r, ds) for r in rows for ds in steps]:
            results.append(run_row(r, model, store, a, device, dtype, budget, prompt, ds))
            x = results[-1]
            print(f"{r:>13} ({x['decode_step']}): {x['us_per_token']:9.1f} us/token {x['us_per_layer']:8.1f} "
                  f"us/layer (wall); {x['cpu_us_per_token']:9.1f} us/token {x['cpu_us_per_layer']:8.1f} us/layer (CPU)",
                  flush=True)
    print(f"\n{config.num_hidden_layers} layers, hidden {config.hidden_size}, ffn {config.intermediate_size}, "
          f"{config.num_local_experts} experts, device {device}, {a.steps} steps, best of {a.repeats}")
    print("| row | step | wall us/token | wall us/layer | CPU us/token | CPU us/layer | host reads/step | experts/tok | "
          "single | prefetch precision |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in results:
        pp = x["prefetch_precision"]
        print(f"| {x['row']} | {x['decode_step']} | {x['us_per_token']:.0f} | {x['us_per_layer']:.0f} | {x['cpu_us_per_token']:.0f} | "
              f"{x['cpu_us_per_layer']:.0f} | {x['host_reads_per_step']:.1f} | {x['experts_per_token']:.2f} | "
              f"{x['single_expert_ratio']:.2f} | {'-' if pp is None else f'{pp:.2f}'} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "threads": a.threads, "budget_T": budget}
    out.write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
