"""`moe-decoder train-demo`: train the small demo Mixtral-layout model, save an HF checkpoint.

    moe-decoder train-demo --out DIR [--steps N] [--seed S] [--family qwen3_moe] [--experts E --top-k K --ffn F]

`--family` trains the same-size model in another softmax-routed family's layout (TRAIN_FAMILIES:
Qwen3-MoE's per-head q/k norm and renormalised top-k, Qwen2-MoE's q/k/v biases, OLMoE's
full-projection q/k norm; the last two weigh the top-k by their softmax probabilities), with
fine-grained experts by default (16 of ffn 128, top-4: the expert parameters and active width
of Mixtral's 8 of 256, top-2), so the real-routing benchmarks can run on fine-grained experts.

Corpus: the CPython standard library sources of the running interpreter (every install has
them): `*.py` under sysconfig's "stdlib" path (site-packages excluded), read in a fixed
order; a file is held out for evaluation when a hash of its relative path says so (about 1
in 20), so the split does not move when files are added or removed elsewhere.

Tokenizer: byte-level BPE trained with `tokenizers` on the training part (`<|endoftext|>` =
id 0 separates files and is the model's BOS/EOS).

Model: decoder.model.transformer.Transformer with ResidentExperts (every expert a parameter),
trained from scratch with AdamW (warmup + cosine), next-token cross-entropy plus the
Switch/Mixtral load-balancing loss, so the routers learn genuinely specialised routing while
keeping the experts' load spread out.

Saved to DIR: config.json (model_type "mixtral", architectures ["MixtralForCausalLM"]; or the
family's), model.safetensors (HF Mixtral names, per-expert
model.layers.{l}.block_sparse_moe.experts.{e}.w1/w2/w3.weight, which every transformers
version loads; or the family's mlp.experts.{e}.gate_proj/up_proj/down_proj), tokenizer.json,
and train_report.json with:

- held-out loss, perplexity (per token) and bits per byte;
- per layer: mean router entropy in bits (uniform = log2(E)) after training and at init,
  the experts' load distribution (share of top-k assignments) and its entropy;
- cross-layer predictability: how often layer l+d's router applied to layer l's MoE input
  recovers layer l+d's actual top-k (what the prefetcher relies on), for d = 1, 2.

Determinism: fixed seed for init and batch sampling, fixed torch thread count,
`torch.use_deterministic_algorithms`, deterministic BPE training and a sorted corpus: the
same interpreter, seed and settings give byte-identical checkpoint files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import platform
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

EOT = "<|endoftext|>"

# Defaults: sized to train in about two minutes of one CPU core (one torch thread: on a
# machine whose cores are shared, several spinning OpenMP threads slow training down tenfold).
DEFAULT_STEPS = 500
DEFAULT_SEED = 1234
# family -> (experts, top-k, expert ffn) by default; and the family's ModelConfig switches
TRAIN_FAMILIES: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {
    "mixtral": ((8, 2, 256), {}),
    "qwen3_moe": ((16, 4, 128), {"qk_norm": "head", "norm_topk_prob": True}),
    "qwen2_moe": ((16, 4, 128), {"qkv_bias": True, "norm_topk_prob": False}),
    "olmoe": ((16, 4, 128), {"qk_norm": "full", "norm_topk_prob": False}),
}


@dataclass
class TrainSettings:
    steps: int = DEFAULT_STEPS
    seed: int = DEFAULT_SEED
    # corpus / tokenizer
    corpus_mb: float = 6.0           # training text used (tokenizer + token pool), MB
    heldout_mb: float = 1.0          # held-out text read for evaluation, MB
    heldout_mod: int = 20            # a file is held out when hash(relpath) % heldout_mod == 0
    vocab_size: int = 2048
    # model (Mixtral layout unless family says otherwise)
    family: str = "mixtral"
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    rope_theta: float = 10000.0
    max_position_embeddings: int = 1024
    # optimisation
    seq_len: int = 128
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    init_std: float = 0.02
    # evaluation
    eval_windows: int = 96
    eval_batch: int = 8
    threads: int = 1


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    root: str
    train_texts: list[str]
    heldout_texts: list[str]
    train_files: int          # files in the training split (before the size cap)
    heldout_files: int
    skipped_files: int        # not UTF-8
    train_bytes: int          # bytes actually used
    heldout_bytes: int


def _path_hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "little")


def stdlib_sources(root: str | None = None) -> tuple[pathlib.Path, list[str]]:
    """(stdlib root, sorted relative paths of its *.py files, site-packages excluded)."""
    base = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"standard library sources not found at {base}")
    rels = []
    for p in base.rglob("*.py"):
        rel = p.relative_to(base)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts or not p.is_file():
            continue
        rels.append(rel.as_posix())
    rels.sort()
    if not rels:
        raise FileNotFoundError(f"no *.py files under {base}")
    return base, rels


def load_corpus(settings: TrainSettings, root: str | None = None) -> Corpus:
    """Read the stdlib split by file: training files in a fixed pseudo-random order (by path
    hash) until corpus_mb, held-out files likewise until heldout_mb."""
    base, rels = stdlib_sources(root)
    heldout = [r for r in rels if _path_hash(r) % settings.heldout_mod == 0]
    train = [r for r in rels if _path_hash(r) % settings.heldout_mod != 0]
    skipped = 0

    def read(names: list[str], cap_bytes: int) -> tuple[list[str], int]:
        nonlocal skipped
        texts, total = [], 0
        # fixed order independent of the directory layout: by a second hash of the path
        for r in sorted(names, key=lambda n: (_path_hash("order:" + n), n)):
            if total >= cap_bytes:
                break
            try:
                text = (base / r).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                skipped += 1
                continue
            if not text.strip():
                continue
            texts.append(text)
            total += len(text.encode("utf-8"))
        return texts, total

    train_texts, train_bytes = read(train, int(settings.corpus_mb * 1e6))
    heldout_texts, heldout_bytes = read(heldout, int(settings.heldout_mb * 1e6))
    if not train_texts or not heldout_texts:
        raise ValueError(f"the standard library at {base} is too small to split into train/held-out")
    return Corpus(str(base), train_texts, heldout_texts, len(train), len(heldout), skipped,
                  train_bytes, heldout_bytes)


def heldout_text(max_bytes: int, settings: TrainSettings | None = None, root: str | None = None) -> str:
    """Held-out stdlib text (files the model never trained on), up to about max_bytes:
    calibration and evaluation material for the demo."""
    s = settings or TrainSettings()
    s = TrainSettings(**{**asdict(s), "heldout_mb": max_bytes / 1e6, "corpus_mb": 1e-6})
    return "\n".join(load_corpus(s, root).heldout_texts)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenization, no prefix space), EOT = id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    if tok.token_to_id(EOT) != 0:
        raise RuntimeError("tokenizer: <|endoftext|> is not id 0")
    return tok


def token_stream(tok, texts: Sequence[str], sep_id: int | None = None):
    """All texts encoded (no special tokens added), each followed by `sep_id` (default: EOT's
    id): int64 tensor [N], the stream the demo model trains and is scored on."""
    import torch

    sep = tok.token_to_id(EOT) if sep_id is None else sep_id
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(sep)
    return torch.tensor(ids, dtype=torch.int64)


def token_byte_lengths(tok) -> list[int]:
    """Bytes of text each token id stands for (byte-level alphabet: one char = one byte; specials 0)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    lengths = [0] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        lengths[i] = 0 if token in special else len(token)
    return lengths


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def model_config(s: TrainSettings, vocab_size: int):
    from decoder.model.config import ModelConfig

    return ModelConfig(
        vocab_size=vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        head_dim=s.hidden_size // s.num_heads, num_local_experts=s.num_experts, num_experts_per_tok=s.top_k,
        rms_norm_eps=1e-5, rope_theta=s.rope_theta, max_position_embeddings=s.max_position_embeddings,
        tie_word_embeddings=False, bos_token_id=0, eos_token_ids=(0,), router_aux_loss_coef=s.aux_loss_coef,
        family=s.family, **TRAIN_FAMILIES[s.family][1],
    )


def _set_determinism(s: TrainSettings) -> None:
    import torch

    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _lr_at(step: int, s: TrainSettings) -> float:
    warmup = max(1, min(s.warmup_steps, s.steps // 10))  # short runs warm up for a tenth of their steps
    if step < warmup:
        return s.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, s.steps - warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _optimizer(model, s: TrainSettings):
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=s.lr, betas=(0.9, 0.95), eps=1e-8)


def per_layer_balancing_loss(router_logits, num_experts: int, top_k: int):
    """Switch/Mixtral load-balancing loss computed per layer and averaged: E * sum_e f_e * P_e
    with f_e the layer's share of top-k assignments to e and P_e its mean router probability
    (1.0 when balanced). HF's variant pools all layers, which lets one layer starve an expert
    while another overuses it; the expert cache wants every layer balanced."""
    import torch
    import torch.nn.functional as F

    losses = []
    for logits in router_logits:                                      # [T, E] per layer
        probs = F.softmax(logits.float(), dim=-1)
        top = torch.topk(probs, top_k, dim=-1).indices                # [T, k]
        share = F.one_hot(top, num_experts).float().sum(1).mean(0) / top_k   # [E], sums to 1
        losses.append(num_experts * torch.sum(share * probs.mean(0)))
    return torch.stack(losses).mean()


def train(model, stream, s: TrainSettings, progress: bool = True,
          autocast_dtype=None) -> dict[str, Any]:
    """AdamW on random windows of `stream`; loss = CE + aux_loss_coef * load balancing.

    autocast_dtype (e.g. torch.bfloat16): mixed precision, entered around each step's forward
    and loss only. Never wrap this whole loop in one `torch.autocast`: autocast caches the
    low-precision copy of each weight for as long as its context lasts, so every forward after
    the first would run on the step-0 weights while the optimizer moved the real ones (the
    loss looks normal, the trained model is garbage).
    """
    import contextlib

    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    cfg = model.config
    if torch.is_autocast_enabled(stream.device.type):
        raise RuntimeError("train() must not run inside torch.autocast (its weight cache would freeze the "
                           "forward at the first step's weights): pass autocast_dtype instead")
    if stream.numel() < s.seq_len + 2:
        raise ValueError(f"training corpus has {stream.numel()} tokens, fewer than one window")
    gen = torch.Generator().manual_seed(s.seed + 1)
    opt = _optimizer(model, s)
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    history: list[dict[str, float]] = []
    ema = None
    bar = tqdm(range(s.steps), desc="train-demo", unit="step", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    for step in bar:
        starts = torch.randint(0, stream.numel() - s.seq_len - 1, (s.batch_size,), generator=gen)
        window = torch.stack([stream[i:i + s.seq_len + 1] for i in starts.tolist()])  # [B, S+1]
        x, y = window[:, :-1], window[:, 1:]
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, s)
        amp = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        with amp:  # a fresh autocast context per step (see the docstring)
            logits, router_logits = model(x, return_router_logits=True)         # [B, S, V]
            ce = F.cross_entropy(logits.reshape(-1, cfg.vocab_size).float(), y.reshape(-1))
            aux = per_layer_balancing_loss(router_logits, cfg.num_local_experts, cfg.num_experts_per_tok)
            loss = ce + s.aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        ce_v, aux_v = ce.item(), aux.item()
        ema = ce_v if ema is None else 0.95 * ema + 0.05 * ce_v
        bar.set_postfix(loss=f"{ema:.3f}", aux=f"{aux_v:.3f}", lr=f"{_lr_at(step, s):.1e}")
        if step % 10 == 0 or step == s.steps - 1:
            history.append({"step": step, "loss": round(ce_v, 4), "aux": round(aux_v, 4)})
    bar.close()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return {"steps": s.steps, "batch_size": s.batch_size, "seq_len": s.seq_len,
            "tokens_seen": s.steps * s.batch_size * s.seq_len, "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2),
            "seconds_per_step": round(seconds / max(1, s.steps), 4),
            "final_train_loss_ema": round(ema, 4) if ema is not None else None,
            "loss_history": history}


# ---------------------------------------------------------------------------------------------
# Evaluation: held-out perplexity and routing statistics
# ---------------------------------------------------------------------------------------------
class _RoutingRecorder:
    """MoE observer that keeps each layer's MoE input and router logits of one forward."""

    def __init__(self) -> None:
        self.inputs: dict[int, Any] = {}
        self.logits: dict[int, Any] = {}

    def on_moe_input(self, layer: int, x) -> None:
        self.inputs[layer] = x.detach()

    def on_routing(self, layer: int, router_logits, weights, idx) -> None:
        self.logits[layer] = router_logits.detach()


def eval_windows(stream, seq_len: int, n: int):
    """n windows of seq_len+1 tokens at evenly spaced offsets: [n, seq_len+1]."""
    import torch

    usable = stream.numel() - seq_len - 1
    if usable <= 0:
        raise ValueError(f"held-out corpus has {stream.numel()} tokens, fewer than one window")
    n = max(1, min(n, usable // (seq_len + 1) or 1))
    starts = [int(i * usable / n) for i in range(n)]
    return torch.stack([stream[i:i + seq_len + 1] for i in starts])


def evaluate(model, windows, byte_lengths: Sequence[int], batch: int = 8) -> dict[str, Any]:
    """Held-out loss/perplexity/bits-per-byte and routing statistics on `windows` [N, S+1]."""
    import torch
    import torch.nn.functional as F

    cfg = model.config
    L, E, k = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
    byte_len = torch.tensor(byte_lengths, dtype=torch.float64)
    rec = _RoutingRecorder()
    model.add_observer(rec)
    model.eval()
    nll = 0.0
    ntok = 0
    nbytes = 0.0
    entropy_sum = torch.zeros(L, dtype=torch.float64)
    load = torch.zeros(L, E, dtype=torch.float64)
    tokens_routed = 0
    distances = [d for d in (1, 2) if d < L]
    hits = {d: torch.zeros(L, dtype=torch.float64) for d in distances}       # |pred ∩ actual|
    exact = {d: torch.zeros(L, dtype=torch.float64) for d in distances}      # pred == actual (as sets)
    top1 = {d: torch.zeros(L, dtype=torch.float64) for d in distances}       # actual top-1 in pred
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch):
                w = windows[i:i + batch]
                x, y = w[:, :-1], w[:, 1:]
                logits = model(x)                                              # [B, S, V]
                nll += float(F.cross_entropy(logits.reshape(-1, cfg.vocab_size).float(), y.reshape(-1),
                                             reduction="sum"))
                ntok += y.numel()
                nbytes += float(byte_len[y.reshape(-1)].sum())
                T = x.numel()
                tokens_routed += T
                actual = {}
                for l in range(L):
                    probs = F.softmax(rec.logits[l].float(), dim=-1)           # [T, E]
                    ent = -(probs * torch.log2(probs.clamp_min(1e-30))).sum(-1)
                    entropy_sum[l] += float(ent.sum())
                    idx = torch.topk(probs, k, dim=-1).indices                 # [T, k]
                    actual[l] = idx
                    load[l] += torch.bincount(idx.reshape(-1), minlength=E).double()
                for d in distances:
                    for l in range(L - d):
                        gate = model.router_weight(l + d)                      # [E, H]
                        pred = torch.topk(rec.inputs[l].float() @ gate.float().t(), k, dim=-1).indices
                        act = actual[l + d]
                        match = (pred[:, :, None] == act[:, None, :]).any(-1)  # [T, k] pred in actual
                        n_hit = match.sum(-1)                                  # [T]
                        hits[d][l] += float(n_hit.sum())
                        exact[d][l] += float((n_hit == k).sum())
                        top1[d][l] += float((pred == act[:, :1]).any(-1).sum())
    finally:
        model.remove_observer(rec)
    loss = nll / max(1, ntok)
    uniform = math.log2(E)
    per_layer = []
    for l in range(L):
        share = (load[l] / load[l].sum()).tolist()
        load_entropy = -sum(p * math.log2(p) for p in share if p > 0)
        per_layer.append({"layer": l,
                          "entropy_bits": round(float(entropy_sum[l]) / tokens_routed, 4),
                          "load": [round(p, 4) for p in share],
                          "load_entropy_bits": round(load_entropy, 4),
                          "max_load": round(max(share), 4)})
    cross: dict[str, Any] = {"chance_recall": round(k / E, 4)}
    for d in distances:
        rows = []
        for l in range(L - d):
            rows.append({"from_layer": l, "to_layer": l + d,
                         "recall": round(float(hits[d][l]) / (tokens_routed * k), 4),
                         "exact_topk": round(float(exact[d][l]) / tokens_routed, 4),
                         "top1_covered": round(float(top1[d][l]) / tokens_routed, 4)})
        cross[f"distance_{d}"] = rows
        cross[f"mean_recall_distance_{d}"] = round(sum(r["recall"] for r in rows) / len(rows), 4)
    return {
        "heldout": {"tokens": ntok, "bytes": int(nbytes), "loss": round(loss, 4),
                    "perplexity": round(math.exp(loss), 3),
                    "bits_per_byte": round(nll / math.log(2) / max(1.0, nbytes), 4)},
        "routing": {"uniform_entropy_bits": round(uniform, 4),
                    "mean_entropy_bits": round(float(entropy_sum.sum()) / (tokens_routed * L), 4),
                    "per_layer": per_layer},
        "cross_layer": cross,
    }


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
# The demo model knows Python source only, so a chat is laid out as a Python file: every
# message a comment line "# role: text", then "# assistant:" for the model to go on from.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '# ' ~ message['role'] ~ ': ' ~ (message['content'] | replace('\n', '\n# ')) ~ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '# assistant:\n' }}{% endif %}"
)


def write_tokenizer_config(out: pathlib.Path) -> str:
    """tokenizer_config.json with the demo's chat template and its end-of-text token (packed
    into the store with the model; the HTTP chat API renders it)."""
    cfg = {"eos_token": EOT, "chat_template": DEMO_CHAT_TEMPLATE}
    _write_atomic(out / "tokenizer_config.json", (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
    return "tokenizer_config.json"


def save_checkpoint(out: pathlib.Path, model, tok) -> list[str]:
    """config.json, model.safetensors (the family's HF names), tokenizer.json, tokenizer_config.json
    (the chat template); returns the file names."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = "float32"
    cfg["dtype"] = "float32"
    cfg["use_cache"] = True
    cfg["attention_dropout"] = 0.0
    cfg["initializer_range"] = 0.02
    cfg["output_router_logits"] = False
    _write_atomic(out / "config.json", (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
    tensors = {name: t.float().contiguous() for name, t in sorted(model.hf_state_dict().items())}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    _write_atomic(out / "tokenizer.json", tok.to_str(pretty=True).encode("utf-8"))
    return ["config.json", "model.safetensors", "tokenizer.json", write_tokenizer_config(out)]


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The whole job
# ---------------------------------------------------------------------------------------------
def run(out: str | os.PathLike, settings: TrainSettings, progress: bool = True,
        log=None) -> dict[str, Any]:
    """Train, evaluate and save into `out`; returns the report (also written as train_report.json)."""
    import torch

    from decoder.model.transformer import Transformer

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    s = settings
    _validate(s)
    _set_determinism(s)
    out = pathlib.Path(out)
    t_start = time.perf_counter()

    corpus = load_corpus(s)
    log(f"train-demo: corpus {corpus.root}: {len(corpus.train_texts)} training files "
        f"({corpus.train_bytes / 1e6:.1f} MB), {len(corpus.heldout_texts)} held-out files "
        f"({corpus.heldout_bytes / 1e6:.1f} MB)")
    t0 = time.perf_counter()
    tok = train_tokenizer(corpus.train_texts, s.vocab_size)
    train_stream = token_stream(tok, corpus.train_texts)
    heldout_stream = token_stream(tok, corpus.heldout_texts)
    t_tok = time.perf_counter() - t0
    vocab = tok.get_vocab_size(with_added_tokens=True)
    log(f"train-demo: byte-level BPE, vocab {vocab}: {train_stream.numel()} training tokens "
        f"({corpus.train_bytes / train_stream.numel():.2f} bytes/token), {heldout_stream.numel()} held-out "
        f"({t_tok:.1f} s)")

    cfg = model_config(s, vocab)
    model = Transformer(cfg)
    model.init_weights(std=s.init_std, seed=s.seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = cfg.expert_params * cfg.num_local_experts * cfg.num_hidden_layers
    log(f"train-demo: {cfg.family} layout: {cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts "
        f"(top-{cfg.num_experts_per_tok}), hidden {cfg.hidden_size}, ffn {cfg.intermediate_size}: "
        f"{n_params / 1e6:.2f} M parameters ({n_expert / 1e6:.2f} M in experts)")

    windows = eval_windows(heldout_stream, s.seq_len, s.eval_windows)
    byte_lengths = token_byte_lengths(tok)
    at_init = evaluate(model, windows, byte_lengths, s.eval_batch)  # the same windows, untrained

    training = train(model, train_stream, s, progress=progress)
    t_eval = time.perf_counter()
    result = evaluate(model, windows, byte_lengths, s.eval_batch)
    for row, init_row in zip(result["routing"]["per_layer"], at_init["routing"]["per_layer"]):
        row["entropy_bits_at_init"] = init_row["entropy_bits"]
    result["routing"]["mean_entropy_bits_at_init"] = at_init["routing"]["mean_entropy_bits"]
    result["cross_layer"]["mean_recall_distance_1_at_init"] = at_init["cross_layer"].get("mean_recall_distance_1")
    result["heldout"]["loss_at_init"] = at_init["heldout"]["loss"]
    eval_s = time.perf_counter() - t_eval

    files = save_checkpoint(out, model, tok)
    active = (n_params - n_expert) + cfg.expert_params * cfg.num_experts_per_tok * cfg.num_hidden_layers
    report: dict[str, Any] = {
        "command": "moe-decoder train-demo --out DIR " + f"--steps {s.steps} --seed {s.seed}"
                   + ("" if s.family == "mixtral" else f" --family {s.family} --experts {s.num_experts} "
                                                        f"--top-k {s.top_k} --ffn {s.intermediate_size}"),
        "settings": asdict(s),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "stdlib": corpus.root},
        "corpus": {"train_files": corpus.train_files, "heldout_files": corpus.heldout_files,
                   "train_files_used": len(corpus.train_texts), "heldout_files_used": len(corpus.heldout_texts),
                   "skipped_not_utf8": corpus.skipped_files,
                   "train_bytes": corpus.train_bytes, "heldout_bytes": corpus.heldout_bytes,
                   "train_tokens": int(train_stream.numel()), "heldout_tokens": int(heldout_stream.numel())},
        "tokenizer": {"type": "byte-level BPE", "vocab_size": vocab, "eot_id": 0,
                      "train_bytes_per_token": round(corpus.train_bytes / train_stream.numel(), 3)},
        "model": {"config": cfg.to_hf(), "parameters": n_params, "expert_parameters": n_expert,
                  "active_parameters_per_token": active,
                  "expert_bytes_fp32": cfg.expert_params * 4,
                  "all_experts_bytes_bf16": n_expert * 2},
        "training": training,
        **result,
        "seconds": {"tokenizer": round(t_tok, 2), "train": training["seconds"],
                    "train_cpu": training["cpu_seconds"], "eval": round(eval_s, 2),
                    "total": round(time.perf_counter() - t_start, 2)},
        "files": files,
    }
    _write_atomic(out / "train_report.json", (json.dumps(report, indent=2) + "\n").encode())
    return report


def format_report(r: dict[str, Any]) -> str:
    h, rt, cl = r["heldout"], r["routing"], r["cross_layer"]
    lines = [
        f"held-out: {h['tokens']} tokens, loss {h['loss']:.3f}, perplexity {h['perplexity']:.2f}, "
        f"{h['bits_per_byte']:.3f} bits/byte",
        f"router entropy (uniform = {rt['uniform_entropy_bits']:.2f} bits): mean {rt['mean_entropy_bits']:.3f} bits "
        f"(at init {rt['mean_entropy_bits_at_init']:.3f})",
        "layer  entropy  load per expert (share of top-k assignments)                     load entropy",
    ]
    for row in rt["per_layer"]:
        load = " ".join(f"{p:.3f}" for p in row["load"])
        lines.append(f"{row['layer']:>5}  {row['entropy_bits']:.3f}    {load:<62} {row['load_entropy_bits']:.3f}")
    lines.append(f"cross-layer predictability (router of l+d on layer l's MoE input; chance recall "
                 f"{cl['chance_recall']:.2f}):")
    for key in ("distance_1", "distance_2"):
        for row in cl.get(key, []):
            lines.append(f"  L{row['from_layer']} -> L{row['to_layer']}: recall {row['recall']:.3f}, "
                         f"exact top-k {row['exact_topk']:.3f}, top-1 covered {row['top1_covered']:.3f}")
    t = r["seconds"]
    lines.append(f"time: tokenizer {t['tokenizer']:.1f} s, training {t['train']:.1f} s "
                 f"({r['training']['steps']} steps, {t['train_cpu']:.1f} s of CPU), eval {t['eval']:.1f} s, total {t['total']:.1f} s")
    return "\n".join(lines)


def _validate(s: TrainSettings) -> None:
    if s.steps < 1:
        raise ValueError("--steps must be >= 1")
    if s.vocab_size < 300:
        raise ValueError("--vocab-size must be >= 300 (256 byte tokens + EOT + merges)")
    if s.corpus_mb <= 0 or s.heldout_mb <= 0:
        raise ValueError("--corpus-mb and --heldout-mb must be positive")
    if s.seq_len < 8 or s.seq_len >= s.max_position_embeddings:
        raise ValueError(f"--seq-len must be in [8, {s.max_position_embeddings})")
    if s.batch_size < 1 or s.eval_windows < 1 or s.threads < 1:
        raise ValueError("--batch-size, --eval-windows and --threads must be >= 1")
    if s.family not in TRAIN_FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(TRAIN_FAMILIES)}, got {s.family!r}")
    if s.num_experts < 2 or s.intermediate_size < 1 or not 1 <= s.top_k <= s.num_experts:
        raise ValueError("--experts must be >= 2, --ffn >= 1 and --top-k in 1..--experts")


def build_parser() -> argparse.ArgumentParser:
    d = TrainSettings()
    p = argparse.ArgumentParser(prog="moe-decoder train-demo",
                                description="Train the small demo Mixtral-layout model on the CPython "
                                            "standard library and save an HF checkpoint.")
    p.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, "
                                                "tokenizer.json, train_report.json)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    p.add_argument("--corpus-mb", type=float, default=d.corpus_mb, help="training text to use, MB")
    p.add_argument("--heldout-mb", type=float, default=d.heldout_mb, help="held-out text to read, MB")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help="held-out windows of --seq-len")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads (fixed, part of what makes runs reproducible)")
    p.add_argument("--family", default=d.family, choices=list(TRAIN_FAMILIES),
                   help="the checkpoint's family layout (model_type)")
    p.add_argument("--experts", type=int, default=None,
                   help="routed experts per layer (default: 8 for mixtral, 16 for the others)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default: 2 for mixtral, 4 for the others)")
    p.add_argument("--ffn", type=int, default=None, help="one expert's ffn width (default: 256 for mixtral, 128 for the others)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    from expert_store.cli import show_defaults

    return show_defaults(p)  # --help lists the defaults


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    experts, top_k, ffn = TRAIN_FAMILIES[args.family][0]
    return TrainSettings(steps=args.steps, seed=args.seed, corpus_mb=args.corpus_mb, heldout_mb=args.heldout_mb,
                         vocab_size=args.vocab_size, batch_size=args.batch_size, seq_len=args.seq_len,
                         lr=args.lr, eval_windows=args.eval_windows, threads=args.threads, family=args.family,
                         num_experts=args.experts if args.experts is not None else experts,
                         top_k=args.top_k if args.top_k is not None else top_k,
                         intermediate_size=args.ffn if args.ffn is not None else ffn)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    s = settings_from_args(args)
    report = run(args.out, s, progress=not args.no_progress)
    print(format_report(report))
    print(f"saved {', '.join(report['files'])} and train_report.json to {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
