"""The fused MoE kernels alone: weight bytes per second for the benchmark shapes, and the tile
sizes that read fastest on this GPU.

    python3 benchmarks/moe_kernel.py [--shapes A,B] [--precisions bf16,int8,int4] [--tokens 1,8]
        [--sweep] [--write-configs] [--tag moe_kernel]
    python3 benchmarks/moe_kernel.py --plot benchmarks/results/moe_kernel.json

For each shape (A: hidden 2048, ffn 7168; B: Mixtral's 4096 x 14336; 8 experts, top-2) and
precision, eight layers of expert slots are allocated (so one pass reads more than the GPU's
L2 holds, as a decode step does) and `moe_triton` runs once per layer for T tokens with a
seeded random routing, captured in one CUDA graph and replayed; the figure is the routed
experts' stored bytes (values + scales) over the time per layer, next to the rate of a plain
device-to-device copy measured in the same run (what HBM gives to a streaming read).

`--sweep` times every tile configuration of a small grid (the up kernel's tiles with the down
kernel's at their default, then the down kernel's with the best up tiles, then for int4 the
best tiles with the scale applied after the product, then for int4 the matrix-vector kernels
(`KernelConfig.gemv`) over their own small tile grid, then the number of programs: H split
over up to 8 up programs, F over up to 16 down programs per SM) for each shape and precision
at each token count; `--write-configs` stores the fastest into
decoder/kernels/configs/<GPU>.json, which `fused_moe.tuned_config` reads.

Writes benchmarks/results/TAG.json (and TAG.png when matplotlib is importable; `--plot` draws
it later from the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from decoder.kernels.fused_moe import (ExpertBank, KernelConfig, config_file, config_key,  # noqa: E402
                                       moe_triton, pick_config, tuned_table)

SHAPES = {"A": (2048, 7168), "B": (4096, 14336)}
BITS = {"bf16": 16, "int8": 8, "int4": 4}
GROUP = 128                 # expert_store.quant.DEFAULT_GROUP_SIZE: what the store packs
EXPERTS, TOP_K, LAYERS = 8, 2, 8


def expert_layout(H: int, Fd: int, bits: int) -> tuple[dict[str, int], dict[str, int], int]:
    """Byte offsets of w1/w3/w2 values and scales inside one slot, and the slot size (the raw
    cache slot layout: values then fp16 scales per matrix, 16-byte aligned)."""
    offs, soffs, at = {}, {}, 0
    for name, (rows, cols) in (("w1", (Fd, H)), ("w3", (Fd, H)), ("w2", (H, Fd))):
        offs[name] = at
        at += (rows * cols * bits // 8 + 15) // 16 * 16
        soffs[name] = at
        at += (rows * -(-cols // GROUP) * 2 + 15) // 16 * 16
    return offs, soffs, at


def make_banks(H: int, Fd: int, bits: int, gen: torch.Generator) -> tuple[list[ExpertBank], int]:
    """LAYERS banks of EXPERTS slots of random weights; and one expert's stored bytes."""
    banks = []
    if bits == 16:
        for _ in range(LAYERS):
            w1, w3 = (torch.randn(EXPERTS, Fd, H, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
                      for _ in range(2))
            w2 = torch.randn(EXPERTS, H, Fd, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
            banks.append(ExpertBank.stacked(w1, w3, w2))
        return banks, 3 * Fd * H * 2
    offs, soffs, slot = expert_layout(H, Fd, bits)
    for _ in range(LAYERS):
        pool = torch.randint(0, 256, (EXPERTS, slot), device="cuda", dtype=torch.uint8, generator=gen)
        for name, (rows, cols) in (("w1", (Fd, H)), ("w3", (Fd, H)), ("w2", (H, Fd))):
            n = rows * -(-cols // GROUP)
            pool[:, soffs[name]: soffs[name] + 2 * n] = (torch.full((EXPERTS, n), 1e-3, device="cuda")
                                                        .to(torch.float16).view(torch.uint8))
        banks.append(ExpertBank.quantized_pool(pool, bits, GROUP, offs, soffs, Fd, H))
    stored = 3 * Fd * H * bits // 8 + 2 * (2 * Fd * -(-H // GROUP) + H * -(-Fd // GROUP))
    return banks, stored


def time_layers(banks: list[ExpertBank], x: torch.Tensor, wts: torch.Tensor, ids: torch.Tensor,
                slot_of: torch.Tensor, cfg: KernelConfig, replays: int) -> float:
    """Seconds per layer: one call per bank, captured once, replayed `replays` times."""
    def layers() -> None:
        for b in banks:
            moe_triton(x, wts, ids, slot_of, b, cfg)

    layers()                                           # compile outside the capture
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layers()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layers()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / replays / len(banks)


def copy_rate() -> float:
    """GB/s of a device-to-device copy of 2 GiB (read + write counted once: bytes read)."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 10 * a.numel() / (time.perf_counter() - t0) / 1e9 * 2  # read + write both cross HBM


def sweep_grid(bits: int) -> tuple[list[dict], list[dict]]:
    """Tiles to try for the up and the down kernel. Quantized tiles hold fewer bytes per element,
    so their grid also reaches wider tiles along the stored rows (more bytes in flight per step)."""
    if bits == 16:
        up_tiles = list(itertools.product((32, 64, 128), (128, 256)))
        down_tiles = list(itertools.product((32, 64, 128), (128, 256)))
    else:
        up_tiles = [(16, 512), (16, 1024), (32, 256), (32, 512), (64, 128), (64, 256), (64, 512), (128, 256)]
        down_tiles = [(16, 512), (32, 256), (32, 512), (64, 128), (64, 256), (64, 512), (128, 256)]
    up = [dict(block_f=f, block_h=h, up_warps=w, up_stages=st)
          for (f, h), w, st in itertools.product(up_tiles, (4, 8), (3, 4))]
    down = [dict(block_d=d, block_fd=fd, down_warps=w, down_stages=st)
            for (d, fd), w, st in itertools.product(down_tiles, (4, 8), (3, 4))]
    return up, down


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="A,B")
    ap.add_argument("--precisions", default="bf16,int8,int4")
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--stages", default="up,down,post-scale,gemv,gemv-unit,programs",
                    help="sweep stages to run, each starting from the best so far (first: the tiles "
                         "already tuned for this GPU, else the defaults)")
    ap.add_argument("--sweep-budget-s", type=float, default=60.0,
                    help="stop sweeping one shape/precision/token count after this long (the rest untried)")
    ap.add_argument("--write-configs", action="store_true")
    ap.add_argument("--tag", default="moe_kernel")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG of an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return 0
    if not torch.cuda.is_available():
        print("moe_kernel.py measures CUDA kernels: no GPU here", file=sys.stderr)
        return 2
    from tqdm import tqdm

    device = torch.cuda.get_device_name()
    hbm = copy_rate()
    print(f"{device}: device copy {hbm:.0f} GB/s (bytes read + written)")
    rows, tuned = [], {}
    for shape in args.shapes.split(","):
        H, Fd = SHAPES[shape]
        for prec in args.precisions.split(","):
            bits = BITS[prec]
            up_grid, down_grid = sweep_grid(bits)
            gen = torch.Generator(device="cuda").manual_seed(0)
            banks, expert_bytes = make_banks(H, Fd, bits, gen)
            slot_of = torch.arange(EXPERTS, dtype=torch.int32, device="cuda")
            for T in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=gen)
                ids = torch.stack([torch.randperm(EXPERTS, device="cuda", generator=gen)[:TOP_K] for _ in range(T)])
                wts = torch.rand(T, TOP_K, device="cuda", generator=gen)
                used = int(ids.unique().numel())
                nbytes = used * expert_bytes
                default = KernelConfig()
                t_default = time_layers(banks, x, wts, ids, slot_of, default, args.replays)
                best, t_best, tried = default, t_default, 1
                known = pick_config(tuned_table(device), banks[0], T)
                if args.sweep and known != default:
                    t_known = time_layers(banks, x, wts, ids, slot_of, known, args.replays)
                    tried += 1
                    if t_known < t_best:
                        best, t_best = known, t_known
                if args.sweep:
                    deadline = time.perf_counter() + args.sweep_budget_s
                    stages = [("up", up_grid), ("down", down_grid)]
                    if bits == 4:                       # then scaling after the product, on the best tiles
                        stages.append(("post-scale", [dict(int4_post_scale=True)]))
                        # then the matrix-vector kernels, with their own tiles
                        stages.append(("gemv", [dict(gemv=True, block_f=f, block_h=h, block_d=f, block_fd=h,
                                                     up_warps=w, down_warps=w, int4_post_scale=False)
                                                for f, h, w in itertools.product((16, 32, 64), (128, 256, 512), (4, 8))]))
                    if bits == 4:                       # the gemv kernels' 1 + n/16 conversion
                        stages.append(("gemv-unit", [dict(gemv_unit=True)]))
                    stages.append(("programs", [dict(up_split=u, down_programs=d)       # then more programs
                                                for u, d in itertools.product((1, 2, 4, 8), (2, 4, 8, 16))]))
                    wanted = set(args.stages.split(","))
                    for stage, grid in [(n, g) for n, g in stages if n in wanted]:
                        base = dataclasses.asdict(best)
                        for g in tqdm(grid, desc=f"{shape} {prec} T={T} {stage}", leave=False):
                            if time.perf_counter() > deadline:
                                break
                            cfg = KernelConfig(**{**base, **g})
                            try:
                                t = time_layers(banks, x, wts, ids, slot_of, cfg, args.replays)
                            except Exception as e:  # a tile that does not fit (shared memory, registers)
                                tqdm.write(f"  skip {cfg}: {type(e).__name__}: {str(e)[:120]}")
                                continue
                            tried += 1
                            if t < t_best:
                                best, t_best = cfg, t
                    tuned.setdefault(config_key(bits, H, Fd), {})[str(T)] = dataclasses.asdict(best)
                row = {"shape": shape, "hidden": H, "ffn": Fd, "precision": prec, "tokens": T, "experts_read": used,
                       "bytes_per_layer": nbytes, "default_us": t_default * 1e6, "default_gbps": nbytes / t_default / 1e9,
                       "best_us": t_best * 1e6, "best_gbps": nbytes / t_best / 1e9, "best_config": dataclasses.asdict(best),
                       "configs_tried": tried, "configs_in_grid": 1 + len(up_grid) + len(down_grid) + (bits == 4) * 20 + 16}
                rows.append(row)
                print(f"{shape} {prec:>4} T={T:<2} experts {used}: default {row['default_us']:8.1f} us "
                      f"({row['default_gbps']:6.0f} GB/s)  best {row['best_us']:8.1f} us ({row['best_gbps']:6.0f} GB/s)"
                      f"  {dataclasses.asdict(best) if args.sweep else ''}", flush=True)
            del banks
            torch.cuda.empty_cache()
    result = {"device": device, "torch": torch.__version__, "device_copy_gbps": hbm, "group_size": GROUP,
              "layers": LAYERS, "experts": EXPERTS, "top_k": TOP_K, "rows": rows,
              "command": "python3 benchmarks/moe_kernel.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out / f'{args.tag}.json'}")
    if args.write_configs and tuned:
        path = config_file(device)
        old = {k: dict(v) for k, v in tuned_table(device).items()}
        for k, v in tuned.items():
            old.setdefault(k, {}).update(v)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path}")
    try:
        plot(result, out / f"{args.tag}.png")
    except ImportError:
        print("matplotlib not importable: draw the plot with --plot JSON")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['shape']} {r['precision']}\nT={r['tokens']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [r["default_gbps"] for r in rows], 0.4, label="default tiles")
    ax.bar([i + 0.2 for i in xs], [r["best_gbps"] for r in rows], 0.4, label="best tiles")
    ax.axhline(result["device_copy_gbps"] / 2, color="k", ls="--", lw=1, label="device copy (read rate)")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("expert bytes read / s (GB/s)")
    ax.set_title(f"fused MoE kernels, {result['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
