"""Why model A came out degenerate when trained on the GPU (benchmarks/decode.py, before fab1a08).

Trains the model-A configuration four ways (bf16 autocast around the WHOLE loop at lr 1e-3 and
3e-4, fp32/TF32, a small model with autocast) and evaluates each trained model on held-out and
on training windows, with and without autocast, batch 1 and 4, in eval and train mode, and with
grad enabled. Every evaluation agrees with every other; only the runs trained inside one autocast
context are bad (held-out ~34.5 nats against a logged training loss of ~6): autocast caches the
bf16 cast of each weight for as long as its context lasts, so every training forward after the
first used the step-0 weights. train() now enters autocast per step and refuses to run inside
one (tests/integration/test_train_demo.py). To reproduce the bad runs, check out 372b53b.

    python3 benchmarks/train_a_autocast.py        # on a CUDA machine, ~2.5 min on an H200
Writes $OUT/diag.json (or /tmp/diag.json); results/train_a_autocast.json is the H200 run of the
first four runs (the per-step run was added after it and has not been run on a GPU yet).
"""
import contextlib, sys, time, os, json
import torch, torch.nn.functional as F
sys.path.insert(0, os.getcwd())
from decoder import train_demo as td
from decoder.model.transformer import Transformer

dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
res = {}
def make(lr, hidden=1536, ffn=4096):
    return td.TrainSettings(steps=1, seed=1234, corpus_mb=4, heldout_mb=1.0, vocab_size=8192, hidden_size=hidden,
        intermediate_size=ffn, num_layers=8, num_heads=16, num_kv_heads=4, num_experts=8, top_k=2, seq_len=256,
        batch_size=16, lr=lr, warmup_steps=50, threads=16, max_position_embeddings=2048)
s0 = make(1e-3)
corpus = td.load_corpus(s0)
tok = td.train_tokenizer(corpus.train_texts, s0.vocab_size)
train_stream = td.token_stream(tok, corpus.train_texts)
held = td.token_stream(tok, corpus.heldout_texts)
print("tokens", train_stream.numel(), held.numel(), flush=True)
hw = td.eval_windows(held, 256, 4).to(dev)
tw = td.eval_windows(train_stream, 256, 4).to(dev)

def ev(model, windows, amp, bs):
    tot = 0.0
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        for i in range(0, windows.shape[0], bs):
            w = windows[i:i + bs]
            lg = model(w[:, :-1]).float()
            tot += float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
    return tot / (windows.shape[0] * (windows.shape[1] - 1))

# name, lr, mode ("wrapped": one autocast around train(), the old decode.py; "per-step":
# train(autocast_dtype=bf16), the fix; "fp32"), steps, hidden, ffn
RUNS = [("lr1e-3_amp", 1e-3, "wrapped", 100, 1536, 4096), ("lr3e-4_amp", 3e-4, "wrapped", 100, 1536, 4096),
        ("lr1e-3_fp32", 1e-3, "fp32", 60, 1536, 4096), ("small_lr1e-3_amp", 1e-3, "wrapped", 100, 256, 512),
        ("lr1e-3_amp_per_step", 1e-3, "per-step", 100, 1536, 4096)]
for name, lr, mode, steps, hidden, ffn in RUNS:
    s = td.TrainSettings(**{**make(lr, hidden, ffn).__dict__, "steps": steps})
    torch.manual_seed(1234)
    cfg = td.model_config(s, tok.get_vocab_size(with_added_tokens=True))
    m = Transformer(cfg); m.init_weights(std=s.init_std, seed=s.seed); m.to(dev)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if mode == "wrapped" else contextlib.nullcontext()
    t0 = time.time()
    guard = torch.is_autocast_enabled
    if mode == "wrapped":   # train() refuses this since fab1a08; lift the guard to show why
        torch.is_autocast_enabled = lambda *a: False
    try:
        with ctx:
            tr = td.train(m, train_stream.to(dev), s, progress=False,
                          autocast_dtype=torch.bfloat16 if mode == "per-step" else None)
    finally:
        torch.is_autocast_enabled = guard
    m.eval()
    r = {"train_s": round(time.time() - t0, 1), "hist": [(h["step"], h["loss"]) for h in tr["loss_history"]]}
    for amp_e in (True, False):
        for bs in (1, 4):
            r[f"held_amp{int(amp_e)}_bs{bs}"] = round(ev(m, hw, amp_e, bs), 3)
            r[f"train_amp{int(amp_e)}_bs{bs}"] = round(ev(m, tw, amp_e, bs), 3)
    m.train()
    r["train_mode_train_amp1_bs4"] = round(ev(m, tw, True, 4), 3)
    with torch.enable_grad(), ctx:
        w = tw[:4]
        lg, _ = m(w[:, :-1], return_router_logits=True)
        r["grad_mode_train_bs4"] = round(float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), w[:, 1:].reshape(-1))), 3)
    wn = {n: float(p.detach().float().abs().max()) for n, p in m.named_parameters()}
    r["max_abs_param"] = max(wn.values()); r["argmax_param"] = max(wn, key=wn.get)
    r["nonfinite_params"] = sum(int(not torch.isfinite(p).all()) for p in m.parameters())
    print(name, json.dumps(r), flush=True)
    res[name] = r
    del m; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "diag.json"), "w"), indent=1)
