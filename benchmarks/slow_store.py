"""Decode tokens/s against injected store latency: how the decoder degrades when the store is slow.

    .venv/bin/python benchmarks/slow_store.py                          # CPU, small random model
    .venv/bin/python benchmarks/slow_store.py --latencies 0,10,50 --tokens 32 --device cuda

For each latency L (ms) an `expert-store serve --inject-latency-ms L` runs on loopback (every
expert blob it serves waits L ms first, RAM tier off), and an in-process Engine decodes over
gRPC from it with a small GPU expert cache (one slot per layer + 2, no host tier), so most
experts cross the slow link. Two gating modes per latency, both with the adaptive prefetcher:

- topk        Mixtral's top-2: what a slow link costs when nothing adapts but prefetch depth
- cost-aware  expert 2 dropped when sensitivity x w2^2 is below a budget scaled by the live
              cost of loading it over min(mean cost of recent experts 2, one H2D copy)
              (sensitivity 1 per layer, --budget T; decoder/gating.py)

Reported per point: decode tokens/s, mean prefetch lookahead (and its histogram), the
single-expert ratio, experts per token, stall seconds. Writes results/slow_store.json and
results/slow_store.png and prints a markdown table.

The model is random (Mixtral layout, --hidden/--ffn/--layers/--experts), written as an HF
safetensors checkpoint and packed with `expert_store.pack.pack_checkpoint`: tokens/s
depends on shapes and routing, not on trained weights; greedy decode from fixed token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

import torch  # noqa: E402

from decoder.engine import Engine  # noqa: E402
from expert_store.client import StoreClient  # noqa: E402
from expert_store.launch import ServerProcess, start_store  # noqa: E402
from expert_store.pack import pack_checkpoint  # noqa: E402
from expert_store.tiers import NvmeTier  # noqa: E402


def make_random_checkpoint(out: Path, hidden: int, ffn: int, layers: int, experts: int, heads: int = 8,
                           kv_heads: int = 4, vocab: int = 1024, seed: int = 0) -> Path:
    """A random Mixtral-layout HF checkpoint (config.json + model.safetensors, bf16, no tokenizer)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
         "lm_head.weight": w(vocab, hidden)}
    for l in range(layers):
        p = f"model.layers.{l}"
        t[f"{p}.self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
        t[f"{p}.self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[f"{p}.self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[f"{p}.self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
        t[f"{p}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        t[f"{p}.block_sparse_moe.gate.weight"] = w(experts, hidden) * 4  # peaky routing, like trained routers
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            t[f"{q}.w1.weight"], t[f"{q}.w3.weight"], t[f"{q}.w2.weight"] = w(ffn, hidden), w(ffn, hidden), w(hidden, ffn)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "num_local_experts": experts, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
              "rope_theta": 1e6, "max_position_embeddings": 4096, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def start_store_server(store_dir: Path, latency_ms: float) -> ServerProcess:
    """`expert-store serve --inject-latency-ms L` on a free loopback port, serving."""
    return start_store(store_dir, "--ram-bytes", "0", "--grace", "1", "--inject-latency-ms", str(latency_ms),
                       env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT, stderr=os.devnull, ready_timeout=60)


def measure(store_dir: Path, model: str, latency_ms: float, gating: str, args: argparse.Namespace) -> dict:
    with start_store_server(store_dir, latency_ms) as srv, StoreClient.open(srv.address, deadline_s=60) as client:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        with Engine.from_store(client, model, device=args.device, dtype=dtype, gpu_cache_bytes=None,
                               host_cache_bytes=0, prefetch=False) as probe:
            slot = probe.provider.slot_bytes
        kw = dict(gating_options={"sensitivity": [1.0] * args.layers, "loss_bound": 1e9}, budget=args.budget) \
            if gating == "cost-aware" else {}
        with Engine.from_store(client, model, device=args.device, dtype=dtype, gating=gating,
                               gpu_cache_bytes=(args.layers + 2) * slot, host_cache_bytes=0, **kw) as eng:
            ids = list(range(3, 3 + args.prompt_tokens))
            eng.generate(ids, max_tokens=2)  # warm-up: connections, first loads
            eng.provider.reset_stats()
            for x in eng.prefetchers:
                if hasattr(x, "reset_stats"):
                    x.reset_stats()
            gating_obj = eng.model.gating
            if hasattr(gating_obj, "reset_stats"):
                gating_obj.reset_stats()
            t0 = time.perf_counter()
            r = eng.generate(ids, max_tokens=args.tokens, stop_at_eos=False)
            seconds = time.perf_counter() - t0
            s = eng.stats()
    pf = s.get("prefetch") or {}
    hist = {int(k): v for k, v in (pf.get("lookahead_hist") or {}).items()}
    n = sum(hist.values())
    gs = s.get("gating_stats") or {}
    return {"latency_ms": latency_ms, "gating": gating, "tokens": len(r.token_ids),
            "decode_tokens_per_s": (len(r.token_ids) - 1) / r.decode_s if r.decode_s > 0 else 0.0,
            "tokens_per_s": len(r.token_ids) / seconds, "mean_lookahead": sum(k * v for k, v in hist.items()) / n if n else 0.0,
            "lookahead_hist": hist, "single_expert_ratio": gs.get("single_expert_ratio", s.get("single_expert_ratio", 0.0)),
            "experts_per_token": gs.get("experts_per_token", s.get("experts_per_token", 0.0)),
            "stall_s": s.get("stall_s", 0.0), "prefetch_recall": pf.get("recall", 0.0)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for gating, style in (("topk", "o-"), ("cost-aware", "s--")):
        pts = [r for r in rows if r["gating"] == gating]
        x = [r["latency_ms"] for r in pts]
        axes[0].plot(x, [r["decode_tokens_per_s"] for r in pts], style, label=gating)
        axes[1].plot(x, [r["mean_lookahead"] for r in pts], style, label=gating)
        axes[2].plot(x, [r["single_expert_ratio"] for r in pts], style, label=gating)
    for ax, title in zip(axes, ("decode tokens/s", "mean prefetch lookahead (layers)", "single-expert ratio")):
        ax.set_xlabel("injected store latency per blob (ms)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latencies", default="0,2,5,10,20,50,100", help="comma list of ms per blob")
    ap.add_argument("--tokens", type=int, default=24, help="tokens decoded per point")
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--budget", type=float, default=1e-4, help="cost-aware gating budget T")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    latencies = [float(x) for x in args.latencies.split(",") if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="slow-store-"))
    try:
        ckpt = make_random_checkpoint(work / "ckpt", args.hidden, args.ffn, args.layers, args.experts)
        pack_checkpoint(ckpt, NvmeTier(work / "store"), model="slow", precisions=("bf16",), progress=False)
        rows = []
        for lat in latencies:
            for gating in ("topk", "cost-aware"):
                row = measure(work / "store", "slow", lat, gating, args)
                rows.append(row)
                print(f"latency {lat:6.1f} ms  {gating:<10}  {row['decode_tokens_per_s']:7.2f} tok/s  "
                      f"lookahead {row['mean_lookahead']:.2f}  single {row['single_expert_ratio']:.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"device": args.device, "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "model": {k: getattr(args, k) for k in ("hidden", "ffn", "layers", "experts")},
            "tokens": args.tokens, "budget": args.budget, "gpu_slots_per_layer": 1, "host_cache_bytes": 0}
    (out / "slow_store.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, out / "slow_store.png")
    print("\n| latency ms | gating | decode tok/s | mean lookahead | single-expert ratio | experts/token | stall s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['latency_ms']:g} | {r['gating']} | {r['decode_tokens_per_s']:.2f} | {r['mean_lookahead']:.2f} | "
              f"{r['single_expert_ratio']:.2f} | {r['experts_per_token']:.2f} | {r['stall_s']:.2f} |")
    print(f"\nwrote {out / 'slow_store.json'} and {out / 'slow_store.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
