"""Cross-layer expert prefetching (AdapMoE §4.2): predict the next layers' experts early.

At layer l's MoE input x_l (hook `on_moe_input`), the routers of layers l+1..l+k are applied to
x_l to predict which experts those layers will pick; the predictions go to the expert cache as
speculative loads (`provider.prefetch`), ordered by predicted weight and distance (nearer first).
With `issue_after_demand` (what the engine uses) they go out only once layer l's MoE block has
asked for its own experts (hook `on_demand_issued`): the predictions need x_l, which exists
before layer l's routing, but a prefetch copy started then would sit on the host->GPU link
ahead of layer l's demand loads, and a copy in flight cannot be pre-empted. The predictions
are then also READ only there: their kernels are queued at x_l, the block's own routing read
waits for them anyway, so the prefetcher adds no host<->GPU synchronisation of its own.
The residual stream changes little between adjacent layers, so this is accurate at distance 1
and degrades with distance. Predictions follow each family's router: its logit bias (GPT-OSS),
and a sigmoid router's choice (DeepSeek-V3: sigmoid scores + e_score_correction_bias, the best
topk_group of n_group groups), weighed by the picked scores renormalised, as the block weighs. x_l is normalised with layer l's post-attention RMSNorm weight;
with `renorm` the prediction for layer j rescales it by w_j / w_l, i.e. applies layer j's norm
weight to the same residual stream (exact if the stream did not change).

k adapts: with t_load = the cache's live EWMA cost of loading the most expensive predicted
expert from where it is now, and t_compute = the measured compute time of one layer,
k = ceil(t_load / t_compute), clamped to [1, min(max_lookahead, layers left after l)]: a load
that takes longer than a layer must start that many layers earlier to be hidden.
t_compute is an EWMA of the time between consecutive MoE inputs MINUS the time the layer spent
blocked waiting for expert loads (the delta of the cache's `stall_seconds()` over the same
interval). The wall time between MoE inputs (`layer_time_s`) must not be used: on a slow store
it is dominated by exactly the stalls prefetching should hide, so t_load / t_layer stays near 1
and k never grows. (On CUDA a wait on a copy event happens on the GPU, not in `get`; those
H2D waits are short and stay inside t_compute.)

What is issued depends on `policy`:

- "budget" (the default): a link budget. The H2D link moves about t_compute / t_load experts
  while one layer computes; issuing more only queues speculative bytes in front of the demand
  loads of the coming layers (the cache runs demand before queued prefetches but cannot preempt
  a copy in flight), and on a transfer-bound model every wasted prefetch is paid in full. So at
  layer l the candidates are the predicted (target j = l+d, expert e) pairs for d <= k, ranked
  by predicted weight / d (ties: nearer first); those already on the GPU and those with a
  predicted weight below `min_score` are dropped, and the best ones are issued while their
  summed load cost (the cache's `load_cost` of each candidate's own location: a host-tier and a
  store-tier expert cost differently) fits in one layer's compute time t_compute, at least one:
  n = max(1, floor(t_compute / t_load)) for equal costs. Before t_compute is measured (or when
  the provider has no load costs) at most top_k per target layer are issued (with adaptive k
  that is top_k at distance 1, as with "all"). The calls are grouped per target layer.
  min_score = 0.3 because the top-k weights are renormalised over the k picked: a second expert
  below 0.3 trails the first by more than ln(7/3) = 0.85 in logit, the least stable prediction
  (with a Mixtral-shaped random router, logits of std ~1.3 over 8 experts, a third of the second
  picks are that weak), and it is exactly the one adaptive gating
  tends to drop (its sensitivity x w2^2 is small), so its load is the most likely to be wasted.
  The top-1 prediction (weight >= 1/k) always passes for k <= 3. At top-k the weights spread
  over k experts, so the floor scales with 2/k (`score_floor`: 0.15 at top-4, 0.075 at top-8):
  the same weight relative to an even split.
- "all": every predicted expert of every target d <= k (the behaviour before the budget).

Store lookahead (a host tier in front of a store, `ExpertCache.prefetch_host`): a prediction
for an expert in neither the GPU nor the host tier also starts a store fetch into the host tier
(lowest priority, bounded in flight by the cache), far enough ahead to hide the store: with
t_store = the cache's live EWMA of one store fetch (`store_fetch_cost`) and t_compute as above,
k_store = ceil(t_store / t_compute), clamped to [1, max_store_lookahead] (default: the model's
layer count, i.e. up to one token ahead). Targets past the last layer wrap into the NEXT token
(layer l + d - L, predicted from the same hidden state with that layer's router: the residual
stream of one token predicts the next one's experts only partly, but a fetch that takes several
layers cannot start any later). These predictions are made on the device with the others (the
captured step reads them with its routing: `static_distance` covers the store horizon); their
targets of this token (d <= the layers left) are the same predictions the GPU plan checks.
Counted: `store_lookahead_hist`, `store_prefetches` (asked of the cache), `store_prefetches_next_token`
and how many of the experts asked for the next token it used (`store_next_token_precision` over
`store_next_token_checked`);
the cache counts what was fetched and used (host_prefetch_*).

Nothing is predicted when there is nothing to load: with adaptive k, when every expert of layer
l+1 is on the GPU (k would be 1 and its loads free); with a fixed k, when layers l+1..l+k all
are (counted as `skipped_resident`; those layers add no precision/recall samples).

Each prediction is checked against the layer's actual routing (hook `on_routing_host`, the
host copy the MoE block reads anyway): precision =
|predicted ∩ used| / |predicted|, recall = |predicted ∩ used| / |used|, per target layer and
per distance. These measure the PREDICTION (every distance up to the lookahead bound, issued or
not; the cache plan reads them through `accuracy_by_layer`). What was issued is checked the
same way: `issued_precision` = |issued ∩ used| / |issued|, `issued_recall` = |issued ∩ used| /
|used| over the target layers predicted in that step, `issued_per_layer` per target layer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from decoder.routing import MoEObserver, group_limited


POLICIES = ("budget", "all")


@dataclass(frozen=True)
class RouterVariant:
    """What a family's router adds to W x (decoder.model.transformer.MoEBlock.route): per-layer
    logit biases [E] (GPT-OSS), or sigmoid scores chosen with per-layer correction biases [E]
    and group-limited top-k (DeepSeek-V3). Dense layers hold zeros."""

    bias: Sequence[torch.Tensor] | None = None
    sigmoid: bool = False
    correction: Sequence[torch.Tensor] | None = None
    n_group: int = 1
    topk_group: int = 1


class Prefetcher(MoEObserver):
    stats_name = "prefetch"

    def __init__(self, routers: Sequence[torch.Tensor], provider: Any = None, *, top_k: int = 2,
                 lookahead: int | None = None, max_lookahead: int = 3,
                 norm_weights: Sequence[torch.Tensor] | None = None, renorm: bool = True,
                 ewma_alpha: float = 0.3, enabled: bool = True, policy: str = "budget",
                 min_score: float = 0.3, issue_after_demand: bool = False,
                 skip_miss_rate: float | None = None, moe_layers: Sequence[int] | None = None,
                 router: RouterVariant | None = None, max_store_lookahead: int | None = None,
                 gpu: bool = True, clock: Callable[[], float] = time.perf_counter) -> None:
        """routers[j]: layer j's router weight [E, H]. provider: the expert cache (None = only
        measure predictions). lookahead: fixed k (None = adaptive up to max_lookahead).
        policy: "budget" (issue what the link can move during one layer, see the module
        docstring) or "all" (every prediction up to distance k). min_score: with "budget", the
        least predicted weight worth a prefetch. issue_after_demand: hold the loads predicted at
        layer l's input until the MoE block has asked for layer l's own experts
        (`on_demand_issued`), so a prefetch copy never starts ahead of that demand on the one
        host->GPU link (the engine turns this on; called without a MoE block, e.g. by tests,
        the loads go out at once). skip_miss_rate: predict nothing for a layer whose next layer's
        recent demand miss rate (provider.miss_rate) is below this (None: always predict).
        router: the family's router beyond W x (biases, sigmoid choice; None: softmax of W x).
        max_store_lookahead: the farthest (in layers, wrapping into the next token) a store fetch
        into the host tier is started for a predicted host-tier miss (None: the layer count when
        the provider has host-tier prefetch, `prefetch_host` with `host_prefetch` > 0; 0: none).
        gpu: prefetch into the GPU tier (False: only the store lookahead into the host tier; on a
        link-bound GPU a wrong guess costs a copy and evicts an expert recency would have kept,
        see benchmarks/README "Against lru").
        clock: the time source of the layer timings (tests pass a fake one)."""
        self.skip_miss_rate = skip_miss_rate
        # layers with routed experts (a dense layer is never a prefetch target): moe_layers
        self.routers = list(routers)
        self.L = len(self.routers)
        self.moe_layers = set(range(self.L)) if moe_layers is None else {int(l) for l in moe_layers}
        self.E = int(self.routers[0].shape[0]) if self.L else 0
        self.provider = provider
        self.top_k = int(top_k)
        if max_lookahead < 1:
            raise ValueError("max_lookahead must be >= 1")
        if lookahead is not None and lookahead < 1:
            raise ValueError("lookahead must be >= 1")
        if policy not in POLICIES:
            raise ValueError(f"unknown prefetch policy {policy!r} (expected one of {POLICIES})")
        self.policy = policy
        self.min_score = float(min_score)
        self.score_floor = self.min_score * 2.0 / max(2, self.top_k)   # min_score for top-2, scaled by 2/k
        self.router = router or RouterVariant()
        self.fixed_k = lookahead
        self.max_lookahead = int(max(max_lookahead, lookahead or 1))
        self.norm_weights = list(norm_weights) if norm_weights is not None else None
        self.renorm = renorm and self.norm_weights is not None
        self.alpha = float(ewma_alpha)
        self.enabled = enabled
        self.gpu = bool(gpu)
        if max_store_lookahead is None:
            max_store_lookahead = (self.L if provider is not None and getattr(provider, "host_prefetch", 0)
                                   and hasattr(provider, "prefetch_host") else 0)
        if max_store_lookahead and (provider is None or not hasattr(provider, "prefetch_host")):
            raise ValueError("max_store_lookahead needs a provider with prefetch_host (an ExpertCache)")
        self.max_store_lookahead = max(0, min(int(max_store_lookahead), self.L))
        self._targets: dict[tuple[int, int, Any], torch.Tensor] = {}   # (layer, D, device) -> target layers
        self._last_layer = math.inf
        self._last_t = 0.0
        self._last_stall = 0.0
        self._clock = clock
        self.layer_time_s: float | None = None      # EWMA wall time per layer (stalls included)
        self.compute_time_s: float | None = None    # EWMA per layer, stalls on expert loads excluded
        # predictions for the current step: target layer -> [(distance, set of experts, per-token idx [T, k])]
        self._pending: dict[int, list[tuple[int, set[int], list[list[int]]]]] = {}
        self._issued_pending: dict[int, set[int]] = {}   # target layer -> experts issued for it this step
        self.issue_after_demand = bool(issue_after_demand)
        self._deferred: tuple[int, int, Any, int] | None = None   # (layer, D, predictions, GPU D) waiting for its demand
        self._stack: torch.Tensor | None = None        # routers [L, E, H] on the compute device
        self._takes_uses: bool | None = None           # the provider's prefetch takes `uses`
        self.min_measured = 32                         # predictions checked before a precision counts
        self._ratio: list[torch.Tensor] = []           # per layer l: norm[l+1 .. l+D] / norm[l], [D, H]
        self.reset_stats()

    # --- statistics -----------------------------------------------------------------------------
    def reset_stats(self) -> None:
        D = self.max_lookahead
        self._pred = [[0] * (D + 1) for _ in range(self.L)]    # predicted experts  [layer][distance]
        self._used = [[0] * (D + 1) for _ in range(self.L)]    # used experts, for checked predictions
        self._tp = [[0] * (D + 1) for _ in range(self.L)]      # predicted and used
        # per token (the same for one-token decode steps; differs for prefill/scoring)
        self._tok_used = [[0] * (D + 1) for _ in range(self.L)]
        self._tok_tp = [[0] * (D + 1) for _ in range(self.L)]
        self._k_hist = [0] * (D + 1)
        self._issued = 0
        self._skipped = 0          # layers whose lookahead targets were all on the GPU: nothing predicted
        self._skipped_low_miss = 0  # layers skipped because the next layer rarely missed lately
        self._issued_layer = [0] * self.L     # experts issued per target layer
        self._issued_tp = 0                   # issued and used by their target layer
        self._issued_checked = 0              # issued for a target layer whose routing was seen
        self._issued_used = 0                 # used experts of the target layers predicted
        self._inputs = 0                      # MoE inputs that considered prefetching
        self._max_issued = 0                  # the most experts issued at one MoE input
        self._dropped = {"resident": 0, "low_score": 0, "budget": 0}
        self._deferred_count = 0              # plans held until their layer's demand was issued
        self._store_k_hist = [0] * (self.max_store_lookahead + 1)
        self._store_issued = 0                # predicted host-tier misses the cache queued a store fetch for
        self._store_next_token = 0            # of those, for the next token's layers
        self._store_dropped_low = 0           # store-tier predictions below the score floor
        self._next_asked: dict[int, set[int]] = {}     # this step's store fetches for the next token's layers
        self._next_check: dict[int, set[int]] = {}     # the last step's, checked against this step's routing
        self._next_hits = 0                   # next-token store fetches the next token used
        self._next_checked = 0                # next-token store fetches checked

    def stats(self) -> dict[str, Any]:
        def pr(tp: int, pred: int, used: int) -> dict[str, float]:
            return {"precision": tp / pred if pred else 0.0, "recall": tp / used if used else 0.0,
                    "predicted": pred, "used": used, "hits": tp}

        D = self.max_lookahead
        per_layer = [pr(sum(self._tp[l]), sum(self._pred[l]), sum(self._used[l])) for l in range(self.L)]
        per_distance = {d: pr(sum(self._tp[l][d] for l in range(self.L)), sum(self._pred[l][d] for l in range(self.L)),
                              sum(self._used[l][d] for l in range(self.L))) for d in range(1, D + 1)}
        tot = pr(sum(map(sum, self._tp)), sum(map(sum, self._pred)), sum(map(sum, self._used)))
        tu = sum(map(sum, self._tok_used))
        tot["token_recall"] = sum(map(sum, self._tok_tp)) / tu if tu else 0.0
        return {**tot, "gpu": self.gpu, "per_layer": per_layer, "per_distance": per_distance,
                "lookahead_hist": {k: n for k, n in enumerate(self._k_hist) if k and n},
                "prefetches_issued": self._issued,
                "issued_per_layer": list(self._issued_layer),
                "issued_per_input": self._issued / self._inputs if self._inputs else 0.0,
                "issued_max_per_input": self._max_issued,
                "issued_after_demand": self._deferred_count,
                "issued_hits": self._issued_tp,
                "issued_precision": self._issued_tp / self._issued_checked if self._issued_checked else 0.0,
                "issued_recall": self._issued_tp / self._issued_used if self._issued_used else 0.0,
                "dropped_resident": self._dropped["resident"],
                "dropped_low_score": self._dropped["low_score"],
                "dropped_budget": self._dropped["budget"],
                "skipped_resident": self._skipped,
                "skipped_low_miss": self._skipped_low_miss,
                "layer_time_s": self.layer_time_s or 0.0,
                "layer_compute_s": self.compute_time_s or 0.0,
                "max_store_lookahead": self.max_store_lookahead,
                "store_lookahead_hist": {k: n for k, n in enumerate(self._store_k_hist) if k and n},
                "store_prefetches": self._store_issued,
                "store_prefetches_next_token": self._store_next_token,
                "store_dropped_low_score": self._store_dropped_low,
                "store_next_token_checked": self._next_checked,
                "store_next_token_precision": self._next_hits / self._next_checked if self._next_checked else None,
                "store_fetch_s": self._store_cost() or 0.0}

    def accuracy_by_layer(self, distance: int = 1, per_token: bool = True) -> list[float]:
        """Per-layer recall at `distance` (the 'prefetch accuracy' of the cache plan): per token
        (each token's predicted top-k vs the experts it used), or over the set of experts a
        whole forward step used (what the cache sees)."""
        tp, used = (self._tok_tp, self._tok_used) if per_token else (self._tp, self._used)
        return [tp[l][distance] / used[l][distance] if used[l][distance] else 0.0 for l in range(self.L)]

    # --- hooks ----------------------------------------------------------------------------------
    def on_moe_input(self, layer: int, x: torch.Tensor) -> None:
        D = self._enter(layer)
        if D is None:
            return
        with torch.no_grad():
            packed = self._predict_device(layer, x, D)                 # [D, T, 2k], not read yet
        self._predicted(layer, D, packed, self._gpu_D)

    def static_distance(self, layer: int) -> int:
        """How many layers ahead predictions made at `layer` reach when not skipped (0: none).
        A captured decode step computes that many on the device, every step (`predict_device`)."""
        if not self.enabled:
            return 0
        gpu = min(self.fixed_k or self.max_lookahead, self.L - 1 - layer) if layer + 1 < self.L and self.gpu else 0
        return max(gpu, self.max_store_lookahead)

    def predict_device(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """[D, T, 2k] predictions of layers layer+1 .. layer+D (D = static_distance) from x,
        without reading them: the captured step reads them with its routing."""
        D = self.static_distance(layer)
        return self._predict_device(layer, x, D) if D else None

    def on_moe_input_read(self, layer: int, packed: list | None) -> None:
        """on_moe_input for a caller that computed `predict_device` itself and read it ([D][T][2k]
        host lists, or None when it computed none): the same timing, skipping and issuing."""
        D = self._enter(layer)
        if D is None or packed is None:
            return
        self._predicted(layer, D, packed[:D], self._gpu_D)

    def _enter(self, layer: int) -> int | None:
        """Per-layer bookkeeping at the MoE input of `layer` (timing, a new step, the deferred
        issue of the layer before); the distance D to predict, or None when nothing is needed."""
        if self._deferred is not None:        # its layer never reported its demand: send it now
            deferred, self._deferred = self._deferred, None
            self._complete(*deferred)
        now = self._clock()
        stall = self._stall_total()
        if layer <= self._last_layer:
            self._pending.clear()            # a new forward step
            self._issued_pending.clear()
            # the store fetches asked for this step's layers by the last one are checked now
            self._next_check, self._next_asked = self._next_asked, {}
        elif layer == self._last_layer + 1:
            dt = now - self._last_t
            blocked = min(dt, max(0.0, stall - self._last_stall))   # waiting for expert loads
            self.layer_time_s = self._ewma(self.layer_time_s, dt)
            self.compute_time_s = self._ewma(self.compute_time_s, dt - blocked)
        self._last_layer, self._last_t, self._last_stall = layer, now, stall
        self._gpu_D = 0
        if not self.enabled:
            return None
        store_D = self._store_k() if self.max_store_lookahead else 0
        if layer + 1 >= self.L or not self.gpu:
            return store_D or None
        k = self.fixed_k or self.max_lookahead
        D = min(k, self.L - 1 - layer)
        # adaptive k is 1 when layer+1 is on the GPU already (loading it costs nothing), and a
        # fixed k needs nothing when its k layers are: then there is nothing to prefetch
        if self._all_resident(layer + 1, layer + (1 if self.fixed_k is None else D)):
            self._k_hist[min(self.fixed_k or 1, self.max_lookahead)] += 1
            self._skipped += 1
            return store_D or None
        rate = getattr(self.provider, "miss_rate", None)
        if self.skip_miss_rate is not None and rate is not None and rate(layer + 1) < self.skip_miss_rate:
            self._skipped_low_miss += 1
            return store_D or None
        self._gpu_D = D
        return max(D, store_D)

    def _predicted(self, layer: int, D: int, packed: "torch.Tensor | list", gpu_D: int | None = None) -> None:
        gpu_D = D if gpu_D is None else gpu_D
        if self.issue_after_demand and self.provider is not None:
            # read, planned and issued once the block has read its routing and asked for its
            # experts: the GPU has computed these by then, so reading them adds no wait of its own
            self._deferred = (layer, D, packed, gpu_D)
            self._deferred_count += 1
            return
        self._complete(layer, D, packed, gpu_D)

    def on_demand_issued(self, layer: int) -> None:
        """The MoE block of `layer` has asked for its experts: the loads predicted at this
        layer's input may go now, queued behind that demand."""
        if self._deferred is not None and self._deferred[0] == layer:
            deferred, self._deferred = self._deferred, None
            self._complete(*deferred)

    def _complete(self, layer: int, D: int, packed: "torch.Tensor | list", gpu_D: int | None = None) -> None:
        """Read the predictions made at `layer`'s input (one transfer, unless the caller read
        them already), record them for the precision/recall checks, choose the lookahead and
        issue the plan: the GPU tier's for distances up to gpu_D (default D), then the store
        fetches into the host tier for distances up to D (`_store_plan`)."""
        rows = packed if isinstance(packed, list) else packed.tolist()
        gpu_D = D if gpu_D is None else gpu_D
        every = self._unpack(rows, D)
        if gpu_D:
            self._complete_gpu(layer, gpu_D, every[:gpu_D])
        if self.max_store_lookahead and self.provider is not None:
            self._store_plan(layer, every)

    def _complete_gpu(self, layer: int, D: int, unpacked: list) -> None:
        preds = {d: p for d, p in zip(range(1, D + 1), unpacked) if layer + d in self.moe_layers}
        k = self.fixed_k or self.max_lookahead
        if self.fixed_k is None:
            k = self._adaptive_k(layer, preds)
        self._k_hist[min(k, self.max_lookahead)] += 1
        for d, (experts, scores, tok_idx) in preds.items():
            self._pending.setdefault(layer + d, []).append((d, set(experts), tok_idx))
        if self.provider is None:
            return
        self._inputs += 1
        if self.policy == "all":
            plan = [(layer + d, experts, [s / d for s in scores])
                    for d, (experts, scores, _) in preds.items() if d <= k]
        else:
            plan = self._budget_plan(layer, preds, k)
        self._issue(plan, layer, preds)

    def _store_plan(self, layer: int, every: list[tuple[list[int], list[float], list[list[int]]]]) -> None:
        """Store fetches into the host tier for the predicted experts that are in neither tier,
        at distances 1 .. k_store (`_store_k`; wrapping into the next token), nearest first and by
        weight within a target layer, those below the score floor left out."""
        ks = min(self._store_k(), len(every))
        self._store_k_hist[ks] += 1
        loc = self.provider.location
        for d in range(1, ks + 1):
            j = (layer + d) % self.L
            if j not in self.moe_layers:
                continue
            experts, scores, _ = every[d - 1]
            want, ws = [], []
            for e, w in zip(experts, scores):
                if loc(j, e) != "store":
                    continue
                if w < self.score_floor:
                    self._store_dropped_low += 1
                    continue
                want.append(e)
                ws.append(w / d)
            if want:
                n = self.provider.prefetch_host(j, want, ws)
                self._store_issued += n
                if layer + d >= self.L:
                    self._store_next_token += n
                    self._next_asked.setdefault(j, set()).update(want)

    def _store_cost(self) -> float | None:
        f = getattr(self.provider, "store_fetch_cost", None)
        return float(f()) if f is not None else None

    def _store_k(self) -> int:
        """k_store = ceil(t_store / t_compute) in [1, max_store_lookahead] (1 until both are measured)."""
        t_store = self._store_cost()
        if t_store is None:
            return 1
        return self.lookahead_rule(t_store, self.compute_time_s, self.max_store_lookahead, self.max_store_lookahead)

    def predicted_use(self, target: int, distance: int, weight: float) -> float | None:
        """The probability that a prediction of `weight` for layer `target`, made `distance`
        layers ahead, is used: weight x the measured precision of such predictions (None until
        `min_measured` of them were checked)."""
        n = self._pred[target][distance]
        if n < self.min_measured:
            return None
        return weight * self._tp[target][distance] / n

    def _issue(self, plan: list[tuple[int, list[int], list[float]]], layer: int | None = None,
               preds: dict | None = None) -> None:
        n = 0
        if self._takes_uses is None:
            import inspect
            self._takes_uses = "uses" in inspect.signature(self.provider.prefetch).parameters
        for j, experts, scores in plan:
            if self._takes_uses and preds is not None and (j - layer) in preds:
                d = j - layer
                weight = dict(zip(preds[d][0], preds[d][1]))
                self.provider.prefetch(j, experts, scores,
                                       uses=[self.predicted_use(j, d, weight.get(e, 0.0)) for e in experts])
            else:
                self.provider.prefetch(j, experts, scores)
            self._issued += len(experts)
            self._issued_layer[j] += len(experts)
            self._issued_pending.setdefault(j, set()).update(experts)
            n += len(experts)
        self._max_issued = max(self._max_issued, n)

    def _budget_plan(self, layer: int, preds: dict[int, tuple[list[int], list[float], list[list[int]]]],
                     k: int) -> list[tuple[int, list[int], list[float]]]:
        """The "budget" policy: (target layer, experts, scores) calls, nearest target first.

        Candidates (j = layer + d, e) for d <= k ranked by weight / d; dropped when on the GPU or
        below min_score; issued while their summed load cost fits in one layer's compute time
        (at least one), or, compute time unmeasured, at most top_k per target layer. The floor is
        `score_floor` (min_score x 2 / top_k)."""
        loc = getattr(self.provider, "location", None)
        cost = getattr(self.provider, "load_cost", None)
        t_compute = self.compute_time_s if cost is not None else None
        cands = []                                       # (score / d, d, weight, expert, location)
        for d, (experts, scores, _) in preds.items():
            if d > k:
                continue
            for e, w in zip(experts, scores):
                where = loc(layer + d, e) if loc is not None else None
                if where == "gpu":
                    self._dropped["resident"] += 1
                elif w < self.score_floor:
                    self._dropped["low_score"] += 1
                else:
                    cands.append((w / d, d, w, e, where))
        cands.sort(key=lambda c: (-c[0], c[1], -c[2], c[3]))
        chosen: dict[int, tuple[list[int], list[float]]] = {}
        spent, count = 0.0, 0
        per_target: dict[int, int] = {}
        for score, d, _, e, where in cands:
            if t_compute is None:
                ok = per_target.get(d, 0) < self.top_k
            else:
                c = cost(where) if where is not None else 0.0
                ok = count == 0 or spent + c <= t_compute * (1 + 1e-9)
                if ok:
                    spent += c
            if not ok:
                self._dropped["budget"] += 1
                continue
            count += 1
            per_target[d] = per_target.get(d, 0) + 1
            es, ss = chosen.setdefault(layer + d, ([], []))
            es.append(e)
            ss.append(score)
        return [(j, *chosen[j]) for j in sorted(chosen)]

    def on_routing(self, layer: int, router_logits: torch.Tensor, weights: torch.Tensor,
                   idx: torch.Tensor) -> None:
        """The same as on_routing_host (what the MoE block calls) for a caller holding tensors."""
        self.on_routing_host(layer, idx.tolist())

    def on_routing_host(self, layer: int, rows: list[list[int]]) -> None:
        # rows: [T][k] expert ids the layer used (-1 = none), read by the MoE block
        asked = self._next_check.pop(layer, None)
        if asked:                            # predicted for this token by the last one's hidden states
            used = {e for row in rows for e in row if e >= 0}
            self._next_checked += len(asked)
            self._next_hits += len(asked & used)
        if layer not in self._pending:
            return
        tok_used = [set(e for e in row if e >= 0) for row in rows]
        used = set().union(*tok_used) if tok_used else set()
        n_used = sum(len(u) for u in tok_used)
        issued = self._issued_pending.pop(layer, set())
        self._issued_checked += len(issued)
        self._issued_tp += len(issued & used)
        self._issued_used += len(used)
        for d, pred, tok_idx in self._pending.pop(layer, []):
            self._pred[layer][d] += len(pred)
            self._used[layer][d] += len(used)
            self._tp[layer][d] += len(pred & used)
            if len(tok_idx) == len(rows):
                # each used expert found among the token's own predictions
                self._tok_tp[layer][d] += sum(len(u.intersection(p)) for u, p in zip(tok_used, tok_idx))
                self._tok_used[layer][d] += n_used

    # --- internals ------------------------------------------------------------------------------
    def _all_resident(self, first: int, last: int) -> bool:
        """Every expert of layers first..last is on the GPU (False when the provider cannot say)."""
        resident = getattr(self.provider, "resident", None)
        if resident is None:
            return False
        return all(len(resident(j)) >= self.E for j in range(first, last + 1))

    def _predict(self, layer: int, target: int, x: torch.Tensor) -> tuple[list[int], list[float], list[list[int]]]:
        """Experts layer `target` would pick for hidden states x (layer `layer`'s MoE input)."""
        return self._predict_many(layer, x, target - layer)[-1]

    def _predict_many(self, layer: int, x: torch.Tensor, D: int) -> list[tuple[list[int], list[float], list[list[int]]]]:
        """Predictions for layers layer+1 .. layer+D from x: per distance (experts by descending
        best weight, those weights, each token's predicted top-k ids). One device->host transfer."""
        if D <= 0:
            return []
        return self._unpack(self._predict_device(layer, x, D).tolist(), D)

    def _predict_device(self, layer: int, x: torch.Tensor, D: int) -> torch.Tensor:
        """Each token's top-k router logits and expert ids for layers layer+1 .. layer+D from x,
        on x's device: [D, T, 2k] float32 (k logits, then k ids). Top-k is taken on the logits
        (softmax is monotonic); `_unpack` renormalises the weights over those k on the host:
        softmax(top-k logits) = top-k probs / their sum. A sigmoid router picks by its choice and
        packs log(score) as the logit, so the same softmax gives the scores renormalised."""
        # x: [T, H]
        if self._stack is None or self._stack.device != x.device or self._stack.dtype != x.dtype:
            self._build_stacks(x.device, x.dtype)
        wrap = layer + D >= self.L                   # the store lookahead reaches the next token
        tgt = self._target_index(layer, D, x.device) if wrap else slice(layer + 1, layer + 1 + D)
        W = self._stack[tgt]                                                                   # [D, E, H]
        if self.renorm:
            xin = x[None] * self._ratio[layer][:D, None, :]                                    # [D, T, H]
        else:
            xin = x[None].expand(D, -1, -1)
        logits = torch.bmm(xin, W.transpose(1, 2))                                             # [D, T, E]
        rv = self.router
        if rv.bias is not None:
            logits = logits + self._bias[tgt][:, None, :]
        k = min(self.top_k, self.E)
        if not rv.sigmoid:
            v, i = torch.topk(logits, k, dim=-1)                                               # [D, T, k]
            return torch.cat([v.float(), i.float()], dim=-1)                                   # [D, T, 2k]
        scores = torch.sigmoid(logits.float())                                                 # [D, T, E]
        choice = scores
        if rv.correction is not None:
            choice = choice + self._corr[tgt][:, None, :]
        Dn, T, E = choice.shape
        choice = group_limited(choice.reshape(Dn * T, E), rv.n_group, rv.topk_group).view(Dn, T, E)
        i = torch.topk(choice, k, dim=-1).indices                                              # [D, T, k]
        v = scores.gather(-1, i).clamp_min(1e-30).log()
        return torch.cat([v, i.float()], dim=-1)

    def _unpack(self, packed: list, D: int) -> list[tuple[list[int], list[float], list[list[int]]]]:
        # packed: [D][T][2k] host lists from _predict_device
        k = min(self.top_k, self.E)
        out = []
        for d in range(D):
            best: dict[int, float] = {}
            tok_idx = []
            for row in packed[d]:                                  # per token: k logits, k expert ids
                ids = [int(e) for e in row[k:]]
                tok_idx.append(ids)
                top = row[0]
                p = [math.exp(l - top) for l in row[:k]]
                z = sum(p)
                for wt, e in zip(p, ids):
                    wt /= z
                    if wt > best.get(e, 0.0):
                        best[e] = wt                                  # best weight per expert
            experts = sorted(best, key=lambda e: -best[e])
            out.append((experts, [best[e] for e in experts], tok_idx))
        return out

    def _build_stacks(self, device: torch.device, dtype: torch.dtype) -> None:
        self._stack = torch.stack([r.to(device, dtype) for r in self.routers])                  # [L, E, H]
        rv = self.router
        if rv.bias is not None:
            self._bias = torch.stack([b.to(device, dtype) for b in rv.bias])                    # [L, E]
        if rv.correction is not None:
            self._corr = torch.stack([c.to(device, torch.float32) for c in rv.correction])      # [L, E]
        self._ratio = []
        if self.renorm:
            norms = torch.stack([w.to(device, dtype) for w in self.norm_weights])              # [L, H]
            Dmax = max(self.max_lookahead, self.max_store_lookahead)
            for l in range(self.L):
                # targets l+1 .. l+Dmax, wrapping into the next token's layers (store lookahead)
                n = Dmax if self.max_store_lookahead else max(0, min(Dmax, self.L - 1 - l))
                idx = torch.tensor([(l + 1 + d) % self.L for d in range(n)], dtype=torch.long, device=device)
                wl, wj = norms[l], norms[idx]                                                  # [H], [D, H]
                self._ratio.append(torch.where(wl.abs() > 1e-12, wj / wl, torch.zeros_like(wj)))  # [D, H]

    def _target_index(self, layer: int, D: int, device: Any) -> torch.Tensor:
        """Target layers layer+1 .. layer+D, wrapped into the next token ([D] long on `device`)."""
        key = (layer, D, device)
        t = self._targets.get(key)
        if t is None:
            t = self._targets[key] = torch.tensor([(layer + 1 + d) % self.L for d in range(D)], device=device)
        return t

    def _ewma(self, old: float | None, x: float) -> float:
        return x if old is None else (1 - self.alpha) * old + self.alpha * x

    def _stall_total(self) -> float:
        """The provider's monotonic seconds blocked on expert loads (0 when it does not count them)."""
        f = getattr(self.provider, "stall_seconds", None)
        return float(f()) if f is not None else 0.0

    @staticmethod
    def lookahead_rule(t_load: float, t_compute: float | None, max_lookahead: int, layers_left: int) -> int:
        """k = ceil(t_load / t_compute) clamped to [1, min(max_lookahead, layers_left)]: a load
        slower than a layer's compute must start that many layers ahead. Unmeasured compute time
        or a free load -> 1; a measured compute time of 0 (all waiting) -> the bound."""
        bound = max(1, min(int(max_lookahead), int(layers_left)))
        if t_compute is None or t_load <= 0:
            return 1
        if t_compute <= 0:
            return bound
        return int(min(bound, max(1, math.ceil(t_load / t_compute))))

    def _adaptive_k(self, layer: int, preds: dict[int, tuple[list[int], list[float], list[list[int]]]]) -> int:
        if self.provider is None or not hasattr(self.provider, "load_cost") or self.compute_time_s is None:
            return 1
        first = preds.get(1)
        if not first:
            return 1
        locs = {self.provider.location(layer + 1, e) for e in first[0]}
        t_load = max(self.provider.load_cost(loc) for loc in locs)
        return self.lookahead_rule(t_load, self.compute_time_s, self.max_lookahead, self.L - 1 - layer)

    def close(self) -> None:
        self._pending.clear()
        self._issued_pending.clear()
        self._deferred = None


def layer_routers(model: Any) -> tuple[list[torch.Tensor], set[int]]:
    """Every layer's router [E, H] (zeros for a dense layer, which has none: predictions for it
    are never used) and the set of layers with routed experts."""
    moe = set(getattr(model.config, "moe_layers", range(model.config.num_hidden_layers)))
    routers: list[torch.Tensor | None] = [model.router_weight(l).detach() if l in moe else None
                                          for l in range(model.config.num_hidden_layers)]
    like = next(r for r in routers if r is not None)
    return [r if r is not None else torch.zeros_like(like) for r in routers], moe


def router_variant(model: Any) -> RouterVariant:
    """The family's router of `model` beyond W x, for predictions (zeros for dense layers)."""
    cfg = model.config
    moe = set(getattr(cfg, "moe_layers", range(cfg.num_hidden_layers)))
    gates = {l: model.layers[l].block_sparse_moe.gate for l in moe}
    E = cfg.num_local_experts

    def per_layer(get: Callable[[Any], Any]) -> list[torch.Tensor]:
        return [get(gates[l]).detach().float() if l in gates else torch.zeros(E)
                for l in range(cfg.num_hidden_layers)]

    return RouterVariant(
        bias=per_layer(lambda g: g.bias) if getattr(cfg, "router_bias", False) else None,
        sigmoid=getattr(cfg, "router_scores", "softmax") == "sigmoid",
        correction=(per_layer(lambda g: g.e_score_correction_bias) if getattr(cfg, "score_correction_bias", False)
                    else None),
        n_group=int(getattr(cfg, "n_group", 1) or 1), topk_group=int(getattr(cfg, "topk_group", 1) or 1))


def build_prefetcher(model: Any, provider: Any, source: Any = None, *, lookahead: int | None = None,
                     max_lookahead: int = 3, renorm: bool = True, enabled: bool = True,
                     policy: str = "budget", min_score: float = 0.3,
                     issue_after_demand: bool = True, skip_miss_rate: float | None = None,
                     max_store_lookahead: int | None = None, gpu: bool = True,
                     clock: Callable[[], float] = time.perf_counter) -> Prefetcher | None:
    """What Engine.from_store calls: a Prefetcher over the model's routers feeding `provider`
    (None when the provider cannot prefetch, i.e. has no `prefetch` of its own)."""
    from decoder.experts.provider import ExpertProvider

    if type(provider).prefetch is ExpertProvider.prefetch:
        return None
    L = model.config.num_hidden_layers
    routers, moe = layer_routers(model)
    norms = [model.layers[l].post_attention_layernorm.weight.detach() for l in range(L)]
    return Prefetcher(routers, provider, top_k=model.config.num_experts_per_tok, lookahead=lookahead, moe_layers=moe,
                      max_lookahead=max_lookahead, norm_weights=norms, renorm=renorm, enabled=enabled,
                      policy=policy, min_score=min_score, issue_after_demand=issue_after_demand,
                      skip_miss_rate=skip_miss_rate, router=router_variant(model),
                      max_store_lookahead=max_store_lookahead, gpu=gpu, clock=clock)
