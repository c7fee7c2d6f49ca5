"""benchmarks/_common.py: the scaffolding accuracy.py and cache_plan.py share (argument parsing
around each benchmark's own flags, the separator token, the temporary work directory, output
files, the recorded command)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import _common, accuracy, cache_plan  # noqa: E402


def test_parsers_share_the_common_flags_and_keep_their_own():
    for mod, own in ((accuracy, ["--ratios", "0.1,0.3", "--scoring", "decode"]),
                     (cache_plan, ["--budgets", "0.25", "--planners", "equal,uniform-paper"])):
        a = mod.parse_args(["--checkpoint", "C", "--eval-tokens", "64", "--seq-len", "16", "--threads", "2",
                            "--out-dir", "/o", "--no-progress", "--device", "cuda"] + own)
        assert (a.checkpoint, a.eval_tokens, a.seq_len, a.threads, a.out_dir, a.no_progress, a.device) == \
            ("C", 64, 16, 2, "/o", True, "cuda")
        d = mod.parse_args([])
        assert d.eval_tokens == mod.Settings().eval_tokens and d.out_dir == str(_common.RESULTS)
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--budgets", "0.25"])      # cache_plan's flag only
    assert cache_plan.parse_args(["--planners", "equal, popularity,"]).planners == "equal, popularity,"
    assert _common.names("equal, popularity,") == ("equal", "popularity")
    assert _common.floats("0.125,,0.5") == (0.125, 0.5) and _common.floats("") == ()


def test_sep_token():
    assert _common.sep_token({"eos_token_id": 7}) == 7
    assert _common.sep_token({"eos_token_id": [3, 9]}) == 3
    assert _common.sep_token({"eos_token_id": None}) == 0 and _common.sep_token({}) == 0


def test_run_in_tempdir_removes_it_even_on_error():
    seen = []
    assert _common.run_in_tempdir("bench-common-", lambda w: (seen.append(w), w.is_dir())[1]) is True
    assert not seen[0].exists()
    with pytest.raises(RuntimeError):
        _common.run_in_tempdir("bench-common-", lambda w: (seen.append(w), (_ for _ in ()).throw(RuntimeError()))
                               )
    assert not seen[1].exists()


def test_write_outputs_and_run_info(tmp_path):
    calls = []
    js, png = _common.write_outputs({"rows": [1, 2]}, tmp_path / "out", "x",
                                    lambda r, p: (calls.append(r), p.write_bytes(b"png")))
    assert json.loads(js.read_text()) == {"rows": [1, 2]} and png.read_bytes() == b"png"
    assert js.name == "x.json" and calls == [{"rows": [1, 2]}]
    info = _common.run_info("cache_plan.py", ["--no-progress"], "cpu", 1)
    assert info["command"] == "python benchmarks/cache_plan.py --no-progress"
    assert info["machine"]["device"] == "cpu" and info["machine"]["threads"] == 1


def test_missing_checkpoint_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        _common.find_checkpoint(str(tmp_path))
