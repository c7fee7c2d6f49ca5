"""Which GPU slot plan loads fewer experts on demand: equal quotas, AdapMoE's DP, or the popularity DP
(each DP under the top-k objective, the default, and under the paper's objective).

    .venv/bin/python benchmarks/cache_plan.py                     # the trained demo model (cached or trained)
    .venv/bin/python benchmarks/cache_plan.py --eval-tokens 2048 --budgets 0.125,0.25,0.375,0.5

Model and text: as benchmarks/accuracy.py (benchmarks/_common.py): the demo's cached checkpoint, packed
(bf16) into a temporary store; train_demo's held-out stdlib files split by file, odd-numbered
ones calibrate (decoder.calibrate: prefetch accuracy, single-expert ratio at the budget,
per-expert popularity; the profile goes into the temporary store), even-numbered ones are
decoded. Calibration and evaluation share no file.

Planners, each at GPU budgets given as a share of all L x E experts (the layer quotas sum to
that many slots; the cache's `top_k` scratch slots come on top, the same for every planner):

- `equal`: the same quota in every layer (mixtral-offloading's policy; the remainder goes to the
  first layers), passed to the cache as explicit `gpu_slots`.
- `uniform`: AdapMoE's DP (`decoder.cache_plan.plan_slots`), planned by the cache itself
  (`cache_options={"plan": "uniform"}`) from the profile, under the planner's default "top-k"
  objective (every layer keeps >= top_k slots where the budget allows it, and a cost term for
  layers below top_k; see decoder/cache_plan.py).
- `popularity` (ours): the DP on the measured per-expert popularity
  (`plan_slots_popularity`, `cache_options={"plan": "popularity"}`), top-k objective.
- `uniform-paper`, `popularity-paper`: the same DPs under the paper's objective (s_l >= 1, f
  without the cost term), i.e. the planners before the top-k objective, passed to the cache as
  explicit `gpu_slots`.
- any of them with cache levers after `+` (`uniform+lfru+admit+skip`): lfru eviction, prefetch
  admission, no predictions for a layer whose next layer rarely misses (decoder/experts), or
  no prefetcher (`equal+noprefetch` with topk gating: decode.py's lru row). The
  "GPU loads/token" column counts every copy into the GPU tier, demanded or prefetched: what
  the link carries.

Gating: `topk` (the planners get single-expert ratio r = 0, as that gating never drops) and
`adaptive` at the calibrated budget T for ~25% single-expert decisions (the planners get the
profile's per-layer r at that T). Prefetcher on, host tier holding every expert, device cpu:
the quantities compared are counts (GPU lookups, hits, misses, loads), not times.

Each (planner, gating, budget) gets a fresh engine; every evaluation window is decoded token by
token (Engine.decode_logits: one token per step through the KV cache, as generate() decodes),
after one warm-up window whose counts are discarded. Per row: slots per layer, GPU hit rate,
on-demand loads per token (demand lookups that missed the GPU tier, i.e. the expert was not
resident, prefetched or not, when the layer needed it), prefetch loads and useful prefetches,
scratch-slot loads (experts that came in outside the layer's quota, e.g. the second expert of a
one-slot layer) and the DP objective's predicted on-demand loads per token (sum_l f_l(s_l))
under the uniform and the popularity model, with the top-k objective's f and with the paper's,
next to the measured value. The prefetcher runs on a loader
thread, so whether a prefetch lands before its layer needs it depends on timing: counts move a
little between runs.

Writes results/cache_plan.json and results/cache_plan.png and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import _common  # noqa: E402
from decoder.cache_plan import plan_cost, plan_slots, plan_slots_popularity  # noqa: E402
from decoder.engine import Engine  # noqa: E402

MODEL = "cache-plan"
PLANNERS = ("equal", "uniform", "popularity", "uniform-paper", "popularity-paper")
# cache levers a planner name may carry after "+" (issue 13): lfru eviction, prefetch admission,
# no predictions for a layer whose next layer rarely misses; e.g. "uniform+lfru+admit"
LEVERS = {"lfru": ({"eviction": "lfru"}, {}), "admit": ({"admission": True}, {}),
          "skip": ({}, {"skip_miss_rate": 0.05}),
          # no prefetcher at all: with `equal` and topk gating, mixtral-offloading's lru (decode.py's lru row)
          "noprefetch": ({}, {})}
GATINGS = ("topk", "adaptive")
DEFAULT_BUDGETS = (0.125, 0.25, 0.375, 0.5)


@dataclass
class Settings:
    eval_tokens: int = 768             # decoded tokens measured per row (windows of seq_len)
    calib_tokens: int = 4096
    seq_len: int = 128
    budgets: Sequence[float] = DEFAULT_BUDGETS   # GPU slots as a share of all L x E experts
    single_ratio: float = 0.25         # adaptive gating's calibrated target
    planners: Sequence[str] = PLANNERS
    gatings: Sequence[str] = GATINGS
    device: str = "cpu"
    heldout_mb: float = 1.0
    warmup_windows: int = 1


# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------
def equal_quotas(total_slots: int, num_layers: int, num_experts: int) -> list[int]:
    """The same quota per layer (mixtral-offloading); the remainder to the first layers."""
    if total_slots < num_layers:
        raise ValueError(f"{total_slots} slots < {num_layers} layers: every layer needs one")
    total = min(total_slots, num_layers * num_experts)
    base, rem = divmod(total, num_layers)
    return [min(num_experts, base + (1 if l < rem else 0)) for l in range(num_layers)]


def planner_profile(profile: dict[str, Any], gating: str, num_layers: int) -> dict[str, Any]:
    """The profile the planners see for a gating: topk never drops expert 2 (r = 0); adaptive
    at the calibrated T drops at the profile's per-layer single-expert ratio."""
    p = dict(profile)
    if gating == "topk":
        p["single_expert_ratio"] = [0.0] * num_layers
    return p


def split_planner(spec: str) -> tuple[str, list[str]]:
    """"uniform+lfru+admit" -> ("uniform", ["lfru", "admit"])."""
    base, *levers = spec.split("+")
    unknown = [x for x in levers if x not in LEVERS]
    if base not in PLANNERS or unknown:
        raise ValueError(f"unknown planner {spec!r} ({', '.join(PLANNERS)}, optionally +{'+'.join(LEVERS)})")
    return base, levers


def expected_plan(planner: str, prof: dict[str, Any], total: int, L: int, E: int) -> list[int]:
    planner, _ = split_planner(planner)
    if planner == "equal":
        return equal_quotas(total, L, E)
    base, _, variant = planner.partition("-")
    if variant not in ("", "paper") or base not in ("uniform", "popularity"):
        raise ValueError(f"unknown planner {planner!r} ({', '.join(PLANNERS)})")
    kw = {"top_k": int(prof.get("top_k", 2)), "objective": "paper" if variant else "top-k"}
    if base == "uniform":
        return plan_slots(prof["prefetch_accuracy"], prof["single_expert_ratio"], total, E, num_layers=L, **kw)
    return plan_slots_popularity(prof["popularity"], prof["prefetch_accuracy"], prof["single_expert_ratio"], total,
                                 **kw)


def cache_options(planner: str, prof: dict[str, Any], plan: list[int]) -> dict[str, Any]:
    """The cache plans `uniform` and `popularity` itself (its default objective); `equal` and the
    paper-objective plans are handed over as explicit per-layer slots. Levers add their options."""
    planner, levers = split_planner(planner)
    extra = {k: v for x in levers for k, v in LEVERS[x][0].items()}
    if planner in ("uniform", "popularity"):
        return {"profile": prof, "plan": planner, **extra}
    return {"profile": prof, "plan": "uniform", "gpu_slots": plan, **extra}


# ---------------------------------------------------------------------------------------------
# one row
# ---------------------------------------------------------------------------------------------
def measure_row(client: Any, model: str, planner: str, gating: str, total_slots: int, profile: dict[str, Any],
                windows: torch.Tensor, budget_T: float | None, slot_bytes: int, host_slot_bytes: int,
                device: str = "cpu", warmup_windows: int = 1, bar: Any = None) -> dict[str, Any]:
    """Decode `windows` token by token through a fresh ExpertCache with `total_slots` GPU slots
    planned by `planner`; returns the row (slots, GPU counts, loads, predictions)."""
    L, E = int(profile["num_layers"]), int(profile["num_experts"])
    prof = planner_profile(profile, gating, L)
    want = expected_plan(planner, prof, total_slots, L, E)
    top_k = int(profile.get("top_k", 2))
    opts = cache_options(planner, prof, want)
    levers = split_planner(planner)[1]
    gpu_bytes = slot_bytes * (total_slots + top_k)          # the plan's slots + top_k scratch slots
    host_bytes = host_slot_bytes * L * E                    # the host tier holds every expert
    with Engine.from_store(client, model, device=device, dtype=torch.float32, gating=gating,
                           budget=budget_T if gating != "topk" else None, gpu_cache_bytes=gpu_bytes,
                           host_cache_bytes=host_bytes, prefetch="noprefetch" not in levers, cache_options=opts,
                           prefetch_options={k: v for x in levers for k, v in LEVERS[x][1].items()},
                           gating_options={"sensitivity": profile["sensitivity"]} if gating != "topk" else None
                           ) as eng:
        cache = eng.provider
        quota = list(cache.quota)
        if quota != want:
            raise RuntimeError(f"{planner}: the cache planned {quota}, the planner says {want}")
        for w in windows[:warmup_windows]:
            eng.decode_logits(w[:-1])
        cache.wait_idle()
        eng.reset_stats()
        t0 = time.perf_counter()
        tokens = 0
        for w in windows[warmup_windows:]:
            eng.decode_logits(w[:-1])
            tokens += int(w.numel() - 1)
            if bar is not None:
                bar.update(1)
        cache.wait_idle()
        seconds = time.perf_counter() - t0
        cs = cache.stats()
        es = eng.stats()
        gs = eng.model.gating.stats() if hasattr(eng.model.gating, "stats") else {}
    g = cs["tiers"]["gpu"]
    acc, r1 = prof["prefetch_accuracy"], prof["single_expert_ratio"]
    pf = es.get("prefetch") or {}
    return {
        "planner": planner, "gating": gating, "budget_T": budget_T if gating != "topk" else None,
        "gpu_slots_total": total_slots, "gpu_share": total_slots / (L * E), "slots": quota,
        "scratch_slots": cs["scratch_slots"], "tokens": tokens, "steps": cs["steps"],
        "gpu_lookups": g["lookups"], "gpu_hits": g["hits"], "gpu_misses": g["misses"], "gpu_hit_rate": g["hit_rate"],
        "on_demand_loads_per_token": g["misses"] / max(1, tokens),
        "demand_loads": cs["demand_loads"], "prefetch_loads": cs["prefetch_loads"],
        # every expert copied into the GPU tier, demanded or prefetched: the link's bytes
        "gpu_loads_per_token": (cs["demand_loads"] + cs["prefetch_loads"]) / max(1, tokens),
        "prefetch_refused": cs["prefetch_refused"],
        "prefetch_useful": cs["prefetch_useful"], "prefetch_late": cs["prefetch_late"],
        "prefetch_unused_evicted": cs["prefetch_unused_evicted"],
        "prefetch_useful_per_token": cs["prefetch_useful"] / max(1, tokens),
        "scratch_loads": cs["scratch_loads"], "transient_loads": cs["transient_loads"],
        "host_hit_rate": cs["tiers"]["host"]["hit_rate"],
        "lookups_per_token": g["lookups"] / max(1, tokens),
        "single_expert_ratio": gs.get("single_expert_ratio", 0.0),
        "experts_per_token": gs.get("experts_per_token"),
        "prefetch_precision": pf.get("precision"), "prefetch_recall": pf.get("recall"),
        "scratch_loads_per_token": cs["scratch_loads"] / max(1, tokens),
        "predicted_uniform_model": plan_cost(quota, acc, r1, E, top_k=top_k),
        "predicted_popularity_model": plan_cost(quota, acc, r1, E, popularity=prof["popularity"], top_k=top_k),
        "predicted_paper_uniform_model": plan_cost(quota, acc, r1, E, objective="paper"),
        "predicted_paper_popularity_model": plan_cost(quota, acc, r1, E, popularity=prof["popularity"],
                                                      objective="paper"),
        "planner_r": list(r1),
        "seconds": round(seconds, 2),
    }


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
def run_cache_plan(checkpoint: Path, work: Path, s: Settings, eval_texts: Sequence[str],
                   calib_texts: Sequence[str], progress: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Pack, calibrate (decoder.calibrate), then one row per (gating, budget, planner)."""
    from tqdm import tqdm

    from decoder.gating import profile_budget
    from expert_store.client import StoreClient

    unknown = []
    for p in s.planners:
        try:
            split_planner(p)
        except ValueError:
            unknown.append(p)
    if unknown:
        raise ValueError(f"unknown planners {sorted(unknown)} ({', '.join(PLANNERS)}, optionally "
                         f"+{'+'.join(LEVERS)})")
    t_start = time.perf_counter()
    config = json.loads((checkpoint / "config.json").read_text())
    L, E = int(config["num_hidden_layers"]), int(config["num_local_experts"])
    totals = [max(L, round(b * L * E)) for b in s.budgets]
    K = int(config["num_experts_per_tok"])
    if any(t + K >= L * E for t in totals):
        # the cache's byte budget (plan + top_k scratch slots) would hold every expert: all E per layer
        raise ValueError(f"budgets must stay below {L * E - K} of the {L * E} experts (top_k scratch slots on top)")
    sep = _common.sep_token(config)
    eval_stream = _common.encode_texts(checkpoint / "tokenizer.json", eval_texts, sep)
    calib_stream = _common.encode_texts(checkpoint / "tokenizer.json", calib_texts, sep)
    n_windows = max(1, s.eval_tokens // s.seq_len) + s.warmup_windows
    windows = _common.eval_windows(eval_stream, s.seq_len, n_windows)

    store = work / "store"
    _common.pack_bf16(checkpoint, store, MODEL)
    with StoreClient.open(str(store)) as client:
        with Engine.from_store(client, MODEL, device=s.device, dtype=torch.float32, prefetch=False) as eng:
            t0 = time.perf_counter()
            profile = _common.calibrate(eng, store, calib_stream, model=MODEL, calib_tokens=s.calib_tokens,
                                        seq_len=s.seq_len, progress=progress)
            t_calib = time.perf_counter() - t0
        with Engine.from_store(client, MODEL, device=s.device, dtype=torch.float32, prefetch=False,
                               gpu_cache_bytes=1 << 40, host_cache_bytes=0) as probe:
            slot_bytes, host_slot_bytes = probe.provider.slot_bytes, probe.provider.host_slot_bytes
    T = profile_budget(profile, s.single_ratio)
    log(f"calibrated on {profile['tokens']} tokens in {t_calib:.1f} s; adaptive T={T:.3g} "
        f"(r per layer {[round(x, 3) for x in profile['single_expert_ratio']]})")

    plan = [(g, t, p) for g in s.gatings for t in totals for p in s.planners]
    bar = tqdm(total=len(plan) * (n_windows - s.warmup_windows), desc="cache plan", unit="window",
               disable=not progress, dynamic_ncols=True, file=sys.stderr)
    rows = []
    with StoreClient.open(str(store)) as client:
        for gating, total, planner in plan:
            rows.append(measure_row(client, MODEL, planner, gating, total, profile, windows,
                                    T if gating != "topk" else None, slot_bytes, host_slot_bytes,
                                    device=s.device, warmup_windows=s.warmup_windows, bar=bar))
    bar.close()
    return {
        "checkpoint": str(checkpoint),
        "model_config": {k: config.get(k) for k in ("num_hidden_layers", "num_local_experts", "num_experts_per_tok",
                                                     "hidden_size", "intermediate_size")},
        "settings": {**asdict(s), "budgets": list(s.budgets), "planners": list(s.planners),
                     "gatings": list(s.gatings)},
        "eval": {"windows": int(windows.shape[0]) - s.warmup_windows, "warmup_windows": s.warmup_windows,
                 "seq_len": s.seq_len, "tokens_per_row": rows[0]["tokens"] if rows else 0,
                 "eval_stream_tokens": int(eval_stream.numel()), "calib_stream_tokens": int(calib_stream.numel())},
        "calibration": {k: profile[k] for k in ("tokens", "top_k", "prefetch_accuracy", "single_expert_ratio",
                                                "budget_for_single_ratio", "popularity")},
        "adaptive_T": T, "slot_bytes": slot_bytes, "rows": rows, "summary": summarize(rows),
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per (gating, budget): the planner with the fewest measured on-demand loads per token,
    popularity's change against uniform and equal, and every planner's change against equal
    quotas (negative = fewer loads)."""
    out: dict[str, Any] = {"per_point": [], "wins": {}}
    keys = sorted({(r["gating"], r["gpu_slots_total"]) for r in rows}, key=lambda k: (GATINGS.index(k[0])
                  if k[0] in GATINGS else 9, k[1]))
    for gating, total in keys:
        pts = {r["planner"]: r for r in rows if r["gating"] == gating and r["gpu_slots_total"] == total}
        loads = {p: r["on_demand_loads_per_token"] for p, r in pts.items()}
        best = min(loads.values())
        winners = sorted(p for p, v in loads.items() if v <= best + 1e-12)
        same_plan = len({tuple(r["slots"]) for r in pts.values()}) == 1
        pt = {"gating": gating, "gpu_slots_total": total, "gpu_share": next(iter(pts.values()))["gpu_share"],
              "loads_per_token": loads, "winner": winners[0] if len(winners) == 1 else "tie",
              "identical_plans": same_plan}
        for base in ("uniform", "equal"):
            if "popularity" in loads and base in loads and loads[base] > 0:
                pt[f"popularity_vs_{base}_pct"] = 100.0 * (loads["popularity"] / loads[base] - 1.0)
        if loads.get("equal", 0) > 0:
            pt["vs_equal_pct"] = {p: 100.0 * (v / loads["equal"] - 1.0) for p, v in loads.items() if p != "equal"}
        out["per_point"].append(pt)
        if not same_plan:
            out["wins"][pt["winner"]] = out["wins"].get(pt["winner"], 0) + 1
    return out


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    gatings = [g for g in GATINGS if any(r["gating"] == g for r in rows)] or [rows[0]["gating"]]
    fig, axes = plt.subplots(1, len(gatings), figsize=(6.0 * len(gatings), 4.8), sharey=True, squeeze=False)
    styles = {"equal": ("s-", "tab:gray"), "uniform": ("o-", "tab:blue"), "popularity": ("^-", "tab:orange"),
              "uniform-paper": ("o:", "tab:blue"), "popularity-paper": ("^:", "tab:orange")}
    for ax, gating in zip(axes[0], gatings):
        for planner in PLANNERS:
            pts = sorted((100 * r["gpu_share"], r["on_demand_loads_per_token"]) for r in rows
                         if r["planner"] == planner and r["gating"] == gating)
            if pts:
                style, color = styles.get(planner, ("x-", None))
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, color=color, label=planner, ms=5,
                        alpha=0.6 if planner.endswith("-paper") else 1.0)
        ax.set_xlabel("GPU expert budget (% of all experts)")
        ax.set_title(f"{gating} gating")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("on-demand (demand-miss) loads per token")
    ev = result["eval"]
    fig.suptitle(f"cache plan: on-demand loads vs GPU budget ({ev['tokens_per_row']} decoded tokens per point; "
                 "dotted: the paper's objective)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    lines = ["| gating | GPU budget | planner | slots/layer | GPU hit rate | on-demand loads/token | vs equal | "
             "scratch loads/token | predicted: uniform, paper f | uniform, top-k f | popularity, top-k f | "
             "prefetch loads/token | prefetch useful/token | GPU loads/token |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    vs = {(pt["gating"], pt["gpu_slots_total"]): pt.get("vs_equal_pct", {}) for pt in result["summary"]["per_point"]}
    for r in result["rows"]:
        t = r["tokens"] or 1
        v = vs.get((r["gating"], r["gpu_slots_total"]), {}).get(r["planner"])
        lines.append(f"| {r['gating']} | {100 * r['gpu_share']:.1f}% ({r['gpu_slots_total']}) | {r['planner']} | "
                     f"{r['slots']} | {100 * r['gpu_hit_rate']:.1f}% | {r['on_demand_loads_per_token']:.3f} | "
                     f"{'-' if v is None else f'{v:+.1f}%'} | {r['scratch_loads'] / t:.3f} | "
                     f"{r['predicted_paper_uniform_model']:.3f} | {r['predicted_uniform_model']:.3f} | "
                     f"{r['predicted_popularity_model']:.3f} | "
                     f"{r['prefetch_loads'] / t:.3f} | {r['prefetch_useful_per_token']:.3f} | "
                     f"{r['gpu_loads_per_token']:.3f} |")
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> str:
    lines = []
    for pt in result["summary"]["per_point"]:
        loads = ", ".join(f"{p} {v:.3f}" for p, v in pt["loads_per_token"].items())
        extra = " (all plans identical)" if pt["identical_plans"] else ""
        vs = pt.get("popularity_vs_uniform_pct")
        vs_s = f"; popularity vs uniform {vs:+.1f}%" if vs is not None else ""
        ve = pt.get("vs_equal_pct") or {}
        if ve:
            vs_s += "; vs equal: " + ", ".join(f"{p} {v:+.1f}%" for p, v in ve.items())
        lines.append(f"  {pt['gating']} @ {100 * pt['gpu_share']:.1f}%: winner {pt['winner']}{extra} "
                     f"({loads}){vs_s}")
    lines.append(f"wins where plans differ: {result['summary']['wins']}")
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: Path, name: str = "cache_plan") -> tuple[Path, Path]:
    return _common.write_outputs(result, out_dir, name, plot)


def _own_args(ap: argparse.ArgumentParser) -> None:
    d = Settings()
    ap.add_argument("--budgets", default=",".join(f"{b:g}" for b in d.budgets),
                    help="GPU budgets as shares of all experts")
    ap.add_argument("--single-ratio", type=float, default=d.single_ratio,
                    help="adaptive gating's calibrated single-expert target")
    ap.add_argument("--gatings", default=",".join(d.gatings))
    ap.add_argument("--name", default="cache_plan", help="output file stem in --out-dir")
    ap.add_argument("--planners", default=",".join(d.planners),
                    help=f"any of {', '.join(PLANNERS)}, each optionally with levers +{'+'.join(LEVERS)} "
                         "(e.g. uniform+lfru+admit)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = _common.build_parser(__doc__.split("\n\n")[0], Settings(), "decoded tokens measured per row", _own_args)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = Settings(eval_tokens=args.eval_tokens, calib_tokens=args.calib_tokens, seq_len=args.seq_len,
                 budgets=_common.floats(args.budgets), single_ratio=args.single_ratio,
                 gatings=_common.names(args.gatings), planners=_common.names(args.planners), device=args.device)
    ckpt = _common.find_checkpoint(args.checkpoint)
    ev, cal, info = _common.heldout_split(s.heldout_mb)
    result = _common.run_in_tempdir("cache-plan-", lambda work: run_cache_plan(ckpt, work, s, ev, cal,
                                                                                progress=not args.no_progress))
    result["text"] = info
    result.update(_common.run_info("cache_plan.py", argv, args.device, args.threads))
    js, png = write_outputs(result, Path(args.out_dir), args.name)
    print()
    print(markdown(result))
    print()
    print(verdict(result))
    print(f"\n{result['eval']['tokens_per_row']} held-out tokens decoded per row ({result['eval']['windows']} windows "
          f"of {s.seq_len} after {s.warmup_windows} warm-up); calibration on {result['calibration']['tokens']} other "
          f"held-out tokens; {result['seconds']:.0f} s. wrote {js} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
