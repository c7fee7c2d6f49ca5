"""Decode tokens/s side by side: AdapMoE against LRU offloading, on-demand loading, HF accelerate
offloading and all-resident, on one GPU, at GPU expert budgets of 25% and 50% of all experts.

    python3 benchmarks/decode.py --out-dir benchmarks/results            # both models, on cuda
    python3 benchmarks/decode.py --models A --tiny --device cpu          # plumbing check on a CPU

Rows (issue 7), every row batch 1, greedy (or, with --temperature, sampled with the same seed per
prompt in every row), the same prompts, `--new-tokens` new tokens each:

- resident      every expert in the GPU cache (quota E per layer), loaded before timing
- ondemand      no GPU expert cache: each expert is copied from pinned host memory when used
- lru           mixtral-offloading's policy: equal per-layer LRU quotas, top-2, no prefetch,
                every expert in pinned host memory
- lfru          as lru, evicting by combined recency and frequency (no prediction)
- lru-cpu, adapmoe-cpu
                as lru / adapmoe, with a miss computed on the host's cores from the host tier's
                bytes when that finishes first (`--miss-compute auto`, the cache's cost rule) or
                whenever it can (`--miss-compute cpu`): decoder/experts/host_compute.py
- adapmoe       the decoder's default, the levers that paid on the H200 (benchmarks/README
                "Against lru"): DP cache plan + `adaptive` gating + lfru eviction, no prefetch
                copies into GPU slots (a store behind a partial host tier keeps its lookahead)
- adapmoe-paper the AdapMoE paper's configuration: DP cache plan + cross-layer prefetch into GPU
                slots + `adaptive` gating, lru eviction
- adapmoe-lfru, adapmoe-admit, adapmoe-skip, adapmoe-lfru-admit[-skip], adapmoe[-lfru]-nopf
                adapmoe-paper with one or more levers: lfru eviction, prefetch admission, no
                predictions for a layer whose next layer missed < 5% lately, no prefetch into
                GPU slots (adapmoe-lfru-nopf is adapmoe's configuration). Every adapmoe row runs at the
                budget for `--adapmoe-ratio` of the droppable expert uses dropped (default 0.5)
- adapmoe-cost  as adapmoe-paper with `cost-aware` gating
- adapmoe-lfru-nopf-cost
                as adapmoe (its levers) with `cost-aware` gating at the same budget T: the
                drops go to tail experts that must be copied in, none to a GPU-resident one
- accelerate    HF transformers MixtralForCausalLM, dense part on the GPU, each layer's experts
                offloaded to the CPU with accelerate's hooks (`accelerate.cpu_offload`, what
                `device_map={...experts: "cpu"}` installs)
- store-remote  as adapmoe, but the host tier holds half the experts; misses stream from
                `expert-store serve --workers N` on loopback (into a FetchPool arena with
                `--remote-fetch-workers` receiving processes)
- store-colocated
                as store-remote, but the store runs beside the decoder (`expert-store colocate`,
                upstream: the store directory, a local NVMe copy) and publishes blobs into a
                shared-memory arena that holds `--colocated-arena-frac` of the experts; the decoder
                maps it (`local-shm://`), page-locks it and copies payloads from it straight
                into GPU slots (`--colocated-publish raw`, the default: the store joins bf16 byte
                planes once as it publishes; `stored`: the decoder decodes them on every miss)

The store rows start from a cold host tier: the fill (store-remote: the popular half into the
host tier; store-colocated: every expert into the arena, then the popular half decoded into
the host tier) runs on its own threads at prefetch priority while the first tokens are
generated (demand first); the row records the fill's GB/s and when the first token of a
one-token request made as the fill began came (`cold_fill`). Targets (issue 14):
store-colocated >= 0.8x lru; store-remote >= 0.4x lru on A at 50%; cold fill >= 10 GB/s into
the arena (co-located), >= 3 GB/s into the host tier (remote); that first token before the
fill ends.

Models:
- A: the demo model (decoder/train_demo.py: stdlib corpus, BPE, Mixtral layout) scaled up and
  trained on the GPU for `--a-train-s` seconds; bf16 experts; held-out perplexity per row.
- B: Mixtral-8x7B shapes (hidden 4096, ffn 14336, 8 experts, top-2, GQA 32/8), `--b-layers`
  layers, random weights packed directly as int4 experts (no HF checkpoint on disk).

Each model is packed into an expert store directory (expert_store.pack.pack_checkpoint),
calibrated (decoder.calibrate.calibrate_model, profile.json stored next to the model), then
every row is an Engine.from_store(...) on that store. Results: decode.json (a list of rows),
decode.md (the table), decode.png; the script prints whether each target of issue 7 is met.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks._common import cpu_model, kernel_table  # noqa: E402
from decoder.calibrate import windows_perplexity  # noqa: E402
from decoder.engine import Engine  # noqa: E402
from decoder.experts.provider import ExpertProvider, ExpertWeights, expert_weights_from_views  # noqa: E402
from expert_store import format as blob_format  # noqa: E402
from expert_store.client import StoreClient  # noqa: E402

MODES = ("reference", "resident", "ondemand", "lru", "lfru", "adapmoe", "adapmoe-paper", "adapmoe-lfru", "adapmoe-admit",
         "adapmoe-lfru-admit", "adapmoe-skip", "adapmoe-lfru-admit-skip", "adapmoe-cost", "adapmoe-lfru-nopf-cost",
         "adapmoe-nopf",
         "adapmoe-lfru-nopf", "accelerate",
         "store-remote", "store-colocated", "lru-cpu", "adapmoe-cpu")
STORE_ROWS = ("store-remote", "store-colocated")   # host tier half the experts, misses from a store process
# adapmoe's levers (the rows named adapmoe, adapmoe-cpu and the store rows): what paid on the H200
# (decode_A_r50: 1.39x / 1.25x lru at 25% / 50% against 1.21x / 1.13x with prefetch)
DEFAULT_LEVERS = frozenset({"lfru", "nopf"})
BUDGET_FREE = ("reference", "resident", "ondemand", "accelerate")   # rows that do not depend on the GPU expert budget
TARGETS = {"adapmoe_vs_lru": {"A": 1.5, "B": 1.35}, "adapmoe_vs_accelerate": 10.0, "resident_vs_adapmoe_50": 2.0,
           # the GPU-driven step (issue 12)
           "resident_ms": {"A": 2.5, "B": 1.5}, "cached_vs_bound": 1.25,
           # the store off the per-token path (issue 14)
           "colocated_vs_lru": 0.8, "remote_vs_lru": {"A": {0.5: 0.4}}, "colocated_fill_gbps": 10.0,
           "remote_fill_gbps": 3.0}


def log(msg: str) -> None:
    print(f"[decode {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# =============================================================================================
# Model A: the demo model, scaled up, trained on the device
# =============================================================================================
@dataclass
class Prepared:
    name: str                          # "A" | "B"
    store: Path                        # store directory
    model: str                         # model name in the store
    ckpt: Path | None                  # HF checkpoint dir (A), for the accelerate row
    prompts: list[list[int]]           # token ids
    warmup_prompt: list[int]
    heldout: list[torch.Tensor] = field(default_factory=list)   # windows [S+1] for perplexity
    info: dict[str, Any] = field(default_factory=dict)


def save_bf16_checkpoint(out: Path, model: Any, tok: Any) -> None:
    """config.json + model.safetensors (HF Mixtral names, bf16) + tokenizer.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf()
    cfg.update(torch_dtype="bfloat16", dtype="bfloat16", use_cache=True, attention_dropout=0.0,
               initializer_range=0.02, output_router_logits=False)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tensors = {n: t.detach().to("cpu", torch.bfloat16).contiguous() for n, t in sorted(model.hf_state_dict().items())}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tokenizer.json").write_text(tok.to_str(pretty=False))


def prepare_model_a(work: Path, device: torch.device, args: argparse.Namespace) -> Prepared:
    from decoder import train_demo as td
    from decoder.model.transformer import Transformer

    s = td.TrainSettings(
        steps=1, seed=1234, corpus_mb=args.a_corpus_mb, heldout_mb=1.0, vocab_size=args.a_vocab,
        hidden_size=args.a_hidden, intermediate_size=args.a_ffn, num_layers=args.a_layers,
        num_heads=args.a_heads, num_kv_heads=max(1, args.a_heads // 4), num_experts=8, top_k=2,
        seq_len=args.a_seq, batch_size=args.a_batch, lr=args.a_lr, warmup_steps=50, threads=os.cpu_count() or 2,
        max_position_embeddings=2048)
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    corpus = td.load_corpus(s)
    tok = td.train_tokenizer(corpus.train_texts, s.vocab_size)
    train_stream = td.token_stream(tok, corpus.train_texts)
    heldout_stream = td.token_stream(tok, corpus.heldout_texts)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    log(f"A: corpus {corpus.train_bytes / 1e6:.1f} MB -> {train_stream.numel()} tokens "
        f"({time.perf_counter() - t0:.1f} s)")
    cfg = td.model_config(s, vocab)
    model = Transformer(cfg)
    model.init_weights(std=s.init_std, seed=s.seed)
    model.to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    stream = train_stream.to(device)
    # fp32 weights, TF32 matmuls: on the H200 this trained 2.2x faster per step than bf16 autocast
    # (casting each expert slice every step), and needs no autocast context at all.

    # time a few steps, then size the run to --a-train-s (the cosine schedule needs the step count)
    probe = td.TrainSettings(**{**s.__dict__, "steps": 3})
    import copy
    shadow = copy.deepcopy(model)
    td.train(shadow, stream, probe, progress=False)
    sync(device)
    t1 = time.perf_counter()
    td.train(shadow, stream, probe, progress=False)
    sync(device)
    per_step = (time.perf_counter() - t1) / probe.steps
    del shadow
    free_memory(device)
    steps = int(max(args.a_min_steps, min(args.a_max_steps, args.a_train_s / max(per_step, 1e-6))))
    s = td.TrainSettings(**{**s.__dict__, "steps": steps})
    log(f"A: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {per_step * 1e3:.0f} ms/step "
        f"-> {steps} steps")
    training = td.train(model, stream, s, progress=True)
    model.eval()
    windows = td.eval_windows(heldout_stream, s.seq_len, args.ppl_windows)
    import torch.nn.functional as F
    nll = 0.0
    with torch.no_grad():
        for w in windows.to(device):
            logits = model(w[None, :-1])[0].float()
            nll += float(F.cross_entropy(logits, w[1:], reduction="sum"))
    ppl = math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))
    ev = {"heldout": {"perplexity": ppl}, "cross_layer": {}}
    final_loss = training["final_train_loss_ema"]
    log(f"A: trained in {training['seconds']:.0f} s, final train loss (EMA) {final_loss:.3f}, "
        f"held-out perplexity {ppl:.2f} (loss {math.log(ppl):.3f}, fp32)")
    if not math.isfinite(ppl) or math.log(ppl) > final_loss + 2.0:
        raise RuntimeError(f"model A is degenerate: held-out loss {math.log(ppl):.2f} nats against a final "
                           f"training loss of {final_loss:.2f}")
    ckpt = work / "A-ckpt"
    save_bf16_checkpoint(ckpt, model, tok)
    del model, stream
    free_memory(device)

    store = work / "store"
    # --remote-miss-precision: the store also holds the precision low-weight misses cross the wire at
    low = getattr(args, "remote_miss_precision", None)
    _pack(ckpt, store, "demo-a", ("bf16",) + ((low,) if low else ()), group_size=128)
    # prompts: the opening of held-out files (same for every row)
    texts = corpus.heldout_texts
    prompts = [tok.encode(t, add_special_tokens=False).ids[:args.prompt_tokens] for t in texts[:args.prompts]]
    warm = tok.encode(texts[args.prompts], add_special_tokens=False).ids[:args.prompt_tokens]
    calib = train_stream[-args.calib_tokens - 1:].tolist()
    prep = Prepared("A", store, "demo-a", ckpt, prompts, warm, heldout=[w for w in windows[:args.ppl_windows]],
                    info={"train": {k: training[k] for k in ("steps", "batch_size", "seq_len", "tokens_seen", "seconds",
                                                             "final_train_loss_ema", "loss_history")},
                          "heldout_perplexity_trained_fp32": ev["heldout"]["perplexity"],
                          "cross_layer_recall_d1": ev["cross_layer"].get("mean_recall_distance_1"),
                          "config": {"hidden": s.hidden_size, "ffn": s.intermediate_size, "layers": s.num_layers,
                                     "heads": s.num_heads, "kv_heads": s.num_kv_heads, "experts": 8, "top_k": 2,
                                     "vocab": vocab}})
    calibrate(prep, device, calib, args)
    return prep


def _pack(ckpt: Path, store: Path, model: str, precisions: Sequence[str], group_size: int,
          codec: str = "auto") -> None:
    from expert_store.pack import pack_checkpoint
    from expert_store.tiers import NvmeTier

    t0 = time.perf_counter()
    res = pack_checkpoint(ckpt, NvmeTier(store), model=model, precisions=precisions, group_size=group_size,
                          progress=True, codec=codec)
    log(f"packed {model}: {res.blobs_written} blobs, {res.bytes_written / 1e9:.2f} GB "
        f"({time.perf_counter() - t0:.0f} s)")


# =============================================================================================
# Model B: Mixtral-8x7B shapes, random int4 experts packed directly
# =============================================================================================
def pack_random_mixtral(work: Path, store: Path, model: str, *, hidden: int, ffn: int, layers: int, heads: int,
                        vocab: int, experts: int = 8, precision: str = "int4", device: torch.device | str = "cpu",
                        router_std: float = 0.5) -> dict[str, Any]:
    """Pack a random Mixtral-layout model straight into `store`: a synthetic checkpoint layout
    (tensors made on `device` when the packer asks for them, never written as an HF checkpoint)
    fed to the store's real packer (quantization, blob format, dense part, manifest). Returns the
    HF config written next to it (work/B-layout/config.json)."""
    from expert_store import pack

    H, Fd, L, E = hidden, ffn, layers, experts
    nh, nkv = heads, max(1, heads // 4)
    hd = H // nh
    V = vocab
    device = torch.device(device)
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": V, "hidden_size": H,
           "intermediate_size": Fd, "num_hidden_layers": L, "num_attention_heads": nh, "num_key_value_heads": nkv,
           "head_dim": hd, "num_local_experts": E, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
           "rope_theta": 1e6, "max_position_embeddings": 4096, "tie_word_embeddings": False,
           "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    root = work / "B-layout"
    root.mkdir(parents=True, exist_ok=True)
    cfg_bytes = (json.dumps(cfg, indent=2) + "\n").encode()
    (root / "config.json").write_bytes(cfg_bytes)

    dense: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,),
                                          "lm_head.weight": (V, H)}
    for l in range(L):
        p = f"model.layers.{l}."
        dense.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                      p + "self_attn.q_proj.weight": (nh * hd, H), p + "self_attn.k_proj.weight": (nkv * hd, H),
                      p + "self_attn.v_proj.weight": (nkv * hd, H), p + "self_attn.o_proj.weight": (H, nh * hd),
                      p + "block_sparse_moe.gate.weight": (E, H)})

    class RandomLayout(pack.CheckpointLayout):
        def expert_tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
            g = torch.Generator(device=device).manual_seed(1000 * layer + expert)
            std = 0.02
            return {"w1": torch.randn(Fd, H, generator=g, device=device, dtype=torch.bfloat16) * std,
                    "w3": torch.randn(Fd, H, generator=g, device=device, dtype=torch.bfloat16) * std,
                    "w2": torch.randn(H, Fd, generator=g, device=device, dtype=torch.bfloat16) * std}

        def dense_tensors(self):
            g = torch.Generator().manual_seed(7)
            for name, shape in sorted(dense.items()):
                if name.endswith("norm.weight"):
                    t = torch.ones(shape, dtype=torch.bfloat16)
                elif "gate.weight" in name:   # sharper routers: some experts clearly preferred
                    t = (torch.randn(shape, generator=g) * router_std).to(torch.bfloat16)
                else:
                    t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
                yield name, t

    layout = RandomLayout(root=root, config=cfg, config_bytes=cfg_bytes, num_layers=L, num_experts=E,
                          hidden_size=H, intermediate_size=Fd, top_k=2, rope_theta=1e6, files={}, fused=False,
                          dense=sorted(dense), routers={})
    real = pack.read_checkpoint_layout
    pack.read_checkpoint_layout = lambda _d: layout   # the packer reads our synthetic layout
    try:
        _pack(root, store, model, (precision,), group_size=128)
    finally:
        pack.read_checkpoint_layout = real
    return cfg


def prepare_model_b(work: Path, device: torch.device, args: argparse.Namespace) -> Prepared:
    """Mixtral-8x7B shapes, random weights, int4 experts packed directly."""
    store = work / "store"
    cfg = pack_random_mixtral(work, store, "mixtral-shape-b", hidden=args.b_hidden, ffn=args.b_ffn,
                              layers=args.b_layers, heads=args.b_heads, vocab=args.b_vocab, precision="int4",
                              device=device)
    V = args.b_vocab
    g = torch.Generator().manual_seed(99)
    prompts = [torch.randint(3, V, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.prompts)]
    warm = torch.randint(3, V, (args.prompt_tokens,), generator=g).tolist()
    calib = torch.randint(3, V, (args.calib_tokens + 1,), generator=g).tolist()
    prep = Prepared("B", store, "mixtral-shape-b", None, prompts, warm,
                    info={"config": {"hidden": cfg["hidden_size"], "ffn": cfg["intermediate_size"],
                                     "layers": cfg["num_hidden_layers"], "heads": cfg["num_attention_heads"],
                                     "kv_heads": cfg["num_key_value_heads"], "experts": 8, "top_k": 2, "vocab": V,
                                     "precision": "int4", "group_size": 128},
                          "weights": "random normal(0, 0.02) experts quantized to int4; routers normal(0, 0.5)"})
    calibrate(prep, device, calib, args)
    return prep


def plain_copy(prep: Prepared, work: Path) -> Path:
    """The store-colocated row's upstream with `--colocated-upstream plain`: the model packed
    again with codec none (`expert-store pack --codec none`, a local copy the co-located store
    publishes as read) beside the calibration profile; B's int blobs are never coded, so B's
    store is its own plain copy."""
    if prep.ckpt is None:
        return prep.store
    out = work / "store-plain"
    if not (out / "models" / prep.model / "manifest.json").is_file():
        _pack(prep.ckpt, out, prep.model, (store_precision(prep),), group_size=128, codec="none")
        profile = prep.store / "models" / prep.model / "profile.json"
        (out / "models" / prep.model / "profile.json").write_bytes(profile.read_bytes())
    return out


# =============================================================================================
# Calibration (profile.json next to the model)
# =============================================================================================
def calibrate(prep: Prepared, device: torch.device, calib_ids: list[int], args: argparse.Namespace) -> None:
    from decoder.calibrate import build_profile, calibrate_model, token_windows, upload_profile, validate_profile

    precision = store_precision(prep)
    t0 = time.perf_counter()
    with Engine.from_store(str(prep.store), prep.model, device=device, dtype=compute_dtype(device),
                           precision=precision, prefetch=False) as eng:
        windows = token_windows(calib_ids, args.calib_seq, args.calib_tokens)
        measured = calibrate_model(eng.model, windows, progress=True)
        profile = build_profile(prep.model, measured, eng.config, text_file=None, seq_len=args.calib_seq)
        validate_profile(profile, eng.config.num_hidden_layers, eng.config.num_local_experts)
        data = (json.dumps(profile, indent=1) + "\n").encode()
        upload_profile(str(prep.store), None, prep.model, data)
    free_memory(device)
    prep.info["calibration"] = {"tokens": profile["tokens"], "budget": profile["budget"],
                                "budget_for_single_ratio": profile["budget_for_single_ratio"],
                                "mean_prefetch_accuracy": sum(profile["prefetch_accuracy"]) / len(profile["prefetch_accuracy"]),
                                "mean_single_expert_ratio": sum(profile["single_expert_ratio"]) / len(profile["single_expert_ratio"]),
                                "seconds": round(time.perf_counter() - t0, 1)}
    log(f"{prep.name}: calibrated in {time.perf_counter() - t0:.0f} s: budget T={profile['budget']:.3g}, "
        f"prefetch accuracy {prep.info['calibration']['mean_prefetch_accuracy']:.2f}")


def store_precision(prep: Prepared) -> str:
    return "int4" if prep.name == "B" else "bf16"


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# =============================================================================================
# On-demand provider: no GPU expert cache
# =============================================================================================
class OnDemandExperts(ExpertProvider):
    """Every expert's raw payload in one pinned host arena; each `get` copies the expert into a
    GPU staging buffer (one per expert of the current layer, reused every layer) and computes
    from it. Copies run on the compute stream, so reuse of a staging buffer is ordered after the
    kernels that read it. Nothing stays on the GPU between layers. With `dense` (int8/int4),
    the copied payload is dequantized once into a dense buffer per use, as the cache's dense
    slots do, so forward is plain matmuls in every row."""

    def __init__(self, client: Any, model: str, precision: str, device: torch.device, L: int, E: int,
                 dense: bool = False, dtype: torch.dtype = torch.bfloat16) -> None:
        from decoder.experts.gpu_slots import DenseLayout

        self.device, self.L, self.E, self.precision = device, L, E, precision
        self.headers: dict[tuple[int, int], Any] = {}
        first = bytes(client.fetch_expert(model, 0, 0, precision))
        h0, _ = blob_format.read_header(first)
        self.raw = int(h0.raw_size)
        self.slot = (self.raw + 4095) // 4096 * 4096
        host = torch.empty((L * E, self.slot), dtype=torch.uint8)
        self.host = host.pin_memory() if device.type == "cuda" else host
        for l in tqdm(range(L), desc="ondemand: host arena", unit="layer", leave=False):
            for e in range(E):
                blob = client.fetch_expert(model, l, e, precision)
                h, _ = blob_format.decode_raw(blob, out=memoryview(self.host[l * E + e].numpy()))
                self.headers[(l, e)] = h
        self.gpu = torch.empty((E, self.slot), dtype=torch.uint8, device=device)
        self.layout = DenseLayout.of(h0, dtype) if dense and precision in ("int8", "int4") else None
        self.dense = (torch.empty((E, self.layout.nbytes), dtype=torch.uint8, device=device)
                      if self.layout is not None else None)
        self._next = 0
        self.reset_stats()

    def reset_stats(self) -> None:
        self.lookups = 0
        self.bytes = 0

    def get(self, layer: int, expert: int) -> ExpertWeights:
        from expert_store.quant import tensors_from_raw

        h = self.headers[(layer, expert)]
        i = self._next % self.E
        buf = self.gpu[i, :h.raw_size]
        self._next += 1
        buf.copy_(self.host[layer * self.E + expert, :h.raw_size], non_blocking=True)
        self.lookups += 1
        self.bytes += h.raw_size
        if self.layout is not None:
            d = self.layout.fill(h, buf, self.dense[i])
            return ExpertWeights(d["w1"], d["w3"], d["w2"], h.precision)
        return expert_weights_from_views(h, tensors_from_raw(h, buf))

    def release(self, layer: int, experts: Sequence[int]) -> None:
        self._next = 0

    def location(self, layer: int, expert: int) -> str:
        return "host"

    def ready(self, layer: int, expert: int) -> bool:
        return False

    def stats(self) -> dict[str, Any]:
        return {"provider": "ondemand", "tiers": {"gpu": {"lookups": self.lookups, "hits": 0, "misses": self.lookups,
                                                          "bytes": self.bytes, "loads": self.lookups}},
                "bytes_fetched": 0, "fetches": 0, "stall_s": 0.0, "gpu_bytes_total": self.bytes}


# =============================================================================================
# The expert-store server (store-remote)
# =============================================================================================
def StoreServer(store: Path, workers: int, log_path: Path, ram_bytes: int = 1 << 30) -> Any:
    """`expert-store serve --workers N` on a free loopback port, serving; its stderr in log_path.
    `.address`, `.stop()` (expert_store.launch.ServerProcess)."""
    from expert_store.launch import start_store

    return start_store(store, "--workers", str(workers), "--ram-bytes", str(ram_bytes), cwd=ROOT, stderr=log_path)


def ColocatedServer(store: Path, model: str, precision: str, arena_frac: float, fetch_threads: int,
                    work: Path, upstream: str | None = None, publish: str = "raw") -> Any:
    """`expert-store colocate` reading `upstream` (default: the store directory) and publishing
    (`--publish raw`: bf16 planes joined once, so the decoder copies blobs to the GPU as they lie)
    into an arena that holds `arena_frac` of the model's `precision` blobs: on /dev/shm when it
    has room, else in `work`. `.target` is the decoder's local-shm:// store; `stop(remove=True)`."""
    import shutil

    from expert_store.arena_publisher import raw_slot_bytes, slot_bytes_for
    from expert_store.colocate import ColocatedStore
    from expert_store.shm_arena import HEADER_BYTES, RECORD_BYTES, SLOT_ALIGN

    with StoreClient.open(str(store)) as c:
        m = c.manifest(model)
        sizes = [e[0] for (_, _, p), e in m.blobs.items() if p == precision]
        slot = (raw_slot_bytes(c, [m], [precision]) if publish == "raw" else slot_bytes_for([m], [precision]))
    n = max(1, round(arena_frac * len(sizes)))
    budget = n * (slot + RECORD_BYTES) + HEADER_BYTES + 2 * SLOT_ALIGN
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > budget + (1 << 30) else work
    arena = base / f"adapmoe-bench-{os.getpid()}.arena"
    log(f"co-located arena: {n} of {len(sizes)} {precision} blobs, {budget / 1e9:.2f} GB at {arena} "
        f"(published {publish})")
    return ColocatedStore(upstream or str(store), str(arena), budget, model,
                          extra=["--precisions", precision, "--fetch-threads", str(fetch_threads), "--publish", publish],
                          start_timeout_s=600)


# =============================================================================================
# One row
# =============================================================================================
def slot_sizes(client: Any, model: str, precision: str, dense: bool = False,
               dtype: torch.dtype = torch.bfloat16, fetch_workers: int = 0) -> tuple[int, int, int, int]:
    """(raw payload bytes, GPU slot bytes, host slot bytes, L*E) as decoder/experts/cache.py sizes
    them; dense=True: the GPU slot of a dense-slot cache (int8/int4 dequantized once per load);
    fetch_workers: a FetchPool host tier (slots for the raw blobs its processes decode)."""
    from decoder.experts.gpu_slots import GPU_ALIGN, align, dense_slot_bytes, host_slot_bytes

    m = client.manifest(model)
    blob = bytes(client.fetch_expert(model, 0, 0, precision))
    h, _ = blob_format.read_header(blob)
    sizes = [v[0] if isinstance(v, (tuple, list)) else v.size for k, v in m.blobs.items() if k[2] == precision]
    raw = int(h.raw_size)
    gpu_slot = dense_slot_bytes(h, dtype) if dense else align(raw, GPU_ALIGN)
    return raw, gpu_slot, host_slot_bytes(h, max(sizes), bool(fetch_workers)), m.num_layers * m.num_experts


def fill_gpu(cache: Any, L: int, E: int) -> None:
    for l in range(L):
        cache.prefetch(l, list(range(E)))
    cache.wait_idle(timeout=600)


def adapmoe_budget(profile: dict, ratio: float | None) -> float:
    """The adaptive gating budget T of the adapmoe rows: the profile's own (calibrated for 25% of
    the droppable expert uses dropped) or, with `ratio`, the one for that share (the profile's
    budget_curve, every 5%)."""
    from decoder.gating import profile_budget

    if ratio is None:
        return float(profile["budget"])
    for r, T in profile.get("budget_curve") or []:
        if abs(float(r) - ratio) < 1e-9:
            return float(T)
    try:   # a profile from before the curve: its 10% / 25% / 50% table
        return profile_budget(profile, ratio)
    except ValueError as e:
        raise ValueError(f"--adapmoe-ratio {ratio}: {e}") from None


def build_engine(prep: Prepared, mode: str, budget: float | None, device: torch.device, target: str,
                 profile: dict, remote_fetch_workers: int = 0, dense_slots: bool | None = None,
                 fill_threads: int = 8, decode_step: str = "auto", miss_compute: str = "auto",
                 cpu_threads: int | None = None, remote: dict[str, Any] | None = None, cpu_workers: int = 1,
                 adapmoe_ratio: float | None = None) -> Engine:
    from decoder.experts.gpu_slots import dense_slots_for

    precision = store_precision(prep)
    dtype = compute_dtype(device)
    dense = dense_slots_for(dense_slots, precision, device.type == "cuda")
    with StoreClient.open(str(prep.store)) as c:
        raw, slot, hslot, n_experts = slot_sizes(c, prep.model, precision, dense=dense, dtype=dtype,
                                                 fetch_workers=remote_fetch_workers if mode == "store-remote" else 0)
        m = c.manifest(prep.model)
        L, E = m.num_layers, m.num_experts
    T = adapmoe_budget(profile, adapmoe_ratio)
    gpu_bytes = None if budget is None else max(L, round(budget * n_experts)) * slot
    host_all = n_experts * hslot
    common = dict(device=device, dtype=dtype, precision=precision, decode_step=decode_step)
    dense_opt = {"dense_slots": dense}
    # the -cpu rows: misses computed on the host's cores (decoder/experts/host_compute.py)
    cpu_opt = ({"miss_compute": miss_compute, "cpu_threads": cpu_threads, "cpu_workers": cpu_workers}
               if mode.endswith("-cpu") else {})
    if mode == "resident":
        # through a host tier filled on fill_threads threads (fetch + decode in parallel); nothing
        # is loaded while it is timed: every expert is on the GPU
        eng = Engine.from_store(target, prep.model, gpu_cache_bytes=n_experts * slot, host_cache_bytes=host_all,
                                prefetch=False, cache_options=dense_opt, **common)
        eng.provider.fill_host([(l, e) for l in range(L) for e in range(E)], fill_threads, progress=True)
        fill_gpu(eng.provider, L, E)
        return eng
    if mode == "ondemand":
        eng = Engine.from_store(target, prep.model, prefetch=False, **common)   # StoreExperts, replaced below
        od = OnDemandExperts(eng.client, prep.model, precision, device, L, E, dense=dense, dtype=dtype)
        eng.provider.close()
        eng.model.experts = eng.provider = od
        return eng
    if mode in ("lru", "lfru", "lru-cpu"):
        eng = Engine.from_store(target, prep.model, gpu_cache_bytes=gpu_bytes, host_cache_bytes=host_all,
                                prefetch=False, gating="topk",
                                cache_options={"profile": None, "scratch_slots": 0, "plan": "uniform",
                                               "eviction": mode.split("-")[0], **dense_opt, **cpu_opt},
                                **common)
        eng.provider.fill_host([(l, e) for l in range(L) for e in range(E)], fill_threads, progress=True)
        eng.provider.pack_host([(l, e) for l in range(L) for e in range(E)])   # -cpu rows: packed before timing
        return eng
    if mode in ("adapmoe", "adapmoe-cost") or mode in STORE_ROWS or mode.startswith("adapmoe-"):
        gating = "cost-aware" if "cost" in mode.split("-") else "adaptive"
        host = host_all if mode not in STORE_ROWS else (n_experts // 2) * hslot
        options: dict[str, Any] = {"scratch_slots": 0, "plan": "uniform", **dense_opt, **cpu_opt}
        # the issue-13 levers alone or together over the paper's configuration (adapmoe-paper):
        # lfru eviction, prefetch admission, skipping, no prefetch; adapmoe: DEFAULT_LEVERS
        levers = set(mode.split("-")[1:]) - {"cost", "cpu", "paper"}
        if mode in ("adapmoe", "adapmoe-cpu") or mode in STORE_ROWS:
            levers = set(DEFAULT_LEVERS)
        # nopf: no prefetch copies into GPU slots (Prefetcher gpu=False); a store behind a partial
        # host tier keeps its lookahead (the prefetcher's store fetches into the host tier)
        pf_options: dict[str, Any] = {"gpu": "nopf" not in levers}
        if "skip" in levers:
            pf_options["skip_miss_rate"] = 0.05
        if "lfru" in levers:
            options["eviction"] = "lfru"
        if "admit" in levers:
            options["admission"] = True
        if mode == "store-remote" and remote_fetch_workers:
            # the distributed case as deployed: the host tier is a FetchPool arena that N processes
            # receive into (one Python process receives ~0.3-0.9 GB/s)
            options.update(fetch_workers=remote_fetch_workers, fetch_target=target,
                           fetch_demand_parts=int((remote or {}).get("demand_parts") or 1),
                           fetch_fill_parts=int((remote or {}).get("fill_parts") or 1))
        if mode == "store-colocated" and remote:
            # loader threads: each waits for its copy out of the arena to end (the seqlock is
            # checked after it), so a few overlap those waits; decodes (`stored`) want more
            options["workers"] = max(1, remote.get("colocated_loaders", 2))
        gating_options: dict[str, Any] = {}
        if mode == "store-remote" and remote:
            # the remote path's levers (issue 14): store fetches into the host tier for predicted
            # host-tier misses (threads in flight; -1: the cache's default), the store lookahead's
            # bound (-1: the layer count), low-weight misses of store-only experts at a lower precision
            if remote.get("host_prefetch", -1) >= 0:
                options["host_prefetch"] = remote["host_prefetch"]
            if remote.get("store_lookahead", -1) >= 0:
                pf_options["max_store_lookahead"] = remote["store_lookahead"]
            low = remote.get("miss_precision")
            if low and low != precision:
                options.update(miss_precision=low, low_precision_misses="store")
                gating_options["miss_precision_threshold"] = remote.get("miss_threshold", 0.3)
        eng = Engine.from_store(target, prep.model, gpu_cache_bytes=gpu_bytes, host_cache_bytes=host,
                                gating=gating, budget=T, cache_options=options,
                                gating_options=gating_options or None, prefetch_options=pf_options, **common)
        if mode in STORE_ROWS:
            return eng   # a cold host tier: run_engine_row fills it while the first tokens are generated
        eng.provider.fill_host([(l, e) for l in range(L) for e in range(E)], fill_threads, progress=True)
        eng.provider.pack_host([(l, e) for l in range(L) for e in range(E)])   # -cpu rows: packed before timing
        return eng
    raise ValueError(f"unknown mode {mode!r}")


def perplexity_engine(eng: Engine, windows: Sequence[torch.Tensor]) -> tuple[float | None, list[float]]:
    """(held-out perplexity over `windows`, the perplexity of each window)."""
    return windows_perplexity(lambda ids: eng.forward_logits(ids.tolist()), windows)


def run_engine_row(prep: Prepared, mode: str, budget: float | None, device: torch.device, args: argparse.Namespace,
                   target: str, profile: dict, pinned_gbps: float, decode_step: str = "auto") -> dict[str, Any]:
    t_build = time.perf_counter()
    eng = build_engine(prep, mode, budget, device, target, profile, args.remote_fetch_workers,
                       {"auto": None, "on": True, "off": False}[args.dense_slots], args.fill_threads, decode_step,
                       args.miss_compute, args.cpu_threads,
                       remote={"host_prefetch": args.remote_host_prefetch, "store_lookahead": args.remote_store_lookahead,
                               "miss_precision": args.remote_miss_precision,
                               "miss_threshold": args.remote_miss_threshold,
                               "colocated_loaders": args.colocated_loaders,
                               "demand_parts": args.remote_demand_parts, "fill_parts": args.remote_fill_parts},
                       cpu_workers=args.cpu_workers, adapmoe_ratio=args.adapmoe_ratio)
    build_s = time.perf_counter() - t_build
    cold_fill = None
    try:
        if mode in STORE_ROWS:   # a few tokens while the cold fill runs, then the warm-up below
            cold_fill = fill_while_serving(eng, prep, mode, profile, args, min(args.warmup_tokens, 4))
        # every row is timed after the same untimed warm-up (a store row's also after its cold
        # fill): otherwise a store row's GPU cache starts colder than lru's and moves more bytes
        eng.generate(prep.warmup_prompt, max_tokens=args.warmup_tokens, temperature=0.0, stop_at_eos=False)
        eng.reset_stats()
        reads0 = eng._step.reads if eng._step is not None else 0
        outs = []
        n_new = args.remote_tokens if mode == "store-remote" else args.new_tokens
        for i, p in enumerate(tqdm(prep.prompts, desc=f"{prep.name} {mode} {budget}", unit="prompt", leave=False)):
            outs.append(eng.generate(p, max_tokens=n_new, temperature=args.temperature, seed=args.seed + i,
                                     stop_at_eos=False).token_ids)
        sync(device)
        st = eng.stats()
        used_step = eng._step is not None
        # host reads per decode token: the step's per-layer reads (none when whole) + the sample;
        # the eager path reads at least once per MoE layer (benchmarks/host_overhead.py counts them)
        n_steps = max(1, st["generated_tokens"] - st["requests"])          # prefills excluded
        step_reads = (eng._step.reads - reads0) / n_steps + 1 if used_step else None
        profile_txt = None
        if args.profile_rows and mode in args.profile_rows:
            profile_txt = torch_profile(eng, prep, args)
        ppl, ppl_windows = perplexity_engine(eng, prep.heldout)
        arena = arena_stats(eng) if mode == "store-colocated" else None
    finally:
        eng.close()
        del eng
        free_memory(device)
    pst = st.get("provider", {}) or {}
    tiers = st.get("tiers", {}) or {}
    steps = max(1, st["generated_tokens"])   # forward steps that produced a token (prefill included)
    per_tier = pst.get("bytes_per_token")
    if per_tier is None:   # ondemand / other providers: bytes into the GPU per forward step
        per_tier = {"gpu": pst.get("gpu_bytes_total", 0) / steps, "host": 0.0, "store": 0.0}
    gb_tok = {k: v / 1e9 for k, v in per_tier.items()}
    pf = st.get("prefetch") or {}
    gpf = pf if pf.get("gpu", True) else {}   # the prefetch into GPU slots (none: no figures)
    tps = st["tokens_per_s"]
    lower_bound_ms = gb_tok.get("gpu", 0.0) / pinned_gbps * 1e3
    return {
        "model": prep.name, "budget": budget, "mode": mode, "tokens_per_s": tps,
        "decode_step": "step" if used_step else "eager", "host_reads_per_token": step_reads,
        "gating": st.get("gating"), "ms_per_token": 1e3 / tps if tps else None,
        # the decode steps' routing (the engine's top-level figures count the prefill too)
        "experts_per_token": st["routing"]["decode"]["experts_per_token"],
        "single_expert_ratio": st["routing"]["decode"]["single_expert_ratio"],
        "gpu_hit_rate": (tiers.get("gpu") or {}).get("hit_rate"),
        "host_hit_rate": (tiers.get("host") or {}).get("hit_rate"),
        "prefetch_precision": gpf.get("precision"), "prefetch_recall": gpf.get("recall"),
        "prefetch_token_recall": gpf.get("token_recall"),
        # what the prefetcher issued to the cache (its link budget), not every prediction
        "prefetch_issued_precision": gpf.get("issued_precision"), "prefetch_issued_recall": gpf.get("issued_recall"),
        "prefetch_issued": gpf.get("issued"),
        "stall_ms_per_token": st["stall_s_per_token"] * 1e3,
        "gb_per_token": gb_tok,
        "lower_bound_ms_per_token": lower_bound_ms,
        "gpu_quota": pst.get("gpu_quota"), "dense_slots": pst.get("dense_slots"), "eviction": pst.get("eviction"),
        # misses the host computed (the -cpu rows), per generated token, and its measured cost
        "cpu_misses_per_token": pst.get("cpu_misses", 0) / steps,
        "host_compute": pst.get("host_compute"), "miss_compute": pst.get("miss_compute"),
        "heldout_perplexity": ppl, "heldout_perplexity_per_window": ppl_windows,
        "generated_tokens": st["generated_tokens"], "decode_s": st["decode_s"], "build_s": round(build_s, 1),
        "outputs_head": [o[:8] for o in outs],
        "gating_stats": {k: v for k, v in (st.get("gating_stats") or {}).items() if k != "per_layer"},
        "torch_profile": profile_txt,
        "cold_fill": cold_fill,
        "arena": arena,
        # copies out of the arena issued while their blob was pinned (counted as loaded at once)
        # or checked after they ended (host_tier.ArenaPins)
        "arena_copies": pst.get("arena_copies") if mode == "store-colocated" else None,
        "remote_path": remote_path_stats(pst, pf, steps) if mode == "store-remote" else None,
    }


def remote_path_stats(pst: dict[str, Any], pf: dict[str, Any], steps: int) -> dict[str, Any]:
    """What the remote path did to hide the store (issue 14): store fetches into the host tier for
    predicted host-tier misses (asked, fetched, used by a later load, evicted unused, a load that
    waited for one in flight), the store lookahead (its histogram and mean, the fetches for the
    next token's layers, the measured store fetch and layer compute time it follows), and the
    low-weight misses that crossed the wire at the lower precision."""
    hist = {int(k): v for k, v in (pf.get("store_lookahead_hist") or {}).items()}
    n = sum(hist.values())
    out = {k: pst.get(k, 0) for k in ("host_prefetch_threads", "host_prefetch_requests", "host_prefetch_loads",
                                      "host_prefetch_useful", "host_prefetch_unused_evicted", "host_prefetch_waited",
                                      "host_prefetch_dropped", "host_prefetch_errors", "low_precision_store_misses",
                                      "demotions", "demotions_waited", "demoted_used")}
    out.update(store_lookahead_hist=hist, store_lookahead_mean=sum(k * v for k, v in hist.items()) / n if n else None,
               store_prefetches_next_token=pf.get("store_prefetches_next_token", 0),
               store_next_token_precision=pf.get("store_next_token_precision"),
               store_fetch_ms=1e3 * (pf.get("store_fetch_s") or 0.0),
               layer_compute_ms=1e3 * (pf.get("layer_compute_s") or 0.0),
               low_precision_misses_per_token=pst.get("low_precision_store_misses", 0) / steps)
    lows = {t: v for t, v in (pst.get("tiers") or {}).items() if t.startswith("gpu-")}
    out["low_precision_tier"] = lows or None
    return out


def arena_stats(eng: Engine) -> dict[str, Any]:
    """The co-located arena as the store and this decoder saw it (slots, use, evictions,
    publishes; the decoder's reader: copies redone after a replacement, remaps)."""
    info = eng.client.arena_info()
    reader = eng.client.stat()["arena"]["reader"]
    return {"slots": info.slots, "slot_bytes": info.slot_bytes, "used": info.used, "evictions": info.evictions,
            "publishes": info.publishes, "data_loss": info.data_loss, "store_fill_gbps": info.fill_gbps,
            "torn": reader.get("torn", 0), "remaps": reader.get("remaps", 0)}


def fill_while_serving(eng: Engine, prep: Prepared, mode: str, profile: dict, args: argparse.Namespace,
                       warm: int) -> dict[str, Any]:
    """A store row's cold start: the fill runs on its own threads at prefetch priority while the
    warm-up tokens are generated (demand loads pass it); timing starts after both. store-remote
    fills the host tier with the half of each layer's experts the calibration found most popular;
    store-remote then fills it with the experts the GPU does not hold after the warm-up;
    store-colocated has the co-located store publish every expert its arena holds (the popular
    first); the decoder then checks them where they lie (raw payloads: the arena is its host
    tier) or decodes the popular half into its host tier (bf16 published as stored). Returns the
    fill's bytes, seconds and GB/s, and when the first token of a one-token request made as the
    fill began came (seconds after the fill began)."""
    import threading

    cache = eng.provider
    L, E = cache.L, cache.E
    pop = profile.get("popularity") or [[1.0] * E] * L
    ranked = [sorted(range(E), key=lambda e: -pop[l][e]) for l in range(L)]
    half = [(l, e) for l in range(L) for e in ranked[l][:E // 2]]
    out: dict[str, Any] = {}
    errors: list[BaseException] = []

    def fill() -> None:
        try:
            keys = half
            if mode == "store-colocated":
                slots = eng.client.arena_info().slots
                every = (half + [(l, e) for l in range(L) for e in ranked[l][E // 2:]])[:slots]
                out["arena"] = cache.host.publish(every, args.fill_threads, progress=True)
                if cache.host.reads_in_place(every[0]):
                    keys = every   # the arena is the host tier: each checked once now, not on first use
            cache.fill_host(keys, args.fill_threads, progress=True)
            out["host"] = dict(cache.host.fill_stats)
        except BaseException as e:  # noqa: BLE001 - reported with the row
            errors.append(e)
        finally:
            out["fill_s"] = time.perf_counter() - t0

    stall0, loads0 = cache.stall_seconds(), cache.stats()["demand_loads"]   # read before the clock starts
    t0 = time.perf_counter()
    filler = threading.Thread(target=fill, name="cold-fill", daemon=True)
    filler.start()
    # demand first: a one-token request made as the fill starts needs its top-k experts per
    # layer, not the fill (a long prompt's prefill needs nearly every expert, so it would wait
    # for most of the fill whatever the priorities)
    eng.generate(prep.warmup_prompt[:1], max_tokens=1, temperature=0.0, stop_at_eos=False)
    out["first_token_s"] = time.perf_counter() - t0
    # where the first token's time went: waiting for experts (the cache's stall clock) and the
    # loads it made, against compute (a first step also builds kernels and captures graphs)
    out["first_token_stall_s"] = cache.stall_seconds() - stall0
    out["first_token_demand_loads"] = cache.stats()["demand_loads"] - loads0
    out["first_token_before_fill_end"] = filler.is_alive()
    # what demand first can reach at best: one store fetch per MoE layer, one layer after another
    # (a layer's experts are known only once the layer before has run); the measured EWMA
    out["first_token_floor_s"] = len(cache.moe_layers) * cache.load_cost("store")
    eng.generate(prep.warmup_prompt, max_tokens=warm, temperature=0.0, stop_at_eos=False)
    filler.join()
    if errors:
        raise errors[0]
    if mode == "store-remote":
        # then the host tier takes the experts the GPU does not hold, most popular first (it
        # evicts what the GPU holds first): with the GPU's write-backs (demote.py) the two tiers
        # then hold up to their sum of distinct experts, and the store serves the rest
        order = sorted(((i, l, e) for l in range(L) for i, e in enumerate(ranked[l])), key=lambda t: t[:2])
        t1 = time.perf_counter()
        rest = cache.fill_host_beside_gpu([(l, e) for _, l, e in order], args.fill_threads, progress=True)
        out["complement"] = {"experts": len(rest), "seconds": time.perf_counter() - t1}
    src = out.get("arena") or out["host"]
    out["into"] = "arena" if "arena" in out else "host tier"
    if out["into"] == "arena" and not src.get("arena_bytes"):
        # an earlier row's decoder had the co-located store publish every expert: this decoder
        # started against a warm arena (what a decoder restart sees); no fill to time
        out["gbps"], out["warm_arena"] = None, True
        log(f"{prep.name} {mode}: the arena was warm (nothing to publish); first token after "
            f"{out['first_token_s']:.2f} s")
        return out
    out["gbps"] = src.get("arena_gbps", src.get("gbps"))
    log(f"{prep.name} {mode}: cold fill {out['gbps']:.2f} GB/s into the {out['into']} "
        f"({out['fill_s']:.1f} s in all); first token after {out['first_token_s']:.2f} s "
        f"({out['first_token_stall_s']:.2f} s of it waiting for {out['first_token_demand_loads']} demand loads; "
        f"one store fetch per layer in turn: {out['first_token_floor_s']:.2f} s)")
    return out


def torch_profile(eng: Engine, prep: Prepared, args: argparse.Namespace) -> str:
    """Where the time of a few decode steps goes (torch profiler): the host's ops by self CPU
    time, then every kernel of the steps (those graphs replay too) by device time per step.
    The steps are the prompt's first tokens teacher-forced one at a time (`decode_logits`):
    decode steps only, no prefill."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    ids = prep.prompts[0][:args.profile_tokens]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        eng.decode_logits(ids)
    cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50)
    _, kernels = kernel_table(prof, len(ids), cuda, limit=40)
    return (f"## {len(ids)} decode steps, by self CPU time\n{cpu}\n"
            f"## kernels, by device time\n{kernels}")


# =============================================================================================
# HF transformers + accelerate offloading
# =============================================================================================
def run_accelerate_row(prep: Prepared, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    import accelerate
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = compute_dtype(device)
    t0 = time.perf_counter()
    if prep.ckpt is not None:
        model = AutoModelForCausalLM.from_pretrained(str(prep.ckpt), dtype=dtype)
        weights = "the trained checkpoint (bf16)"
    else:
        # B: HF cannot read int4 blobs; same shapes in bf16 (zeros: the speed does not depend on values)
        cfg = AutoConfig.from_pretrained(str(prep.store.parent / "B-layout"))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        weights = "same shapes, bf16 zeros (HF cannot load the int4 blobs)"
    model.eval()
    # dense part on the device, each layer's experts offloaded to the CPU (accelerate hooks)
    experts = []
    for layer in model.model.layers:
        experts.append(layer.mlp.experts)
        layer.mlp.experts = None
    model.to(device)
    for layer, ex in zip(model.model.layers, experts):
        layer.mlp.experts = ex
        if device.type == "cuda":
            accelerate.cpu_offload(ex, execution_device=device)
    build_s = time.perf_counter() - t0
    n_new = args.accelerate_tokens if prep.name == "A" else args.b_accelerate_tokens
    times = []
    outs = []
    gen_rng = torch.Generator(device=device)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        # greedy, or softmax(logits / T) sampling as Engine.generate does (top_p 1)
        if args.temperature == 0:
            return logits.argmax()
        return torch.multinomial(torch.softmax(logits.float() / args.temperature, dim=-1), 1, generator=gen_rng)[0]

    with torch.inference_mode():
        for i, p in enumerate(tqdm([prep.warmup_prompt] + prep.prompts, desc=f"{prep.name} accelerate", unit="prompt",
                                   leave=False)):
            gen_rng.manual_seed(args.seed + i - 1)
            ids = torch.tensor([p], device=device)
            out = model(input_ids=ids, use_cache=True)
            past = out.past_key_values
            tok = pick(out.logits[0, -1])
            gen = [int(tok)]
            sync(device)
            t1 = time.perf_counter()
            for _ in range(n_new - 1):
                out = model(input_ids=tok.view(1, 1), past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = pick(out.logits[0, -1])
                gen.append(int(tok))
            times.append((time.perf_counter() - t1, n_new - 1))
            outs.append(gen)
        times, outs = times[1:], outs[1:]   # the first prompt is the warm-up
        # the first windows only (slow); compare with the engine rows' per-window figures
        ppl, ppl_windows = windows_perplexity(lambda ids, m=model: m(input_ids=ids.to(device)[None]).logits[0],
                                              prep.heldout[: args.accelerate_ppl_windows])
    secs = sum(t for t, _ in times)
    steps = sum(n for _, n in times)
    del model, experts
    free_memory(device)
    tps = steps / secs if secs else 0.0
    return {"model": prep.name, "budget": None, "mode": "accelerate", "tokens_per_s": tps,
            "ms_per_token": 1e3 / tps if tps else None,
            "experts_per_token": None, "single_expert_ratio": 0.0, "gpu_hit_rate": None, "host_hit_rate": None,
            "prefetch_precision": None, "prefetch_recall": None, "prefetch_token_recall": None,
            "stall_ms_per_token": None, "gb_per_token": None, "lower_bound_ms_per_token": None,
            "heldout_perplexity": ppl, "heldout_perplexity_per_window": ppl_windows,
            "generated_tokens": steps, "decode_s": secs, "build_s": round(build_s, 1),
            "outputs_head": [o[:8] for o in outs],
            "note": f"transformers {transformers.__version__}, accelerate {accelerate.__version__}: "
                    f"accelerate.cpu_offload on every layer's MixtralExperts; {weights}; {n_new} new tokens"}


# =============================================================================================
# Measurements around the rows
# =============================================================================================
def pinned_copy_gbps(device: torch.device, mb: int = 256) -> float:
    """Measured pinned host -> device copy rate (GB/s), best of 5; a memcpy rate on the CPU."""
    n = mb << 20
    src = torch.empty(n, dtype=torch.uint8)
    if device.type == "cuda":
        src = src.pin_memory()
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    best = 0.0
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        best = max(best, n / (time.perf_counter() - t0) / 1e9)
    return best


def add_ratios(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        def find(mode: str, budget: Any) -> dict | None:
            same = [x for x in rows if x["model"] == r["model"] and x["mode"] == mode
                    and (mode in BUDGET_FREE or x["budget"] == budget)]
            return next((x for x in same if x.get("decode_step") == r.get("decode_step")), same[0] if same else None)
        lru, res = find("lru", r["budget"]), find("resident", None)
        r["vs_lru"] = r["tokens_per_s"] / lru["tokens_per_s"] if lru and lru["tokens_per_s"] else None
        r["vs_resident"] = r["tokens_per_s"] / res["tokens_per_s"] if res and res["tokens_per_s"] else None
        acc = find("accelerate", None)
        r["vs_accelerate"] = r["tokens_per_s"] / acc["tokens_per_s"] if acc and acc["tokens_per_s"] else None


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = check_step_targets(rows) + check_lever_targets(rows) + check_store_targets(rows)
    for r in rows:
        if r["mode"] != "adapmoe" or r.get("decode_step") == "eager" and any(
                x.get("decode_step") == "step" for x in rows if x["model"] == r["model"]):
            continue
        need = TARGETS["adapmoe_vs_lru"].get(r["model"])
        if r.get("vs_lru") is not None and need:
            out.append({"target": f"{r['model']} adapmoe >= {need}x lru @ {r['budget']:.0%}", "measured": r["vs_lru"],
                        "met": r["vs_lru"] >= need})
        if r.get("vs_accelerate") is not None:
            out.append({"target": f"{r['model']} adapmoe >= 10x accelerate @ {r['budget']:.0%}",
                        "measured": r["vs_accelerate"], "met": r["vs_accelerate"] >= TARGETS["adapmoe_vs_accelerate"]})
        if r["budget"] == 0.5 and r.get("vs_resident"):
            slow = 1 / r["vs_resident"]
            out.append({"target": f"{r['model']} adapmoe within 2x of resident @ 50% (resident/adapmoe <= 2)",
                        "measured": slow, "met": slow <= TARGETS["resident_vs_adapmoe_50"]})
    return out


def check_lever_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 13's targets, for every adapmoe* row at a budget with an lru row beside it (the same
    decode path): GB/token <= 0.75x lru; tokens/s >= 1.35x lru and >= 1.15x the best of
    lru/lfru; held-out perplexity within 1% of topk (the lru row decodes with topk)."""
    out = []
    for r in rows:
        if not r["mode"].startswith("adapmoe") or r["mode"] == "adapmoe-cost" or not r.get("tokens_per_s"):
            continue
        same = [x for x in rows if x["model"] == r["model"] and x["budget"] == r["budget"]
                and x.get("decode_step") == r.get("decode_step") and x.get("tokens_per_s")]
        lru = next((x for x in same if x["mode"] == "lru"), None)
        lfru = next((x for x in same if x["mode"] == "lfru"), None)
        if lru is None:
            continue
        where = f"{r['model']} {r['mode']} @ {r['budget']:.0%}"
        gb, gb_lru = (r.get("gb_per_token") or {}).get("gpu"), (lru.get("gb_per_token") or {}).get("gpu")
        if gb is not None and gb_lru:
            out.append({"target": f"{where}: GB/token <= 0.75x lru (ratio)", "measured": gb / gb_lru,
                        "met": gb <= 0.75 * gb_lru})
        out.append({"target": f"{where}: tokens/s >= 1.35x lru", "measured": r["tokens_per_s"] / lru["tokens_per_s"],
                    "met": r["tokens_per_s"] >= 1.35 * lru["tokens_per_s"]})
        if lfru is not None:
            best = max(lru["tokens_per_s"], lfru["tokens_per_s"])
            out.append({"target": f"{where}: tokens/s >= 1.15x the best of lru/lfru", "measured": r["tokens_per_s"] / best,
                        "met": r["tokens_per_s"] >= 1.15 * best})
        p, p_ref = r.get("heldout_perplexity"), lru.get("heldout_perplexity")
        if p and p_ref:
            out.append({"target": f"{where}: held-out perplexity within 1% of topk (ratio)", "measured": p / p_ref,
                        "met": p <= 1.01 * p_ref})
    return out


def check_store_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 14's targets for the store rows: tokens/s against lru at the same budget
    (store-colocated >= 0.8x everywhere; store-remote >= 0.4x on A at 50%), the cold fill's GB/s
    (>= 10 into the co-located arena, >= 3 into the remote row's host tier) and the first token
    before the fill ended (demand first)."""
    out = []
    for r in rows:
        if r["mode"] not in STORE_ROWS or not r.get("tokens_per_s"):
            continue
        where = f"{r['model']} {r['mode']} @ {r['budget']:.0%}"
        need = TARGETS["colocated_vs_lru"] if r["mode"] == "store-colocated" else \
            TARGETS["remote_vs_lru"].get(r["model"], {}).get(r["budget"])
        if need is not None and r.get("vs_lru") is not None:
            out.append({"target": f"{where}: tokens/s >= {need}x lru (ratio)", "measured": r["vs_lru"],
                        "met": r["vs_lru"] >= need})
        fill = r.get("cold_fill") or {}
        if fill.get("gbps") is not None:
            need = TARGETS["colocated_fill_gbps" if r["mode"] == "store-colocated" else "remote_fill_gbps"]
            out.append({"target": f"{where}: cold fill >= {need:g} GB/s into the {fill.get('into')} (GB/s)",
                        "measured": fill["gbps"], "met": fill["gbps"] >= need})
        if "first_token_s" in fill and not fill.get("warm_arena"):
            out.append({"target": f"{where}: first token before the cold fill ended (first token s / fill s)",
                        "measured": fill["first_token_s"] / max(fill["fill_s"], 1e-9),
                        "met": bool(fill.get("first_token_before_fill_end"))})
    return out


def check_step_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 12's targets for rows decoded through the GPU-driven step: resident ms/token,
    cached rows within 1.25x of (bytes-moved bound + reference step), host reads per token."""
    out = []
    for r in rows:
        if r.get("decode_step") != "step" or not r.get("ms_per_token"):
            continue
        m, ms = r["model"], r["ms_per_token"]
        L = len(r.get("gpu_quota") or []) or None
        ref = next((x for x in rows if x["model"] == m and x["mode"] == "reference"), None)
        reads = r.get("host_reads_per_token")
        if r["mode"] == "resident":
            need = TARGETS["resident_ms"].get(m)
            if need:
                out.append({"target": f"{m} resident <= {need} ms/token (step)", "measured": ms, "met": ms <= need})
            if reads is not None:
                out.append({"target": f"{m} resident host reads/token <= 1", "measured": reads, "met": reads <= 1.0})
        elif r["mode"] in ("lru", "adapmoe"):
            if ref is not None and r.get("lower_bound_ms_per_token") is not None:
                floor = r["lower_bound_ms_per_token"] + ref["ms_per_token"]
                out.append({"target": f"{m} {r['mode']} @ {r['budget']:.0%} <= 1.25 x (bytes bound + reference) "
                                      f"= {1.25 * floor:.2f} ms (ratio shown)",
                            "measured": ms / floor, "met": ms <= TARGETS["cached_vs_bound"] * floor})
            if reads is not None and L:
                out.append({"target": f"{m} {r['mode']} @ {r['budget']:.0%} host reads/token <= {L + 1}",
                            "measured": reads, "met": reads <= L + 1})
    return out


def fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "-"
    return format(v, spec)


def ppl_cell(r: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Held-out perplexity; a row scored on fewer windows (accelerate) also shows the resident
    row's perplexity over those same windows (equal-length windows: their geometric mean)."""
    cell = fmt(r.get("heldout_perplexity"), ".3f")
    mine = r.get("heldout_perplexity_per_window") or []
    ref = next((x.get("heldout_perplexity_per_window") or [] for x in rows
                if x["model"] == r["model"] and x["mode"] == "resident"), [])
    if mine and len(mine) < len(ref):
        n = len(mine)
        same = math.exp(sum(math.log(v) for v in ref[:n]) / n)
        cell += f" ({n} window{'s' if n > 1 else ''}; resident there: {same:.3f})"
    return cell


def markdown(rows: list[dict[str, Any]], targets: list[dict[str, Any]]) -> str:
    head = ("| model | budget | mode | tok/s | vs lru | vs resident | experts/tok | single | GPU hit | "
            "pf prec | pf recall | issued prec | stall ms/tok | GB/tok gpu | GB/tok host | GB/tok store | bound ms/tok | "
            "ms/tok | CPU misses/tok | held-out ppl |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    def label(r: dict[str, Any]) -> str:
        # the decode path is named only where a table holds the same row on both paths
        both = {x.get("decode_step") for x in rows
                if (x["model"], x["mode"], x["budget"]) == (r["model"], r["mode"], r["budget"])}
        return r["mode"] + (f" ({r['decode_step']})" if len(both) > 1 else "")

    for r in rows:
        gb = r.get("gb_per_token") or {}
        lines.append("| " + " | ".join([
            r["model"], fmt(r["budget"], ".0%") if r["budget"] is not None else "-", label(r),
            fmt(r["tokens_per_s"], ".1f"), fmt(r.get("vs_lru")), fmt(r.get("vs_resident")),
            fmt(r.get("experts_per_token")), fmt(r.get("single_expert_ratio")), fmt(r.get("gpu_hit_rate")),
            fmt(r.get("prefetch_precision")), fmt(r.get("prefetch_recall")),
            fmt(r.get("prefetch_issued_precision")), fmt(r.get("stall_ms_per_token"), ".1f"),
            fmt(gb.get("gpu"), ".3f"), fmt(gb.get("host"), ".3f"), fmt(gb.get("store"), ".3f"),
            fmt(r.get("lower_bound_ms_per_token"), ".2f"), fmt(r.get("ms_per_token"), ".2f"),
            fmt(r.get("cpu_misses_per_token"), ".2f"), ppl_cell(r, rows)]) + " |")
    lines.append("")
    for r in rows:
        rp = r.get("remote_path")
        if rp:   # what the remote path did to hide the store
            lines.append(
                f"- {r['model']} {r['mode']} @ {fmt(r['budget'], '.0%')}: host-tier store prefetches "
                f"{rp['host_prefetch_loads']} fetched of {rp['host_prefetch_requests']} asked, "
                f"{rp['host_prefetch_useful']} used, {rp['host_prefetch_unused_evicted']} evicted unused, "
                f"{rp['host_prefetch_waited']} waited for; store lookahead mean {fmt(rp['store_lookahead_mean'])} "
                f"(store fetch {fmt(rp['store_fetch_ms'], '.1f')} ms / layer compute "
                f"{fmt(rp['layer_compute_ms'], '.2f')} ms), {rp['store_prefetches_next_token']} for the next token "
                f"(precision {fmt(rp['store_next_token_precision'])}); "
                f"low-precision misses over the wire {fmt(rp['low_precision_misses_per_token'], '.2f')}/token; "
                f"GPU evictions written back to the host tier {rp.get('demotions', 0)} "
                f"({rp.get('demoted_used', 0)} used again, {rp.get('demotions_waited', 0)} waited for a buffer)")
    if any(r.get("remote_path") for r in rows):
        lines.append("")
    for t in targets:
        lines.append(f"- {'MET' if t['met'] else 'MISSED'}: {t['target']}: measured {t['measured']:.2f}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == m]
        labels, vals, colors = [], [], []
        palette = {None: "#777777", 0.25: "#1f77b4", 0.5: "#ff7f0e"}
        for mode in MODES:
            for r in rs:
                if r["mode"] == mode:
                    name = mode + (" eager" if r.get("decode_step") == "eager" else "")
                    labels.append(name if r["budget"] is None else f"{name}\n{r['budget']:.0%}")
                    vals.append(r["tokens_per_s"])
                    colors.append(palette.get(r["budget"], "#2ca02c"))
        ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("decode tokens/s (batch 1, log scale)")
        ax.set_title(f"model {m}: grey = no budget, blue = 25%, orange = 50% of experts on the GPU", fontsize=8)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}" if v >= 10 else f"{v:.2f}", ha="center", va="bottom", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =============================================================================================
def run_model(prep: Prepared, device: torch.device, args: argparse.Namespace, work: Path,
              pinned_gbps: float, rows: list[dict[str, Any]], on_row: Any = None) -> list[dict[str, Any]]:
    with StoreClient.open(str(prep.store)) as c:
        profile = c.manifest(prep.model).profile
    if not profile:
        raise RuntimeError(f"model {prep.model} has no calibration profile in the store")
    server = colocated = None
    if args.warmup_row and args.modes:
        # the first row of a process pays one-time costs (allocator growth, kernel/library loading,
        # clocks) that an engine's own warm-up tokens do not cover: run it once, untimed
        first = next((m for m in args.modes if m != "reference"), args.modes[0])
        t0 = time.perf_counter()
        try:
            if first == "accelerate":
                run_accelerate_row(prep, device, args)
            elif first not in (*STORE_ROWS, "reference"):
                run_engine_row(prep, first, None if first in BUDGET_FREE else args.budgets[0], device, args,
                               str(prep.store), profile, pinned_gbps)
        except Exception as e:
            log(f"warm-up row failed: {e}")
        free_memory(device)
        log(f"{prep.name}: warm-up row ({first}) {time.perf_counter() - t0:.0f} s, not reported")
    try:
        for mode in args.modes:
            budgets = [None] if mode in BUDGET_FREE else args.budgets
            for b in budgets:
                t0 = time.perf_counter()
                try:
                    if mode == "reference":
                        if not args.reference_probe:
                            continue
                        row = run_reference_row(prep, args)
                    elif mode == "accelerate":
                        if prep.name == "B" and not args.b_accelerate:
                            continue
                        row = run_accelerate_row(prep, device, args)
                    else:
                        target = str(prep.store)
                        if mode == "store-remote":
                            if server is None:
                                served = plain_copy(prep, work) if args.remote_copy == "plain" else prep.store
                                server = StoreServer(served, args.store_workers, work / "store-server.log")
                            target = f"grpc://{server.address}"
                        if mode == "store-colocated":
                            if colocated is None:
                                upstream = None
                                if args.colocated_upstream == "plain":
                                    upstream = str(plain_copy(prep, work))
                                if args.colocated_upstream == "remote":
                                    if server is None:
                                        server = StoreServer(prep.store, args.store_workers,
                                                             work / "store-server.log")
                                    upstream = f"grpc://{server.address}"
                                colocated = ColocatedServer(prep.store, prep.model, store_precision(prep),
                                                            args.colocated_arena_frac, args.colocated_fetch_threads,
                                                            work, upstream, args.colocated_publish)
                            target = colocated.target
                        for ds in args.decode_steps:
                            t0 = time.perf_counter()
                            row = run_engine_row(prep, mode, b, device, args, target, profile, pinned_gbps, ds)
                            if mode == "store-remote":
                                row["store_workers"] = args.store_workers
                                row["fetch_workers"] = args.remote_fetch_workers
                                row["fetch_demand_parts"] = args.remote_demand_parts
                                row["fetch_fill_parts"] = args.remote_fill_parts
                                row["remote_copy"] = args.remote_copy
                            if mode == "store-colocated":
                                row["colocated_upstream"] = args.colocated_upstream
                                row["arena_frac"] = args.colocated_arena_frac
                                row["arena_publish"] = args.colocated_publish
                                row["colocated_loaders"] = args.colocated_loaders
                            if ds != args.decode_steps[-1]:
                                finish_row(row, rows, t0, prep, mode, b, on_row)
                except Exception as e:   # one broken row must not lose the others
                    import traceback
                    traceback.print_exc()
                    row = {"model": prep.name, "budget": b, "mode": mode, "tokens_per_s": 0.0,
                           "error": f"{type(e).__name__}: {e}"}
                    free_memory(device)
                finish_row(row, rows, t0, prep, mode, b, on_row)
    finally:
        if colocated is not None:
            colocated.stop(remove=True)
        if server is not None:
            server.stop()
    return rows


def finish_row(row: dict[str, Any], rows: list[dict[str, Any]], t0: float, prep: Prepared, mode: str,
               b: float | None, on_row: Any) -> None:
    row["row_s"] = round(time.perf_counter() - t0, 1)
    rows.append(row)
    log(f"{prep.name} {mode:>12} ({row.get('decode_step', '-')}) budget {b}: {row['tokens_per_s']:.2f} tok/s "
        f"(ppl {row.get('heldout_perplexity')}, {row['row_s']} s)")
    if on_row is not None:
        on_row()


def run_reference_row(prep: Prepared, args: argparse.Namespace) -> dict[str, Any]:
    """The captured-step probe (`--reference-probe`, e.g. shared/probes/graph_bound.py: every
    expert resident, device routing, grouped GEMM, one CUDA graph) for this model's shapes,
    run in a subprocess in the same session: the floor a batch-1 step of these shapes has."""
    r = subprocess.run([sys.executable, args.reference_probe, prep.name], capture_output=True, text=True,
                       timeout=600)
    best = None
    for line in r.stdout.splitlines():
        try:
            x = json.loads(line)
        except ValueError:
            continue
        if x.get("shape") == prep.name and "graph_ms" in x and (best is None or x["graph_ms"] < best["graph_ms"]):
            best = x
    if best is None:
        raise RuntimeError(f"reference probe printed no figure for {prep.name}: {r.stderr[-500:]}")
    ms = float(best["graph_ms"])
    return {"model": prep.name, "budget": None, "mode": "reference", "decode_step": "probe",
            "tokens_per_s": 1e3 / ms, "ms_per_token": ms, "reference_probe": best}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="A,B", help="comma list of A,B")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--budgets", default="0.25,0.5", help="GPU expert budgets (fractions of all experts)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", default="/tmp/adapmoe-decode", help="checkpoints and stores go here (not the repo)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="decode", help="output file stem")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0: sampling, prompt i seeded with --seed + i in every row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-tokens", type=int, default=16)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--accelerate-tokens", type=int, default=16)
    p.add_argument("--accelerate-ppl-windows", type=int, default=2)
    p.add_argument("--remote-tokens", type=int, default=32, help="new tokens per prompt of the store-remote row")
    p.add_argument("--b-accelerate-tokens", type=int, default=4, help="new tokens per prompt of B's accelerate row")
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--adapmoe-ratio", type=float, default=0.5, metavar="R",
                   help="adapmoe rows at the budget for a share R of the droppable expert uses dropped (0.05 "
                        "steps; within 1%% of top-k's held-out perplexity on model A at 0.5)")
    p.add_argument("--calib-seq", type=int, default=256)
    p.add_argument("--store-workers", type=int, default=4)
    p.add_argument("--dense-slots", choices=("auto", "on", "off"), default="auto",
                   help="int8/int4 GPU slots dequantized once per load (auto: on with CUDA) or raw, "
                        "dequantized in every forward (off)")
    p.add_argument("--remote-fetch-workers", type=int, default=4,
                   help="store-remote: FetchPool processes receiving into the host tier (0 = the engine's own client)")
    p.add_argument("--remote-demand-parts", type=int, default=1,
                   help="store-remote: fetch each demand miss in up to K byte ranges over the FetchPool's "
                        "processes (moe-decoder --fetch-demand-parts; 1: one process per blob)")
    p.add_argument("--remote-fill-parts", type=int, default=1,
                   help="store-remote: the cold fill's fetches in up to K byte ranges each (moe-decoder "
                        "--fetch-fill-parts; 1: one process per blob)")
    p.add_argument("--remote-host-prefetch", type=int, default=-1,
                   help="store-remote: threads fetching predicted host-tier misses from the store into the host "
                        "tier (-1: the cache's default, half the fetch processes; 0: off)")
    p.add_argument("--remote-store-lookahead", type=int, default=-1,
                   help="store-remote: the farthest the store lookahead reaches, in layers (into the next token "
                        "past the last; -1: the layer count; 0: no store fetches for predictions)")
    p.add_argument("--remote-miss-precision", choices=("int8", "int4"), default=None,
                   help="store-remote: low-weight misses of experts not in the host tier cross the wire at this "
                        "precision (A packs it too; B's store is int4 already)")
    p.add_argument("--remote-miss-threshold", type=float, default=0.3,
                   help="store-remote with --remote-miss-precision: the gate weight below which a miss may go low")
    p.add_argument("--miss-compute", choices=("auto", "cpu"), default="auto",
                   help="the -cpu rows: a miss goes to the host's cores when that finishes first by the "
                        "measured costs (auto), or whenever it can (cpu)")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="the -cpu rows: torch threads for host-computed experts (default: torch's, the cores)")
    p.add_argument("--cpu-workers", type=int, default=1,
                   help="the -cpu rows: host experts computed at once, each on cpu-threads / W threads")
    p.add_argument("--colocated-arena-frac", type=float, default=1.0,
                   help="store-colocated: the share of the model's experts the co-located arena holds")
    p.add_argument("--colocated-upstream", choices=("dir", "plain", "remote"), default="dir",
                   help="store-colocated: the co-located store reads the store directory (a local NVMe copy), "
                        "a copy of it packed with codec none (plain: published as read, no lz4 to undo) or the "
                        "remote `expert-store serve` of the store-remote row")
    p.add_argument("--remote-copy", choices=("stored", "plain"), default="stored",
                   help="what the store-remote row's store serves: the model as packed (A: bf16-planes+lz4, "
                        "decoded by the fetch processes) or its codec-none copy (plain_copy: more bytes on the "
                        "wire, nothing to decode)")
    p.add_argument("--colocated-fetch-threads", type=int, default=8,
                   help="store-colocated: the co-located store's upstream fetch threads")
    p.add_argument("--colocated-loaders", type=int, default=2,
                   help="store-colocated: the decoder's loader threads (each waits for its copy from the arena)")
    p.add_argument("--colocated-publish", choices=("raw", "stored"), default="raw",
                   help="store-colocated: bf16 blobs into the arena with their planes joined (raw: the decoder "
                        "copies them to the GPU as they lie) or as stored (decoded on every host-tier miss)")
    p.add_argument("--fill-threads", type=int, default=8,
                   help="threads that fetch and decode experts into the host tier (and loader threads of "
                        "the resident row) while a row is built, before timing")
    p.add_argument("--profile-rows", default="lru,adapmoe", help="rows to run the torch profiler on (comma list)")
    p.add_argument("--profile-tokens", type=int, default=16)
    # model A
    p.add_argument("--a-hidden", type=int, default=2048)
    p.add_argument("--a-ffn", type=int, default=7168)
    p.add_argument("--a-layers", type=int, default=8)
    p.add_argument("--a-heads", type=int, default=16)
    p.add_argument("--a-vocab", type=int, default=8192)
    p.add_argument("--a-seq", type=int, default=256)
    p.add_argument("--a-batch", type=int, default=16)
    p.add_argument("--a-lr", type=float, default=1e-3)
    p.add_argument("--a-corpus-mb", type=float, default=8.0)
    p.add_argument("--a-train-s", type=float, default=90.0, help="training time budget (s)")
    p.add_argument("--a-min-steps", type=int, default=20)
    p.add_argument("--a-max-steps", type=int, default=3000)
    # model B
    p.add_argument("--b-layers", type=int, default=8)
    p.add_argument("--b-hidden", type=int, default=4096)
    p.add_argument("--b-ffn", type=int, default=14336)
    p.add_argument("--b-heads", type=int, default=32)
    p.add_argument("--b-vocab", type=int, default=32000)
    p.add_argument("--b-accelerate", action="store_true", help="also run the accelerate row on B (slow)")
    p.add_argument("--no-warmup-row", dest="warmup_row", action="store_false",
                   help="do not run the first row once untimed before the measured rows")
    p.add_argument("--tiny", action="store_true", help="CPU-sized models and runs (plumbing check)")
    p.add_argument("--decode-steps", default="auto",
                   help="comma list of Engine decode_step values to run every engine row with "
                        "(auto | step | eager; e.g. eager,auto for the before/after pair)")
    p.add_argument("--reference-probe", default=None, metavar="PY",
                   help="the reference row: a captured-step probe printing JSON lines with shape/graph_ms")
    p.add_argument("--merge", default=None, metavar="TAGS",
                   help="only combine earlier runs' OUT_DIR/TAG.json (comma list) into OUT_DIR/decode.*")
    args = p.parse_args(list(argv) if argv is not None else None)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r} (modes: {', '.join(MODES)})")
    args.budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    args.decode_steps = [d.strip() for d in args.decode_steps.split(",") if d.strip()]
    args.profile_rows = [m.strip() for m in args.profile_rows.split(",") if m.strip()]
    if args.tiny:
        args.a_hidden, args.a_ffn, args.a_layers, args.a_heads, args.a_vocab = 64, 128, 4, 4, 512
        args.a_seq, args.a_batch, args.a_corpus_mb, args.a_train_s, args.a_min_steps, args.a_max_steps = 64, 4, 0.5, 2, 5, 5
        args.b_hidden, args.b_ffn, args.b_layers, args.b_heads, args.b_vocab = 128, 256, 2, 4, 512
        args.new_tokens, args.warmup_tokens, args.prompt_tokens, args.accelerate_tokens = 6, 2, 8, 3
        args.remote_tokens, args.b_accelerate_tokens = 4, 3
        args.ppl_windows, args.calib_tokens, args.calib_seq, args.store_workers = 2, 128, 64, 2
        args.remote_fetch_workers = 2
        args.colocated_fetch_threads = 2
        args.profile_tokens = 2
    return args


def merge(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir)
    rows, metas = [], {}
    for tag in args.merge.split(","):
        rows += json.loads((out_dir / f"{tag}.json").read_text())
        meta_path = out_dir / f"{tag}_meta.json"
        if meta_path.exists():
            metas[tag] = json.loads(meta_path.read_text())
    add_ratios(rows)
    targets = check_targets(rows)
    (out_dir / "decode.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    (out_dir / "decode_meta.json").write_text(json.dumps({"merged": metas, "targets": targets}, indent=1) + "\n")
    (out_dir / "decode.md").write_text(markdown(rows, targets))
    plot(rows, out_dir / "decode.png")
    print(markdown(rows, targets))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    device = torch.device(args.device)
    work = Path(args.work)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    pinned = pinned_copy_gbps(device)
    log(f"pinned host -> {device} copy: {pinned:.1f} GB/s")
    rows: list[dict[str, Any]] = []
    models_info: dict[str, Any] = {}
    for name in args.models:
        mwork = work / name
        if mwork.exists():
            import shutil
            shutil.rmtree(mwork)
        mwork.mkdir(parents=True)
        t0 = time.perf_counter()
        prep = (prepare_model_a if name == "A" else prepare_model_b)(mwork, device, args)
        prep.info["prepare_s"] = round(time.perf_counter() - t0, 1)
        models_info[name] = prep.info

        def save() -> None:
            add_ratios(rows)
            write_results(out_dir, args, rows, check_targets(rows), models_info, pinned, device, t_start)

        run_model(prep, device, args, mwork, pinned, rows, on_row=save)
        if not args.tiny:
            import shutil
            shutil.rmtree(mwork, ignore_errors=True)   # the next model needs the disk
    add_ratios(rows)
    targets = check_targets(rows)
    write_results(out_dir, args, rows, targets, models_info, pinned, device, t_start)
    print(markdown(rows, targets))
    for t in targets:
        print(f"target {'MET   ' if t['met'] else 'MISSED'} {t['target']}: {t['measured']:.2f}", flush=True)
    return 0


def write_results(out_dir: Path, args: argparse.Namespace, rows: list, targets: list, models_info: dict,
                  pinned: float, device: torch.device, t_start: float) -> None:
    meta = {"command": "python3 " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "cpu_cores": os.cpu_count(), "cpu": cpu_model(),
            "pinned_h2d_gbps": pinned, "new_tokens": args.new_tokens, "prompts": args.prompts,
            "temperature": args.temperature, "seed": args.seed,
            "models": models_info, "targets": targets, "seconds": round(time.perf_counter() - t_start, 1)}
    plain = [{k: v for k, v in r.items() if k != "torch_profile"} for r in rows]
    (out_dir / f"{args.tag}.json").write_text(json.dumps(plain, indent=1, default=str) + "\n")
    (out_dir / f"{args.tag}_meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    (out_dir / f"{args.tag}.md").write_text(markdown(rows, targets))
    profiles = "\n\n".join(f"# {r['model']} {r['mode']} budget {r['budget']}\n{r['torch_profile']}"
                           for r in rows if r.get("torch_profile"))
    if profiles:
        (out_dir / f"{args.tag}_profile.txt").write_text(profiles + "\n")
    try:
        plot(rows, out_dir / f"{args.tag}.png")
    except Exception as e:  # pragma: no cover - plotting is best effort
        log(f"plot failed: {e}")


if __name__ == "__main__":
    sys.exit(main())
