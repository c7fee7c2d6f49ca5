"""The decode step on CUDA: captured graphs against the same step run eagerly (same kernels:
identical tokens), against the eager Transformer path (the same experts except where two router
logits are within a few bf16 ulps, and the same logits within bf16 tolerance once the eager path
is routed as the step routed), and through a cache that evicts and reloads experts between
graph replays (never a stale slot)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from checkpoints import make_packed_store
from decoder.engine import Engine
from decoder.kernels.fused_moe import ExpertBank, KernelConfig, moe_torch, moe_triton
from decoder.model.config import ModelConfig
from decoder.model.transformer import Transformer
from decoder.routing import Gating
from decoder.step import DecodeStep
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


class RouterLog:
    """What an eager model routed: hooks on every layer's router record its logits (float32
    [T, E] per call) and a wrapper around the model's gating records the experts it chose
    ([T, k] per call), in call order (one call per layer per decode step)."""

    def __init__(self, model: Transformer) -> None:
        self.calls: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.model, self.gating = model, model.gating
        self.hooks = [blk.block_sparse_moe.gate.register_forward_hook(self._hook) for blk in model.layers]
        log = self

        class Recording(Gating):
            name = model.gating.name

            def route(self, layer, router_logits):
                w, idx = log.gating.route(layer, router_logits)
                log.ids.append(idx.to("cpu", copy=True))
                return w, idx
        model.gating = Recording()

    def _hook(self, mod, inp, out) -> None:
        self.calls.append(out.detach().reshape(-1, out.shape[-1]).to("cpu", torch.float32, copy=True))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.model.gating = self.gating


class StepRoutingLog:
    """The experts the decode step chose, recorded after every DecodeStep.run: [L, k] per step
    (row 0 of the batch), read from the step's routing buffer that its MoE kernels read."""

    def __init__(self, monkeypatch) -> None:
        self.steps: list[torch.Tensor] = []
        run = DecodeStep.run

        def recording_run(step, *a, **kw):
            out = run(step, *a, **kw)
            self.steps.append(step.ids_all[:, 0].to("cpu", copy=True))
            return out
        monkeypatch.setattr(DecodeStep, "run", recording_run)


class ReplayGating(Gating):
    """Routes each eager decode step to the experts the decode step chose for it (layer by layer,
    step by step), weighted as top-k gating weighs them: the eager forward computes the step's
    routing with its own kernels, so logits compare without top-k's discontinuity."""

    name = "replay"

    def __init__(self, steps: list[torch.Tensor]) -> None:
        self.steps, self.calls = steps, {}

    def route(self, layer: int, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.calls.get(layer, 0)
        self.calls[layer] = t + 1
        idx = self.steps[t][layer].to(router_logits.device).view(1, -1)          # [1, k]
        w = F.softmax(router_logits.float(), dim=-1).gather(1, idx)              # [1, k]
        return w / w.sum(-1, keepdim=True), idx


def routing_flips(log: RouterLog, step: list[torch.Tensor], layers: int) -> list[tuple]:
    """Every (token, layer) whose step experts differ from the experts the eager path chose, as
    (token, layer, margin, ulp): margin = the eager router logit of an expert only the eager
    path took minus that of an expert only the step took (the smallest such gap, by size);
    ulp = one bf16 ulp at that row's largest logit. A flip of a few ulps is two roundings of a
    near-tie."""
    flips = []
    for t, ids in enumerate(step):
        for l in range(layers):
            logits = log.calls[t * layers + l][0]                                # [E]
            mine = set(log.ids[t * layers + l][0].tolist())
            theirs = set(ids[l].tolist())
            if mine != theirs:
                gaps = [float(logits[a] - logits[b]) for a in mine - theirs for b in theirs - mine]
                ulp = 2.0 ** (math.floor(math.log2(logits.abs().max().item())) - 7)
                flips.append((t, l, min(gaps, key=abs), ulp))
    return flips


def check_routing_then_logits(step_logits, eager_logits, replay_logits, eager: RouterLog, step_ids, layers, tol):
    """The step chose the eager path's experts except at near-ties (within 8 bf16 ulps of the
    eager router logits), rows differ from the eager logits only from the first such flip on,
    and the step's logits equal those of the eager forward routed as the step routed, on every
    row. Every finding is in the message of the first assertion that fails."""
    assert len(step_ids) == step_logits.shape[0] and len(eager.calls) == len(eager.ids) == layers * len(step_ids)
    flips = routing_flips(eager, step_ids, layers)
    apart = ((step_logits - eager_logits).abs().amax(-1) > tol).nonzero().flatten().tolist()
    replay_apart = ((step_logits - replay_logits).abs().amax(-1) > tol).nonzero().flatten().tolist()
    # the eager path's own choice against its logits (the routing kernel on CUDA): no expert it
    # left out has a larger logit than one it took (a tie may go either way)
    own = [(i // layers, i % layers) for i, (lg, ids) in enumerate(zip(eager.calls, eager.ids))
           if lg[0][ids[0]].min() < lg[0][[e for e in range(lg.shape[1]) if e not in ids[0].tolist()]].max()]
    found = (f"routing flips (token, layer, margin, ulp): {flips}; rows apart from eager: {apart}; "
             f"rows apart from eager routed as the step routed: {replay_apart}; "
             f"eager choices that leave out a larger logit: {own}")
    assert not own, found
    assert all(abs(margin) <= 8 * ulp for _, _, margin, ulp in flips), "a flip is not a near-tie: " + found
    assert len(flips) <= max(1, len(step_ids) * layers // 20), "too many routing flips: " + found
    first_flip = min((t for t, *_ in flips), default=len(step_ids))
    assert all(t >= first_flip for t in apart), "rows differ before any routing flip: " + found
    torch.testing.assert_close(step_logits, replay_logits, rtol=tol, atol=tol, msg=lambda m: m + "\n" + found)


def test_graphs_give_the_uncaptured_steps_tokens_and_the_eager_logits(monkeypatch):
    ids = list(range(5, 17))
    seq = ids + list(range(40, 56))           # one teacher-forced sequence for every path
    runs = {}
    for mode in ("step-eager", "step"):
        eng = Engine.from_model(bf16_model(), decode_step="step")
        if mode == "step-eager":
            eng._use_step()           # build the step without capture: same kernels, no graphs
            eng._setup_caches(len(ids) + 64)
            eng._step = DecodeStep(eng.model, 1, capture=False)
        res = eng.generate(ids, max_tokens=64, stop_at_eos=False)
        log = StepRoutingLog(monkeypatch)
        runs[mode] = (res.token_ids, eng.decode_logits(seq), eng._step, log.steps)
        monkeypatch.undo()
    assert runs["step"][2].capture and runs["step"][2].whole_steps > 0
    assert runs["step"][0] == runs["step-eager"][0]
    torch.testing.assert_close(runs["step"][1], runs["step-eager"][1], rtol=0, atol=0)
    step_ids = runs["step"][3]

    eng = Engine.from_model(bf16_model(), decode_step="eager")
    log = RouterLog(eng.model)
    eager = eng.decode_logits(seq)
    log.remove()
    eng.model.gating = ReplayGating(step_ids)
    replay = eng.decode_logits(seq)
    check_routing_then_logits(runs["step"][1], eager, replay, log, step_ids, runs["step"][2].L, 5e-2)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return make_packed_store(tmp_path_factory.mktemp("step-cuda"), precisions=("bf16",), hidden=128, ffn=256,
                             layers=L, experts=E, seed=5, dtype=torch.bfloat16)


def test_evictions_between_graph_replays_never_read_a_stale_slot(store_dir, monkeypatch):
    """Quota 2 of 8 experts per layer: almost every token evicts and reloads experts into the
    slots the captured MoE graphs read through the slot table. Logits must equal the eager
    path's, which computes with each expert's own weights, routed as the step routed."""
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    out = {}
    for mode in ("eager", "step", "replay"):
        with StoreClient.open(str(store_dir)) as c:
            with Engine.from_store(c, "tiny", device="cuda", dtype=torch.bfloat16,
                                   decode_step="eager" if mode == "replay" else mode,
                                   gpu_cache_bytes=0, host_cache_bytes=1 << 24, prefetch=mode == "step",
                                   cache_options={"gpu_slots": [2] * L, "scratch_slots": 2}) as eng:
                if mode == "eager":
                    log = RouterLog(eng.model)
                if mode == "replay":
                    eng.model.gating = ReplayGating(out["step"][3])
                steps = StepRoutingLog(monkeypatch)
                out[mode] = (eng.decode_logits(ids), eng.stats(), eng._step, steps.steps)
                monkeypatch.undo()
                if mode == "eager":
                    log.remove()
    (a, _, _, _), (r, _, _, _), (b, sb, st, step_ids) = out["eager"], out["replay"], out["step"]
    assert st.capture and st.layered_steps == 40 and st.reads == 40 * L
    assert sb["provider"]["evictions_gpu"] > 20
    check_routing_then_logits(b, a, r, log, step_ids, L, 3e-2)
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
