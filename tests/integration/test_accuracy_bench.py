"""benchmarks/accuracy.py's core on a tiny random Mixtral (seconds): the budget sweep is monotone
in the single-expert ratio, the topk row is the plain engine's perplexity, full-forward scoring
of the per-token rules matches the decode path, and the JSON/PNG are written."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checkpoints import make_mixtral_checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import accuracy  # noqa: E402
from decoder import Engine  # noqa: E402

pytestmark = pytest.mark.timeout(180)
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def texts():
    ev, cal, info = accuracy.heldout_split(heldout_mb=0.05)
    assert not set(ev) & set(cal) and info["eval_files"] >= 1 and info["calib_files"] >= 1
    return ev, cal


def test_accuracy_sweep_on_a_tiny_checkpoint(tmp_path, texts):
    ckpt, _ = make_mixtral_checkpoint(tmp_path / "ckpt", hidden=32, ffn=48, layers=2, experts=4, vocab=320, seed=5)
    s = accuracy.Settings(eval_tokens=64, calib_tokens=128, seq_len=16, ratios=(0.2, 0.4, 0.6),
                          cost_aware_extra=(3.0,), gpu_experts_per_layer=2, host_experts_per_layer=3)
    work = tmp_path / "work"
    work.mkdir()
    result = accuracy.run_accuracy(ckpt, work, s, *texts, progress=False, log=lambda m: None)
    rows = result["rows"]
    by = {m: [r for r in rows if r["method"] == m] for m in ("topk", "uniform", "adaptive", "cost-aware")}
    assert len(by["topk"]) == 1 and len(by["uniform"]) == len(by["adaptive"]) == 3 and len(by["cost-aware"]) == 4
    assert result["eval"]["tokens_scored"] == 64 and all(r["tokens"] == 64 for r in rows)

    # the sweep: budgets increase and so does the single-expert ratio (deterministic per-token rules)
    for m in ("uniform", "adaptive"):
        budgets = [r["budget"] for r in by[m]]
        ratios = [r["single_expert_ratio"] for r in by[m]]
        assert budgets == sorted(budgets) and len(set(budgets)) == 3
        assert ratios == sorted(ratios) and ratios[-1] > ratios[0] > 0, (m, ratios)
        assert all(r["decode_check"]["ok"] for r in by[m])
        assert all(r["est_loss_per_token"] >= 0 for r in by[m])
    assert all(r["scoring"] == "decode" for r in by["cost-aware"])
    assert by["topk"][0]["single_expert_ratio"] == 0 and by["topk"][0]["experts_per_token"] == 2

    # topk row = the plain engine (model's own TopKGating, forward_logits) on the same windows
    cfg = json.loads((ckpt / "config.json").read_text())
    stream = accuracy.encode_texts(ckpt / "tokenizer.json", texts[0], cfg["eos_token_id"])
    windows = accuracy.eval_windows(stream, s.seq_len, 4)
    nll = n = 0
    with Engine.from_store(str(work / "store"), accuracy.MODEL) as eng:
        for w in windows:
            logits = eng.forward_logits(w[:-1])
            nll += float(F.cross_entropy(logits, w[1:], reduction="sum"))
            n += w.numel() - 1
    assert by["topk"][0]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-9)

    # outputs
    js, png = accuracy.write_outputs(result, tmp_path / "results")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    back = json.loads(js.read_text())
    assert len(back["rows"]) == len(rows) and "met" in back["target"]
    assert set(back["target"]) >= {"adaptive", "cost-aware", "topk_perplexity"}
    table = accuracy.markdown(result)
    assert table.count("\n") == len(rows) + 1 and "| topk |" in table
    assert "overall:" in accuracy.verdict(result)


def test_decode_scoring_matches_auto(tmp_path, texts):
    ckpt, _ = make_mixtral_checkpoint(tmp_path / "ckpt", hidden=32, ffn=48, layers=2, experts=4, vocab=320, seed=6)
    out = {}
    for scoring in ("auto", "decode"):
        s = accuracy.Settings(eval_tokens=32, calib_tokens=64, seq_len=16, ratios=(0.3,), methods=("adaptive",),
                              scoring=scoring)
        work = tmp_path / scoring
        work.mkdir()
        out[scoring] = accuracy.run_accuracy(ckpt, work, s, *texts, progress=False, log=lambda m: None)["rows"]
    for a, b in zip(out["auto"], out["decode"]):
        assert (a["scoring"], b["scoring"]) == ("full-forward", "decode")
        assert a["budget"] == b["budget"] and a["single_expert_ratio"] == b["single_expert_ratio"]
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)


def test_top_k_sweep_on_a_tiny_qwen3_checkpoint(tmp_path, texts):
    """Top-4 of 8 (Qwen3-MoE layout): budgets over every droppable expert use, so the share of
    expert uses saved grows with the budget up to (k - 1) / k; the target is read on it."""
    from family_checkpoints import make_family_checkpoint

    ckpt = make_family_checkpoint(tmp_path / "q3", "qwen3_moe", hidden=32, layers=2, experts=8, top_k=4, ffn=24,
                                  vocab=320, norm_topk_prob=True, seed=8)
    s = accuracy.Settings(eval_tokens=64, calib_tokens=128, seq_len=16, ratios=(0.2, 0.5, 0.9),
                          methods=("uniform", "adaptive"))
    work = tmp_path / "work"
    work.mkdir()
    result = accuracy.run_accuracy(ckpt, work, s, *texts, progress=False, log=lambda m: None)
    assert result["model_config"]["family"] == "qwen3_moe" and result["model_config"]["num_experts_per_tok"] == 4
    assert result["target"]["metric"] == "uses_saved"
    rows = result["rows"]
    assert rows[0]["method"] == "topk" and rows[0]["uses_saved"] == 0 and rows[0]["experts_per_token"] == 4
    for m in ("uniform", "adaptive"):
        mrows = [r for r in rows if r["method"] == m]
        saved = [r["uses_saved"] for r in mrows]
        assert saved == sorted(saved) and 0 < saved[0] < saved[-1] <= 0.75, (m, saved)
        for r in mrows:
            assert r["uses_saved"] == pytest.approx(1 - r["experts_per_token"] / 4)
            assert r["decode_check"]["ok"]
        # some tokens keep 2 or 3 experts: the drops are partial tails, not only single-expert tokens
        assert any(r["experts_per_token"] < 4 - 3 * r["single_expert_ratio"] - 1e-9 for r in mrows)
    assert [p["ratio"] for p in result["target"]["adaptive"]["points"]] == \
        [r["uses_saved"] for r in rows if r["method"] == "adaptive"]
    assert "fewer expert uses" in accuracy.verdict(result)
