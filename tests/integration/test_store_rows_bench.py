"""Plumbing of benchmarks/decode.py's store rows on the CPU at toy sizes (`--tiny --device cpu`):
store-remote (a real `expert-store serve --workers 2`, FetchPool receivers) and store-colocated
(a real `expert-store colocate` publishing into a shared-memory arena), each from a cold host
tier filled while the first tokens are generated. Timings are meaningless here; what is checked
is that each row runs, decodes the tokens the lru row decodes, and reports its cold fill and
its targets as the GPU run does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import decode  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def test_store_rows_on_a_random_mixtral(tmp_path):
    torch.set_num_threads(1)
    args = decode.parse_args(["--tiny", "--device", "cpu", "--models", "B", "--budgets", "0.5,0.25",
                              "--modes", "lru,store-remote,store-colocated", "--profile-rows", "",
                              "--calib-tokens", "64", "--prompts", "1", "--no-warmup-row", "--fill-threads", "2"])
    device = torch.device("cpu")
    prep = decode.prepare_model_b(tmp_path, device, args)
    rows: list[dict] = []
    decode.run_model(prep, device, args, tmp_path, pinned_gbps=5.0, rows=rows)
    decode.add_ratios(rows)
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    by_mode = {r["mode"]: r for r in rows if r["budget"] == 0.5}
    assert set(by_mode) == {"lru", "store-remote", "store-colocated"} and len(rows) == 6
    for mode in decode.STORE_ROWS:
        r = by_mode[mode]
        assert r["tokens_per_s"] > 0 and r["vs_lru"] is not None
        fill = r["cold_fill"]
        assert fill["gbps"] > 0 and fill["fill_s"] > 0 and fill["first_token_s"] > 0
        assert fill["first_token_floor_s"] > 0   # the store's measured fetch time, once per layer
        assert fill["into"] == ("arena" if mode == "store-colocated" else "host tier")
        # half the experts in the host tier: some demand loads come from the store
        assert r["host_hit_rate"] is not None
    # the remote path's levers are on by default and reported (issue 14): one thread (of the two
    # fetch processes) fetching predicted host-tier misses, the store lookahead's decisions
    rp = by_mode["store-remote"]["remote_path"]
    assert rp["host_prefetch_threads"] == 1 and rp["host_prefetch_errors"] == 0
    assert sum(rp["store_lookahead_hist"].values()) > 0 and rp["store_lookahead_mean"] >= 1
    assert rp["low_precision_store_misses"] == 0 and rp["low_precision_tier"] is None   # not asked for
    assert by_mode["store-colocated"]["remote_path"] is None
    colo = by_mode["store-colocated"]["cold_fill"]
    assert colo["arena"]["arena_bytes"] > 0   # every expert went into the arena
    arena = by_mode["store-colocated"]["arena"]
    assert arena["used"] == arena["slots"] > 0 and arena["data_loss"] == 0
    targets = decode.check_targets(rows)
    names = [t["target"] for t in targets]
    assert any("store-colocated @ 50%: tokens/s >= 0.8x lru" in n for n in names)
    assert any("store-colocated @ 50%: cold fill >= 10 GB/s into the arena" in n for n in names)
    assert any("store-remote @ 50%: cold fill >= 3 GB/s into the host tier" in n for n in names)
    # the 25% row's decoder started against the arena the 50% row's filled: no fill to time
    warm = next(r for r in rows if r["mode"] == "store-colocated" and r["budget"] == 0.25)["cold_fill"]
    assert warm["warm_arena"] and warm["gbps"] is None
    assert not any("store-colocated @ 25%: cold fill" in n or "store-colocated @ 25%: first token" in n
                   for n in names)
    assert sum("first token before the cold fill ended" in n for n in names) == 3
    assert all(isinstance(t["met"], bool) for t in targets)
    assert "| B | 50% | store-colocated |" in decode.markdown(rows, targets)
    assert "B store-remote @ 50%: host-tier store prefetches" in decode.markdown(rows, targets)
    # the co-located store was stopped and its arena file removed
    arena = f"adapmoe-bench-{os.getpid()}.arena"
    assert not (Path("/dev/shm") / arena).exists() and not (tmp_path / arena).exists()


def test_store_remote_host_tier_holds_half_a_bf16_model(tmp_path):
    # bf16 blobs are coded: the FetchPool decodes them into its slots (raw blobs, a little
    # larger than the stored ones), and the row's host tier is still sized for half the experts
    torch.set_num_threads(1)
    args = decode.parse_args(["--tiny", "--device", "cpu", "--models", "A", "--budgets", "0.5",
                              "--modes", "store-remote", "--profile-rows", "", "--prompts", "1"])
    device = torch.device("cpu")
    prep = decode.prepare_model_a(tmp_path / "A", device, args)
    with decode.StoreClient.open(str(prep.store)) as c:
        profile = c.manifest(prep.model).profile
        codecs = {decode.blob_format.read_header(bytes(c.fetch_expert(prep.model, 0, e, "bf16")))[0].codec
                  for e in range(2)}
    assert codecs != {"none"}   # the case at hand: coded bf16 blobs
    server = decode.StoreServer(prep.store, 1, tmp_path / "server.log")
    try:
        eng = decode.build_engine(prep, "store-remote", 0.5, device, f"grpc://{server.address}", profile,
                                  remote_fetch_workers=2, fill_threads=2)
        try:
            cache = eng.provider
            assert cache.host_capacity == cache.L * cache.E // 2
            assert cache.host.fetch_pool is not None and cache.host.fetch_pool.raw
        finally:
            eng.close()
    finally:
        server.stop()


def test_store_remote_serves_the_plain_copy_when_asked(tmp_path):
    # `--remote-copy plain`: the row's store serves the codec-none copy of A, whose bf16 blobs
    # the fetch processes take as they come
    torch.set_num_threads(1)
    args = decode.parse_args(["--tiny", "--device", "cpu", "--models", "A", "--budgets", "0.5",
                              "--modes", "store-remote", "--profile-rows", "", "--prompts", "1",
                              "--no-warmup-row", "--remote-copy", "plain", "--fill-threads", "2",
                              "--remote-demand-parts", "2", "--remote-fill-parts", "3"])
    device = torch.device("cpu")
    prep = decode.prepare_model_a(tmp_path / "A", device, args)
    rows: list[dict] = []
    decode.run_model(prep, device, args, tmp_path, pinned_gbps=5.0, rows=rows)
    assert [r.get("error") for r in rows] == [None] and rows[0]["remote_copy"] == "plain"
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["cold_fill"]["gbps"] > 0
    assert rows[0]["fetch_demand_parts"] == 2 and rows[0]["fetch_fill_parts"] == 3
    # where the first token's time went: its demand loads, and the part of it spent waiting
    fill = rows[0]["cold_fill"]
    assert fill["first_token_demand_loads"] >= 1 and 0 < fill["first_token_stall_s"] <= fill["first_token_s"]
    with decode.StoreClient.open(str(tmp_path / "store-plain")) as c:
        assert decode.blob_format.read_header(bytes(c.fetch_expert(prep.model, 0, 0, "bf16")))[0].codec == "none"


def test_plain_copy_is_the_model_packed_with_codec_none(tmp_path):
    """`--colocated-upstream plain`: the co-located store's upstream is the model packed again
    with codec none (the same payloads, no lz4 to undo as it publishes) with the profile beside
    it; B (random int blobs, never coded) is its own plain copy."""
    from expert_store import format as fmt
    from expert_store.pack import pack_checkpoint
    from expert_store.tiers import NvmeTier
    from tests.checkpoints import make_mixtral_checkpoint

    ckpt, _ = make_mixtral_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16, seed=9)
    store = tmp_path / "store"
    pack_checkpoint(ckpt, NvmeTier(store), model="m", precisions=("bf16",), progress=False)
    (store / "models" / "m" / "profile.json").write_text('{"budget": 1.0}\n')
    prep = decode.Prepared(name="A", store=store, model="m", ckpt=ckpt, prompts=[], warmup_prompt=[])
    plain = decode.plain_copy(prep, tmp_path / "work")
    assert plain != store and (plain / "models" / "m" / "profile.json").read_text() == '{"budget": 1.0}\n'
    coded_tier, plain_tier = NvmeTier(store), NvmeTier(plain)
    for l in range(2):
        for e in range(4):
            key = fmt.expert_key("m", l, e, "bf16")
            a, b = coded_tier.get(key), plain_tier.get(key)
            assert fmt.read_header(a)[0].codec == "bf16-planes+lz4" and fmt.read_header(b)[0].codec == "none"
            assert bytes(fmt.decode_raw(a)[1]) == bytes(fmt.decode_raw(b)[1])
    assert decode.plain_copy(prep, tmp_path / "work") == plain   # packed once
    b = decode.Prepared(name="B", store=store, model="m", ckpt=None, prompts=[], warmup_prompt=[])
    assert decode.plain_copy(b, tmp_path / "work") == store
