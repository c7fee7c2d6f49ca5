"""Held-out perplexity against the gating budget: what dropping tail experts costs in accuracy.

    .venv/bin/python benchmarks/accuracy.py                       # the trained demo model (cached or trained)
    .venv/bin/python benchmarks/accuracy.py --family qwen3_moe    # the fine-grained demo model (16 experts, top-4)
    .venv/bin/python benchmarks/accuracy.py --checkpoint DIR --eval-tokens 4096

Model: the trained demo model (`moe-decoder train-demo`, CPython stdlib code). `--checkpoint DIR`
takes any HF checkpoint of a supported family with a tokenizer.json; by default the demo's
cached checkpoint (decoder.demo's cache dir: $ADAPMOE_DEMO_DIR or .demo/checkpoint; with
`--family F`, .demo/checkpoint-F, train-demo's layout and defaults for F), trained there with
decoder.train_demo's defaults when it is missing or was trained with other settings.

Text: the held-out split of train_demo (stdlib files the model never trained on), split again
by file: even-numbered held-out files are the evaluation text, odd-numbered ones the
calibration text, so calibration and evaluation never share a file. The checkpoint is packed
(bf16 experts) into a temporary store, calibrated with decoder.calibrate (per-layer
sensitivity F_l, prefetch accuracy, popularity) and the profile is stored next to the model.

Sweep: budgets come from the calibration text only: for each target ratio r of the droppable
expert uses (a token's top-k but the first; top-2: the single-expert ratio), `uniform`'s
threshold is the r-quantile of the tail weights W_m (the decision weight of a token's m last
experts, m = 1..k-1: their share of the top-k's, or their router probability for a family that
does not renormalise; top-2: w2), and `adaptive`'s T the r-quantile of F_l * W_m^2 (over
all calibration routing decisions). `cost-aware` runs at the
same T values as `adaptive`, plus points at multiples of the largest T (--cost-aware-extra):
its ratio follows the live location of expert 2 (kept when it is on the GPU tier, dropped
below T x load cost / min(mean load cost of recent experts 2, one H2D copy) when it is further
away, capped by a loss bound of L x T per token; decoder/gating.py), so it saturates below 100%. `topk` is the reference. Per point: held-out perplexity, the
single-expert ratio and experts/token over the evaluated decisions, and the estimated loss per
token (sum over layers of F_l * W^2 of the dropped experts), next to the measured loss change,
and the share of expert uses saved (1 - experts per token / k).

Scoring: windows of --seq-len tokens evenly spaced over the evaluation text, each from position
0, every token scored. `cost-aware` always runs the decode path (Engine.decode_logits: one token
per forward step through the static KV cache, as generate() decodes), on an engine with a
GPU/host expert cache smaller than the model (3 and 5 experts per layer) and the prefetcher:
its decisions depend on where experts are at that moment. `topk`, `uniform` and `adaptive`
decide each (token, layer) from that token's own router logits only (W, F_l, T), so scoring a
window with one causal full-sequence forward makes exactly the decisions the decode path makes
(hidden states of earlier tokens are the same under causal attention); `--scoring auto`
(default) uses the full forward for them and checks this on every point: the first window is
also decoded token by token and must give the same single-expert decisions and logits within
1e-3. `--scoring decode` decodes everything.

Target: top-2 (issue 4): at >= 25% single-expert decisions; top-k > 2 (issue 15): at >= 25%
fewer expert uses; in both, perplexity within 1% of `topk` and better than the uniform threshold
at the same ratio (uniform's perplexity linearly interpolated in it). Prints MET / MISSED with
the numbers. Writes results/accuracy.json and results/accuracy.png (accuracy-FAMILY.* with
--family) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import _common  # noqa: E402
from benchmarks._common import (encode_texts, eval_windows, find_checkpoint,  # noqa: E402,F401
                                heldout_split)
from decoder.engine import Engine  # noqa: E402
from decoder.gating import make_gating  # noqa: E402
from decoder.calibrate import decision_tails  # noqa: E402
from decoder.train_demo import TRAIN_FAMILIES  # noqa: E402
from decoder.model.config import ModelConfig  # noqa: E402
from decoder.model.transformer import MoEObserver  # noqa: E402

MODEL = "accuracy"
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
TARGET_RATIO = 0.25
TARGET_PPL_TOL = 0.01
DECODE_CHECK_ATOL = 1e-3


@dataclass
class Settings:
    eval_tokens: int = 1536            # scored tokens (windows of seq_len)
    calib_tokens: int = 4096
    seq_len: int = 128
    ratios: Sequence[float] = DEFAULT_RATIOS
    cost_aware_extra: Sequence[float] = (3.0,)   # extra cost-aware points at these multiples of the largest T
    methods: Sequence[str] = ("uniform", "adaptive", "cost-aware")
    scoring: str = "auto"              # auto | decode
    device: str = "cpu"
    gpu_experts_per_layer: int | None = None    # cost-aware's cache; None: 3/8 of the experts (3 of 8)
    host_experts_per_layer: int | None = None   # None: 5/8 of the experts (5 of 8)
    heldout_mb: float = 1.0


# ---------------------------------------------------------------------------------------------
# calibration and budgets
# ---------------------------------------------------------------------------------------------
class _TailWeights(MoEObserver):
    """Collects each routing decision's tail weights W_m (the decision weight of the m last
    experts, m = 1..k-1, as the gating sees it: decoder.calibrate.decision_tails; top-2 of a
    renormalising family: w2), per layer: [T, k-1] per call."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.tails: list[list[torch.Tensor]] = [[] for _ in range(model.config.num_hidden_layers)]

    def on_routing(self, layer, router_logits, weights, idx):
        moe = self.model.layers[layer].block_sparse_moe
        self.tails[layer].append(decision_tails(moe, weights.detach().double()).cpu())


def calibrate(engine: Engine, store_dir: Path, calib_ids: torch.Tensor, s: Settings,
              progress: bool) -> dict[str, Any]:
    """decoder.calibrate on the calibration text; the profile goes next to the model in the store."""
    return _common.calibrate(engine, store_dir, calib_ids, model=MODEL, calib_tokens=s.calib_tokens,
                             seq_len=s.seq_len, progress=progress)


def sweep_budgets(engine: Engine, calib_ids: torch.Tensor, sensitivity: Sequence[float], s: Settings
                  ) -> dict[str, list[float]]:
    """Per target ratio: uniform's threshold and adaptive's T, from the calibration text's top-k
    routing (quantiles of W_m and of F_l * W_m^2 over every droppable expert use)."""
    from decoder.calibrate import token_windows

    rec = _TailWeights(engine.model)
    old = engine.model.gating
    engine.model.gating = make_gating("topk", config=engine.config)
    engine.model.add_observer(rec)
    try:
        for w in token_windows(calib_ids.tolist(), s.seq_len, s.calib_tokens):
            engine.forward_logits(w)
    finally:
        engine.model.remove_observer(rec)
        engine.model.gating = old
    moe = engine.config.moe_layers
    tails = {l: torch.cat(rec.tails[l]) for l in moe}                  # [N, k-1]
    all_w = torch.cat([tails[l].flatten() for l in moe])
    est = torch.cat([(sensitivity[l] * tails[l] ** 2).flatten() for l in moe])

    def q(x: torch.Tensor, r: float) -> float:  # smallest value v with (x < v) for a share >= r
        return math.nextafter(float(torch.quantile(x, r)), math.inf)

    return {"uniform": [q(all_w, r) for r in s.ratios], "adaptive": [q(est, r) for r in s.ratios]}


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------
def score_window(engine: Engine, window: torch.Tensor, decode: bool) -> tuple[float, int, torch.Tensor]:
    """(summed next-token NLL in nats, tokens scored, logits) of one [S + 1] window."""
    x, y = window[:-1], window[1:].to(engine.device)
    logits = engine.decode_logits(x) if decode else engine.forward_logits(x)
    return float(F.cross_entropy(logits, y, reduction="sum")), int(y.numel()), logits


def _set_gating(engine: Engine, method: str, budget: float | None, sensitivity: Sequence[float]) -> None:
    if method == "topk":
        g = make_gating("topk", config=engine.config)
    elif method == "uniform":
        g = make_gating("uniform", config=engine.config, threshold=budget, sensitivity=sensitivity)
    else:
        g = make_gating(method, config=engine.config, provider=engine.provider, budget=budget,
                        sensitivity=sensitivity)
    engine.model.gating = g


def _single_decisions(engine: Engine) -> tuple[int, int, int]:
    """(single-expert decisions, experts used, decisions) of the gating so far."""
    st = engine.model.gating.stats()
    d = st["decisions"]
    return round(st["single_expert_ratio"] * d), round(st["experts_per_token"] * d), d


def measure_point(engine: Engine, method: str, budget: float | None, windows: torch.Tensor,
                  sensitivity: Sequence[float], decode: bool, check_decode: bool,
                  bar: Any = None) -> dict[str, Any]:
    """Perplexity and gating statistics of one (method, budget) over all windows."""
    _set_gating(engine, method, budget, sensitivity)
    engine.reset_stats()
    t0 = time.perf_counter()
    nll, n = 0.0, 0
    first_logits = None
    for i, w in enumerate(windows):
        a, b, logits = score_window(engine, w, decode)
        nll, n = nll + a, n + b
        if i == 0:
            first_logits = logits
        if bar is not None:
            bar.update(1)
    seconds = time.perf_counter() - t0
    gs = engine.model.gating.stats()
    row: dict[str, Any] = {
        "method": method, "budget": budget,
        "budget_kind": {"uniform": "W threshold", "topk": None}.get(method, "T"),
        "scoring": "decode" if decode else "full-forward",
        "tokens": n, "nll": nll / n, "perplexity": math.exp(nll / n),
        "single_expert_ratio": gs["single_expert_ratio"], "experts_per_token": gs["experts_per_token"],
        "uses_saved": 1.0 - gs["experts_per_token"] / engine.config.num_experts_per_tok,
        "decisions": gs["decisions"], "est_loss_per_token": gs["est_loss_per_token"],
        "seconds": round(seconds, 2),
    }
    if method == "cost-aware":
        row["expert2_location"] = gs.get("expert2_location")
        row["capped_by_bound"] = gs.get("capped_by_bound")
        row["loss_bound"] = gs.get("loss_bound")
        if hasattr(engine.provider, "load_cost"):
            row["load_cost_s"] = {t: engine.provider.load_cost(t) for t in ("host", "store")}
        pst = engine.stats()
        row["gpu_hit_rate"] = (pst.get("tiers") or {}).get("gpu", {}).get("hit_rate")
    if check_decode and not decode:
        # the same window through the decode path: the same decisions and logits
        engine.model.gating.reset_stats()
        score_window(engine, windows[0], decode=False)
        full_single = _single_decisions(engine)
        engine.model.gating.reset_stats()
        _, _, dec_logits = score_window(engine, windows[0], decode=True)
        dec_single = _single_decisions(engine)
        diff = float((dec_logits - first_logits).abs().max())
        row["decode_check"] = {"tokens": int(windows.shape[1] - 1), "max_abs_logit_diff": diff,
                               "single_decisions_full": full_single[0], "single_decisions_decode": dec_single[0],
                               "ok": full_single == dec_single and diff <= DECODE_CHECK_ATOL}
        if not row["decode_check"]["ok"]:
            raise RuntimeError(f"{method} at {budget}: full-forward scoring differs from the decode path "
                               f"({row['decode_check']}); rerun with --scoring decode")
    return row


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
def run_accuracy(checkpoint: Path, work: Path, s: Settings, eval_texts: Sequence[str], calib_texts: Sequence[str],
                 progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Pack, calibrate, sweep; returns the result dict (rows, calibration, target check)."""
    from tqdm import tqdm

    from expert_store.client import StoreClient

    unknown = set(s.methods) - {"uniform", "adaptive", "cost-aware"}
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)} (uniform, adaptive, cost-aware; topk always runs)")
    if s.scoring not in ("auto", "decode"):
        raise ValueError("scoring must be auto or decode")
    if any(not 0 < r < 1 for r in s.ratios) or list(s.ratios) != sorted(s.ratios):
        raise ValueError("ratios must be increasing, in (0, 1)")
    t_start = time.perf_counter()
    config = json.loads((checkpoint / "config.json").read_text())
    sep = _common.sep_token(config)
    eval_stream = encode_texts(checkpoint / "tokenizer.json", eval_texts, sep)
    calib_stream = encode_texts(checkpoint / "tokenizer.json", calib_texts, sep)
    n_windows = max(1, s.eval_tokens // s.seq_len)
    windows = eval_windows(eval_stream, s.seq_len, n_windows)
    if calib_stream.numel() < min(s.calib_tokens, 2 * s.seq_len):
        raise ValueError(f"calibration text too short: {calib_stream.numel()} tokens")

    store = work / "store"
    _common.pack_bf16(checkpoint, store, MODEL)
    model_cfg = ModelConfig.from_hf(config)
    device = torch.device(s.device)
    dtype = torch.float32
    with StoreClient.open(str(store)) as client:
        # 1. calibration (autograd on the calibration text), profile into the store
        with Engine.from_store(client, MODEL, device=device, dtype=dtype, prefetch=False) as eng:
            t0 = time.perf_counter()
            profile = calibrate(eng, store, calib_stream, s, progress)
            sens = profile["sensitivity"]
            budgets = sweep_budgets(eng, calib_stream, sens, s)
            t_calib = time.perf_counter() - t0
        log(f"calibrated on {profile['tokens']} tokens in {t_calib:.1f} s: F_l = "
            + ", ".join(f"{f:.3g}" for f in sens))

    rows: list[dict[str, Any]] = []
    plan: list[tuple[str, float | None, float | None]] = [("topk", None, None)]
    for m in s.methods:
        grid = budgets["uniform"] if m == "uniform" else budgets["adaptive"]
        plan += [(m, b, r) for b, r in zip(grid, s.ratios)]
        if m == "cost-aware":  # it never drops an expert 2 already on the GPU: larger T to see where it saturates
            plan += [(m, x * budgets["adaptive"][-1], None) for x in s.cost_aware_extra]
    bar = tqdm(total=len(plan) * n_windows, desc="accuracy", unit="window", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    with StoreClient.open(str(store)) as client:
        # 2. topk, uniform, adaptive: every expert resident (decisions do not depend on the cache)
        with Engine.from_store(client, MODEL, device=device, dtype=dtype, prefetch=False) as eng:
            for method, budget, target in plan:
                if method == "cost-aware":
                    continue
                decode = s.scoring == "decode"
                row = measure_point(eng, method, budget, windows, sens, decode=decode, check_decode=not decode,
                                    bar=bar)
                row["target_ratio"] = target
                rows.append(row)
        # 3. cost-aware: a GPU/host cache smaller than the model, the prefetcher, the decode path
        if "cost-aware" in s.methods:
            with Engine.from_store(client, MODEL, device=device, dtype=dtype, prefetch=False,
                                   gpu_cache_bytes=1 << 40) as probe:
                slot = probe.provider.slot_bytes
                L, E = probe.config.num_hidden_layers, probe.config.num_local_experts
            n_gpu = s.gpu_experts_per_layer if s.gpu_experts_per_layer is not None else max(1, 3 * E // 8)
            n_host = s.host_experts_per_layer if s.host_experts_per_layer is not None else max(1, 5 * E // 8)
            gpu_bytes = slot * (L * min(E, n_gpu) + model_cfg.num_experts_per_tok)
            host_bytes = slot * L * min(E, n_host)
            with Engine.from_store(client, MODEL, device=device, dtype=dtype, gpu_cache_bytes=gpu_bytes,
                                   host_cache_bytes=host_bytes) as eng:
                cache_info = {"gpu_cache_bytes": gpu_bytes, "host_cache_bytes": host_bytes,
                              "gpu_slots_per_layer": list(eng.provider.quota), "slot_bytes": slot,
                              "plan": eng.provider.plan}
                _set_gating(eng, "topk", None, sens)
                score_window(eng, windows[0], decode=True)             # warm-up: fill the tiers
                for method, budget, target in plan:
                    if method != "cost-aware":
                        continue
                    row = measure_point(eng, method, budget, windows, sens, decode=True, check_decode=False,
                                        bar=bar)
                    row["target_ratio"] = target
                    rows.append(row)
        else:
            cache_info = None
    bar.close()

    topk = rows[0]
    for r in rows:
        r["ppl_vs_topk_pct"] = 100.0 * (r["perplexity"] / topk["perplexity"] - 1.0)
        r["measured_delta_loss"] = r["nll"] - topk["nll"]
    return {
        "checkpoint": str(checkpoint),
        "model_config": {"family": model_cfg.family,
                         **{k: getattr(model_cfg, k) for k in ("num_hidden_layers", "num_local_experts",
                                                               "num_experts_per_tok", "hidden_size",
                                                               "intermediate_size", "vocab_size")}},
        "checkpoint_sha256": _fingerprint(checkpoint),
        "settings": {**asdict(s), "ratios": list(s.ratios), "methods": list(s.methods),
                     "cost_aware_extra": list(s.cost_aware_extra)},
        "eval": {"windows": int(windows.shape[0]), "seq_len": s.seq_len, "tokens_scored": topk["tokens"],
                 "eval_stream_tokens": int(eval_stream.numel()), "calib_stream_tokens": int(calib_stream.numel())},
        "calibration": {k: profile[k] for k in ("tokens", "loss_nats_per_token", "sensitivity", "prefetch_accuracy",
                                                "budget_for_single_ratio", "mean_w2")},
        "budgets": budgets,
        "cost_aware_cache": cache_info,
        "rows": rows,
        "target": check_target(rows, model_cfg.num_experts_per_tok),
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def _fingerprint(ckpt: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(ckpt.glob("*.safetensors")) + [ckpt / "config.json", ckpt / "tokenizer.json"]:
        h.update(f.read_bytes())
    return h.hexdigest()


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """Linear interpolation on points sorted by x; None outside [min x, max x]."""
    pts = sorted(zip(xs, ys))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if pts and x == pts[-1][0]:
        return pts[-1][1]
    return None


def target_metric(top_k: int) -> tuple[str, str]:
    """(row key, label) of the target's x-axis: top-2's single-expert ratio (issue 4), or the
    share of expert uses saved at top-k > 2 (issue 15)."""
    return ("single_expert_ratio", "single-expert decisions") if top_k <= 2 else ("uses_saved", "fewer expert uses")


def check_target(rows: Sequence[dict[str, Any]], top_k: int = 2) -> dict[str, Any]:
    """The target per method: a measured point with >= 25% on the target's metric (single-expert
    ratio for top-2, expert uses saved for top-k > 2), perplexity within 1% of topk and below
    uniform's (interpolated) perplexity at that ratio."""
    key, label = target_metric(top_k)
    topk = next(r for r in rows if r["method"] == "topk")
    limit = topk["perplexity"] * (1 + TARGET_PPL_TOL)

    def curve(method: str) -> tuple[list[float], list[float]]:
        pts = [(0.0, topk["perplexity"])] + [(r[key], r["perplexity"]) for r in rows if r["method"] == method]
        return [p[0] for p in pts], [p[1] for p in pts]

    ux, uy = curve("uniform")
    out: dict[str, Any] = {"topk_perplexity": topk["perplexity"], "perplexity_limit": limit,
                           "metric": key, "metric_label": label, "min_ratio": TARGET_RATIO}
    for method in ("adaptive", "cost-aware"):
        mrows = [r for r in rows if r["method"] == method]
        if not mrows:
            continue
        mx, my = curve(method)
        points = []
        for r in mrows:
            u = _interp(ux, uy, r[key]) if len(ux) > 1 else None
            points.append({"budget": r["budget"], "ratio": r[key], "single_expert_ratio": r["single_expert_ratio"],
                           "experts_per_token": r["experts_per_token"], "perplexity": r["perplexity"],
                           "uniform_at_same_ratio": u, "within_1pct": r["perplexity"] <= limit,
                           "better_than_uniform": u is not None and r["perplexity"] < u})
        good = [p for p in points if p["ratio"] >= TARGET_RATIO and p["within_1pct"] and p["better_than_uniform"]]
        # largest ratio the curve keeps within 1% of topk (linear between measured points)
        best_ratio = 0.0
        pts = sorted(zip(mx, my))
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if y0 > limit:
                break
            best_ratio = x1 if y1 <= limit else x0 + (x1 - x0) * (limit - y0) / (y1 - y0)
            if y1 > limit:
                break
        out[method] = {
            "met": bool(good),
            "best_point": max(good, key=lambda p: p["ratio"]) if good else None,
            "max_ratio_within_1pct": best_ratio,
            "perplexity_at_25pct": _interp(mx, my, TARGET_RATIO),
            "uniform_perplexity_at_25pct": _interp(ux, uy, TARGET_RATIO) if len(ux) > 1 else None,
            "points": points,
        }
    out["met"] = bool(out.get("adaptive", {}).get("met") or out.get("cost-aware", {}).get("met"))
    return out


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    key, label = result["target"]["metric"], result["target"]["metric_label"]
    topk = next(r for r in rows if r["method"] == "topk")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"uniform": ("s--", "tab:gray"), "adaptive": ("o-", "tab:blue"), "cost-aware": ("^-", "tab:orange")}
    for method, (style, color) in styles.items():
        pts = sorted((r[key], r["perplexity"]) for r in rows if r["method"] == method)
        if not pts:
            continue
        pts = [(0.0, topk["perplexity"])] + pts
        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], style, color=color, label=method, ms=5)
    ax.axhline(topk["perplexity"], color="black", lw=1, label=f"topk ({topk['perplexity']:.2f})")
    ax.axhline(topk["perplexity"] * (1 + TARGET_PPL_TOL), color="black", lw=0.8, ls=":", label="topk + 1%")
    ax.axvline(100 * TARGET_RATIO, color="tab:red", lw=0.8, ls=":", label=f"25% {label}")
    ax.set_xlabel(f"{label} (%)")
    ax.set_ylabel("held-out perplexity")
    ev = result["eval"]
    fam = result.get("model_config", {}).get("family")
    ax.set_title(f"{fam or 'model'}: held-out perplexity vs {label} ({ev['tokens_scored']} tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    lines = ["| method | budget | single-expert ratio | experts/token | uses saved | perplexity | vs topk | "
             "est. loss/token | measured Δloss | scoring |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        b = "-" if r["budget"] is None else (f"W<{r['budget']:.3f}" if r["method"] == "uniform"
                                              else f"T={r['budget']:.3g}")
        lines.append(f"| {r['method']} | {b} | {100 * r['single_expert_ratio']:.1f}% | {r['experts_per_token']:.3f} | "
                     f"{100 * r['uses_saved']:.1f}% | {r['perplexity']:.3f} | {r['ppl_vs_topk_pct']:+.2f}% | "
                     f"{r['est_loss_per_token']:.4f} | {r['measured_delta_loss']:+.4f} | {r['scoring']} |")
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> str:
    t = result["target"]
    label = t["metric_label"]
    lines = [f"target: >= {TARGET_RATIO:.0%} {label}, perplexity <= {t['perplexity_limit']:.3f} "
             f"(topk {t['topk_perplexity']:.3f} + 1%), and below uniform at the same ratio"]
    for method in ("adaptive", "cost-aware"):
        m = t.get(method)
        if m is None:
            continue
        at25 = m["perplexity_at_25pct"]
        u25 = m["uniform_perplexity_at_25pct"]
        s = (f"  {method}: {'MET' if m['met'] else 'MISSED'}; within 1% of topk up to "
             f"{100 * m['max_ratio_within_1pct']:.1f}% {label}")
        if at25 is not None and u25 is not None:
            s += f"; at 25%: perplexity {at25:.3f} vs uniform {u25:.3f}"
        if m["best_point"]:
            p = m["best_point"]
            s += (f"; best point {100 * p['ratio']:.1f}% ({p['experts_per_token']:.2f} experts/token) at perplexity "
                  f"{p['perplexity']:.3f} (uniform {p['uniform_at_same_ratio']:.3f})")
        lines.append(s)
    lines.append(f"overall: {'MET' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: Path, name: str = "accuracy") -> tuple[Path, Path]:
    return _common.write_outputs(result, out_dir, name, plot)


def _own_args(ap: argparse.ArgumentParser) -> None:
    d = Settings()
    ap.add_argument("--family", default=None, choices=sorted(TRAIN_FAMILIES),
                    help="without --checkpoint: the demo model trained in this family's layout "
                         "(.demo/checkpoint-FAMILY; default: the Mixtral demo model)")
    ap.add_argument("--ratios", default=",".join(str(r) for r in d.ratios),
                    help="target ratios of the droppable expert uses (top-2: single-expert ratios) "
                         "the budgets are calibrated for")
    ap.add_argument("--methods", default=",".join(d.methods))
    ap.add_argument("--cost-aware-extra", default=",".join(f"{x:g}" for x in d.cost_aware_extra),
                    help="extra cost-aware points at these multiples of the largest calibrated T ('' = none)")
    ap.add_argument("--scoring", default=d.scoring, choices=["auto", "decode"],
                    help="auto: full forward for the per-token rules (checked against decode), decode for "
                         "cost-aware; decode: everything through the KV-cache decode path")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = _common.build_parser(__doc__.split("\n\n")[0], Settings(), "held-out tokens scored", _own_args)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = Settings(eval_tokens=args.eval_tokens, calib_tokens=args.calib_tokens, seq_len=args.seq_len,
                 ratios=_common.floats(args.ratios), methods=_common.names(args.methods),
                 cost_aware_extra=_common.floats(args.cost_aware_extra), scoring=args.scoring, device=args.device)
    if args.family is not None and args.checkpoint:
        raise ValueError("give --checkpoint or --family, not both")
    ckpt = find_checkpoint(args.checkpoint, family=args.family)
    ev, cal, info = heldout_split(s.heldout_mb)
    result = _common.run_in_tempdir("accuracy-", lambda work: run_accuracy(ckpt, work, s, ev, cal,
                                                                            progress=not args.no_progress))
    result["text"] = info
    report = ckpt / "train_report.json"
    if report.is_file():
        rep = json.loads(report.read_text())
        result["train_report"] = {"heldout": rep.get("heldout"), "settings": rep.get("settings")}
    result.update(_common.run_info("accuracy.py", argv, args.device, args.threads))
    js, png = write_outputs(result, Path(args.out_dir), "accuracy" if args.family in (None, "mixtral")
                            else f"accuracy-{args.family}")
    print()
    print(markdown(result))
    print()
    print(verdict(result))
    print(f"\n{result['eval']['tokens_scored']} held-out tokens scored ({result['eval']['windows']} windows of "
          f"{s.seq_len}); calibration on {result['calibration']['tokens']} other held-out tokens; "
          f"{result['seconds']:.0f} s. wrote {js} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
