"""`moe-decoder calibrate --upload` against a replica set (what the Kubernetes calibrate Job
does through k8s://): the profile lands on every replica, so a decoder gets it with the
manifest whichever replica it asks; the store's bearer token comes from --store-token-file.
Real `expert-store serve` processes on loopback, each over its own copy of the packed model."""

from __future__ import annotations

import json
import shutil

import pytest

from expert_store.client import StoreClient
from service_procs import ServiceProcess, moe_decoder, pack_tiny_model

pytestmark = pytest.mark.timeout(600)

TOKEN = "calibrate-test-token"
TEXT = ("def merge(intervals):\n    out = []\n    for a, b in sorted(intervals):\n"
        "        if out and a <= out[-1][1]:\n            out[-1][1] = max(out[-1][1], b)\n"
        "        else:\n            out.append([a, b])\n    return out\n\n") * 12


def test_profile_is_uploaded_to_every_replica(tmp_path):
    first = pack_tiny_model(tmp_path / "a", "tiny", layers=2, seed=3)
    second = tmp_path / "b" / "store"
    shutil.copytree(first, second)
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "text.txt").write_text(TEXT)
    auth = ("--token-file", str(tmp_path / "token"))
    with ServiceProcess.expert_store(first, *auth) as a, ServiceProcess.expert_store(second, *auth) as b:
        for replica in (a, b):
            with StoreClient.open(replica.address, token=TOKEN) as c:
                assert c.manifest("tiny").profile is None
        r = moe_decoder("calibrate", "--store", f"grpc://{a.address},{b.address}", "--model", "tiny",
                        "--text", str(tmp_path / "text.txt"), "--tokens", "256", "--seq-len", "64", "--upload",
                        "--store-token-file", str(tmp_path / "token"), "--no-progress", timeout=300)
        assert r.returncode == 0, r.stderr
        assert "stored profile.json for tiny in 2 replica(s)" in r.stdout, r.stdout
        profiles = []
        for replica in (a, b):
            with StoreClient.open(replica.address, token=TOKEN) as c:
                profiles.append(c.manifest("tiny").profile)
        assert profiles[0] and profiles[0] == profiles[1], profiles
        assert profiles[0]["model"] == "tiny" and set(profiles[0]["budget_for_single_ratio"]) >= {"0.25"}
        # the same bytes on both disks
        on_disk = [json.loads(p.read_text()) for p in (first / "models" / "tiny" / "profile.json",
                                                        second / "models" / "tiny" / "profile.json")]
        assert on_disk[0] == on_disk[1] == profiles[0]


def test_calibrate_for_a_perplexity_target(tmp_path):
    """--max-ppl-rise: the quality budget is found on the text after the calibration tokens,
    stored as budget_for_ppl_rise (with what was evaluated), printed, and a decoder built on the
    profile takes it as its default budget."""
    store = pack_tiny_model(tmp_path / "s", "tiny", layers=2, seed=3)
    (tmp_path / "text.txt").write_text(TEXT * 10)
    out = tmp_path / "profile.json"
    r = moe_decoder("calibrate", "--store", str(store), "--model", "tiny", "--text", str(tmp_path / "text.txt"),
                    "--tokens", "256", "--seq-len", "64", "--max-ppl-rise", "1%", "--ppl-tokens", "512",
                    "--out", str(out), "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr
    profile = json.loads(out.read_text())
    q = profile["quality"]
    assert profile["budget_for_ppl_rise"] == {"0.01": q["budget"]} and q["max_ppl_rise"] == 0.01
    assert q["ppl_at_budget"] <= 1.01 * q["ppl_topk"] and 400 <= q["tokens"] <= 512 and q["evaluated"]
    assert "budget for a perplexity rise <= 1.00%" in r.stdout, r.stdout
    from decoder.gating import make_gating
    from decoder.model.config import ModelConfig

    with StoreClient.open(str(store)) as c:
        config = ModelConfig.from_hf(c.manifest("tiny").config)
    assert make_gating("adaptive", config=config, profile=profile).budget == q["budget"]
    bad = moe_decoder("calibrate", "--store", str(store), "--model", "tiny", "--text", str(tmp_path / "text.txt"),
                      "--max-ppl-rise", "150%", timeout=60)
    assert bad.returncode != 0 and "rise must be in" in bad.stderr
