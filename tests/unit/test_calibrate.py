"""Calibration: F_l from autograd equals an independent finite-difference computation; profile
schema checks; windows."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints import make_packed_store
from decoder import Engine
from decoder.calibrate import (PROFILE_SCHEMA, PROFILE_VERSION, build_profile, calibrate_model, token_windows,
                               validate_profile)
from expert_store.client import StoreClient

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)
L, E = 2, 4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    store = make_packed_store(tmp_path_factory.mktemp("calib"), hidden=32, ffn=48, layers=L, experts=E, seed=21)
    with StoreClient.open(str(store)) as c:
        with Engine.from_store(c, "tiny", dtype=torch.float64, prefetch=False) as eng:
            yield eng


def finite_difference_sensitivity(model, ids, eps=1e-2):
    """F_l = mean_t 0.5 * (dLoss/d eps)^2 for the perturbation out_l[t] += eps * (E1(x_t) - E2(x_t)),
    with dLoss/d eps by central differences (no autograd)."""
    import torch.nn.functional as F

    from decoder.model.transformer import MoEObserver

    class Rec(MoEObserver):
        x, route = {}, {}

        def on_moe_input(self, layer, x):
            self.x[layer] = x.detach().clone()

        def on_routing(self, layer, logits, w, idx):
            self.route[layer] = idx.detach().clone()

    rec = Rec()
    model.add_observer(rec)
    with torch.no_grad():
        model(ids[None])
    model.remove_observer(rec)
    S = ids.numel()
    out = []
    for l in range(L):
        deltas = []
        for t in range(S - 1):
            e1, e2 = (int(v) for v in rec.route[l][t])
            x = rec.x[l][t:t + 1]
            with torch.no_grad():
                deltas.append((model.experts.get(l, e1)(x) - model.experts.get(l, e2)(x))[0])
        total = 0.0
        for t in range(S - 1):
            def loss_at(scale):
                def hook(module, inputs, output):
                    output = output.clone()
                    output[0, t] += scale * deltas[t]
                    return output
                h = model.layers[l].block_sparse_moe.register_forward_hook(hook)
                try:
                    with torch.no_grad():
                        logits = model(ids[None])
                        return float(F.cross_entropy(logits[0, :-1], ids[1:], reduction="sum"))
                finally:
                    h.remove()
            d = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
            total += 0.5 * d * d
        out.append(total / (S - 1))
    return out


def test_sensitivity_matches_finite_differences(engine):
    ids = torch.tensor([1, 40, 7, 99, 3, 150, 22, 8, 61, 5], dtype=torch.long)
    measured = calibrate_model(engine.model, [ids], budget=1e-3)
    want = finite_difference_sensitivity(engine.model, ids)
    assert all(w > 0 for w in want)
    for got, ref in zip(measured["sensitivity"], want):
        assert got == pytest.approx(ref, rel=1e-3)   # FD noise: RMSNorm computes in float32
    assert measured["tokens"] == ids.numel() - 1
    # calibration leaves the model as it was: routing restored, no hooks, no grads kept
    assert type(engine.model.gating).__name__ == "TopKGating"
    assert all(not p.requires_grad or p.grad is None for p in engine.model.parameters())
    assert not any(m._forward_hooks for m in engine.model.modules())


def test_budget_ratios_and_profile(engine):
    windows = token_windows(list(range(3, 300, 3)), seq_len=32, max_tokens=90)
    assert [w.numel() for w in windows] == [32, 32, 26]
    m = calibrate_model(engine.model, windows)
    # the recorded single-expert ratio at the 25% budget is 25% over all decisions
    total = sum(m["single_expert_ratio"]) / L
    assert total == pytest.approx(0.25, abs=0.02)
    assert m["budget"] == m["budget_for_single_ratio"]["0.25"]
    assert len(m["prefetch_accuracy_by_distance"]) == 1   # L - 1 distances
    p = build_profile("tiny", m, engine.config, text_file="/x/y.txt", seq_len=32)
    assert p["schema"] == PROFILE_SCHEMA and p["version"] == PROFILE_VERSION and p["text_file"] == "y.txt"
    assert validate_profile(json.dumps(p), L, E)["tokens"] == m["tokens"]
    for bad, msg in [({**p, "version": 99}, "version"), ({**p, "schema": "x"}, "schema"),
                     ({**p, "sensitivity": [1.0]}, "sensitivity"), ({**p, "sensitivity": [-1.0, 1.0]}, "sensitivity")]:
        with pytest.raises(ValueError, match=msg):
            validate_profile(bad, L, E)
    with pytest.raises(ValueError, match="layers"):
        validate_profile(p, L + 1, E)
    with pytest.raises(ValueError):
        token_windows([1, 2, 3], seq_len=1, max_tokens=3)
