"""`moe-decoder train-demo`: a tiny real training run (seconds), run twice with the same seed.

Checks: byte-identical checkpoints for the same seed; HF transformers' MixtralForCausalLM loads
the checkpoint and gives our Transformer's logits; the routers are trained (entropy below
uniform and below its value at init; load spread over the experts); the report has its fields.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY_ARGS = ["--steps", "40", "--seed", "7", "--corpus-mb", "0.4", "--heldout-mb", "0.15", "--vocab-size", "512",
             "--batch-size", "4", "--seq-len", "64", "--eval-windows", "16", "--no-progress"]
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _moe_decoder() -> list[str]:
    exe = Path(sys.executable).parent / "moe-decoder"
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from decoder.cli import main; sys.exit(main())"]


def _train(out: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_vars)
    r = subprocess.run(_moe_decoder() + ["train-demo", "--out", str(out)] + TINY_ARGS,
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, f"train-demo failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


# What differs between processes, and between a quiet machine and a loaded one, that could
# reach the numbers: hash seeds, thread pools (torch/OpenMP, the tokenizer trainer's rayon).
# The second run changes all of them; its bytes must not change (so the report's figures,
# which test_router_is_trained checks, are a function of the code and the seed alone).
OTHER_PROCESS_ENV = {"PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                     "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("train-demo")
    a, b = base / "a", base / "b"
    ra = _train(a, PYTHONHASHSEED="0")
    _train(b, **OTHER_PROCESS_ENV)
    return a, b, ra


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_gives_identical_checkpoint_bytes(runs):
    a, b, _ = runs
    for name in CHECKPOINT_FILES:
        assert (a / name).is_file(), f"{name} missing"
        assert _sha(a / name) == _sha(b / name), f"{name} differs between two runs with the same seed"
    ra, rb = (json.loads((d / "train_report.json").read_text()) for d in (a, b))
    for key in ("routing", "heldout", "cross_layer"):
        assert ra[key] == rb[key], f"{key} differs between two runs with the same seed"


def test_checkpoint_is_hf_mixtral_layout(runs):
    from safetensors import safe_open

    a, _, _ = runs
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    with safe_open(str(a / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    L, E = cfg["num_hidden_layers"], cfg["num_local_experts"]
    for l in range(L):
        assert f"model.layers.{l}.block_sparse_moe.gate.weight" in keys
        for e in range(E):
            for w in ("w1", "w2", "w3"):
                assert f"model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight" in keys
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys


def test_hf_transformers_loads_it_and_matches_our_logits(runs):
    import torch
    from safetensors.torch import load_file
    from transformers import MixtralForCausalLM

    from decoder.model.config import ModelConfig
    from decoder.model.transformer import Transformer

    a, _, _ = runs
    cfg = ModelConfig.from_hf(json.loads((a / "config.json").read_text()))
    ours = Transformer(cfg)
    ours.load_hf_state_dict(load_file(str(a / "model.safetensors")))
    ours.eval()
    hf = MixtralForCausalLM.from_pretrained(str(a), dtype=torch.float32)
    hf.eval()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(a / "tokenizer.json"))
    text = "import os\n\ndef main(argv):\n    for name in sorted(os.listdir('.')):\n        print(name)\n"
    ids = torch.tensor([tok.encode(text).ids], dtype=torch.int64)
    assert tok.decode(ids[0].tolist()) == text  # byte-level BPE round-trips source code
    with torch.no_grad():
        mine = ours(ids)
        theirs = hf(input_ids=ids).logits
    assert mine.shape == theirs.shape == (1, ids.shape[1], cfg.vocab_size)
    assert (mine - theirs).abs().max().item() < 1e-4


def test_router_is_trained(runs):
    a, _, _ = runs
    r = json.loads((a / "train_report.json").read_text())
    rt = r["routing"]
    uniform = math.log2(8)
    assert rt["uniform_entropy_bits"] == pytest.approx(uniform)
    assert rt["mean_entropy_bits"] < uniform
    assert rt["mean_entropy_bits"] < rt["mean_entropy_bits_at_init"]
    for row in rt["per_layer"]:
        assert row["entropy_bits"] < uniform
        assert len(row["load"]) == 8 and sum(row["load"]) == pytest.approx(1.0, abs=1e-3)
    # training moved the loss: held-out perplexity below a uniform guess over the vocabulary
    assert r["heldout"]["perplexity"] < 0.75 * r["tokenizer"]["vocab_size"]
    assert r["heldout"]["loss"] < r["heldout"]["loss_at_init"]
    hist = r["training"]["loss_history"]
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_report_has_its_fields(runs):
    a, _, ra = runs
    r = json.loads((a / "train_report.json").read_text())
    for key in ("settings", "corpus", "tokenizer", "model", "training", "heldout", "routing", "cross_layer",
                "seconds", "files"):
        assert key in r, key
    h = r["heldout"]
    assert h["tokens"] > 0 and h["perplexity"] == pytest.approx(math.exp(h["loss"]), rel=1e-2)
    assert 0 < h["bits_per_byte"] < 8
    assert r["corpus"]["train_files_used"] > 0 and r["corpus"]["heldout_files_used"] > 0
    assert r["training"]["steps"] == 40
    cl = r["cross_layer"]
    assert cl["chance_recall"] == pytest.approx(2 / 8)
    L = r["model"]["config"]["num_hidden_layers"]
    assert [row["to_layer"] for row in cl["distance_1"]] == list(range(1, L))
    for row in cl["distance_1"] + cl["distance_2"]:
        assert 0.0 <= row["exact_topk"] <= row["recall"] <= 1.0
        assert 0.0 <= row["top1_covered"] <= 1.0
    # the human-readable summary is printed
    assert "held-out" in ra.stdout and "perplexity" in ra.stdout and "cross-layer" in ra.stdout


def test_bad_arguments_are_one_line_errors(tmp_path):
    r = subprocess.run(_moe_decoder() + ["train-demo", "--out", str(tmp_path / "x"), "--steps", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "--steps" in r.stderr


# --- mixed precision: autocast per step, never around the whole loop ---------------------------
def _tiny_model_and_stream():
    import torch

    from decoder import train_demo as td
    from decoder.model.transformer import Transformer

    s = td.TrainSettings(steps=4, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         vocab_size=128, seq_len=16, batch_size=2, lr=1e-2, threads=1)
    model = Transformer(td.model_config(s, 128))
    model.init_weights(seed=3)
    stream = torch.arange(4000) * 7 % 128                     # a learnable pattern
    return td, s, model, stream


def test_train_refuses_to_run_inside_one_autocast_context():
    # One autocast context around the loop keeps the first step's low-precision weight casts for
    # every later forward (what degraded benchmarks/decode.py's GPU-trained model A to ~35 nats).
    import torch

    td, s, model, stream = _tiny_model_and_stream()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="autocast_dtype"):
        td.train(model, stream, s, progress=False)


def test_train_with_autocast_dtype_learns_what_fp32_learns():
    import torch
    import torch.nn.functional as F

    losses = {}
    for dtype in (None, torch.bfloat16):
        td, s, model, stream = _tiny_model_and_stream()
        report = td.train(model, stream, s, progress=False, autocast_dtype=dtype)
        assert math.isfinite(report["loss_history"][-1]["loss"])
        w = td.eval_windows(stream, s.seq_len, 4)
        with torch.no_grad():
            logits = model(w[:, :-1]).float()
        losses[dtype] = float(F.cross_entropy(logits.reshape(-1, 128), w[:, 1:].reshape(-1)))
    assert losses[None] < math.log(128)                          # it learned something in 4 steps
    assert abs(losses[torch.bfloat16] - losses[None]) < 0.1, losses


def test_family_qwen3_moe_with_fine_grained_experts(tmp_path):
    """--family qwen3_moe trains 16 experts top-4 in Qwen3-MoE's layout: transformers'
    AutoModelForCausalLM loads the checkpoint with our logits, and training lowers the loss."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from decoder.model.config import ModelConfig
    from decoder.model.transformer import Transformer

    out = tmp_path / "q3"
    r = subprocess.run(_moe_decoder() + ["train-demo", "--out", str(out), "--family", "qwen3_moe"] + TINY_ARGS,
                       capture_output=True, text=True, timeout=240, env=dict(os.environ, PYTHONHASHSEED="0"))
    assert r.returncode == 0, f"train-demo failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["model_type"] == "qwen3_moe" and cfg_json["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (cfg_json["num_experts"], cfg_json["num_experts_per_tok"], cfg_json["moe_intermediate_size"]) == (16, 4, 128)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.15.gate_proj.weight" in keys and "model.layers.0.self_attn.q_norm.weight" in keys
    cfg = ModelConfig.from_hf(cfg_json)
    assert cfg.family == "qwen3_moe" and cfg.qk_norm == "head" and cfg.norm_topk_prob
    ours = Transformer(cfg)
    ours.load_hf_state_dict(load_file(str(out / "model.safetensors")))
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, experts_implementation="eager").eval()
    ids = torch.randint(1, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours.eval()(ids) - hf(input_ids=ids).logits).abs().max().item() < 1e-4
    rep = json.loads((out / "train_report.json").read_text())
    # 40 tiny steps lower the held-out loss; the routers stay under uniform entropy (the
    # load-balancing term holds 16 experts near uniform this early)
    assert rep["routing"]["mean_entropy_bits"] < math.log2(16)
    assert len(rep["routing"]["per_layer"][0]["load"]) == 16
    assert rep["heldout"]["loss"] < rep["heldout"]["loss_at_init"]
    assert "--family qwen3_moe --experts 16 --top-k 4 --ffn 128" in rep["command"]


def test_demo_reuses_a_model_trained_before_family_existed(tmp_path):
    """A cached demo model whose report predates --family (no "family" in its settings) was trained
    in the Mixtral layout: `moe-decoder demo` reuses it instead of training again."""
    from dataclasses import asdict

    from decoder import demo, train_demo

    s = train_demo.TrainSettings()
    settings = asdict(s)
    del settings["family"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "train_report.json").write_text(json.dumps({"settings": settings, "marker": 1}))
    assert demo.ensure_checkpoint(tmp_path, s, retrain=False)["marker"] == 1
    # other settings still train again (here: refused before training, the corpus is not read)
    other = train_demo.TrainSettings(family="qwen3_moe", steps=0)
    with pytest.raises(ValueError, match="--steps"):
        demo.ensure_checkpoint(tmp_path, other, retrain=False)
