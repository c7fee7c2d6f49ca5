"""The Triton kernels of the decode step (decoder/kernels/triton_moe.py, norm.py, rope.py,
router.py) under Triton's interpreter, in a child process (TRITON_INTERPRET must be set before
Triton is imported), against the torch reference (fused_moe.moe_torch, RMSNorm,
apply_rope_signed, topk_route): bf16/fp32 slots, int8/int4 slots read in place, split H and F,
post-scaling, the int4 matrix-vector kernels, a dropped choice; then whole decode steps whose
every kernel runs in the interpreter against the eager forward."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

KERNEL_CHECK = textwrap.dedent("""
    import torch
    from decoder.kernels.fused_moe import ExpertBank, KernelConfig, moe_torch, moe_triton, use_kernels
    from expert_store.quant import quantize
    assert use_kernels(torch.empty(0))
    g = torch.Generator().manual_seed(0)

    def quantized_bank(slots, Fd, H, bits, group):
        # a uint8 pool laid out like raw int8/int4 cache slots: values then scales per matrix
        mats, offs, soffs, at = [], {}, {}, 0
        for s in range(slots):
            mats.append({n: quantize(torch.randn(*shape, generator=g) * 0.1, bits, group)
                         for n, shape in (("w1", (Fd, H)), ("w3", (Fd, H)), ("w2", (H, Fd)))})
        for n in ("w1", "w3", "w2"):
            q, sc = mats[0][n]
            offs[n] = at
            at += (q.numel() * q.element_size() + 15) // 16 * 16
            soffs[n] = at
            at += (sc.numel() * 2 + 15) // 16 * 16
        pool = torch.zeros(slots, at, dtype=torch.uint8)
        for s in range(slots):
            for n in ("w1", "w3", "w2"):
                q, sc = mats[s][n]
                qb, sb = q.reshape(-1).view(torch.uint8), sc.reshape(-1).view(torch.uint8)
                pool[s, offs[n]:offs[n] + qb.numel()] = qb
                pool[s, soffs[n]:soffs[n] + sb.numel()] = sb
        return ExpertBank.quantized_pool(pool, bits, group, offs, soffs, Fd, H)

    for dt, T, k, E, Fd, H in ((torch.float32, 3, 2, 6, 200, 144), (torch.bfloat16, 5, 2, 8, 96, 80),
                               (torch.float32, 2, 4, 8, 64, 32)):
        slots = E + 2
        w1 = (torch.randn(slots, Fd, H, generator=g) * 0.1).to(dt)
        w3 = (torch.randn(slots, Fd, H, generator=g) * 0.1).to(dt)
        w2 = (torch.randn(slots, H, Fd, generator=g) * 0.1).to(dt)
        bank = ExpertBank.stacked(w1, w3, w2)
        perm = torch.randperm(slots, generator=g)[:E].to(torch.int32)
        x = torch.randn(T, H, generator=g).to(dt)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        ids[0, -1] = -1                                    # a dropped choice contributes nothing
        wts = torch.rand(T, k, generator=g)
        wts[0, -1] = 0.0
        a = moe_torch(x, wts, ids, perm, bank).float()
        b = moe_triton(x, wts, ids, perm, bank).float()
        c = moe_triton(x, wts, ids, perm, bank, KernelConfig(block_h=32, up_split=3, down_programs=64)).float()
        tol = 1e-5 if dt == torch.float32 else 2e-2
        assert (a - c).abs().max().item() <= tol * max(1.0, a.abs().max().item()), (dt, T, k, "split")
        err = (a - b).abs().max().item()
        assert err <= tol * max(1.0, a.abs().max().item()), (dt, T, k, err)
    # quantized slots read in place (int8, int4): group sizes smaller than a tile and not
    # dividing it (a scale per column), and multiples of the tile (one scale per row and tile),
    # with the default tiles and with smaller ones
    small = KernelConfig(block_f=32, block_h=64, block_d=32, block_fd=64, up_warps=2, up_stages=2,
                         down_warps=2, down_stages=2)
    for bits, group, dt, Fd, H, cfg in ((8, 32, torch.float32, 192, 96, None), (4, 32, torch.float32, 192, 96, None),
                                        (4, 48, torch.bfloat16, 192, 96, None),
                                        (4, 128, torch.bfloat16, 256, 256, None), (8, 256, torch.float32, 256, 512, None),
                                        (4, 128, torch.float32, 256, 256, small),
                                        (4, 128, torch.float32, 256, 256, KernelConfig(int4_post_scale=True)),
                                        (4, 128, torch.bfloat16, 256, 384, KernelConfig(int4_post_scale=True)),
                                        (4, 64, torch.float32, 192, 128, KernelConfig(block_h=64, block_fd=64,
                                                                                      int4_post_scale=True)),
                                        (4, 128, torch.float32, 256, 384, KernelConfig(up_split=3, down_programs=64)),
                                        (8, 32, torch.float32, 192, 96, KernelConfig(block_h=32, up_split=2)),
                                        (4, 64, torch.float32, 192, 256, KernelConfig(block_h=64, up_split=4,
                                                                                      int4_post_scale=True))):
        E, T, k = 6, 4, 2
        bank = quantized_bank(E + 1, Fd, H, bits, group)
        perm = torch.randperm(E + 1, generator=g)[:E].to(torch.int32)
        x = torch.randn(T, H, generator=g).to(dt)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        wts = torch.rand(T, k, generator=g)
        a = moe_torch(x, wts, ids, perm, bank).float()
        b = moe_triton(x, wts, ids, perm, bank, cfg).float()
        tol = 1e-4 if dt == torch.float32 else 3e-2
        err = (a - b).abs().max().item()
        assert err <= tol * max(1.0, a.abs().max().item()), (bits, group, dt, err)
    # int4 through the matrix-vector kernels (KernelConfig.gemv): a tile inside one group, a
    # tile of whole groups, split H, one token and several, a dropped choice, a slot-less run
    # that falls back (group 48 fits neither way) - all against the torch path
    for group, dt, T, Fd, H, cfg in ((128, torch.float32, 1, 256, 256, KernelConfig(gemv=True)),
                                     (128, torch.bfloat16, 1, 256, 384, KernelConfig(gemv=True)),
                                     (32, torch.float32, 3, 192, 256, KernelConfig(gemv=True, block_h=128, block_fd=64)),
                                     (64, torch.float32, 2, 192, 256, KernelConfig(gemv=True, block_h=64, up_split=2,
                                                                                   block_fd=64, down_programs=64)),
                                     (128, torch.bfloat16, 1, 256, 512, KernelConfig(gemv=True, block_h=256, up_split=2)),
                                     (48, torch.float32, 2, 192, 96, KernelConfig(gemv=True)),
                                     # nibbles as 1 + n/16, corrected per group: one group per tile,
                                     # whole groups per tile, split H and F
                                     (128, torch.float32, 1, 256, 384, KernelConfig(gemv=True, gemv_unit=True)),
                                     (128, torch.bfloat16, 2, 256, 512, KernelConfig(gemv=True, gemv_unit=True,
                                                                                     block_h=256, up_split=2)),
                                     (32, torch.float32, 3, 192, 256, KernelConfig(gemv=True, gemv_unit=True,
                                                                                   block_h=128, block_fd=64,
                                                                                   down_programs=64))):
        E, k = 6, 2
        bank = quantized_bank(E + 1, Fd, H, 4, group)
        perm = torch.randperm(E + 1, generator=g)[:E].to(torch.int32)
        x = torch.randn(T, H, generator=g).to(dt)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        ids[-1, -1] = -1
        wts = torch.rand(T, k, generator=g)
        a = moe_torch(x, wts, ids, perm, bank).float()
        b = moe_triton(x, wts, ids, perm, bank, cfg).float()
        tol = 1e-4 if dt == torch.float32 else 3e-2
        err = (a - b).abs().max().item()
        assert err <= tol * max(1.0, a.abs().max().item()), ("gemv", group, dt, T, err)
    # the decode step's RMSNorm kernel (with and without the residual add) against RMSNorm
    from decoder.kernels.norm import _kernel
    from decoder.model.transformer import RMSNorm
    for dt in (torch.float16, torch.bfloat16):
        norm = RMSNorm(96, eps=1e-5)
        norm.weight.data = (torch.rand(96, generator=g) + 0.5)
        norm = norm.to(dt)
        x, r = torch.randn(3, 96, generator=g).to(dt), torch.randn(3, 96, generator=g).to(dt)
        h, y = torch.empty_like(x), torch.empty_like(x)
        _kernel()[(3,)](x, r, h, norm.weight, y, 96, norm.eps, HAS_R=True, BLOCK=128)
        if dt == torch.float16:
            assert torch.equal(h, x + r)
        else:       # the interpreter casts to bf16 by truncation (CUDA rounds): one ulp apart at most
            torch.testing.assert_close(h.float(), (x + r).float(), rtol=2 ** -7, atol=0)
        torch.testing.assert_close(y.float(), norm(x + r).float(), rtol=2e-2, atol=2e-2)
        _kernel()[(3,)](x, x, x, norm.weight, y, 96, norm.eps, HAS_R=False, BLOCK=128)
        torch.testing.assert_close(y.float(), norm(x).float(), rtol=2e-2, atol=2e-2)
    print("kernels ok")
""")


def test_triton_kernels_match_the_torch_path_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=200)
    assert r.returncode == 0 and "kernels ok" in r.stdout, r.stderr[-3000:]


STEP_CHECK = textwrap.dedent("""
    import torch
    from decoder.engine import Engine
    from decoder.kernels.rope import rope_and_cache
    from decoder.kernels.router import route_topk
    from decoder.model.config import ModelConfig
    from decoder.model.transformer import Transformer, apply_rope_signed
    from decoder.routing import topk_route
    g = torch.Generator().manual_seed(0)

    # RoPE + the KV cache write: rows at different positions, equal to the torch ops bit for bit
    B, nh, nkv, hd, S = 3, 4, 2, 16, 10
    qkv = torch.randn(B, (nh + 2 * nkv) * hd, generator=g)
    cos, sin = torch.randn(B, hd, generator=g), torch.randn(B, hd, generator=g)
    pos = torch.tensor([0, 7, 3])
    q_out = torch.empty(B, nh, hd)
    kc, vc = torch.zeros(B + 1, nkv, S, hd), torch.zeros(B + 1, nkv, S, hd)
    rope_and_cache(qkv, cos, sin, pos, q_out, kc, vc, nh)
    c, s = cos.view(B, 1, 1, hd), sin.view(B, 1, 1, hd)
    assert torch.equal(q_out, apply_rope_signed(qkv[:, :nh * hd].view(B, nh, 1, hd), c, s).view(B, nh, hd))
    k_ref = apply_rope_signed(qkv[:, nh * hd:(nh + nkv) * hd].view(B, nkv, 1, hd), c, s)[:, :, 0]
    for b in range(B):
        assert torch.equal(kc[b, :, pos[b]], k_ref[b])
        assert torch.equal(vc[b, :, pos[b]], qkv[b, (nh + nkv) * hd:].view(nkv, hd))
    assert kc.abs().sum() == k_ref.abs().sum()                     # nothing else written

    # top-k routing: renormalised or not, an inactive row routed nowhere
    logits = torch.randn(4, 8, generator=g)
    active = torch.tensor([True, False, True, True])
    for k, renorm in ((2, True), (2, False), (3, True)):
        w, ids, pend = torch.empty(4, k), torch.empty(4, k, dtype=torch.long), torch.empty(4)
        route_topk(logits, active, k, renorm, w, ids, pend)
        w_ref, ids_ref = topk_route(logits, k, renorm)
        assert torch.equal(ids[active], ids_ref[active]) and (ids[1] == -1).all(), (k, renorm)
        torch.testing.assert_close(w[active], w_ref[active], rtol=1e-6, atol=1e-7)
        assert (w[1] == 0).all() and (pend == -1).all()
        # the eager forward's routing on CUDA (router.topk): every row, no masking
        from decoder.kernels.router import topk
        w2, ids2 = topk(logits, k, renorm)
        assert torch.equal(ids2, ids_ref), (k, renorm)
        torch.testing.assert_close(w2, w_ref, rtol=1e-6, atol=1e-7)
    # a tie goes to the lowest expert, at the top and at the k-th place alike
    w2, ids2 = topk(torch.tensor([[5.0, 3.0, 3.0, 0.0], [1.0, 4.0, 4.0, 4.0]]), 2, True)
    assert ids2.tolist() == [[0, 1], [1, 2]] and torch.allclose(w2[1], torch.tensor([0.5, 0.5]))

    # the whole-token counters: one program per layer against the torch ops
    from decoder.kernels.counts import _count_torch, count_routing
    L, B, k, E = 3, 5, 2, 6
    ids = torch.randint(0, E, (L, B, k), generator=g)
    ids[0, 1, 1] = -1
    ids[2, 3] = -1
    pend = torch.where(torch.rand(L, B, generator=g) < 0.5, torch.rand(L, B, generator=g), torch.full((L, B), -1.0))
    active = torch.tensor([True, True, False, True, True])
    c1, l1 = torch.rand(L, 5, generator=g).double(), torch.randint(0, 9, (L, E), generator=g)
    c2, l2 = c1.clone(), l1.clone()
    count_routing(ids, pend, active, c1, l1)
    _count_torch(ids, pend, active, c2, l2)
    torch.testing.assert_close(c1, c2, rtol=1e-6, atol=0)      # W^2 summed in fp32 in another order
    assert torch.equal(l1, l2)

    # whole decode steps, every kernel in the interpreter, against the eager forward
    for family in ({}, dict(family="qwen2_moe", qkv_bias=True, norm_topk_prob=False,
                            shared_expert_intermediate_size=20)):
        def model():
            cfg = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=64, **family)
            m = Transformer(cfg)
            m.init_weights(std=0.3, seed=0)
            return m.eval()
        ids = torch.randint(0, 300, (8,), generator=torch.Generator().manual_seed(1))
        eager = Engine.from_model(model(), decode_step="eager")
        ref = eager.decode_logits(ids)
        eager.close()
        step = Engine.from_model(model(), decode_step="step")
        out = step.decode_logits(ids)
        st = step._step
        assert st.kernels and st.plain_attention and st.whole_steps == 8, family
        assert all(blk.self_attn.qkv_fused() for blk in step.model.layers)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        st_ref, st_step = eager.stats(), step.stats()
        assert st_step["routing"]["decode"] == st_ref["routing"]["decode"], family
        assert st_step["expert_loads"] == st_ref["expert_loads"], family
        step.close()
    print("step ok")
""")


def test_decode_step_kernels_match_the_eager_forward_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", STEP_CHECK], env=env, capture_output=True, text=True, timeout=200)
    assert r.returncode == 0 and "step ok" in r.stdout, r.stderr[-3000:]
