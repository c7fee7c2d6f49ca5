"""llama.cpp next to our rows, for one model, in one call: build llama.cpp, run our rows
(benchmarks/decode.py), write the model for llama.cpp, run llama-bench at the same GPU expert
budgets, and put both in one table and plot with the target
`adapmoe >= 1.2x llama.cpp at the same GPU expert memory`.

    benchmarks/peers/fetch-llama-cpp.sh                       # once, here: the trimmed source
    python3 benchmarks/peers/run.py --model B --out-dir OUT --decode "--modes resident,lru,adapmoe"
    python3 benchmarks/peers/run.py --model A --cpu --tiny --out-dir /tmp/p --decode "--device cpu"

Stages, overlapped so that a GPU call of 600 s holds them:
1. the llama.cpp build (CPU + CUDA sm_90 unless --cpu) starts at once, in the background, at a
   low priority;
2. benchmarks/decode.py --models M runs our rows (its flags from --decode). While it trains and
   calibrates, the build uses the idle cores; once its timed rows begin (the model's
   profile.json appears in its store) the build is paused (SIGSTOP to its process group) and
   resumed when decode.py ends, so our rows are timed on a quiet host. For model A the trained
   checkpoint is hard-linked out of decode.py's work directory as soon as it is written
   (decode.py deletes the directory when its rows are done);
3. the llama.cpp model: A converted by convert_hf_to_gguf.py (F16, bf16's bytes per expert;
   --a-types adds llama-quantize outputs), B written as random Q4_0 at our B shapes; this
   overlaps the rest of the build;
4. llama-bench, alone on the host, at every placement (benchmarks/peers/placement.py);
5. the table (benchmarks/peers/table.py).

Without --decode, --ours names an earlier decode.py JSON to compare with (and for A --a-ckpt
the checkpoint). Outputs in OUT: decode_M.json/_meta.json (our rows), peers_M.json (ours and
llama.cpp's rows), peers_M_meta.json (versions, flags, stage times, targets), peers_M.md,
peers_M.png, peers_M.log (build, conversion and llama-bench output).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import llama_src  # noqa: E402
from benchmarks.peers.placement import placements  # noqa: E402

# decode.py's --tiny model B, for the plumbing check on a CPU
TINY_B = {"layers": 2, "hidden": 128, "ffn": 256, "heads": 4, "kv_heads": 1, "experts": 8, "top_k": 2, "vocab": 512}


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Stages:
    """Wall-clock start/end of each stage, relative to the start of the run."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.spans: dict[str, list[float]] = {}

    def now(self) -> float:
        return round(time.perf_counter() - self.t0, 1)

    def start(self, name: str) -> None:
        self.spans[name] = [self.now()]

    def end(self, name: str) -> None:
        self.spans.setdefault(name, [self.now()]).append(self.now())

    def as_dict(self) -> dict[str, Any]:
        return {k: {"start_s": v[0], "end_s": v[-1] if len(v) > 1 else None,
                    "seconds": round(v[-1] - v[0], 1) if len(v) > 1 else None} for k, v in self.spans.items()}


class Build:
    """The background llama.cpp build, pausable as one process group."""

    def __init__(self, build_dir: Path, cuda: bool, jobs: int, nice: int, logf: Path, stages: Stages) -> None:
        self.dir, self.stages, self.log = build_dir, stages, logf
        self.paused_s, self._paused_at = 0.0, None
        if llama_src.built(build_dir):
            log(f"llama.cpp already built in {build_dir}")
            self.proc = None
            return
        stages.start("build")
        self.proc = llama_src.start_build(build_dir, cuda, jobs, logf, nice=nice)
        log(f"llama.cpp build started in {build_dir} (cuda={cuda}, -j{jobs}, nice {nice}; log {logf})")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: int) -> bool:
        try:
            os.killpg(self.proc.pid, sig)
            return True
        except ProcessLookupError:     # the build ended in between
            return False

    def pause(self) -> None:
        if self.running() and self._paused_at is None and self._signal(signal.SIGSTOP):
            self._paused_at = time.perf_counter()
            self.stages.start("build_paused")
            log("build paused while our rows are timed")

    def resume(self) -> None:
        if self._paused_at is not None:
            self._signal(signal.SIGCONT)
            self.paused_s += time.perf_counter() - self._paused_at
            self._paused_at = None
            self.stages.end("build_paused")
            log("build resumed")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the build (False: not done within `timeout` s, and stopped)."""
        if self.proc is None:
            return True
        self.resume()
        try:
            rc = self.proc.wait(timeout=None if timeout is None else max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            self.stop()
            self.stages.end("build")
            log(f"llama.cpp build not done by the deadline: stopped; see {self.log}")
            return False
        self.stages.end("build")
        if rc != 0 or not llama_src.built(self.dir):
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else ""
            raise RuntimeError(f"llama.cpp build failed (exit {rc}); end of {self.log}:\n{tail}")
        log(f"llama.cpp built ({self.stages.as_dict()['build']['seconds']} s, {self.paused_s:.0f} s of it paused)")
        return True

    def stop(self) -> None:
        if self.running():
            self.resume()
            self._signal(signal.SIGTERM)
            self.proc.wait()


def run_decode(args: argparse.Namespace, work: Path, out_dir: Path, build: Build,
               stages: Stages) -> tuple[Path | None, Path | None, str | None]:
    """benchmarks/decode.py for the model, watched: pause the build while rows are timed; keep
    model A's checkpoint. Returns (its JSON, the kept checkpoint, an error): a failed decode.py
    still leaves the llama.cpp rows to measure where the model is there."""
    dwork, dout = work / "decode", work / "decode-out"
    tag = f"decode_{args.model}"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--models", args.model, "--work", str(dwork),
           "--out-dir", str(dout), "--tag", tag, *shlex.split(args.decode)]
    log("$ " + shlex.join(cmd))
    mwork = dwork / args.model
    kept = work / "A-ckpt" if args.model == "A" else None
    linked = False
    stages.start("decode")
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if kept is not None and not linked and (mwork / "store").exists() \
                    and (mwork / "A-ckpt" / "tokenizer.json").is_file():
                from benchmarks.peers.convert import link_checkpoint

                link_checkpoint(mwork / "A-ckpt", kept)
                linked = True
                log(f"model A's checkpoint kept in {kept}")
            if any((mwork / "store" / "models").glob("*/profile.json")):
                build.pause()
    finally:
        if proc.poll() is None:
            proc.terminate()
        build.resume()
    stages.end("decode")
    if kept is not None and not linked:
        raise RuntimeError(f"model A's checkpoint never appeared in {mwork / 'A-ckpt'} "
                           f"(decode.py exit {proc.returncode})")
    ours = None
    for suffix in (".json", "_meta.json"):     # what decode.py wrote, also of a failed run (rows so far)
        if (dout / f"{tag}{suffix}").is_file():
            shutil.copy2(dout / f"{tag}{suffix}", out_dir / f"{tag}{suffix}")
            ours = ours or out_dir / f"{tag}.json"
    error = f"benchmarks/decode.py failed (exit {proc.returncode})" if proc.returncode != 0 else None
    if error:
        log(error + "; the llama.cpp rows are measured all the same")
    return ours, kept if linked else None, error


def b_shapes(args: argparse.Namespace, decode_meta: dict[str, Any] | None) -> dict[str, int]:
    """Model B's shapes: what our rows ran (decode meta), else decode.py's defaults (or --tiny's)."""
    from dataclasses import asdict

    from benchmarks.peers.gguf_models import Shapes

    cfg = (((decode_meta or {}).get("models") or {}).get("B") or {}).get("config")
    if cfg:
        return {k: int(cfg[k]) for k in TINY_B}
    return dict(TINY_B) if args.tiny else {k: v for k, v in asdict(Shapes()).items() if k in TINY_B}


def write_models(args: argparse.Namespace, work: Path, ckpt: Path | None, decode_meta: dict[str, Any] | None,
                 logf: Path) -> list[dict[str, Any]]:
    """The GGUF files to bench (before llama-quantize): B random at --b-type, A converted."""
    if args.model == "B":
        from benchmarks.peers.gguf_models import Shapes, write_random_model

        shapes = Shapes(**b_shapes(args, decode_meta))
        info = write_random_model(work / f"B-{args.b_type}.gguf", shapes, args.b_type)
        log(f"model B written: {info['bytes'] / 1e9:.2f} GB {args.b_type} ({info['seconds']} s)")
        return [info]
    from benchmarks.peers.convert import convert_subprocess, link_checkpoint

    if ckpt is None:
        if not args.a_ckpt:
            raise SystemExit("model A needs --decode (our rows train it) or --a-ckpt CHECKPOINT_DIR")
        ckpt = link_checkpoint(Path(args.a_ckpt), work / "A-ckpt")
    info = convert_subprocess(ckpt, work / "A-f16.gguf", "f16", logf)
    log(f"model A converted to F16 ({info['seconds']} s)")
    return [info]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=("A", "B"))
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/adapmoe-peers"), help="models, build, decode.py's work")
    p.add_argument("--build-dir", type=Path, default=None, help="default: WORK/build-cuda (or build-cpu)")
    p.add_argument("--cpu", action="store_true", help="build without CUDA (the plumbing check on a CPU)")
    p.add_argument("--tiny", action="store_true", help="decode.py's --tiny shapes and few tokens (plumbing check)")
    p.add_argument("--decode", default=None, metavar="FLAGS",
                   help="run benchmarks/decode.py --models M with these flags for our rows (one string)")
    p.add_argument("--ours", type=Path, default=None, help="without --decode: an earlier decode.py JSON")
    p.add_argument("--a-ckpt", default=None, help="without --decode: model A's checkpoint directory")
    p.add_argument("--a-types", default="", help="model A: llama-quantize types besides F16 (e.g. q8_0,q4_0)")
    p.add_argument("--b-type", default="q4_0", choices=("q4_0", "q8_0", "f16"))
    p.add_argument("--budgets", default="0.25,0.5", help="GPU expert budgets (fractions of all experts)")
    p.add_argument("--placements", default="ncmoe,ot")
    p.add_argument("--n-gen", type=int, default=None, help="tokens generated (default: our rows' --new-tokens, else 64)")
    p.add_argument("--n-depth", type=int, default=None, help="context before them (default 48, our prompt length)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--reps", type=int, default=None, help="llama-bench repetitions (default 5; --tiny 2)")
    p.add_argument("--llama-args", default="", metavar="FLAGS",
                   help="further llama-bench flags for every placement, one string (e.g. '-lm auto,none')")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="build jobs")
    p.add_argument("--nice", type=int, default=19, help="build priority (nice) while our rows prepare")
    p.add_argument("--tag", default=None, help="output stem (default peers_M)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="seconds from the start by which the table must be written (a GPU call's limit less a "
                        "margin): llama-bench placements that would run past it are skipped rows")
    a = p.parse_args(argv)

    stages = Stages()
    out_dir, work = a.out_dir.resolve(), a.work.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    tag = a.tag or f"peers_{a.model}"
    logf = out_dir / f"{tag}.log"
    llama_src.source_info()            # fails early without the fetched source
    llama_src.use_gguf_py()
    build_dir = (a.build_dir or work / ("build-cpu" if a.cpu else "build-cuda")).resolve()
    build = Build(build_dir, not a.cpu, a.jobs, a.nice, logf, stages)
    try:
        ckpt, run_error = None, None
        if a.decode is not None:
            ours, ckpt, run_error = run_decode(a, work, out_dir, build, stages)
        else:
            ours = a.ours
        decode_meta = None
        if ours is not None:
            meta_path = ours.with_name(ours.stem + "_meta.json")
            decode_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        stages.start("models")
        models = write_models(a, work, ckpt, decode_meta, logf)
        stages.end("models")
        deadline = None if a.deadline_s is None else stages.t0 + a.deadline_s
        if not build.wait(None if deadline is None else deadline - time.perf_counter() - 15):
            models = []                # no llama.cpp rows: the table holds ours, and the run fails
            run_error = (run_error + "; " if run_error else "") + "llama.cpp build not done by the deadline"
    except BaseException:
        build.stop()
        raise
    info = llama_src.build_info(build_dir)
    bins = llama_src.binaries(build_dir)
    if a.model == "A" and a.a_types and models:
        from benchmarks.peers.convert import quantize

        stages.start("quantize")
        for t in (x.strip() for x in a.a_types.split(",") if x.strip()):
            models.append(quantize(bins["llama-quantize"], Path(models[0]["path"]), work / f"A-{t}.gguf", t,
                                   a.threads, logf))
            log(f"model A quantized to {t} ({models[-1]['seconds']} s)")
        stages.end("quantize")

    from benchmarks.peers import bench, table

    n_gen = a.n_gen or int((decode_meta or {}).get("new_tokens") or (6 if a.tiny else 64))
    n_depth = a.n_depth if a.n_depth is not None else (8 if a.tiny else 48)
    reps = a.reps or (2 if a.tiny else 5)
    budgets = tuple(float(b) for b in a.budgets.split(",") if b.strip())
    rows: list[dict[str, Any]] = []
    so_far: list[dict[str, Any]] = []

    def on_row(row: dict[str, Any]) -> None:
        """Log the row and keep every row so far in OUT (a call cut short still returns them)."""
        log(f"  {row['mode']:>16} budget {row['budget']}: {row.get('tokens_per_s') or row.get('error')}")
        row["matched_type"] = row.get("model_path", "") == models[0]["path"]   # F16 for A, --b-type for B
        so_far.append(row)
        (out_dir / f"{tag}.json").write_text(json.dumps(so_far, indent=1, default=str) + "\n")

    stages.start("bench")
    for m in models:
        layout = bench.model_layout(Path(m["path"]))
        places = placements(layout["layers"], budgets, tuple(x.strip() for x in a.placements.split(",") if x.strip()))
        log(f"llama-bench: {Path(m['path']).name}, {len(places)} placements, -n {n_gen} -d {n_depth} -t {a.threads}")
        rows += bench.bench_model(bins["llama-bench"], Path(m["path"]), a.model, places, n_gen=n_gen, n_depth=n_depth,
                                  threads=a.threads, reps=reps, build=info, log=logf,
                                  extra=tuple(shlex.split(a.llama_args)), on_row=on_row,
                                  deadline=deadline)
    stages.end("bench")

    decode_rows = json.loads(ours.read_text()) if ours is not None else []
    all_rows, targets = table.combine(decode_rows, decode_meta, rows, models=[a.model])
    meta = {"command": "python3 " + shlex.join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
            "model": a.model, "ours": str(ours) if ours else None, "models": models, "build": info,
            "n_gen": n_gen, "n_depth": n_depth, "threads": a.threads, "reps": reps, "budgets": budgets,
            "stages": stages.as_dict(), "build_paused_s": round(build.paused_s, 1), "error": run_error,
            "seconds": stages.now()}
    print(table.write(out_dir, tag, all_rows, targets, meta))
    table.print_targets(targets)
    failed = [r for r in rows if r.get("error")]
    return 1 if (failed or run_error) else 0


if __name__ == "__main__":
    sys.exit(main())
