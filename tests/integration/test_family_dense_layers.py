"""Models with dense layers between MoE layers (Qwen's decoder_sparse_step / mlp_only_layers)
through the AdapMoE machinery that walks layers: the prefetcher predicts only for layers with
routed experts, and calibration measures only those (dense layers get zeros), so a cache with
the prefetcher on and a calibrated adaptive gating work end to end."""

from __future__ import annotations

import pytest
import torch

from decoder.calibrate import calibrate_model
from decoder.engine import Engine
from expert_store.pack import pack_checkpoint
from expert_store.tiers import NvmeTier
from family_checkpoints import make_family_checkpoint

pytestmark = pytest.mark.timeout(240)
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense-layers")
    ckpt = make_family_checkpoint(root / "ckpt", "qwen2_moe", hidden=48, layers=4, experts=6, top_k=2, ffn=20,
                                  heads=6, kv_heads=3, shared_expert_intermediate_size=30, decoder_sparse_step=2,
                                  intermediate_size=44, norm_topk_prob=True, seed=5)
    pack_checkpoint(ckpt, NvmeTier(root / "store"), model="q2", precisions=("bf16",), progress=False)
    return root / "store"


def test_prefetcher_and_calibration_skip_dense_layers(store_dir):
    ids = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(3))
    with Engine.from_store(str(store_dir), "q2", prefetch=False) as ref:
        moe = set(ref.config.moe_layers)
        want = ref.decode_logits(ids)
    assert 0 < len(moe) < ref.config.num_hidden_layers          # dense layers in between
    with Engine.from_store(str(store_dir), "q2", gpu_cache_bytes=0, host_cache_bytes=1 << 22, prefetch=True,
                           prefetch_options={"lookahead": 3, "policy": "all"},
                           cache_options={"gpu_slots": [2 if l in moe else 0 for l in range(4)],
                                          "scratch_slots": 2}) as eng:
        got = eng.decode_logits(ids)
        eng.provider.wait_idle()
        pf = eng.stats()["prefetch"]
        assert eng.provider.quota == [2 if l in moe else 0 for l in range(4)]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # a byte budget plans slots for the MoE layers only
    with Engine.from_store(str(store_dir), "q2", gpu_cache_bytes=1 << 40, host_cache_bytes=0, prefetch=False) as probe:
        slot = probe.provider.slot_bytes
    with Engine.from_store(str(store_dir), "q2", gpu_cache_bytes=(len(moe) * 3 + 2) * slot, host_cache_bytes=0,
                           prefetch=False) as eng:
        q = eng.provider.quota
        assert all(q[l] == 0 for l in range(4) if l not in moe) and sum(q) == len(moe) * 3
    assert pf["prefetches_issued"] > 0
    issued = pf["issued_per_layer"]
    assert all(issued[l] == 0 for l in range(len(issued)) if l not in moe)    # never a dense target
    with Engine.from_store(str(store_dir), "q2", prefetch=False) as eng:
        windows = [ids[i:i + 20] for i in range(0, 40, 20)]
        prof = calibrate_model(eng.model, windows)
    L = len(prof["sensitivity"])
    assert all(prof["sensitivity"][l] > 0 for l in moe)
    assert all(prof["sensitivity"][l] == 0 and prof["single_expert_ratio"][l] == 0 for l in range(L) if l not in moe)
