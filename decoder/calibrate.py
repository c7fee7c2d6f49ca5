"""`moe-decoder calibrate`: measure what AdapMoE's gating and cache plan need, write a profile.

    moe-decoder calibrate --store DIR_OR_ADDR --model NAME --text FILE [--out profile.json]
                          [--tokens N] [--seq-len S] [--budget T] [--upload] [--wait-for-model]
                          [--max-ppl-rise PCT [--ppl-tokens N]]

Per layer l, over the calibration tokens t of the text file (teacher-forced windows):

- sensitivity F_l = mean over t and tail sizes m = 1..k-1 of 0.5 * (g_{l,t} . v_{t,m})^2, with
  g_{l,t} the gradient of the window's summed next-token loss (nats) w.r.t. layer l's MoE output
  at token t (autograd) and v_{t,m} = dy / W: the change of the MoE output when the token's m
  lowest-weight experts are dropped (and the rest reweighed as the family does), per unit of
  their renormalised weight W (decoder/gating.py derives it: W * (ybar_K - ybar_D), or
  -W * Z * ybar_D for a router that does not renormalise). So the loss rises by about
  F_l * W^2 (Fisher / second-order Taylor): adaptive gating drops the tail while F_l * W^2 < T.
  For top-2: v = E1 - E2 and the rule F_l * w2^2 < T.
- prefetch accuracy: recall of the cross-layer prediction (layer l's router applied to layer
  l-d's MoE input, decoder/experts/prefetch.py) at distances 1..3 (layer 0 cannot be predicted: 0).
- drop ratio at the budget T: the share of the droppable expert uses (all of a token's top-k
  but the first: (t, m) with F_l * W_m^2 < T) that adaptive gating drops, per layer
  (`single_expert_ratio`; for top-2 exactly the share of single-expert tokens), and the budgets
  that give overall ratios of 10/25/50 % (`budget_for_single_ratio`).
- expert popularity: share of top-k assignments per expert.
- with `--max-ppl-rise PCT`: the budget for a quality target rather than a drop ratio: the
  largest T on `budget_curve` (the budget at every 5% of drop ratio) whose adaptive gating
  keeps the perplexity on held-out text (the --text after the calibration tokens) within PCT of
  top-k's (`budget_for_ppl_rise`, with what was evaluated under `quality`); the decoder takes
  it as its default budget.

The profile is versioned JSON (`"schema": "adapmoe.profile"`, `"version": 1`); the store keeps
it next to the model as profile.json (`--upload`), where the decoder finds it (manifest.profile)
for adaptive gating and the cache plan.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:          # torch loads inside the functions: `calibrate --help` stays quick
    import torch

    from decoder.model.config import ModelConfig
    from decoder.model.transformer import MoEBlock, Transformer

PROFILE_SCHEMA = "adapmoe.profile"
PROFILE_VERSION = 1
RATIO_TARGETS = (0.1, 0.25, 0.5)
# Below this many calibration tokens `calibrate` warns: per-layer sensitivities are means over
# the tokens and the budgets quantiles of their decisions; from a few hundred tokens down they
# move with the text chosen (the default is 2048).
MIN_RELIABLE_TOKENS = 512


# --------------------------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------------------------
def validate_profile(profile: Any, num_layers: int | None = None, num_experts: int | None = None) -> dict:
    """Check a profile dict (or JSON text/bytes); returns the dict. ValueError with the reason."""
    if isinstance(profile, (bytes, bytearray, str)):
        try:
            profile = json.loads(profile)
        except ValueError as e:
            raise ValueError(f"profile is not valid JSON: {e}") from None
    if not isinstance(profile, Mapping):
        raise ValueError("profile must be a JSON object")
    if profile.get("schema") != PROFILE_SCHEMA:
        raise ValueError(f"not an AdapMoE profile (schema {profile.get('schema')!r})")
    v = profile.get("version")
    if v != PROFILE_VERSION:
        raise ValueError(f"profile version {v!r} is not supported (this decoder reads {PROFILE_VERSION})")
    L = profile.get("num_layers")
    if num_layers is not None and L != num_layers:
        raise ValueError(f"profile is for {L} layers, the model has {num_layers}")
    if num_experts is not None and profile.get("num_experts") != num_experts:
        raise ValueError(f"profile is for {profile.get('num_experts')} experts, the model has {num_experts}")
    for key in ("sensitivity", "prefetch_accuracy", "single_expert_ratio"):
        vals = profile.get(key)
        if not isinstance(vals, list) or len(vals) != L or not all(isinstance(x, (int, float)) and math.isfinite(x)
                                                                    and x >= 0 for x in vals):
            raise ValueError(f"profile field {key!r} must be {L} finite non-negative numbers")
    pop = profile.get("popularity")
    if not isinstance(pop, list) or len(pop) != L:
        raise ValueError("profile field 'popularity' must have one row per layer")
    quality = profile.get("budget_for_ppl_rise")
    if quality is not None:
        if not isinstance(quality, Mapping) or not quality or not all(
                _number(k) and 0 < float(k) < 1 and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                for k, v in quality.items()):
            raise ValueError("profile field 'budget_for_ppl_rise' must map rises in (0, 1) to finite budgets >= 0")
    return dict(profile)


def _number(text: Any) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
def calibrate_model(model: Transformer, windows: Sequence[torch.Tensor], budget: float | None = None,
                    max_distance: int = 3, progress: bool = False) -> dict[str, Any]:
    """Measure a Transformer (decoder.model.transformer) on token windows ([S] int64 tensors).

    Runs with autograd (the model's parameters are not trained: their grads are not kept).
    Returns the profile fields (without identification metadata).
    """
    import torch
    import torch.nn.functional as F

    from decoder.experts.prefetch import Prefetcher, layer_routers, router_variant
    from decoder.routing import MoEObserver, TopKGating

    cfg = model.config
    L, E, k = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
    if k < 2:
        raise ValueError("calibration needs a top-k >= 2 model (sensitivity is of dropping experts)")
    provider = model.experts
    old_gating = model.gating
    model.gating = TopKGating(k)

    class Recorder(MoEObserver):
        def __init__(self) -> None:
            self.x: dict[int, Any] = {}
            self.route: dict[int, tuple[Any, Any]] = {}

        def on_moe_input(self, layer, x):
            self.x[layer] = x.detach()

        def on_routing(self, layer, router_logits, weights, idx):
            self.route[layer] = (weights.detach(), idx.detach())

    rec = Recorder()
    routers, moe = layer_routers(model)
    norms = [model.layers[l].post_attention_layernorm.weight.detach() for l in range(L)]
    pred = Prefetcher(routers, None, top_k=k, lookahead=min(max_distance, max(1, L - 1)),
                      max_lookahead=min(max_distance, max(1, L - 1)), norm_weights=norms, moe_layers=moe,
                      router=router_variant(model))
    zs: dict[int, Any] = {}

    def make_hook(l):
        def hook(module, inputs, output):
            z = torch.zeros_like(output, requires_grad=True)
            zs[l] = z
            return output + z
        return hook

    handles = [model.layers[l].block_sparse_moe.register_forward_hook(make_hook(l)) for l in sorted(moe)]
    model.add_observer(rec)
    model.add_observer(pred)
    sens_sum = [0.0] * L
    tails_all: list[list[Any]] = [[] for _ in range(L)]    # per layer [S, k-1] dropped weights W_m
    pop = torch.zeros(L, E, dtype=torch.float64)
    tokens = 0
    loss_sum = 0.0
    params = [p for p in model.parameters()]
    req = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        it = windows
        if progress:
            from tqdm import tqdm
            it = tqdm(windows, desc="calibrate", unit="window")
        for ids in it:
            ids = ids.to(next(model.parameters()).device).view(1, -1)
            with torch.enable_grad():
                logits = model(ids)                                   # [1, S, V]
                loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
                moe_sorted = sorted(moe)
                grads = dict(zip(moe_sorted, torch.autograd.grad(loss, [zs[l] for l in moe_sorted])))
            S = ids.shape[1]
            loss_sum += float(loss.detach())
            tokens += S - 1
            with torch.no_grad():
                for l in moe_sorted:                                   # dense layers decide nothing
                    g = grads[l].reshape(S, -1)                          # [S, H]
                    w, idx = rec.route[l]                              # [S, k] weights as applied, ids
                    y = expert_outputs(model.layers[l].block_sparse_moe, provider, rec.x[l], idx)   # [S, k, H]
                    v, W = tail_directions(w, y, model.layers[l].block_sparse_moe)    # [S, k-1, H], [S, k-1]
                    # the last position has no next token: its gradient is 0 by construction,
                    # but it is a decision like any other; average over positions with a target
                    contrib = 0.5 * torch.einsum("sh,smh->sm", g.to(v.dtype), v) ** 2   # [S, k-1]
                    sens_sum[l] += float(contrib[:-1].mean(dim=1).sum())
                    tails_all[l].append(W[:-1].double().cpu())
                    pop[l] += torch.bincount(idx[:-1].flatten().cpu(), minlength=E).double()
    finally:
        for h in handles:
            h.remove()
        model.remove_observer(rec)
        model.remove_observer(pred)
        model.gating = old_gating
        for p, r in zip(params, req):
            p.requires_grad_(r)
    if tokens == 0:
        raise ValueError("calibration text is too short: no window with at least 2 tokens")

    sens = [s / tokens for s in sens_sum]
    tails = [torch.cat(v) if v else torch.zeros(0, k - 1, dtype=torch.float64) for v in tails_all]   # [N, k-1]
    est = torch.cat([(sens[l] * tails[l] ** 2).flatten() for l in range(L)])   # every droppable expert use
    budget_for = {}
    for r in RATIO_TARGETS:
        # smallest T with (F * W_m^2 < T) for a fraction >= r of the droppable expert uses
        q = float(torch.quantile(est, r)) if est.numel() else 0.0
        budget_for[str(r)] = math.nextafter(q, math.inf)
    # the budget at every 5% of drop ratio: what a quality target searches (budget_for_quality)
    curve = [[r / 100, math.nextafter(float(torch.quantile(est, r / 100)), math.inf) if est.numel() else 0.0]
             for r in range(5, 100, 5)]
    if budget is None:
        budget = budget_for["0.25"]
    single = [float((sens[l] * tails[l] ** 2 < budget).double().mean()) if tails[l].numel() else 0.0
              for l in range(L)]
    acc_by_d = {str(d): pred.accuracy_by_layer(d, per_token=True) for d in range(1, pred.max_lookahead + 1)}
    popularity = (pop / pop.sum(dim=1, keepdim=True).clamp_min(1)).tolist()
    return {
        "tokens": tokens,
        "loss_nats_per_token": loss_sum / tokens,
        "sensitivity": sens,
        "prefetch_accuracy": acc_by_d["1"],
        "prefetch_accuracy_by_distance": acc_by_d,
        "budget": float(budget),
        "single_expert_ratio": single,
        "budget_for_single_ratio": budget_for,
        "budget_curve": curve,
        "mean_w2": [float(v[:, 0].mean()) if v.numel() else 0.0 for v in tails],   # the last expert's weight
        "popularity": popularity,
    }


def windows_perplexity(logits_of: Any, windows: Sequence[Any]) -> tuple[float | None, list[float]]:
    """Teacher-forced perplexity over token `windows` ([S] each): logits_of(ids [S - 1]) ->
    logits [S - 1, V] predicting ids[1:]. (perplexity over all windows, each window's); (None,
    []) without windows."""
    import torch.nn.functional as F

    nll, n, per = 0.0, 0, []
    for w in windows:
        if w.numel() < 2:
            continue
        logits = logits_of(w[:-1]).float()
        x = float(F.cross_entropy(logits, w[1:].to(logits.device), reduction="sum"))
        nll += x
        n += w.numel() - 1
        per.append(math.exp(x / (w.numel() - 1)))
    return (math.exp(nll / n) if n else None), per


def perplexity(model: Transformer, windows: Sequence[Any], gating: Any) -> float:
    """Held-out perplexity of `model` over token `windows` with `gating` (teacher-forced)."""
    import torch

    old = model.gating
    model.gating = gating
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            ppl, _ = windows_perplexity(lambda ids: model(ids.to(device).view(1, -1))[0],
                                        [w.reshape(-1) for w in windows])
    finally:
        model.gating = old
    if ppl is None:
        raise ValueError("no held-out window with at least 2 tokens")
    return ppl


def budget_for_quality(model: Transformer, windows: Sequence[torch.Tensor], measured: Mapping[str, Any],
                       max_rise: float, progress: bool = False) -> dict[str, Any]:
    """The largest budget T of `measured["budget_curve"]` (the most experts dropped) whose
    adaptive gating keeps the perplexity over `windows` within `max_rise` (0.01 = 1%) of top-k's:
    a bisection over the curve (perplexity grows with the drop ratio). Returns max_ppl_rise,
    budget, drop_ratio (the calibration's share of droppable uses dropped at T: 0 when none is
    within the target), ppl_topk, ppl_at_budget, tokens and every (ratio, T, ppl) evaluated."""
    from decoder.gating import make_gating
    from decoder.routing import TopKGating

    if not 0 < max_rise < 1:
        raise ValueError(f"the perplexity rise must be in (0, 1) (0.01 = 1%), got {max_rise}")
    cfg = model.config
    curve = measured["budget_curve"]
    base = perplexity(model, windows, TopKGating(cfg.num_experts_per_tok))
    evaluated: list[list[float]] = []

    def ppl_at(i: int) -> float:
        ratio, T = curve[i]
        g = make_gating("adaptive", config=cfg, budget=T, sensitivity=measured["sensitivity"])
        p = perplexity(model, windows, g)
        evaluated.append([ratio, T, p])
        if progress:
            print(f"  drop ratio {ratio:.0%} (T={T:.3g}): perplexity {p:.4f} ({p / base - 1:+.2%} vs top-k)",
                  file=sys.stderr, flush=True)
        return p

    lo, hi, best = 0, len(curve) - 1, None     # the answer is the last index within the target
    while lo <= hi:
        mid = (lo + hi) // 2
        p = ppl_at(mid)
        if p <= (1 + max_rise) * base:
            best, lo = (mid, p), mid + 1
        else:
            hi = mid - 1
    (ratio, T), ppl = (curve[best[0]], best[1]) if best is not None else ((0.0, 0.0), base)   # T=0: top-k
    return {"max_ppl_rise": max_rise, "budget": T, "drop_ratio": ratio, "ppl_topk": base, "ppl_at_budget": ppl,
            "tokens": sum(int(w.numel()) - 1 for w in windows), "evaluated": evaluated}


def expert_outputs(moe: MoEBlock, provider: Any, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Each token's top-k expert outputs as the block computes them (GPT-OSS biases and clamps
    included). moe: the layer's MoEBlock; x: [S, H]; idx: [S, k] -> [S, k, H] float32."""
    import torch

    S, k = idx.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    y = torch.zeros(S, k, x.shape[1], dtype=dtype, device=x.device)
    used = torch.unique(idx).tolist()
    for e in used:
        sel = (idx == e).nonzero()                                     # [n, 2]: (token, slot)
        y[sel[:, 0], sel[:, 1]] = moe.expert(e, provider.get(moe.layer, e), x[sel[:, 0]]).to(dtype)
    provider.release(moe.layer, used)
    return y


def tail_directions(w: torch.Tensor, y: torch.Tensor, moe: MoEBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE output's change per unit of dropped decision weight when a token's m last experts go.

    w: [S, k] the weights the block applied (descending), y: [S, k, H] the experts' outputs,
    moe: the layer's MoEBlock -> (v [S, k-1, H], W [S, k-1]) for m = 1..k-1: dy_m the exact output
    change (a renormalising router rescales the kept weights by sum(w) / sum(kept w); one that
    does not keeps them), W_m = `decision_tails` (what the gating compares), v = dy / W.

    v is formed from weighted means, not by dividing dy by W: with D the dropped experts (applied
    weight T_D, weighted mean output ybar_D) and K the kept ones (ybar_K), a renormalising router
    gives dy = T_D (ybar_K - ybar_D) and W = T_D / sum(w), so v = sum(w) (ybar_K - ybar_D); one
    that does not gives dy = -T_D ybar_D and W = T_D / c (c: the routed scaling factor of a
    sigmoid router, else 1), so v = -c ybar_D. Dividing dy by a W of 1e-38 (a random router's
    tail in float32) would multiply dy's rounding error by 1e38 and overflow (g . v)^2. A tail
    of weight exactly 0 takes the plain mean of its outputs (dy / W has no limit there; F W^2
    is 0)."""
    import torch

    S, k = w.shape
    w = w.to(y.dtype)
    W = decision_tails(moe, w)                                         # [S, k-1]
    if moe.renormalize:
        ratio = w.sum(dim=1)                                           # T_D / W_m = sum(w)  [S]
    else:
        ratio = torch.full((S,), float(moe.scaling) if moe.scores == "sigmoid" else 1.0, dtype=y.dtype,
                           device=y.device)
    out_v = []
    for m in range(1, k):
        kept, tail = w[:, :k - m], w[:, k - m:]                        # [S, k-m], [S, m]
        tail_w = tail.sum(dim=1, keepdim=True)                         # [S, 1]
        some = tail_w > 0
        share = torch.where(some, tail / torch.where(some, tail_w, 1.0), torch.full_like(tail, 1.0 / m))
        ybar_d = (share[..., None] * y[:, k - m:]).sum(dim=1)          # [S, H]
        if moe.renormalize:
            ybar_k = (kept[..., None] * y[:, :k - m]).sum(dim=1) / kept.sum(dim=1, keepdim=True)
            out_v.append(ratio[:, None] * (ybar_k - ybar_d))
        else:
            out_v.append(-ratio[:, None] * ybar_d)
    return torch.stack(out_v, dim=1), W


def decision_tails(moe: MoEBlock, w: torch.Tensor) -> torch.Tensor:
    """W_m, m = 1..k-1: the decision weight of a token's m last experts, as the gating sees it
    (decoder/gating.py). moe: the layer's MoEBlock; w: [S, k] the weights it applied -> [S, k-1]:
    their share of the top-k's when the family renormalises, else the router weights themselves
    (the routed scaling factor of a sigmoid router taken out: the gating sees the scores)."""
    if moe.renormalize:
        d = w / w.sum(dim=1, keepdim=True)
    else:
        d = w / moe.scaling if moe.scores == "sigmoid" else w
    return d.flip(-1).cumsum(-1)[:, :-1]


def token_windows(ids: Sequence[int], seq_len: int, max_tokens: int) -> list[Any]:
    """Non-overlapping windows of seq_len tokens covering up to max_tokens tokens."""
    import torch

    if seq_len < 2:
        raise ValueError("--seq-len must be >= 2")
    ids = list(ids)[:max_tokens]
    out = [torch.tensor(ids[i:i + seq_len], dtype=torch.long) for i in range(0, len(ids), seq_len)]
    return [w for w in out if w.numel() >= 2]


def build_profile(model_name: str, measured: Mapping[str, Any], config: ModelConfig, *, text_file: str | None,
                  seq_len: int) -> dict[str, Any]:
    return {
        "schema": PROFILE_SCHEMA,
        "version": PROFILE_VERSION,
        "model": model_name,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "text_file": os.path.basename(text_file) if text_file else None,
        "seq_len": seq_len,
        "num_layers": config.num_hidden_layers,
        "num_experts": config.num_local_experts,
        "top_k": config.num_experts_per_tok,
        **measured,
    }


def upload_profile(store: Any, client: Any, model: str, data: bytes, **replica_options: Any) -> str:
    """Put profile.json next to the model: PutBlob to every replica of a gRPC client (each
    serves the model's manifest, and with it the profile, on its own: `pack --placement all`
    puts the model on all of them), the local client's ModelStore (`put_file`), or a store
    directory. replica_options: token/TLS/deadline of the per-replica clients."""
    import xxhash

    digest = xxhash.xxh3_128_hexdigest(data)
    if client is not None and callable(getattr(client, "replicas", None)):
        from expert_store.client import GrpcStoreClient

        addresses = client.replicas()
        for address in addresses:
            with GrpcStoreClient([address], target=address, **replica_options) as one:
                one.put(model, "profile", data)
        return f"{len(addresses)} replica(s): {', '.join(addresses)}"
    if client is not None and callable(getattr(client, "put", None)):
        client.put(model, "profile", data)
        return "store"
    local = getattr(client, "store", None)
    if local is not None and callable(getattr(local, "put_file", None)):
        local.put_file(model, "profile", data, digest)
        return "store"
    if isinstance(store, (str, os.PathLike)) and Path(store).is_dir():
        from expert_store.store import ModelStore

        with ModelStore.open(store, ram_bytes=0) as ms:
            ms.put_file(model, "profile", data, digest)
        return str(store)
    raise ValueError("cannot upload the profile: the store client cannot write and --store is not a directory")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def parse_rise(text: str) -> float:
    """'1%' or '0.01' -> 0.01: a perplexity rise in (0, 1)."""
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r} (e.g. 1%)") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"the rise must be in (0%, 100%), got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-decoder calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="store directory or gRPC address")
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True, help="calibration text file (UTF-8)")
    p.add_argument("--out", default=None, help="write the profile JSON here (default: profile.json)")
    p.add_argument("--upload", action="store_true", help="store the profile next to the model (profile.json)")
    p.add_argument("--tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-ppl-rise", type=parse_rise, default=None, metavar="PCT",
                   help="also find the budget T that drops the most experts while the perplexity on held-out "
                        "text (the --text after the calibration tokens) stays within PCT of top-k's, e.g. 1%%; "
                        "stored as budget_for_ppl_rise, the decoder's default budget then")
    p.add_argument("--ppl-tokens", type=int, default=2048,
                   help="held-out tokens for --max-ppl-rise (default 2048)")
    p.add_argument("--budget", type=float, default=None,
                   help="budget T for the recorded single-expert ratio (default: the T giving 25%%)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "int8", "int4"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--store-token-file", default=None, metavar="F",
                   help="bearer token sent to the store (default: $EXPERT_STORE_TOKEN, if set)")
    p.add_argument("--store-tls-ca", default=None, metavar="F", help="CA (PEM) of the store's TLS certificate")
    p.add_argument("--store-tls-server-name", default=None, help="expected name in the store's certificate")
    p.add_argument("--store-deadline", type=float, default=30.0, help="seconds per store RPC attempt")
    p.add_argument("--wait-for-model", action="store_true",
                   help="wait for the model to appear in the store (and for the store to be reachable) "
                        "before calibrating, as `moe-decoder serve --wait-for-model` does: a calibrate Job "
                        "may start before the pack Job is done")
    p.add_argument("--wait-timeout", type=float, default=None, metavar="S",
                   help="with --wait-for-model: give up (exit 1) after S seconds (default: wait forever)")
    from expert_store.cli import show_defaults

    return show_defaults(p)  # --help lists the defaults


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    import torch

    from decoder.engine import Engine

    from decoder.cli import quiet_store_retries, read_store_token, refuse_checkpoint_dir
    from expert_store.client import StoreClient

    if args.tokens < 2:
        raise ValueError("--tokens must be >= 2")
    if args.wait_timeout is not None and not args.wait_for_model:
        raise ValueError("--wait-timeout goes with --wait-for-model")
    refuse_checkpoint_dir(args.store)
    text = Path(args.text).read_text(encoding="utf-8")
    store_options = {"token": read_store_token(args.store_token_file), "tls_ca": args.store_tls_ca,
                     "tls_server_name": args.store_tls_server_name, "deadline_s": args.store_deadline}

    def open_client() -> Any:
        return StoreClient.open(args.store, **store_options)

    def load(client: Any) -> Engine:
        return Engine.from_store(client, args.model, device=args.device, dtype=torch.float32,
                                 precision=args.precision, prefetch=False)

    if args.wait_for_model:
        import logging

        from decoder.serving.waiter import ModelWaiter

        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        waiter = ModelWaiter(args.model, args.store, open_client, timeout_s=args.wait_timeout)
        try:
            engine = waiter.run(load)
        except BaseException:
            waiter.close()
            raise
        client = waiter.client
    else:
        with quiet_store_retries():
            client = open_client()
            try:
                engine = load(client)
            except BaseException:
                client.close()
                raise
    try:
        if engine.tokenizer is None:
            raise ValueError(f"model {args.model!r} has no tokenizer in the store")
        ids = engine.tokenizer.encode(text)
        windows = token_windows(ids, args.seq_len, args.tokens)
        measured = calibrate_model(engine.model, windows, budget=args.budget, progress=not args.no_progress)
        if measured["tokens"] < MIN_RELIABLE_TOKENS:
            print(few_tokens_warning(measured["tokens"]), file=sys.stderr, flush=True)
        if args.max_ppl_rise is not None:
            held = token_windows(ids[args.tokens:], args.seq_len, args.ppl_tokens) if len(ids) > args.tokens else []
            n_held = sum(int(w.numel()) - 1 for w in held)
            if not held:
                print("moe-decoder calibrate: warning: no text after the calibration tokens: the quality budget "
                      "is measured on the calibration text itself (give a longer --text)", file=sys.stderr, flush=True)
                held = windows
            elif n_held < MIN_RELIABLE_TOKENS // 2:
                print(f"moe-decoder calibrate: warning: the quality budget rests on {n_held} held-out tokens: "
                      f"its perplexities are noisy (give a longer --text)", file=sys.stderr, flush=True)
            q = budget_for_quality(engine.model, held, measured, args.max_ppl_rise, progress=not args.no_progress)
            measured["budget_for_ppl_rise"] = {str(args.max_ppl_rise): q["budget"]}
            measured["quality"] = q
        profile = build_profile(args.model, measured, engine.config, text_file=args.text, seq_len=args.seq_len)
        validate_profile(profile, engine.config.num_hidden_layers, engine.config.num_local_experts)
        data = (json.dumps(profile, indent=1) + "\n").encode()
        out = args.out or ("profile.json" if not args.upload else None)
        if out:
            Path(out).write_bytes(data)
            print(f"wrote {out}")
        if args.upload:
            where = upload_profile(args.store, client, args.model, data, **store_options)
            print(f"stored profile.json for {args.model} in {where}")
        print(format_profile(profile))
    finally:
        engine.close()
        client.close()
    return 0


def few_tokens_warning(tokens: int) -> str:
    """The one line `calibrate` prints when its profile rests on too few tokens."""
    return (f"moe-decoder calibrate: warning: this profile comes from only {tokens} tokens (fewer than "
            f"{MIN_RELIABLE_TOKENS}): its sensitivities and budgets are noisy; calibrate on more held-out "
            f"text (a longer --text file, --tokens)")


def format_profile(p: Mapping[str, Any]) -> str:
    lines = [f"calibration of {p['model']}: {p['tokens']} tokens, loss {p['loss_nats_per_token']:.4f} nats/token, "
             f"budget T={p['budget']:.3g}",
             f"{'layer':>5} {'F_l':>12} {'prefetch acc':>12} {'single@T':>9} {'mean w2':>8}"]
    for l in range(p["num_layers"]):
        lines.append(f"{l:>5} {p['sensitivity'][l]:>12.4g} {p['prefetch_accuracy'][l]:>12.3f} "
                     f"{p['single_expert_ratio'][l]:>9.3f} {p['mean_w2'][l]:>8.3f}")
    lines.append("budget for single-expert ratio: " +
                 ", ".join(f"{float(r):.0%}: T={t:.3g}" for r, t in p["budget_for_single_ratio"].items()))
    q = p.get("quality")
    if q:
        lines.append(f"budget for a perplexity rise <= {q['max_ppl_rise']:.2%}: T={q['budget']:.3g}, dropping "
                     f"{q['drop_ratio']:.0%} of the droppable expert uses (perplexity {q['ppl_at_budget']:.4f} vs "
                     f"top-k {q['ppl_topk']:.4f} on {q['tokens']} held-out tokens; the decoder's default budget)")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
