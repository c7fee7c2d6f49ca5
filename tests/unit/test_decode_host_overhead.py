"""Host work of a decode step: the MoE block reads the routing on the host once per layer, a
gating that decides on the device (adaptive, uniform) adds no read of its own (its decisions
are counted later from one batched read), observers that count on the host get the block's
copy (no extra read), and the one-token fast path computes what the T-token path computes."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from decoder.engine import RoutingStats
from decoder.gating import AdaptiveGating, CountingTopK
from decoder.model.config import ModelConfig
from decoder.model.transformer import MoEObserver, Transformer

pytestmark = pytest.mark.timeout(60)
torch.set_num_threads(1)
L, E = 3, 4
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=L, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_local_experts=E, num_experts_per_tok=2)
# every way a tensor's value reaches Python
HOST_READS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}


class CountHostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS or (name == "to" and any(getattr(a, "type", None) == "cpu" for a in args[1:])):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def model(gating=None) -> Transformer:
    m = Transformer(CFG, gating=gating)
    m.init_weights(seed=0)
    with torch.no_grad():
        for l in range(L):
            m.router_weight(l).normal_(0.0, 1.0, generator=torch.Generator().manual_seed(l))
    m.setup_caches(1, 16)
    return m.eval()


def decode_reads(m: Transformer, steps: int = 3) -> list[list[str]]:
    out = []
    with torch.inference_mode():
        m(torch.tensor([[1, 5, 9]]), torch.arange(3))
        for i in range(steps):
            with CountHostReads() as c:
                m(torch.tensor([[7 + i]]), torch.tensor([3 + i]))
            out.append(c.reads)
    return out


@pytest.mark.parametrize("gating", [None, "counting-topk"])
def test_topk_decode_reads_routing_once_per_layer(gating):
    m = model(CountingTopK(2, L) if gating else None)
    m.add_observer(RoutingStats(L, E))
    for reads in decode_reads(m):
        # one read per MoE layer (the routing) + one per forward (the cached length)
        assert len(reads) == L + 1, reads


def test_adaptive_gating_adds_no_read_of_its_own():
    m = model(AdaptiveGating(2, L, [1.0] * L, budget=0.05))
    routing = RoutingStats(L, E)
    m.add_observer(routing)
    for reads in decode_reads(m):
        assert len(reads) == L + 1, reads
    s = m.gating.stats()                        # reads the decisions made so far, once
    assert 0 < s["single_expert_ratio"] < 1
    # what it counted is what the MoE blocks ran (counted from the routing they read)
    ran = routing.summary()
    assert s["decisions"] == ran["decisions"] and s["single_expert_ratio"] == ran["single_expert_ratio"]
    assert s["est_loss_per_token"] > 0


class DeviceRecorder(MoEObserver):
    def __init__(self) -> None:
        self.seen: list[tuple[int, list[list[int]]]] = []

    def on_routing(self, layer, router_logits, weights, idx):
        self.seen.append((layer, idx.tolist()))


class HostRecorder(MoEObserver):
    def __init__(self) -> None:
        self.seen: list[tuple[int, list[list[int]]]] = []

    def on_routing(self, layer, router_logits, weights, idx):  # pragma: no cover - must not be called
        raise AssertionError("an observer with on_routing_host gets that instead of on_routing")

    def on_routing_host(self, layer, rows):
        self.seen.append((layer, [list(r) for r in rows]))


def test_host_observers_see_the_device_routing():
    m = model(AdaptiveGating(2, L, [1.0] * L, budget=0.05))
    dev, host, stats = DeviceRecorder(), HostRecorder(), RoutingStats(L, E)
    for obs in (dev, host, stats):
        m.add_observer(obs)
    with torch.inference_mode():
        m(torch.tensor([[1, 5, 9, 11, 3]]), torch.arange(5))          # T = 5
        for i in range(4):
            m(torch.tensor([[7 + i]]), torch.tensor([5 + i]))          # T = 1
    assert dev.seen == host.seen and len(dev.seen) == 5 * L
    rows = [r for _, rs in dev.seen for r in rs]
    used = sum(e >= 0 for r in rows for e in r)
    single = sum(sum(e >= 0 for e in r) == 1 for r in rows)
    assert 0 < single < len(rows)
    s = stats.summary()
    assert s["decisions"] == len(rows)
    assert s["experts_per_token"] == pytest.approx(used / len(rows))
    assert s["single_expert_ratio"] == pytest.approx(single / len(rows))
    loads = torch.zeros(L, E, dtype=torch.int64)
    for layer, rs in dev.seen:
        for r in rs:
            for e in r:
                if e >= 0:
                    loads[layer, e] += 1
    assert torch.equal(stats.loads, loads)


def test_one_token_path_matches_the_token_batch_path():
    # the same tokens through the MoE block one at a time (fast path) and all at once (grouped
    # by expert): the same experts, weights and accumulation order
    m = model(AdaptiveGating(2, L, [1.0] * L, budget=0.05))
    block = m.layers[1].block_sparse_moe
    x = torch.randn(1, 9, CFG.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        together = block(x, m.experts, m.gating, [])
        apart = torch.cat([block(x[:, t:t + 1], m.experts, m.gating, []) for t in range(9)], dim=1)
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-6)
    assert together.abs().sum() > 0
