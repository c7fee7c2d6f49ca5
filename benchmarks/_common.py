"""Scaffolding shared by the held-out-text benchmarks (accuracy.py, cache_plan.py).

- model: `find_checkpoint` (--checkpoint DIR, or the demo's cached checkpoint, trained when
  missing), `pack_bf16` (the checkpoint's bf16 experts into a store directory), `sep_token`;
- text: `heldout_split` (train_demo's held-out stdlib files: even-numbered evaluate,
  odd-numbered calibrate, no shared file), `encode_texts`, `eval_windows`;
- calibration: `calibrate` (decoder.calibrate on the calibration text; the profile goes next to
  the model in the store);
- command line: `build_parser` (the flags every such benchmark has, around its own ones),
  `run_in_tempdir`, `run_info` (command and machine, recorded in the JSON), `cpu_model` (the
  host CPU's name and AVX-512, for any benchmark's metadata);
- output: `write_outputs` (results/NAME.json and the plot NAME.png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

import torch  # noqa: E402

T = TypeVar("T")


def cpu_model() -> dict[str, Any]:
    """The host CPU's model name and whether it has AVX-512 (torch's int4 CPU layout depends on
    it; the host-computed miss rows run on it)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor() or None, "avx512f": None}
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), None)
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
    return {"model": name, "avx512f": "avx512f" in flags}


# ---------------------------------------------------------------------------------------------
# model and text
# ---------------------------------------------------------------------------------------------
def find_checkpoint(path: str | None, log: Callable[[str], None] = print, family: str | None = None) -> Path:
    """--checkpoint DIR as given; otherwise the demo's cached checkpoint, trained with
    decoder.train_demo's defaults when missing or trained with other settings. family (a
    train-demo family other than mixtral): checkpoint-FAMILY, trained in that family's layout
    with its default experts, top-k and expert width."""
    if path:
        p = Path(path)
        for f in ("config.json", "tokenizer.json"):
            if not (p / f).is_file():
                raise FileNotFoundError(f"{p} is not a checkpoint with a tokenizer: {f} is missing")
        return p
    from decoder import demo, train_demo

    if family in (None, "mixtral"):
        ckpt, settings = demo.default_cache_dir() / "checkpoint", train_demo.TrainSettings()
    else:
        (experts, top_k, ffn), _ = train_demo.TRAIN_FAMILIES[family]
        ckpt = demo.default_cache_dir() / f"checkpoint-{family}"
        settings = train_demo.TrainSettings(family=family, num_experts=experts, top_k=top_k, intermediate_size=ffn)
    log(f"demo checkpoint: {ckpt}")
    demo.ensure_checkpoint(ckpt, settings, retrain=False)
    return ckpt


def heldout_split(heldout_mb: float = 1.0) -> tuple[list[str], list[str], dict[str, Any]]:
    """(evaluation texts, calibration texts, info): train_demo's held-out stdlib files (never
    trained on) alternately assigned, so the two sets share no file."""
    from decoder import train_demo

    s = train_demo.TrainSettings(heldout_mb=heldout_mb, corpus_mb=1e-6)
    corpus = train_demo.load_corpus(s)
    texts = corpus.heldout_texts
    if len(texts) < 2:
        raise ValueError("the held-out split has fewer than two files")
    ev, cal = texts[0::2], texts[1::2]
    info = {"source": f"train_demo held-out split of {corpus.root} (hash(path) % {s.heldout_mod} == 0)",
            "heldout_files": len(texts), "eval_files": len(ev), "calib_files": len(cal),
            "eval_bytes": sum(len(t.encode()) for t in ev), "calib_bytes": sum(len(t.encode()) for t in cal)}
    return ev, cal, info


def encode_texts(tokenizer_json: Path, texts: Sequence[str], sep_id: int) -> torch.Tensor:
    """Each text's ids (no special tokens added) followed by sep_id (the model's EOS): [N] int64,
    the format train_demo trains on."""
    from tokenizers import Tokenizer

    from decoder import train_demo

    return train_demo.token_stream(Tokenizer.from_file(str(tokenizer_json)), texts, sep_id)


def eval_windows(stream: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """n windows of seq_len + 1 tokens evenly spaced over the stream: [n, seq_len + 1]."""
    from decoder.train_demo import eval_windows as spaced

    w = spaced(stream, seq_len, n)
    if w.shape[0] < n:
        raise ValueError(f"evaluation text too short: {w.shape[0]} windows of {seq_len} tokens, wanted {n}")
    return w


def sep_token(config: dict[str, Any]) -> int:
    """The id that separates texts: the config's eos_token_id (the first one of a list; 0 if none)."""
    eos = config.get("eos_token_id", 0)
    return int(eos[0] if isinstance(eos, list) else (eos if eos is not None else 0))


def pack_bf16(checkpoint: Path, store: Path, model: str) -> None:
    """The checkpoint's experts (bf16) and dense part into the store directory, as `model`."""
    from expert_store.pack import pack_checkpoint
    from expert_store.tiers import NvmeTier

    pack_checkpoint(checkpoint, NvmeTier(store), model=model, precisions=("bf16",), progress=False)


# ---------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------
def calibrate(engine: Any, store_dir: Path, calib_ids: torch.Tensor, *, model: str, calib_tokens: int,
              seq_len: int, progress: bool) -> dict[str, Any]:
    """decoder.calibrate on the calibration text; the profile goes next to `model` in the store."""
    from decoder.calibrate import build_profile, calibrate_model, token_windows, upload_profile, validate_profile

    windows = token_windows(calib_ids.tolist(), seq_len, calib_tokens)
    measured = calibrate_model(engine.model, windows, progress=progress)
    profile = build_profile(model, measured, engine.config, text_file=None, seq_len=seq_len)
    profile["text_file"] = "held-out stdlib files (odd-numbered)"
    validate_profile(profile, engine.config.num_hidden_layers, engine.config.num_local_experts)
    upload_profile(str(store_dir), None, model, (json.dumps(profile) + "\n").encode())
    return profile


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def build_parser(description: str, defaults: Any, eval_help: str,
                 add_own: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """--checkpoint, --eval-tokens, --calib-tokens, --seq-len, then the benchmark's own flags
    (`add_own`), then --device, --threads, --out-dir, --no-progress; defaults from the
    benchmark's Settings (`defaults`)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--checkpoint", default=None, metavar="DIR",
                    help="HF Mixtral checkpoint with tokenizer.json (default: the demo model, cached or trained)")
    ap.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens, help=eval_help)
    ap.add_argument("--calib-tokens", type=int, default=defaults.calib_tokens)
    ap.add_argument("--seq-len", type=int, default=defaults.seq_len)
    add_own(ap)
    ap.add_argument("--device", default=defaults.device)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine's cores are shared)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--no-progress", action="store_true")
    return ap


def floats(text: str) -> tuple[float, ...]:
    """'0.1,0.2' -> (0.1, 0.2); empty items are skipped."""
    return tuple(float(x) for x in text.split(",") if x.strip())


def names(text: str) -> tuple[str, ...]:
    """'a, b' -> ('a', 'b'); empty items are skipped."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def run_in_tempdir(prefix: str, fn: Callable[[Path], T]) -> T:
    """fn(a fresh temporary directory), removed afterwards whatever happens."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return fn(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_info(script: str, argv: Sequence[str] | None, device: str, threads: int) -> dict[str, Any]:
    """The JSON's "command" and "machine" entries."""
    return {
        "command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"device": device, "machine": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__, "threads": threads},
    }


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def write_outputs(result: dict[str, Any], out_dir: Path, name: str,
                  plot: Callable[[dict[str, Any], Path], None]) -> tuple[Path, Path]:
    """out_dir/NAME.json (the result, indented) and out_dir/NAME.png (`plot`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, png = out_dir / f"{name}.json", out_dir / f"{name}.png"
    js.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, png)
    return js, png


def kernel_table(prof: Any, steps: int, cuda: bool, limit: int = 30) -> tuple[list[dict[str, Any]], str]:
    """The kernels (CUDA) or ops (CPU) of a torch.profiler run of `steps` decode steps, most
    device time first: rows {name, calls, per_step, us, us_per_step, share} and a printable
    table whose first line sums them (kernels per step, device time per step). Kernels that a
    CUDA graph replays are listed too: CUPTI reports them one by one."""
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if not cuda or e.device_type.name == "CUDA"]
    events = [e for e in events if getattr(e, key) > 0]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    calls = sum(e.count for e in events)
    rows = [{"name": e.key[:90], "calls": e.count, "per_step": e.count / steps, "us": getattr(e, key),
             "us_per_step": getattr(e, key) / steps, "share": getattr(e, key) / total} for e in events]
    lines = [f"{calls / steps:.1f} {'kernels' if cuda else 'ops'} and {total / steps:.1f} us of "
             f"{'device' if cuda else 'CPU'} time per step ({steps} steps)",
             f"{'us/step':>9} {'share':>6} {'calls/step':>10}  name"]
    lines += [f"{r['us_per_step']:9.1f} {100 * r['share']:5.1f}% {r['per_step']:10.2f}  {r['name']}"
              for r in rows[:limit]]
    return rows[:limit], "\n".join(lines)
