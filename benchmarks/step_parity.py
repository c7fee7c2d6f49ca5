"""The decode step against the eager forward, token by token and layer by layer: where their
numbers part and why (a kernel, or two roundings of a near-tie in the router).

    python3 benchmarks/step_parity.py                      # CUDA: the step's Triton kernels
    TRITON_INTERPRET=1 python3 benchmarks/step_parity.py   # the same kernels on the CPU (slow)
    python3 benchmarks/step_parity.py --dtype float32

The model is tests/unit/test_decode_step_cuda.py's (random bf16, hidden 256, 4 layers, 8 experts
top-2) and so is the teacher-forced sequence. The step runs uncaptured (its graphs replay the
same kernels and give the same numbers). Per token and layer it prints the largest difference of
the attention output, the MoE output and the router logits, and both paths' experts with their
top-3 router logits, for the rows given with --rows and every row whose MoE output differs by
more than --flag; then the largest logit difference of every row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from decoder.engine import Engine  # noqa: E402
from decoder.model.config import ModelConfig  # noqa: E402
from decoder.model.transformer import Transformer  # noqa: E402
from decoder.step import DecodeStep  # noqa: E402

SEQ = list(range(5, 17)) + list(range(40, 56))


def model(device: str, dtype: torch.dtype) -> Transformer:
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_local_experts=8,
                      num_experts_per_tok=2, max_position_embeddings=512)
    m = Transformer(cfg)
    m.init_weights(std=0.05, seed=0)
    return m.to(device, dtype).eval()


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).to("cpu", torch.float32, copy=True)


def eager_run(device: str, dtype: torch.dtype, seq: list[int]) -> tuple[dict, torch.Tensor]:
    """Hooks on every layer's attention, MoE block and router: their outputs per call."""
    rec: dict[str, list] = {"attn": [], "moe": [], "gate": []}
    eng = Engine.from_model(model(device, dtype), decode_step="eager")
    for blk in eng.model.layers:
        blk.self_attn.register_forward_hook(lambda m, i, o: rec["attn"].append(flat(o)))
        blk.block_sparse_moe.register_forward_hook(lambda m, i, o: rec["moe"].append(flat(o)))
        blk.block_sparse_moe.gate.register_forward_hook(lambda m, i, o: rec["gate"].append(flat(o)))
    return rec, eng.decode_logits(seq)


def step_run(device: str, dtype: torch.dtype, seq: list[int]) -> tuple[dict, torch.Tensor]:
    """The step's attention output, MoE output (x - h after the layer), router logits and
    chosen experts per layer, recorded around DecodeStep's own methods."""
    rec: dict[str, list] = {"attn": [], "moe": [], "gate": [], "ids": []}
    attention, moe, route = DecodeStep._attention, DecodeStep._moe, DecodeStep._route

    def attention_rec(self, layer, x):
        y = attention(self, layer, x)
        rec["attn"].append(flat(y))
        return y

    def moe_rec(self, layer, experts=None):
        h = self.h.clone()
        moe(self, layer, experts)
        rec["moe"].append(flat(self.x.float() - h.float()))

    def route_rec(self, layer, logits):
        rec["gate"].append(flat(logits))
        route(self, layer, logits)
        rec["ids"].append(sorted(self.route_ids[layer].reshape(-1).tolist()))

    DecodeStep._attention, DecodeStep._moe, DecodeStep._route = attention_rec, moe_rec, route_rec
    try:
        eng = Engine.from_model(model(device, dtype), decode_step="step")
        eng._use_step()
        eng._setup_caches(len(seq))
        eng._step = DecodeStep(eng.model, 1, capture=False)
        return rec, eng.decode_logits(seq)
    finally:
        DecodeStep._attention, DecodeStep._moe, DecodeStep._route = attention, moe, route


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, default=len(SEQ), help="rows of the sequence to run (at most 28)")
    p.add_argument("--rows", default="", help="rows to print every layer of, e.g. 16,17")
    p.add_argument("--flag", type=float, default=0.1, help="also print a layer whose MoE output differs by more")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    seq = SEQ[:args.tokens]
    rows = {int(r) for r in args.rows.split(",") if r.strip()}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    eager, ref = eager_run(args.device, dtype, seq)
    step, out = step_run(args.device, dtype, seq)
    L = len(eager["gate"]) // len(seq)
    for t in range(len(seq)):
        for l in range(L):
            i = t * L + l
            da, dm, dg = ((step[k][i] - eager[k][i]).abs().max().item() for k in ("attn", "moe", "gate"))
            if t not in rows and dm <= args.flag:
                continue
            top_e = [round(v, 4) for v in eager["gate"][i].sort(descending=True).values[:3].tolist()]
            top_s = [round(v, 4) for v in step["gate"][i].sort(descending=True).values[:3].tolist()]
            print(f"token {t} layer {l}: attention {da:.4f} moe {dm:.4f} router {dg:.4f}; experts step "
                  f"{step['ids'][i]} eager {sorted(eager['gate'][i].topk(2).indices.tolist())}; top-3 router "
                  f"logits eager {top_e} step {top_s}")
    print("largest logit difference per row:", [round(x, 3) for x in (out - ref).abs().amax(-1).tolist()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
