"""`moe-decoder generate` and `serve` with --single-expert-ratio R, over a real `expert-store
serve` whose model was calibrated by the real `moe-decoder calibrate --upload`: adaptive gating
takes the budget the stored profile holds for R (the same tokens and decisions as passing that
budget by hand with --budget), cost-aware gating resolves it too; R with --budget, R with topk
gating, R out of range and an R the profile has no budget for are one-line errors before
anything serves."""

from __future__ import annotations

import json

import pytest

from decoder.client import DecoderClient
from service_procs import ServiceProcess, moe_decoder, pack_tiny_model

pytestmark = pytest.mark.timeout(600)

PROMPT = "Once upon a time, a model kept its experts"
CALIBRATION_TEXT = ("The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away, "
                    "a model kept its experts on a fast disk. Numbers 0 1 2 3 4 5 6 7 8 9 10 42. ") * 6


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(store process, profile) for a tiny model calibrated over gRPC with --upload."""
    root = tmp_path_factory.mktemp("ratio")
    store_dir = pack_tiny_model(root / "m", "tiny", layers=3, seed=5)
    text = root / "calib.txt"
    text.write_text(CALIBRATION_TEXT)
    with ServiceProcess.expert_store(store_dir) as store:
        r = moe_decoder("calibrate", "--store", store.address, "--model", "tiny", "--text", str(text),
                        "--out", str(root / "profile.json"), "--tokens", "300", "--seq-len", "64", "--upload",
                        "--no-progress", timeout=300)
        assert r.returncode == 0, r.stderr
        profile = json.loads((root / "profile.json").read_text())
        assert set(profile["budget_for_single_ratio"]) >= {"0.1", "0.25", "0.5"}
        yield store, profile


def generate(store, tmp_path, name, *flags):
    stats = tmp_path / f"{name}.json"
    r = moe_decoder("generate", "--store", store.address, "--model", "tiny", "--prompt", PROMPT,
                    "--max-tokens", "12", "--no-stats", "--stats-json", str(stats), *flags, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout, json.loads(stats.read_text())


def test_generate_takes_the_profiles_budget_for_the_ratio(calibrated, tmp_path):
    store, profile = calibrated
    T = profile["budget_for_single_ratio"]["0.5"]
    text, by_ratio = generate(store, tmp_path, "ratio", "--gating", "adaptive", "--single-expert-ratio", "0.5")
    text_b, by_budget = generate(store, tmp_path, "budget", "--gating", "adaptive", "--budget", repr(T))
    assert text == text_b
    assert by_ratio["generated_tokens"] == by_budget["generated_tokens"] > 0
    assert by_ratio["gating_stats"]["per_layer"] == by_budget["gating_stats"]["per_layer"]
    assert by_ratio["single_expert_ratio"] == by_budget["single_expert_ratio"] > 0
    # cost-aware gating resolves the ratio's budget from the same profile (its decisions also
    # depend on measured load costs, so only that it runs is checked here)
    _, cost_aware = generate(store, tmp_path, "cost", "--gating", "cost-aware", "--single-expert-ratio", "0.25")
    assert cost_aware["gating"] == "cost-aware" and cost_aware["generated_tokens"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--gating", "adaptive", "--single-expert-ratio", "0.5", "--budget", "0.1"], "not both"),
    (["--gating", "topk", "--single-expert-ratio", "0.5"], "applies to --gating adaptive and cost-aware"),
    (["--gating", "adaptive", "--single-expert-ratio", "1.5"], "must be in (0, 1)"),
    (["--gating", "adaptive", "--single-expert-ratio", "0.3"], "budgets for single-expert ratios 0.1, 0.25, 0.5"),
])
@pytest.mark.parametrize("command", ["generate", "serve"])
def test_bad_ratio_flags_are_one_line_errors(calibrated, command, flags, message):
    store, _ = calibrated
    argv = [command, "--store", store.address, "--model", "tiny"]
    argv += ["--prompt", PROMPT, "--max-tokens", "2"] if command == "generate" else ["--listen", "127.0.0.1:0"]
    r = moe_decoder(*argv, *flags, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("moe-decoder: error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "listening on" not in r.stdout


def test_serve_takes_the_profiles_budget_for_the_ratio(calibrated):
    store, profile = calibrated
    T = profile["budget_for_single_ratio"]["0.5"]
    answers = []
    for flags in (["--single-expert-ratio", "0.5"], ["--budget", repr(T)]):
        with ServiceProcess.decoder(store.address, "tiny", "--gating", "adaptive", *flags) as dec, \
                DecoderClient(dec.address, deadline_s=120) as c:
            r = c.generate(PROMPT, max_tokens=12, temperature=0.0)
            stats = c.stats()
            answers.append((r.token_ids, stats["engine"]["gating_stats"]["per_layer"]))
    assert answers[0] == answers[1]
    assert len(answers[0][0]) > 0
    assert any(layer["single_expert_ratio"] > 0 for layer in answers[0][1])
