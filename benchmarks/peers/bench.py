"""llama.cpp's decode speed with part of the experts on the CPU: one llama-bench run per
expert placement (benchmarks/peers/placement.py), each a row with its command line.

llama-bench -m MODEL -p 0 -n N -d D -ngl 99 -t T -r R -o json -v [-ncmoe K | -ot PATTERNS] [EXTRA]

- `-p 0 -n N`: no prompt test, N generated tokens at batch 1 (decode only), as our rows' N new
  tokens; `-d D`: after D tokens of context (our rows' prompt length);
- `-ngl 99`: every layer on the GPU, then the placement sends expert tensors to the CPU, where
  llama.cpp computes them (it does not copy them to the GPU for a batch of 1);
- `-t T`: CPU threads for those experts (all the host's cores by default), `-r R` repetitions
  (tokens/s is their mean, with the standard deviation);
- `-v`: the load log, from which each row records the model buffers llama.cpp allocated per
  device (`CUDA0`, `CPU_Mapped`, `CPU_REPACK`, ... MiB) and how many tensors the placement
  moved: what the placement did, not only what it asked for. It prints nothing per token.
- EXTRA: further llama-bench flags (e.g. `-lm auto,none`: a row per value).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.peers.placement import PROJECTIONS, Placement


def model_layout(gguf_path: Path) -> dict[str, Any]:
    """Layers, experts, type and the bytes of every expert tensor of a GGUF (its header only)."""
    import gguf

    r = gguf.GGUFReader(str(gguf_path))
    arch = r.fields["general.architecture"].contents()
    layers = int(r.fields[f"{arch}.block_count"].contents())
    experts = int(r.fields[f"{arch}.expert_count"].contents())
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    types = {t.name: t.tensor_type.name for t in r.tensors}
    exps = {n: s for n, s in sizes.items() if "_exps" in n}
    missing = [f"blk.{l}.ffn_{p}_exps.weight" for l in range(layers) for p in PROJECTIONS
               if f"blk.{l}.ffn_{p}_exps.weight" not in exps]
    if missing:
        raise ValueError(f"{gguf_path}: no merged expert tensor(s) {missing[:3]}...: not a MoE llama-layout GGUF")
    return {"path": str(gguf_path), "arch": arch, "layers": layers, "experts": experts,
            "expert_tensor_bytes": exps, "expert_bytes": sum(exps.values()), "bytes": sum(sizes.values()),
            "expert_type": types["blk.0.ffn_up_exps.weight"]}


def gpu_expert_bytes(layout: dict[str, Any], placement: Placement) -> int:
    """Bytes of expert tensors the placement keeps on the GPU."""
    exps = layout["expert_tensor_bytes"]
    return sum(exps[f"blk.{l}.ffn_{PROJECTIONS[k]}_exps.weight"]
               for l, c in enumerate(placement.gpu_tensors) for k in range(c))


def bench_command(llama_bench: Path, model: Path, placement: Placement, *, n_gen: int, n_depth: int, threads: int,
                  reps: int, n_gpu_layers: int = 99, extra: tuple[str, ...] = ()) -> list[str]:
    return [str(llama_bench), "-m", str(model), "-p", "0", "-n", str(n_gen), "-d", str(n_depth),
            "-ngl", str(n_gpu_layers), "-t", str(threads), "-r", str(reps), "-o", "json", "-v", *placement.args,
            *extra]


DEADLINE_MARGIN_S = 10.0   # left for the table after the last llama-bench run
MIN_RUN_S = 5.0            # a placement is not started with less time than this left

_BUFFER = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([0-9.]+) MiB")
_OVERRIDE = re.compile(r"^tensor \S+ .*buffer type overridden to (\S+)")


def load_reports(stderr: str) -> list[dict[str, Any]]:
    """Per model load in a llama-bench -v log, in order: {"buffers_mib": {buffer: MiB},
    "overridden": {buffer type: tensors}}."""
    loads: list[dict[str, Any]] = []
    overridden: dict[str, int] = {}
    for line in stderr.splitlines():
        m = _OVERRIDE.match(line)
        if m:
            overridden[m.group(1)] = overridden.get(m.group(1), 0) + 1
            continue
        m = _BUFFER.search(line)
        if m:
            if not loads or m.group(1) in loads[-1]["buffers_mib"] or loads[-1].get("closed"):
                loads.append({"buffers_mib": {}, "overridden": overridden})
                overridden = {}
            loads[-1]["buffers_mib"][m.group(1)] = float(m.group(2))
        elif loads and line.startswith("llama_context"):
            loads[-1]["closed"] = True        # the next buffer lines belong to the next load
    for load in loads:
        load.pop("closed", None)
    return loads


def run_bench(cmd: list[str], log: Path, timeout: float = 600) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run llama-bench: (the JSON results of its stdout, the load reports of its stderr);
    stderr is appended to `log`."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    err = proc.stderr.decode(errors="replace")
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n{err}")
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed (exit {proc.returncode}); see {log}")
    text = proc.stdout.decode(errors="replace")
    start = text.find("[")
    if start < 0:
        raise RuntimeError(f"llama-bench printed no JSON: {text[-500:]!r}")
    return json.loads(text[start:]), load_reports(err)


def peer_row(result: dict[str, Any], *, model: str, placement: Placement, layout: dict[str, Any],
             cmd: list[str], build: dict[str, Any], seconds: float, load: dict[str, Any] | None = None) -> dict[str, Any]:
    """One table row from one llama-bench result (and the load report of its model)."""
    return {
        "model": model, "peer": "llama.cpp", "mode": f"llama.cpp-{placement.name}", "placement": placement.name,
        "model_path": layout["path"], "budget": placement.budget, "gpu_expert_fraction": placement.gpu_fraction,
        "gpu_layer_tensors": list(placement.gpu_tensors),
        "gpu_expert_bytes": gpu_expert_bytes(layout, placement), "expert_bytes": layout["expert_bytes"],
        "weight_type": layout["expert_type"], "model_bytes": layout["bytes"],
        "tokens_per_s": float(result["avg_ts"]), "tokens_per_s_stddev": float(result.get("stddev_ts") or 0.0),
        "ms_per_token": 1e3 / float(result["avg_ts"]) if result.get("avg_ts") else None,
        "samples_ts": result.get("samples_ts"),
        "n_gen": int(result["n_gen"]), "n_depth": int(result.get("n_depth", 0)), "threads": int(result["n_threads"]),
        "command": shlex.join(cmd),
        "version": {"llama_cpp_commit": build["source"]["llama_cpp_commit"],
                    "llama_cpp_python": build["source"]["llama_cpp_python"],
                    "build_commit": result.get("build_commit"), "build_number": result.get("build_number")},
        "build_flags": build.get("cmake_flags"),
        "backends": result.get("backends"), "gpu_info": result.get("gpu_info"), "cpu_info": result.get("cpu_info"),
        "flash_attn": result.get("flash_attn"), "n_gpu_layers": result.get("n_gpu_layers"),
        "n_cpu_moe": result.get("n_cpu_moe"), "tensor_buft_overrides": result.get("tensor_buft_overrides"),
        "load_mode": result.get("load_mode"),
        "model_buffers_mib": (load or {}).get("buffers_mib"), "overridden_tensors": (load or {}).get("overridden"),
        "row_s": round(seconds, 1),
    }


def bench_model(llama_bench: Path, gguf_path: Path, model: str, placements: list[Placement], *, n_gen: int,
                n_depth: int, threads: int, reps: int, build: dict[str, Any], log: Path,
                extra: tuple[str, ...] = (), on_row: Any = None, deadline: float | None = None) -> list[dict[str, Any]]:
    """Every placement of one model, in order (a row per llama-bench result); a failing
    placement is a row with its error. `deadline` (time.perf_counter() seconds): placements
    not started `DEADLINE_MARGIN_S` before it are rows marked skipped, a running one is
    stopped at that margin."""
    layout = model_layout(gguf_path)
    rows = []
    for p in placements:
        cmd = bench_command(llama_bench, gguf_path, p, n_gen=n_gen, n_depth=n_depth, threads=threads, reps=reps,
                            extra=extra)
        t0 = time.perf_counter()
        left = None if deadline is None else deadline - DEADLINE_MARGIN_S - t0
        try:
            if left is not None and left < MIN_RUN_S:
                raise RuntimeError("skipped: the call's deadline")
            results, loads = run_bench(cmd, log, timeout=600 if left is None else left)
            if len(loads) != len(results):
                loads = [None] * len(results)      # a load report we cannot pair: leave it out
            new = [peer_row(r, model=model, placement=p, layout=layout, cmd=cmd, build=build,
                            seconds=(time.perf_counter() - t0) / len(results), load=ld)
                   for r, ld in zip(results, loads)]
        except (RuntimeError, OSError, subprocess.TimeoutExpired, KeyError, ValueError) as e:
            new = [{"model": model, "peer": "llama.cpp", "mode": f"llama.cpp-{p.name}", "placement": p.name,
                    "model_path": layout["path"], "budget": p.budget, "gpu_expert_fraction": p.gpu_fraction,
                    "gpu_expert_bytes": gpu_expert_bytes(layout, p), "tokens_per_s": None,
                    "command": shlex.join(cmd), "error": str(e), "row_s": round(time.perf_counter() - t0, 1)}]
        for row in new:
            rows.append(row)
            if on_row:
                on_row(row)
    return rows
