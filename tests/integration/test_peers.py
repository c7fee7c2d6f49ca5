"""benchmarks/peers/ without a llama.cpp build (seconds): the expert placements for a budget
(--n-cpu-moe and the -ot patterns, checked against the tensor names of a GGUF written here),
model B's random GGUF (read back with gguf's reader), model A's tokenizer registration and
checkpoint link (loaded back through transformers), llama-bench rows and the table/target
logic on recorded figures.

The build itself, conversion and llama-bench run in the CPU pipeline check instead (a llama.cpp
build is minutes): `python3 benchmarks/peers/run.py --model B --cpu --tiny ...` (benchmarks/README.md)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import gguf  # noqa: E402  (the `bench` extra; the GPU run imports the fetched gguf-py instead)

from benchmarks.peers import bench, convert, gguf_models, placement, table  # noqa: E402

TINY = gguf_models.Shapes(layers=3, hidden=64, ffn=96, heads=4, kv_heads=2, experts=4, top_k=2, vocab=300)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("peers") / "b.gguf"
    return out, gguf_models.write_random_model(out, TINY, "q4_0", seed=3)


# ------------------------------------------------------------------ placement
def test_n_cpu_moe_is_the_layers_whose_experts_stay_on_the_cpu():
    assert [placement.n_cpu_moe(8, b) for b in (1.0, 0.5, 0.25, 0.0)] == [0, 4, 6, 8]
    p = placement.ncmoe_placement(8, 0.25)
    assert p.args == ("-ncmoe", "6") and p.gpu_tensors == (0,) * 6 + (3, 3) and p.gpu_fraction == 0.25
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            placement.n_cpu_moe(8, bad)


@pytest.mark.parametrize("layers,budget", [(8, 0.25), (8, 0.5), (32, 0.25), (3, 0.5), (12, 0.1)])
def test_ot_spreads_the_budget_over_layers(layers, budget):
    counts = placement.spread_counts(layers, budget)
    assert len(counts) == layers and sum(counts) == round(3 * layers * budget)
    assert max(counts) - min(counts) <= 1 and all(0 <= c <= 3 for c in counts)
    ot = placement.ot_placement(layers, budget)
    assert ot.args[0] == "-ot" and "," not in ot.args[1]        # llama-bench splits test values on ','
    assert abs(ot.gpu_fraction - budget) <= 1 / (6 * layers) + 1e-12
    assert placement.spread_counts(8, 0.25) == (0, 1, 1, 1) * 2 and placement.spread_counts(8, 0.5) == (1, 2) * 4


def test_ot_patterns_keep_exactly_the_planned_tensors_on_the_gpu():
    # 12 layers: blk.1 must not catch blk.10/blk.11
    names = [f"blk.{l}.ffn_{p}_exps.weight" for l in range(12) for p in ("gate", "up", "down")]
    names += [f"blk.{l}.attn_q.weight" for l in range(12)] + ["output.weight"]
    for budget in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
        counts = placement.spread_counts(12, budget)
        on_gpu = placement.gpu_tensor_names(counts, names)
        want = {f"blk.{l}.ffn_{placement.PROJECTIONS[k]}_exps.weight" for l, c in enumerate(counts) for k in range(c)}
        assert on_gpu == want
    assert placement.cpu_override((3,) * 12) == ""
    assert placement.ot_placement(12, 1.0).args == ()


def test_placements_list_both_ways_per_budget_and_both_ends_once():
    ps = placement.placements(8, (0.25, 0.5))
    assert [(p.name, p.budget) for p in ps] == [("ncmoe", 0.25), ("ot", 0.25), ("ncmoe", 0.5), ("ot", 0.5),
                                                ("ncmoe", 1.0), ("ncmoe", 0.0)]
    assert [p.name for p in placement.placements(8, (0.5,), ("ncmoe",))] == ["ncmoe"] * 3
    with pytest.raises(ValueError, match="unknown placement"):
        placement.placements(8, (0.5,), ("experts",))


# ------------------------------------------------------------------ model B as GGUF
def test_random_model_reads_back_as_a_llama_moe_gguf(tiny_gguf):
    path, info = tiny_gguf
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 3
    assert (f["llama.expert_count"], f["llama.expert_used_count"], f["llama.embedding_length"]) == (4, 2, 64)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"],
            f["llama.rope.dimension_count"]) == (4, 2, 16)
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == 300 and tokens[:3] == ["<unk>", "<s>", "</s>"] and "<0x0A>" in tokens
    t = {x.name: x for x in r.tensors}
    up = t["blk.1.ffn_up_exps.weight"]
    assert up.tensor_type == gguf.GGMLQuantizationType.Q4_0 and [int(d) for d in up.shape] == [64, 96, 4]
    assert [int(d) for d in t["blk.1.ffn_down_exps.weight"].shape] == [96, 64, 4]
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    w = gguf.quants.dequantize(up.data, up.tensor_type)
    assert w.shape == (4, 96, 64) and np.isfinite(w).all() and 0.015 < float(w.std()) < 0.025
    assert not np.array_equal(w[0], w[1])                 # experts differ
    router = np.asarray(t["blk.0.ffn_gate_inp.weight"].data)
    assert 0.3 < float(router.std()) < 0.7
    assert info["expert_bytes"] == sum(int(x.n_bytes) for x in r.tensors if "_exps" in x.name)
    assert info["expert_bytes_per_expert"] == 3 * 64 * 96 // 32 * 18
    with pytest.raises(ValueError, match="multiples of 32"):
        gguf_models.write_random_model(path.with_name("bad.gguf"), gguf_models.Shapes(hidden=48, heads=4, kv_heads=2))


def test_layout_and_gpu_bytes_of_each_placement(tiny_gguf):
    path, info = tiny_gguf
    layout = bench.model_layout(path)
    assert (layout["layers"], layout["experts"], layout["expert_type"]) == (3, 4, "Q4_0")
    per_tensor = info["expert_bytes"] // 9
    for p in placement.placements(3, (0.25, 0.5)):
        assert bench.gpu_expert_bytes(layout, p) == sum(p.gpu_tensors) * per_tensor
        # the -ot patterns leave on the GPU exactly the tensors the bytes count
        assert len(placement.gpu_tensor_names(p.gpu_tensors, list(layout["expert_tensor_bytes"]))) == sum(p.gpu_tensors)


# ------------------------------------------------------------------ model A's tokenizer
def test_declared_pre_tokenizer():
    bpe = {"model": {"type": "BPE"}}
    assert convert.llama_pre_tokenizer({**bpe, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                                                  "use_regex": True}}) == "gpt-2"
    seq = {"type": "Sequence", "pretokenizers": [{"type": "ByteLevel", "add_prefix_space": False}]}
    assert convert.llama_pre_tokenizer({**bpe, "pre_tokenizer": seq}) == "gpt-2"
    for pre in ({"type": "ByteLevel", "add_prefix_space": True}, {"type": "ByteLevel", "add_prefix_space": False,
                                                                   "use_regex": False},
                {"type": "Metaspace"}, None):
        assert convert.llama_pre_tokenizer({**bpe, "pre_tokenizer": pre}) is None
    assert convert.llama_pre_tokenizer({"model": {"type": "Unigram"},
                                        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}) is None


def test_linked_checkpoint_loads_our_tokenizer_through_transformers(tmp_path):
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer

    from decoder import train_demo

    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n"] * 20
    tok = train_demo.train_tokenizer(texts, 300)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "tokenizer.json").write_text(tok.to_str())
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}))
    save_file({"w": np.zeros(4, dtype=np.float32)}, str(ckpt / "model.safetensors"))
    # the declaration is what the converter falls back to
    assert convert.llama_pre_tokenizer(json.loads(tok.to_str())) == "gpt-2"
    dst = convert.link_checkpoint(ckpt, tmp_path / "kept")
    (ckpt / "model.safetensors").unlink()                  # decode.py deletes its work directory
    assert (dst / "model.safetensors").stat().st_size > 0
    hf = AutoTokenizer.from_pretrained(str(dst))
    text = "def sub(a, b):\n    return a - b  # quick fox\n"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False).ids
    assert hf.eos_token == train_demo.EOT
    assert convert.link_checkpoint(dst, dst) == dst and (dst / "model.safetensors").stat().st_size > 0  # in place
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        convert.link_checkpoint(ckpt, tmp_path / "again")


# ------------------------------------------------------------------ llama-bench rows
BUILD = {"source": {"llama_cpp_commit": "0c1e57098", "llama_cpp_python": "0.3.36"},
         "cmake_flags": ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90"]}


def bench_result(ts: float, **kw) -> dict:
    """A llama-bench -o json entry (the fields peer_row reads)."""
    return {"build_commit": "0c1e57098", "build_number": 0, "n_gen": 64, "n_depth": 48, "n_threads": 16,
            "avg_ts": ts, "stddev_ts": 0.4, "samples_ts": [ts - 0.3, ts + 0.3], "backends": "CUDA",
            "gpu_info": "NVIDIA H200", "n_gpu_layers": 99, **kw}


def test_bench_command_and_row(tiny_gguf):
    path, _ = tiny_gguf
    layout = bench.model_layout(path)
    p = placement.ot_placement(3, 0.5)
    cmd = bench.bench_command(Path("/b/llama-bench"), path, p, n_gen=64, n_depth=48, threads=16, reps=5)
    assert cmd[:2] == ["/b/llama-bench", "-m"] and cmd[-2:] == list(p.args)
    i = cmd.index
    assert (cmd[i("-p") + 1], cmd[i("-n") + 1], cmd[i("-ngl") + 1], cmd[i("-o") + 1]) == ("0", "64", "99", "json")
    assert "-v" in cmd
    extra = bench.bench_command(Path("/b/llama-bench"), path, p, n_gen=64, n_depth=48, threads=16, reps=5,
                                extra=("-lm", "auto,none"))
    assert extra[-2:] == ["-lm", "auto,none"]
    load = bench.load_reports(BENCH_STDERR)[0]
    row = bench.peer_row(bench_result(57.5, load_mode="auto"), model="B", placement=p, layout=layout, cmd=cmd,
                         build=BUILD, seconds=3.0, load=load)
    assert row["model_buffers_mib"]["CUDA0"] == 6104.06 and row["overridden_tensors"] == {"CPU_REPACK": 2}
    assert row["mode"] == "llama.cpp-ot" and row["tokens_per_s"] == 57.5 and row["budget"] == 0.5
    assert row["gpu_expert_bytes"] == bench.gpu_expert_bytes(layout, p) and row["weight_type"] == "Q4_0"
    assert row["version"]["llama_cpp_commit"] == "0c1e57098" and "-ot" in row["command"]
    assert abs(row["ms_per_token"] - 1e3 / 57.5) < 1e-9


# what llama-bench -v printed on stderr for one placement run twice (-lm auto,none), abridged
BENCH_STDERR = """llama_model_loader: loaded meta data with 30 key-value pairs and 33 tensors from b.gguf (version GGUF V3 (latest))
llama_model_loader: tensor overrides to CPU are used with mmap enabled - consider using --load-mode none for better performance
tensor blk.0.ffn_up_exps.weight (0 MiB q4_0) buffer type overridden to CPU_REPACK
tensor blk.1.ffn_gate_exps.weight (0 MiB q4_0) buffer type overridden to CPU_REPACK
load_tensors: offloaded 3/3 layers to GPU
load_tensors:        CUDA0 model buffer size =  6104.06 MiB
load_tensors:   CPU_Mapped model buffer size =    70.31 MiB
load_tensors:   CPU_REPACK model buffer size =   528.00 MiB
llama_context: constructing llama_context
llama_kv_cache:      CUDA0 KV buffer size =     8.00 MiB
tensor blk.0.ffn_up_exps.weight (0 MiB q4_0) buffer type overridden to CPU_REPACK
tensor blk.1.ffn_gate_exps.weight (0 MiB q4_0) buffer type overridden to CPU_REPACK
load_tensors:        CUDA0 model buffer size =  6104.06 MiB
load_tensors:          CPU model buffer size =    70.31 MiB
load_tensors:   CPU_REPACK model buffer size =   528.00 MiB
llama_context: constructing llama_context
"""


def test_load_reports_pair_each_load_with_its_buffers():
    loads = bench.load_reports(BENCH_STDERR)
    assert loads == [{"buffers_mib": {"CUDA0": 6104.06, "CPU_Mapped": 70.31, "CPU_REPACK": 528.0},
                      "overridden": {"CPU_REPACK": 2}},
                     {"buffers_mib": {"CUDA0": 6104.06, "CPU": 70.31, "CPU_REPACK": 528.0},
                      "overridden": {"CPU_REPACK": 2}}]
    assert bench.load_reports("no load here\n") == []


# ------------------------------------------------------------------ table and target
B_CONFIG = {"hidden": 4096, "ffn": 14336, "layers": 8, "experts": 8, "precision": "int4", "group_size": 128}


def ours(mode, budget, tps, quota=None, step="step", dense=True):
    return {"model": "B", "mode": mode, "budget": budget, "tokens_per_s": tps, "decode_step": step,
            "gpu_quota": quota, "dense_slots": dense}


def peer(placement_name, budget, tps, frac=None):
    return {"model": "B", "peer": "llama.cpp", "mode": f"llama.cpp-{placement_name}", "placement": placement_name,
            "budget": budget, "gpu_expert_fraction": budget if frac is None else frac,
            "gpu_expert_bytes": int(6.3e9 * (budget if frac is None else frac)), "tokens_per_s": tps,
            "weight_type": "Q4_0", "command": f"llama-bench ... {placement_name}",
            "version": BUILD["source"], "build_flags": BUILD["cmake_flags"]}


# our B rows and llama.cpp's from the H200 figures (tokens/s)
DECODE_ROWS = [ours("resident", None, 59.6, [8] * 8), ours("lru", 0.25, 29.4, [2] * 8), ours("lru", 0.5, 34.5, [4] * 8),
               ours("adapmoe", 0.25, 20.0, [2] * 8, step="eager"), ours("adapmoe", 0.25, 26.5, [2] * 8),
               ours("adapmoe", 0.5, 30.9, [4] * 8), ours("reference", None, 275.1), ours("accelerate", None, 0.26)]
PEER_ROWS = [peer("ncmoe", 1.0, 836.6), peer("ncmoe", 0.5, 82.0), peer("ot", 0.5, 70.0), peer("ncmoe", 0.25, 57.5),
             peer("ncmoe", 0.0, 43.5)]


def test_our_rows_pick_the_gpu_driven_step_and_size_gpu_memory():
    rows = {(r["mode"], r["budget"]): r for r in table.our_rows(DECODE_ROWS, "B", B_CONFIG)}
    assert ("reference", None) not in rows
    assert rows[("adapmoe", 0.25)]["tokens_per_s"] == 26.5          # not the eager row
    per = 3 * 4096 * 14336 * 2                                      # a dense bf16 slot
    assert rows[("lru", 0.25)]["gpu_expert_fraction"] == 0.25 and rows[("lru", 0.25)]["gpu_expert_bytes"] == 16 * per
    assert rows[("resident", None)]["gpu_expert_fraction"] == 1.0 and rows[("resident", None)]["gpu_expert_bytes"] == 64 * per
    assert rows[("accelerate", None)]["gpu_expert_bytes"] == 0
    raw = table.our_expert_bytes(B_CONFIG, dense_slots=False)
    assert raw == 3 * 4096 * 14336 // 2 + 3 * 4096 * 14336 // 128 * 2
    assert table.our_expert_bytes({"hidden": 2048, "ffn": 7168}, dense_slots=False) == 3 * 2048 * 7168 * 2


def test_target_is_adapmoe_over_the_best_llama_cpp_placement_at_the_same_budget():
    rows, targets = table.combine(DECODE_ROWS, {"models": {"B": {"config": B_CONFIG}}}, PEER_ROWS)
    by = {t["target"].split(":")[0]: t for t in targets}
    assert set(by) == {"B @ 25%", "B @ 50%"}
    assert by["B @ 50%"]["llama_cpp_placement"] == "ncmoe" and by["B @ 50%"]["measured"] == pytest.approx(30.9 / 82.0)
    assert by["B @ 25%"]["measured"] == pytest.approx(26.5 / 57.5) and not by["B @ 25%"]["met"]
    faster = [ours("adapmoe", 0.5, 100.0, [4] * 8)]
    (t,) = table.combine(faster, None, PEER_ROWS)[1]
    assert t["met"] and t["measured"] == pytest.approx(100 / 82)
    # a llama-quantize type other than the one matched to our experts is shown, not compared
    other = {**peer("ncmoe", 0.5, 500.0), "weight_type": "Q2_K", "matched_type": False}
    rows2, (t2,) = table.combine(faster, None, PEER_ROWS + [other])
    assert t2["llama_cpp_tokens_per_s"] == 82.0 and any(r.get("weight_type") == "Q2_K" for r in rows2)
    md = table.markdown(rows, targets)
    assert "- target MISSED: B @ 25%: adapmoe >= 1.2x llama.cpp at the same GPU expert memory: 0.46" in md
    assert "`llama-bench ... ot`" in md and "0c1e57098" in md
    assert re.search(r"\| B \| llama.cpp \| ncmoe \(Q4_0\) \| 50% \| 50% \| 3\.15 \| 82\.0 \| 0\.38 \|", md)


def test_write_outputs(tmp_path, capsys):
    rows, targets = table.combine(DECODE_ROWS, {"models": {"B": {"config": B_CONFIG}}}, PEER_ROWS)
    table.write(tmp_path, "peers_B", rows, targets, {"command": "x"})
    assert json.loads((tmp_path / "peers_B.json").read_text()) == json.loads(json.dumps(rows))
    assert json.loads((tmp_path / "peers_B_meta.json").read_text())["targets"] == targets
    assert (tmp_path / "peers_B.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table.print_targets(targets)
    out = capsys.readouterr().out
    assert out.count("target MISSED") == 2


# ------------------------------------------------------------------ the build's command line
def test_build_script_names_the_flags_and_targets(tmp_path):
    from benchmarks.peers import llama_src

    with pytest.raises(FileNotFoundError, match="fetch-llama-cpp.sh"):
        llama_src.source_info(tmp_path)
    (tmp_path / "ADAPMOE_SOURCE.json").write_text(json.dumps({"llama_cpp_commit": "0c1e57098",
                                                               "llama_cpp_python": "0.3.36"}))
    script, conf = llama_src.build_script(tmp_path, tmp_path / "b", cuda=True, jobs=16, nice=19)
    assert {"-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DLLAMA_BUILD_COMMIT=0c1e57098",
            "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF"} <= set(conf)
    assert script.endswith("nice -n 19 cmake --build " + str(tmp_path / "b") + " --target llama-bench llama-quantize -j 16")
    _, cpu = llama_src.build_script(tmp_path, tmp_path / "b", cuda=False, jobs=2)
    assert "-DGGML_CUDA=OFF" in cpu and not any(a.startswith("-DCMAKE_CUDA") for a in cpu)


def test_placements_past_the_deadline_are_skipped_rows(tiny_gguf, tmp_path):
    import time

    path, _ = tiny_gguf
    seen = []
    rows = bench.bench_model(tmp_path / "no-llama-bench", path, "B", placement.placements(3, (0.5,)), n_gen=8,
                             n_depth=0, threads=1, reps=1, build=BUILD, log=tmp_path / "log",
                             on_row=seen.append, deadline=time.perf_counter() + bench.DEADLINE_MARGIN_S + 1)
    assert len(rows) == 4 and seen == rows
    assert all(r["tokens_per_s"] is None and r["error"] == "skipped: the call's deadline" for r in rows)
    assert rows[0]["budget"] == 0.5 and rows[0]["gpu_expert_bytes"] > 0
    # without a deadline the missing binary is that placement's error, and the next still runs
    rows = bench.bench_model(tmp_path / "no-llama-bench", path, "B", placement.placements(3, (0.5,))[:2],
                             n_gen=8, n_depth=0, threads=1, reps=1, build=BUILD, log=tmp_path / "log")
    assert [r["placement"] for r in rows] == ["ncmoe", "ot"] and all("error" in r for r in rows)
