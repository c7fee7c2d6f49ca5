"""The decode step on CUDA: captured graphs against the same step run eagerly (same kernels:
identical tokens), against the eager Transformer path (bf16 tolerance), and through a cache
that evicts and reloads experts between graph replays (never a stale slot)."""

from __future__ import annotations

import pytest
import torch

from checkpoints import make_packed_store
from decoder.engine import Engine
from decoder.kernels.fused_moe import ExpertBank, KernelConfig, moe_torch, moe_triton
from decoder.model.config import ModelConfig
from decoder.model.transformer import Transformer
from expert_store.client import StoreClient

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
L, E = 3, 8


def bf16_model(seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_local_experts=8,
                      num_experts_per_tok=2, max_position_embeddings=512)
    m = Transformer(cfg)
    m.init_weights(std=0.05, seed=seed)
    return m.to("cuda", torch.bfloat16).eval()


def test_kernels_match_torch_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    for T in (1, 2, 8, 16):
        w1 = torch.randn(10, 1024, 512, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
        w3 = torch.randn(10, 1024, 512, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
        w2 = torch.randn(10, 512, 1024, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
        bank = ExpertBank.stacked(w1, w3, w2)
        slot_of = torch.tensor([9, 0, 3, 4, 7, 1, 2, 5], dtype=torch.int32, device="cuda")
        x = torch.randn(T, 512, device="cuda", generator=g, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(8, device="cuda", generator=g)[:2] for _ in range(T)])
        wts = torch.rand(T, 2, device="cuda", generator=g)
        a, b = moe_torch(x, wts, ids, slot_of, bank).float(), moe_triton(x, wts, ids, slot_of, bank).float()
        assert (a - b).abs().max().item() <= 2e-2 * max(1.0, a.abs().max().item())


def router_margins(model: Transformer) -> tuple[list[list[float]], list]:
    """Hooks on every layer's router that record, per call, the gap between the top-k-th and the
    next router logit of each row: (one list per call, the hook handles). A row whose gap is a
    few bf16 ulps may pick another expert on a path that rounds differently."""
    calls: list[list[float]] = []
    k = model.config.num_experts_per_tok

    def hook(mod, inp, out):
        s = out.float().reshape(-1, out.shape[-1]).sort(-1, descending=True).values
        calls.append((s[:, k - 1] - s[:, k]).tolist())
    return calls, [blk.block_sparse_moe.gate.register_forward_hook(hook) for blk in model.layers]


def rows_apart(a: torch.Tensor, b: torch.Tensor, margins: list[list[float]], layers: int, tol: float) -> str:
    """Which rows of two [seq, vocab] logits differ by more than `tol`, with the smallest router
    margin each row's token had in any layer (margins: one call per layer per token)."""
    bad = ((a - b).abs().amax(-1) > tol).nonzero().flatten().tolist()
    per_row = [min(min(margins[t * layers + l]) for l in range(layers)) for t in bad]
    return f"rows {bad} differ by more than {tol}; their smallest top-k router margins (eager): {per_row}"


def test_graphs_give_the_uncaptured_steps_tokens_and_the_eager_logits():
    ids = list(range(5, 17))
    seq = ids + list(range(40, 56))           # one teacher-forced sequence for every path
    runs = {}
    margins: list[list[float]] = []
    for mode in ("eager", "step-eager", "step"):
        eng = Engine.from_model(bf16_model(), decode_step="eager" if mode == "eager" else "step")
        if mode == "step-eager":
            eng._use_step()           # build the step without capture: same kernels, no graphs
            eng._setup_caches(len(ids) + 64)
            from decoder.step import DecodeStep
            eng._step = DecodeStep(eng.model, 1, capture=False)
        res = eng.generate(ids, max_tokens=64, stop_at_eos=False)
        if mode == "eager":
            margins, hooks = router_margins(eng.model)
        logits = eng.decode_logits(seq)
        if mode == "eager":
            for h in hooks:
                h.remove()
        runs[mode] = (res.token_ids, logits, eng._step)
    assert runs["step"][2].capture and runs["step"][2].whole_steps > 0
    assert runs["step"][0] == runs["step-eager"][0]
    torch.testing.assert_close(runs["step"][1], runs["step-eager"][1], rtol=0, atol=0)
    L = runs["step"][2].L
    torch.testing.assert_close(runs["step"][1], runs["eager"][1], rtol=5e-2, atol=5e-2,
                               msg=lambda m: m + "\n" + rows_apart(runs["step"][1], runs["eager"][1], margins, L, 0.05))


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return make_packed_store(tmp_path_factory.mktemp("step-cuda"), precisions=("bf16",), hidden=128, ffn=256,
                             layers=L, experts=E, seed=5, dtype=torch.bfloat16)


def test_evictions_between_graph_replays_never_read_a_stale_slot(store_dir):
    """Quota 2 of 8 experts per layer: almost every token evicts and reloads experts into the
    slots the captured MoE graphs read through the slot table. Logits must equal the eager
    path's, which computes with each expert's own weights."""
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    out = {}
    margins: list[list[float]] = []
    for mode in ("eager", "step"):
        with StoreClient.open(str(store_dir)) as c:
            with Engine.from_store(c, "tiny", device="cuda", dtype=torch.bfloat16, decode_step=mode,
                                   gpu_cache_bytes=0, host_cache_bytes=1 << 24, prefetch=mode == "step",
                                   cache_options={"gpu_slots": [2] * L, "scratch_slots": 2}) as eng:
                if mode == "eager":
                    margins, hooks = router_margins(eng.model)
                out[mode] = (eng.decode_logits(ids), eng.stats(), eng._step)
    (a, sa, _), (b, sb, st) = out["eager"], out["step"]
    assert st.capture and st.layered_steps == 40 and st.reads == 40 * L
    assert sb["provider"]["evictions_gpu"] > 20
    torch.testing.assert_close(b, a, rtol=3e-2, atol=3e-2, msg=lambda m: m + "\n" + rows_apart(b, a, margins, L, 0.03))
    assert (b.argmax(-1) == a.argmax(-1)).float().mean() > 0.9


def test_int4_and_int8_slots_read_in_place_on_cuda():
    from expert_store.quant import quantize

    g = torch.Generator().manual_seed(2)
    Fd, H, slots = 1024, 512, 6
    for bits in (4, 8):
        offs, soffs, at, mats = {}, {}, 0, []
        for _ in range(slots):
            mats.append({n: quantize(torch.randn(*sh, generator=g) * 0.05, bits, 128)
                         for n, sh in (("w1", (Fd, H)), ("w3", (Fd, H)), ("w2", (H, Fd)))})
        for n in ("w1", "w3", "w2"):
            q, sc = mats[0][n]
            offs[n], at = at, at + (q.numel() * q.element_size() + 255) // 256 * 256
            soffs[n], at = at, at + (sc.numel() * 2 + 255) // 256 * 256
        pool = torch.zeros(slots, at, dtype=torch.uint8)
        for s in range(slots):
            for n in ("w1", "w3", "w2"):
                q, sc = mats[s][n]
                pool[s, offs[n]:offs[n] + q.numel() * q.element_size()] = q.reshape(-1).view(torch.uint8)
                pool[s, soffs[n]:soffs[n] + sc.numel() * 2] = sc.reshape(-1).view(torch.uint8)
        bank = ExpertBank.quantized_pool(pool.cuda(), bits, 128, offs, soffs, Fd, H)
        slot_of = torch.tensor([5, 0, 3, 1], dtype=torch.int32, device="cuda")
        for T in (1, 8):
            x = torch.randn(T, H, generator=g).to("cuda", torch.bfloat16)
            ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(T)]).cuda()
            wts = torch.rand(T, 2, generator=g).cuda()
            a = moe_torch(x, wts, ids, slot_of, bank).float()
            for cfg in (KernelConfig(), KernelConfig(int4_post_scale=True), KernelConfig(block_h=256, block_fd=256)):
                b = moe_triton(x, wts, ids, slot_of, bank, cfg).float()
                assert (a - b).abs().max().item() <= 2e-2 * max(1.0, a.abs().max().item()), (bits, T, cfg)


def test_batched_step_rows_give_each_sequences_own_logits():
    """Eight rows at different positions (row b starts at step b, inactive before) through the
    captured batch-8 step: each row's logits are those of its sequence run alone through the
    batch-1 step, within bf16 tolerance (the fused MoE splits its sums differently for 16
    routed rows than for 2), and the greedy tokens agree."""
    from decoder.step import DecodeStep

    B, steps = 8, 24
    model = bf16_model(seed=3)
    model.setup_caches(B, 64)
    seqs = torch.randint(0, 512, (B, steps), generator=torch.Generator().manual_seed(4))
    step8 = DecodeStep(model, B)
    batched = torch.zeros(B, steps, 512)
    for t in range(steps):
        active = torch.arange(B) <= t
        pos = (t - torch.arange(B)).clamp(min=0)
        tok = seqs[torch.arange(B), pos]
        out = step8.run(tok, pos, active).float().cpu().clone()
        for b in range(B):
            if active[b]:
                batched[b, t - b] = out[b]
    step1 = DecodeStep(model, 1)
    for b in range(B):
        alone = torch.stack([step1.run(seqs[b, p:p + 1], torch.tensor([p])).float().cpu().clone()[0]
                             for p in range(steps - b)])
        torch.testing.assert_close(batched[b, :steps - b], alone, rtol=5e-2, atol=5e-2)
        agree = (batched[b, :steps - b].argmax(-1) == alone.argmax(-1)).float().mean().item()
        assert agree > 0.9, (b, agree)
