"""Our rows (benchmarks/decode.py's JSON) and llama.cpp's rows in one table and one plot:
tokens/s against the GPU memory that holds experts, and the target
`adapmoe >= 1.2x llama.cpp at the same GPU expert memory`.

"The same GPU expert memory" is the same fraction of all experts on the GPU: our budget b
(equal per-layer quotas of whole experts, `gpu_quota`) against llama.cpp placements that keep
the fraction b of the expert weights on the GPU (benchmarks/peers/placement.py), the best of
them counting. Bytes differ with the formats and are shown beside it: our GPU slots hold bf16
experts (model A; and model B, whose int4 experts are dequantized once per load into dense
slots), llama.cpp holds its file's type (F16 for A, Q4_0 for B).

    python3 benchmarks/peers/table.py --ours DECODE.json --peers PEERS.json --out-dir DIR --tag peers_B
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TARGET_RATIO = 1.2
TARGET = f"adapmoe >= {TARGET_RATIO}x llama.cpp at the same GPU expert memory"
SKIP_MODES = ("reference", "store-remote")   # a probe and a remote-store setting, not a placement of experts


def our_expert_bytes(config: dict[str, Any], dense_slots: bool | None) -> int:
    """GPU bytes of one expert in our cache: three [ffn, hidden] matrices, bf16 in a dense slot
    (bf16 stores; int8/int4 dequantized once per load), else the raw payload (int8/int4 values
    plus one fp16 scale per group)."""
    n = 3 * int(config["hidden"]) * int(config["ffn"])
    precision = config.get("precision", "bf16")
    if precision == "bf16" or dense_slots:
        return 2 * n
    bits = {"int8": 8, "int4": 4}[precision]
    return n * bits // 8 + n // int(config.get("group_size", 128)) * 2


def our_rows(decode_rows: list[dict[str, Any]], model: str, config: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Our rows of `model`, one per (mode, budget): where a row was run through several decode
    steps, the GPU-driven one (anything but `eager`), the project's default."""
    picked: dict[tuple[str, Any], dict[str, Any]] = {}
    for r in decode_rows:
        if r.get("model") != model or r.get("mode") in SKIP_MODES or not r.get("tokens_per_s"):
            continue
        key = (r["mode"], r.get("budget"))
        old = picked.get(key)
        if old is None or (old.get("decode_step") == "eager" and r.get("decode_step") != "eager"):
            picked[key] = r
    cfg = config or {}
    out = []
    for (mode, budget), r in picked.items():
        quota = r.get("gpu_quota") or []
        total = (len(quota) or int(cfg.get("layers", 0))) * int(cfg.get("experts", 8)) or None
        if mode == "resident":
            on_gpu = total
        elif quota:
            on_gpu = sum(quota)
        elif budget is None:           # ondemand, accelerate: no expert stays on the GPU
            on_gpu = 0
        else:
            on_gpu = None
        frac = on_gpu / total if (on_gpu is not None and total) else (1.0 if mode == "resident" else budget)
        per = our_expert_bytes(config, r.get("dense_slots")) if config else None
        out.append({"model": model, "peer": "adapmoe", "mode": mode, "budget": budget, "gpu_expert_fraction": frac,
                    "gpu_expert_bytes": on_gpu * per if (per is not None and on_gpu is not None) else None,
                    "tokens_per_s": float(r["tokens_per_s"]), "decode_step": r.get("decode_step"),
                    "dense_slots": r.get("dense_slots")})
    return sorted(out, key=lambda r: (r["mode"], -1 if r["budget"] is None else r["budget"]))


def check_target(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At each budget with an adapmoe row: adapmoe's tokens/s over the best llama.cpp row that
    was asked for the same budget, among the rows in the type matched to our experts'
    (`matched_type`: F16 for A's bf16, Q4_0 for B's int4; extra llama-quantize types are shown,
    not compared). Its actual fraction is shown: placements come in whole tensors or layers."""
    out = []
    for r in rows:
        if r.get("peer") != "adapmoe" or r["mode"] != "adapmoe" or r.get("budget") is None:
            continue
        peers = [p for p in rows if p.get("peer") == "llama.cpp" and p["model"] == r["model"]
                 and p.get("budget") == r["budget"] and p.get("tokens_per_s") and p.get("matched_type", True)]
        if not peers:
            continue
        best = max(peers, key=lambda p: p["tokens_per_s"])
        ratio = r["tokens_per_s"] / best["tokens_per_s"]
        out.append({"target": f"{r['model']} @ {r['budget']:.0%}: {TARGET}", "measured": ratio,
                    "met": ratio >= TARGET_RATIO, "adapmoe_tokens_per_s": r["tokens_per_s"],
                    "llama_cpp_tokens_per_s": best["tokens_per_s"], "llama_cpp_placement": best["placement"],
                    "llama_cpp_gpu_expert_fraction": best["gpu_expert_fraction"]})
    return out


def _gb(v: Any) -> str:
    return "-" if v is None else f"{v / 1e9:.3g}"


def _num(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict[str, Any]], targets: list[dict[str, Any]]) -> str:
    lines = ["| model | system | row | budget | experts on GPU | GPU expert GB | tokens/s | adapmoe / this |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ada = next((x for x in rows if x.get("peer") == "adapmoe" and x["mode"] == "adapmoe"
                    and x["model"] == r["model"] and x.get("budget") == r.get("budget") and r.get("budget") is not None),
                   None)
        ratio = ada["tokens_per_s"] / r["tokens_per_s"] if (ada and r.get("tokens_per_s") and ada is not r) else None
        tps = _num(r.get("tokens_per_s"))
        if r.get("tokens_per_s_stddev"):
            tps += f" ± {r['tokens_per_s_stddev']:.1f}"
        if r.get("error"):
            tps = f"failed: {r['error'][:60]}"
        row = r["placement"] if r.get("peer") == "llama.cpp" else r["mode"]
        if r.get("peer") == "llama.cpp":
            row += f" ({r.get('weight_type', '?')}"
            row += f", -lm {r['load_mode']})" if r.get("load_mode") not in (None, "auto") else ")"
        lines.append(f"| {r['model']} | {r['peer']} | {row} | {_num(r.get('budget'), '.0%')} | "
                     f"{_num(r.get('gpu_expert_fraction'), '.0%')} | {_gb(r.get('gpu_expert_bytes'))} | {tps} | "
                     f"{_num(ratio, '.2f')} |")
    if targets:
        lines.append("")
    for t in targets:
        lines.append(f"- target {'MET' if t['met'] else 'MISSED'}: {t['target']}: {t['measured']:.2f} "
                     f"(adapmoe {t['adapmoe_tokens_per_s']:.1f} tok/s, llama.cpp {t['llama_cpp_placement']} "
                     f"{t['llama_cpp_tokens_per_s']:.1f} tok/s)")
    cmds = [r for r in rows if r.get("peer") == "llama.cpp" and r.get("command")]
    if cmds:
        first = next((r for r in cmds if r.get("version")), None)
        lines += ["", "llama.cpp rows:"]
        if first:
            v = first["version"]
            lines.append(f"- version: llama.cpp {v['llama_cpp_commit']} (llama-cpp-python {v['llama_cpp_python']} "
                         f"sdist), build flags: {' '.join(first.get('build_flags') or [])}")
        lines += [f"- `{c}`" for c in dict.fromkeys(r["command"] for r in cmds)]   # once per run
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, m in zip(axes[0], models):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["model"] != m or not r.get("tokens_per_s") or r.get("gpu_expert_bytes") is None:
                continue
            name = r["mode"]
            if r.get("peer") == "llama.cpp":
                name = f"llama.cpp {r['placement']} {r.get('weight_type', '')}".strip()
                if r.get("load_mode") not in (None, "auto"):
                    name += f" -lm {r['load_mode']}"
            series.setdefault(name, []).append((r["gpu_expert_bytes"] / 1e9, r["tokens_per_s"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            style = "--" if name.startswith("llama.cpp") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("GPU memory holding experts (GB)")
        ax.set_ylabel("decode tokens/s (batch 1)")
        ax.set_title(f"model {m}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def combine(decode_rows: list[dict[str, Any]], decode_meta: dict[str, Any] | None,
            peer_rows: list[dict[str, Any]], models: list[str] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Our rows of every model (default: those the peers ran), then the peer rows; and the targets."""
    models = models or sorted({r["model"] for r in peer_rows})
    configs = ((decode_meta or {}).get("models") or {})
    rows: list[dict[str, Any]] = []
    for m in models:
        rows += our_rows(decode_rows, m, (configs.get(m) or {}).get("config"))
        rows += [r for r in peer_rows if r["model"] == m]
    return rows, check_target(rows)


def write(out_dir: Path, tag: str, rows: list[dict[str, Any]], targets: list[dict[str, Any]],
          meta: dict[str, Any]) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{tag}.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    (out_dir / f"{tag}_meta.json").write_text(json.dumps({**meta, "targets": targets}, indent=1, default=str) + "\n")
    md = markdown(rows, targets)
    (out_dir / f"{tag}.md").write_text(md)
    plot(rows, out_dir / f"{tag}.png")
    return md


def print_targets(targets: list[dict[str, Any]]) -> None:
    if not targets:
        print("target -      " + TARGET + ": no adapmoe row with a llama.cpp row at the same budget", flush=True)
    for t in targets:
        print(f"target {'MET   ' if t['met'] else 'MISSED'} {t['target']}: {t['measured']:.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ours", type=Path, required=True, help="benchmarks/decode.py's JSON (a list of rows)")
    p.add_argument("--ours-meta", type=Path, default=None, help="its _meta.json (default: beside it)")
    p.add_argument("--peers", type=Path, required=True, help="llama.cpp rows (benchmarks/peers/run.py's peers JSON)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--tag", default="peers")
    a = p.parse_args(argv)
    meta_path = a.ours_meta or a.ours.with_name(a.ours.stem + "_meta.json")
    decode_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    peer_rows = [r for r in json.loads(a.peers.read_text()) if r.get("peer") == "llama.cpp"]
    rows, targets = combine(json.loads(a.ours.read_text()), decode_meta, peer_rows)
    print(write(a.out_dir, a.tag, rows, targets, {"ours": str(a.ours), "peers": str(a.peers)}))
    print_targets(targets)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
