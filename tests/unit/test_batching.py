"""decoder.batching.BatchScheduler without a server: a real engine on a tiny packed checkpoint
(in-process store directory), the real step thread.

Every sequence decoded in a batch must produce exactly the tokens (and text, finish reason)
`Engine.generate` produces for it alone, whatever else shares its steps and whichever KV-cache
row it lands in; limits, cancellation and deadlines free rows at once.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from checkpoints import make_mixtral_checkpoint
from decoder import Engine
from decoder.batching import (BatchScheduler, ErrorEvent, FinishEvent, InvalidRequest, QueueFull, SamplingSpec,
                              ShuttingDown, TokenEvent)
from expert_store.pack import pack_checkpoint
from expert_store.tiers import NvmeTier

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

PROMPTS = ["Once upon a time", "The quick brown fox jumps over", "Hello",
           "def forward(x): return silu(x @ w1.T) * (x @ w3.T) @ w2.T", "Numbers: 0 1 2 3", "A mixture of experts"]
CTX = 128


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    ckpt, _ = make_mixtral_checkpoint(root / "ckpt", hidden=64, ffn=96, layers=2, experts=4, seed=11,
                                      max_position_embeddings=CTX)
    pack_checkpoint(ckpt, NvmeTier(root / "store"), model="tiny", precisions=("bf16",), progress=False)
    with Engine.from_store(str(root / "store"), "tiny") as eng:
        yield eng


class Collector:
    """A sink: records events; `finished` is set on the final event."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.text = ""
        self.end: FinishEvent | ErrorEvent | None = None
        self.finished = threading.Event()
        self.first = threading.Event()
        self.after_end = 0

    def __call__(self, ev) -> None:
        if self.end is not None:
            self.after_end += 1
        if isinstance(ev, TokenEvent):
            self.ids.append(ev.token_id)
            self.text += ev.text
            self.first.set()
        else:
            self.end = ev
            self.finished.set()

    def wait(self, timeout: float = 60.0) -> "Collector":
        assert self.finished.wait(timeout), "sequence did not finish"
        return self


def wait_until(pred, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


def test_batched_greedy_equals_engine_generate_in_every_row(engine):
    refs = [engine.generate(p, max_tokens=24) for p in PROMPTS]
    with BatchScheduler(engine, max_active=3, max_queue=8) as sch:
        sinks = [Collector() for _ in PROMPTS]
        # two at once, the rest while those decode: sequences join running batches, rows get reused
        for i in (0, 1):
            sch.submit(engine.encode(PROMPTS[i]), SamplingSpec(max_tokens=24), sinks[i])
        assert sinks[0].first.wait(30)
        for i in range(2, len(PROMPTS)):
            sch.submit(engine.encode(PROMPTS[i]), SamplingSpec(max_tokens=24), sinks[i])
        for s in sinks:
            s.wait()
        assert sch.stats.max_batch == 3  # really batched
        assert sch.stats.steps < sum(len(r.token_ids) for r in refs)
    for ref, s in zip(refs, sinks):
        assert isinstance(s.end, FinishEvent)
        assert s.ids == ref.token_ids
        assert s.text == ref.text
        assert s.end.usage.finish_reason == ref.finish_reason
        assert s.end.usage.completion_tokens == len(ref.token_ids)
        assert s.end.usage.prompt_tokens == ref.prompt_tokens
        assert s.end.usage.experts_per_token == pytest.approx(2.0)  # top-2 routing


def test_non_contiguous_rows_after_a_cancel_still_match(engine):
    """Cancel the sequence in row 1 while rows 0 and 2 decode: the batch becomes rows {0, 2}
    (the gathered-rows path of RowKVCache), then a newcomer takes row 1 back."""
    refs = {p: engine.generate(p, max_tokens=30).token_ids for p in PROMPTS[:4]}
    with BatchScheduler(engine, max_active=3, max_queue=4) as sch:
        sinks = {p: Collector() for p in PROMPTS[:4]}
        seqs = {p: sch.submit(engine.encode(p), SamplingSpec(max_tokens=30), sinks[p]) for p in PROMPTS[:3]}
        assert sinks[PROMPTS[1]].first.wait(30)
        assert seqs[PROMPTS[1]].row == 1
        sch.cancel(seqs[PROMPTS[1]])
        assert wait_until(lambda: sch.rows_in_use() == 2 or sinks[PROMPTS[0]].finished.is_set(), 5)
        sch.submit(engine.encode(PROMPTS[3]), SamplingSpec(max_tokens=30), sinks[PROMPTS[3]])
        for p in (PROMPTS[0], PROMPTS[2], PROMPTS[3]):
            assert sinks[p].wait().ids == refs[p]
        assert sinks[PROMPTS[1]].end is None  # a cancelled sequence gets no final event
        assert sch.stats.cancelled == 1


def test_seeded_sampling_and_stop_strings_match_engine(engine):
    spec = SamplingSpec(max_tokens=30, temperature=0.9, top_p=0.8, seed=1234)
    ref = engine.generate(PROMPTS[0], max_tokens=30, temperature=0.9, top_p=0.8, seed=1234)
    greedy = engine.generate(PROMPTS[2], max_tokens=30)
    stop = greedy.text[5:8]
    assert stop.strip()
    ref_stop = engine.generate(PROMPTS[2], max_tokens=30, stop=[stop])
    assert ref_stop.finish_reason == "stop"
    with BatchScheduler(engine, max_active=4, max_queue=0) as sch:
        a, b, c = Collector(), Collector(), Collector()
        sch.submit(engine.encode(PROMPTS[0]), spec, a)
        sch.submit(engine.encode(PROMPTS[2]), SamplingSpec(max_tokens=30, stop=(stop,)), b)
        sch.submit(engine.encode(PROMPTS[1]), SamplingSpec(max_tokens=0), c)
        a.wait(), b.wait(), c.wait()
    assert a.ids == ref.token_ids and a.text == ref.text
    assert b.ids == ref_stop.token_ids and b.text == ref_stop.text and stop not in b.text
    assert b.end.usage.finish_reason == "stop"
    assert c.ids == [] and c.end.usage.finish_reason == "length" and c.end.usage.completion_tokens == 0


def test_context_limit_caps_generation_like_engine(engine):
    prompt = engine.encode(" ".join(["word"] * 200))[: CTX - 3]
    ref = engine.generate(prompt, max_tokens=50)
    assert ref.finish_reason == "length" and len(ref.token_ids) == 4  # ctx - n_prompt + 1
    with BatchScheduler(engine, max_active=2, max_queue=2) as sch:
        s = Collector()
        sch.submit(prompt, SamplingSpec(max_tokens=50), s)
        assert s.wait().ids == ref.token_ids


def test_each_step_loads_the_union_of_the_batch_experts_once(engine):
    """A thin counting wrapper around the engine's real provider: per layer and forward, one
    prepare() with the union of the experts the batch routed to, and one get() per expert."""
    real = engine.provider

    class Counting:
        def __init__(self) -> None:
            self.prepares: list[tuple[int, list[int]]] = []
            self.gets: list[tuple[int, int]] = []

        def __getattr__(self, name):
            return getattr(real, name)

        def prepare(self, layer, experts):
            self.prepares.append((layer, list(experts)))
            return real.prepare(layer, experts)

        def get(self, layer, expert):
            self.gets.append((layer, expert))
            return real.get(layer, expert)

    counting = Counting()
    engine.model.experts = counting
    try:
        with BatchScheduler(engine, max_active=4, max_queue=0) as sch:
            sinks = [Collector() for _ in range(4)]
            for p, s in zip(PROMPTS[:4], sinks):
                sch.submit(engine.encode(p), SamplingSpec(max_tokens=12), s)
            for s in sinks:
                s.wait()
            forwards = sch.stats.steps + sch.stats.prefills
    finally:
        engine.model.experts = real
    L = engine.config.num_hidden_layers
    assert len(counting.prepares) == forwards * L
    i = 0
    for layer, experts in counting.prepares:
        assert len(set(experts)) == len(experts) <= engine.config.num_local_experts
        assert counting.gets[i:i + len(experts)] and sorted(e for _, e in counting.gets[i:i + len(experts)]) == experts
        assert all(l == layer for l, _ in counting.gets[i:i + len(experts)])
        i += len(experts)
    assert i == len(counting.gets)


def test_queue_limits_and_invalid_requests(engine):
    sch = BatchScheduler(engine, max_active=1, max_queue=1)  # not started: submissions just queue
    ids = engine.encode("Hello")
    a = sch.submit(ids, SamplingSpec(), Collector())
    sch.submit(ids, SamplingSpec(), Collector())
    with pytest.raises(QueueFull):
        sch.submit(ids, SamplingSpec(), Collector())
    sch.cancel(a)  # a queued sequence leaves at once: room again
    assert sch.queued == 1
    sch.submit(ids, SamplingSpec(), Collector())
    assert sch.stats.rejected == 1
    bad = [
        ([], SamplingSpec()),
        ([0] * (CTX + 1), SamplingSpec()),
        ([engine.config.vocab_size], SamplingSpec()),
        ([-1], SamplingSpec()),
        (ids, SamplingSpec(temperature=-0.5)),
        (ids, SamplingSpec(temperature=float("nan"))),
        (ids, SamplingSpec(top_p=1.5)),
        (ids, SamplingSpec(max_tokens=-1)),
        (ids, SamplingSpec(max_tokens=1 << 30)),
        (ids, SamplingSpec(stop=tuple("abcdefghijklmnopq"))),
        (ids, SamplingSpec(stop=("x" * 1000,))),
    ]
    for prompt, spec in bad:
        with pytest.raises(InvalidRequest):
            sch.submit(prompt, spec, Collector())
    sch.close()
    with pytest.raises(ShuttingDown):
        sch.submit(ids, SamplingSpec(), Collector())


def test_cancel_frees_the_row_for_the_next_request(engine):
    with BatchScheduler(engine, max_active=1, max_queue=1) as sch:
        long_run, nxt = Collector(), Collector()
        seq = sch.submit(engine.encode(PROMPTS[0]), SamplingSpec(max_tokens=CTX), long_run)
        assert long_run.first.wait(30)
        sch.submit(engine.encode(PROMPTS[2]), SamplingSpec(max_tokens=5), nxt)
        assert sch.queued == 1
        sch.cancel(seq)
        assert nxt.wait(10).end.usage.completion_tokens == 5  # got the only row long before CTX tokens
        assert long_run.end is None and len(long_run.ids) < CTX - 20
        assert wait_until(lambda: sch.rows_in_use() == 0, 5)


class SlowSteps:
    """The engine's real provider, with every forward step (begin_token) taking 10 ms longer:
    a slow device, so that deadlines expire mid-generation whatever the machine's speed."""

    def __init__(self, real) -> None:
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def begin_token(self) -> None:
        time.sleep(0.01)
        self.real.begin_token()


def test_deadlines_end_active_and_queued_sequences(engine, monkeypatch):
    monkeypatch.setattr(engine, "provider", SlowSteps(engine.provider))
    with BatchScheduler(engine, max_active=1, max_queue=2) as sch:
        active, queued = Collector(), Collector()
        soon = time.monotonic() + 0.3
        sch.submit(engine.encode(PROMPTS[0]), SamplingSpec(max_tokens=CTX), active, deadline=soon)
        sch.submit(engine.encode(PROMPTS[1]), SamplingSpec(max_tokens=4), queued, deadline=soon)
        for s in (active, queued):
            assert isinstance(s.wait(30).end, ErrorEvent) and s.end.code == "DEADLINE_EXCEEDED"
        assert wait_until(lambda: sch.rows_in_use() == 0 and sch.queued == 0, 5)
        assert sch.stats.expired == 2
        ok = Collector()
        sch.submit(engine.encode(PROMPTS[2]), SamplingSpec(max_tokens=3), ok)
        assert isinstance(ok.wait().end, FinishEvent)


def test_close_answers_everything_left_with_unavailable(engine):
    sch = BatchScheduler(engine, max_active=1, max_queue=1).start()
    a, b = Collector(), Collector()
    sch.submit(engine.encode(PROMPTS[0]), SamplingSpec(max_tokens=CTX), a)
    sch.submit(engine.encode(PROMPTS[1]), SamplingSpec(max_tokens=CTX), b)
    assert a.first.wait(30)
    sch.close()
    for s in (a, b):
        assert isinstance(s.end, ErrorEvent) and s.end.code == "UNAVAILABLE"
    # the engine is usable on its own again
    assert engine.generate("Hello", max_tokens=3).completion_tokens == 3


@pytest.mark.parametrize("family,kw", [
    ("deepseek_v3", dict(hidden=48, layers=2, experts=8, top_k=2, ffn=24, heads=4, first_k_dense_replace=1,
                         n_shared_experts=1, kv_lora_rank=12, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                         v_head_dim=12, n_group=2, topk_group=1, seed=31)),
    ("gpt_oss", dict(hidden=48, layers=2, experts=4, top_k=2, ffn=24, heads=4, kv_heads=2, sliding_window=5,
                     swiglu_limit=1.0, seed=32)),
])
def test_batched_rows_match_generate_for_mla_and_sinks(tmp_path, family, kw):
    """Batched KV-cache rows hold DeepSeek's compressed latent + RoPE key (KVCache.dims) and GPT-OSS's
    per-row sliding windows and sinks: each row decodes exactly Engine.generate's tokens."""
    from family_checkpoints import make_family_checkpoint

    ckpt = make_family_checkpoint(tmp_path / "ckpt", family, max_position_embeddings=CTX, **kw)
    pack_checkpoint(ckpt, NvmeTier(tmp_path / "store"), model="fam", precisions=("bf16",), progress=False)
    prompts = [[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 90], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    with Engine.from_store(str(tmp_path / "store"), "fam", decode_step="eager") as eng:
        refs = [eng.generate(p, max_tokens=12).token_ids for p in prompts]
        with BatchScheduler(eng, max_active=3, max_queue=4) as sch:
            sinks = [Collector() for _ in prompts]
            for p, s in zip(prompts, sinks):
                sch.submit(p, SamplingSpec(max_tokens=12), s)
            for s in sinks:
                s.wait()
            assert sch.stats.max_batch >= 2
    assert [s.ids for s in sinks] == refs
