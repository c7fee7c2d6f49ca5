"""Continuous batching vs one-at-a-time decoding, on one device, with resident experts.

    python benchmarks/batching_bench.py [--device cuda] [--dtype bfloat16] [--batch 1,2,4,8,16]
        [--hidden 1024 --ffn 3584 --layers 8 --experts 8 --heads 16 --kv-heads 4]
        [--requests 16 --prompt-tokens 64 --max-tokens 64] [--decode-step auto|step|eager]

Builds a random Mixtral-layout model (experts resident on the device, so this measures the
scheduler and the batched forward, not expert streaming), then for each --batch value runs
`--requests` greedy requests through `decoder.batching.BatchScheduler(max_active=batch)` and
reports decode tokens/s, steps and mean batch size. The batch=1 pass doubles as the reference:
every batched sequence's tokens are compared with its one-at-a-time tokens (identical on CPU
float32; on a GPU in bf16, batched matrix products may round differently, so a near-tie between
two logits can flip a token: the share of identical sequences and tokens is reported).

Writes benchmarks/results/batching_<device>_<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import kernel_table  # noqa: E402
from decoder.batching import BatchScheduler, FinishEvent, SamplingSpec, TokenEvent  # noqa: E402
from decoder.engine import Engine  # noqa: E402
from decoder.model.config import ModelConfig  # noqa: E402
from decoder.model.transformer import Transformer  # noqa: E402


def build_engine(args: argparse.Namespace) -> Engine:
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                      num_local_experts=args.experts, num_experts_per_tok=2,
                      max_position_embeddings=args.prompt_tokens + args.max_tokens + 8, eos_token_ids=(-1,))
    dtype = getattr(torch, args.dtype)
    model = Transformer(cfg)
    model.init_weights(std=0.02, seed=0)
    model = model.to(device=args.device, dtype=dtype).eval()
    return Engine.from_model(model, None, model_name="random", decode_step=args.decode_step)


def run_batch(engine: Engine, prompts: list[list[int]], batch: int, max_tokens: int) -> dict:
    results: dict[int, list[int]] = {}
    done = threading.Event()

    def sink_for(i: int):
        ids: list[int] = []

        def sink(ev) -> None:
            if isinstance(ev, TokenEvent):
                ids.append(ev.token_id)
            else:
                assert isinstance(ev, FinishEvent), ev
                results[i] = ids
                if len(results) == len(prompts):
                    done.set()
        return sink

    with BatchScheduler(engine, max_active=batch, max_queue=len(prompts)) as sch:
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            sch.submit(p, SamplingSpec(max_tokens=max_tokens), sink_for(i))
        assert done.wait(3600), "requests did not finish"
        wall = time.perf_counter() - t0
        st = sch.stats
    tokens = sum(len(v) for v in results.values())
    return {"batch": batch, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "decode_steps": st.steps, "mean_batch": st.batched_tokens / max(1, st.steps),
            "decode_tokens_per_s": st.batched_tokens / st.decode_s if st.decode_s else 0.0,
            "prefill_s": st.prefill_s, "decode_s": st.decode_s, "ids": [results[i] for i in range(len(prompts))]}


def profile_steps(engine: Engine, prompts: list[list[int]], batch: int, tokens: int = 16) -> list[dict]:
    """The kernels of `batch` requests of `tokens` new tokens each (prefill included), most
    device time first, printed and returned as rows (per decode step: the steps are counted
    by the scheduler)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        run = run_batch(engine, prompts[:batch], batch, tokens)
    rows, table = kernel_table(prof, max(1, run["decode_steps"]), cuda)
    print(f"batch {batch}, {batch} x {tokens} tokens:\n{table}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", default="1,2,4,8,16")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=3584)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--decode-step", default="auto", choices=["auto", "step", "eager"],
                    help="Engine decode path: auto (the GPU-driven step on CUDA), step, eager")
    ap.add_argument("--profile", action="store_true",
                    help="also print the GPU kernels of 16 decode steps per batch size (torch.profiler)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    batches = sorted({int(b) for b in args.batch.split(",")} | {1})
    engine = build_engine(args)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, args.vocab, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.requests)]
    for b in batches:   # warm-up: allocator, kernel compilation, the step's graphs of every bucket up to b
        run_batch(engine, prompts[:b], b, 4)
    runs = [run_batch(engine, prompts, b, args.max_tokens) for b in batches]
    ref = runs[0]["ids"]
    rows = []
    for r in runs:
        same_seq = sum(a == b for a, b in zip(r["ids"], ref))
        same_tok = sum(x == y for a, b in zip(r["ids"], ref) for x, y in zip(a, b))
        first_diff = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(r["ids"], ref)]
        row = {k: v for k, v in r.items() if k != "ids"}
        row.update(identical_sequences=same_seq / len(ref), identical_tokens=same_tok / max(1, sum(map(len, ref))),
                   first_divergence=[d for d in first_diff if d is not None])
        rows.append(row)
        print(f"batch {r['batch']:>3}: {r['tokens_per_s']:9.1f} tokens/s end to end, "
              f"{row['decode_tokens_per_s']:9.1f} decode tokens/s, mean batch {r['mean_batch']:.2f}, "
              f"identical to batch 1: {100 * row['identical_sequences']:.0f}% of sequences, "
              f"{100 * row['identical_tokens']:.1f}% of tokens")
    by_batch = {r["batch"]: r for r in rows}
    target = None
    if 8 in by_batch and by_batch[1]["decode_tokens_per_s"]:
        ratio = by_batch[8]["decode_tokens_per_s"] / by_batch[1]["decode_tokens_per_s"]
        target = {"name": "batch 8 decode tokens/s >= 5x batch 1", "ratio": ratio, "met": ratio >= 5.0}
        print(f"target (issue 12): {target['name']}: {'MET' if target['met'] else 'MISSED'} ({ratio:.2f}x)")
    profiles = {b: profile_steps(engine, prompts, b) for b in batches} if args.profile else {}
    out = {"device": args.device, "target": target, "profiles": profiles, "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
           else "cpu", "dtype": args.dtype, "torch": torch.__version__,
           "decode_step": args.decode_step,
           "model": {k: getattr(args, k) for k in ("hidden", "ffn", "layers", "experts", "heads", "kv_heads", "vocab")},
           "requests": args.requests, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
           "runs": rows, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"batching_{args.device.split(':')[0]}_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
