"""Engine generation logic (sampling, EOS, stop strings, streaming, stats) on an in-memory model,
and the StoreExperts provider over a real in-process store (accounting, LRU bound, decoding)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from checkpoints import make_mixtral_checkpoint, make_tokenizer_json, reference_expert

from decoder.engine import Engine, _find_stop, _safe_len
from decoder.experts.provider import ExpertSource, ExpertWeights, QuantizedMatrix, StoreExperts, decode_expert_blob
from decoder.model.config import ModelConfig
from decoder.model.transformer import Transformer
from decoder.tokenizer import StreamDecoder, Tokenizer

torch.set_num_threads(1)
VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_bytes(make_tokenizer_json(VOCAB).encode(), bos_id=1, eos_ids=(2,))


def tiny_engine(tokenizer, seed: int = 0, **cfg_kw) -> Engine:
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                      num_experts_per_tok=2, max_position_embeddings=64, **cfg_kw)
    model = Transformer(cfg)
    model.init_weights(std=0.3, seed=seed)
    return Engine.from_model(model.eval(), tokenizer, model_name="tiny")


def test_greedy_is_argmax_of_forward_logits(tokenizer):
    e = tiny_engine(tokenizer)
    ids = tokenizer.encode("Hello world")
    res = e.generate(ids, max_tokens=6, stop_at_eos=False)
    seq = list(ids)
    for tok in res.token_ids:
        assert tok == int(e.forward_logits(seq)[-1].argmax())
        seq.append(tok)
    assert res.finish_reason == "length" and res.prompt_tokens == len(ids)
    assert e.generate(ids, max_tokens=0).token_ids == []


def test_eos_stops_generation(tokenizer):
    e = tiny_engine(tokenizer)
    ids = tokenizer.encode("Once upon a time")
    first = e.generate(ids, max_tokens=1, stop_at_eos=False).token_ids[0]
    e.model.config = dataclasses.replace(e.config, eos_token_ids=(first,))
    e.config = e.model.config
    res = e.generate(ids, max_tokens=10)
    assert res.token_ids == [first] and res.finish_reason == "eos"
    assert len(e.generate(ids, max_tokens=5, stop_at_eos=False).token_ids) == 5


def test_sampling_top_p_and_seed(tokenizer):
    e = tiny_engine(tokenizer)
    a = e.generate("abc", max_tokens=12, temperature=1.5, top_p=0.9, seed=3, stop_at_eos=False)
    b = e.generate("abc", max_tokens=12, temperature=1.5, top_p=0.9, seed=3, stop_at_eos=False)
    assert a.token_ids == b.token_ids
    # top_p -> 0+ keeps only the most likely token: same as greedy
    g = e.generate("abc", max_tokens=8, stop_at_eos=False)
    t = e.generate("abc", max_tokens=8, temperature=1.0, top_p=1e-6, seed=1, stop_at_eos=False)
    assert g.token_ids == t.token_ids
    for bad in (dict(temperature=-1), dict(top_p=1.5), dict(max_tokens=-1)):
        with pytest.raises(ValueError):
            e.generate("abc", **{"max_tokens": 1, **bad})


def test_stop_strings_and_stream_holdback():
    assert _find_stop("abcXYdef", ["XY", "de"], 0) == 3
    assert _find_stop("abc", ["zz"], 0) is None
    assert _safe_len("hello wor", ["world"]) == len("hello ")   # "wor" may start the stop string
    assert _safe_len("hello", ["xyz"]) == 5
    assert _safe_len("ab\ufffd", []) == 2                          # unfinished UTF-8 held back


def test_stream_decoder_never_emits_partial_characters(tokenizer):
    ids = tokenizer.encode("héllo wörld ✓", add_special_tokens=False)
    sd = StreamDecoder(tokenizer)
    text = "".join(sd.push(i) for i in ids)
    assert text == "héllo wörld ✓" and "\ufffd" not in text


def test_stop_string_cuts_text_and_stream(tokenizer):
    e = tiny_engine(tokenizer, seed=1)
    full = e.generate("The quick", max_tokens=16, stop_at_eos=False)
    assert len(full.text) > 3
    stop = full.text[1:3]
    streamed: list[str] = []
    cut = e.generate("The quick", max_tokens=16, stop=[stop], stop_at_eos=False,
                     on_token=lambda d, t: streamed.append(d))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)] == "".join(streamed)


def test_stats_counts_and_reset(tokenizer):
    e = tiny_engine(tokenizer)
    e.generate([1, 5, 6, 7], max_tokens=5, stop_at_eos=False)
    s = e.stats()
    assert s["prompt_tokens"] == 4 and s["generated_tokens"] == 5
    assert s["routing"]["prefill"]["decisions"] == 4 * 2 and s["routing"]["decode"]["decisions"] == 4 * 2
    assert s["experts_per_token"] == 2.0 and s["single_expert_ratio"] == 0.0
    assert sum(map(sum, s["expert_loads"])) == (4 + 4) * 2 * 2
    assert s["tiers"]["gpu"]["misses"] == 0 and s["provider"]["provider"] == "resident"
    e.reset_stats()
    s = e.stats()
    assert s["generated_tokens"] == 0 and sum(map(sum, s["expert_loads"])) == 0


def test_context_limit(tokenizer):
    e = tiny_engine(tokenizer)
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        e.generate([1] * 65, max_tokens=1)
    res = e.generate([1] * 60, max_tokens=50, stop_at_eos=False)
    assert len(res.token_ids) == 5 and res.finish_reason == "length"  # positions 60..63 + the last token


# --- StoreExperts over a real in-process store ------------------------------------------------
@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from expert_store.client import StoreClient
    from expert_store.pack import pack_checkpoint
    from expert_store.store import ModelStore
    from checkpoints import load_reference_model

    root = tmp_path_factory.mktemp("provider")
    ckpt, cfg = make_mixtral_checkpoint(root / "ckpt", hidden=32, ffn=48, layers=2, experts=4, vocab=280,
                                        dtype=torch.bfloat16)
    with ModelStore.open(str(root / "store"), ram_bytes=0) as ms:
        pack_checkpoint(ckpt, ms.tiered, model="p", precisions=("bf16", "int8", "int4"), group_size=16,
                        progress=False)
    client = StoreClient.open(str(root / "store"))
    ref = load_reference_model(ckpt, dtype=torch.float32)
    yield client, ModelConfig.from_hf(cfg), ref
    client.close()


def source(packed, precision="bf16") -> ExpertSource:
    client, cfg, _ = packed
    return ExpertSource(client=client, model="p", config=cfg, manifest=client.manifest("p"), precision=precision)


def test_store_experts_accounting_and_exact_bf16(packed):
    _, cfg, ref = packed
    p = StoreExperts(source(packed))
    p.prepare(0, [1, 3])          # one streaming call for both
    assert p.ready(0, 1) and p.ready(0, 3) and not p.ready(0, 0)
    w = p.get(0, 3)
    p.release(0, [1, 3])
    want = reference_expert(ref, 0, 3)
    x = torch.randn(5, cfg.hidden_size)
    assert torch.equal(w.w1, want["w1"]) and torch.equal(w.w2, want["w2"])
    y = w(x)
    assert y.shape == (5, cfg.hidden_size)
    p.get(0, 1)                   # accounted by prepare already
    p.get(1, 2)                   # not prepared: a miss
    p.get(1, 2)                   # now a hit
    st = p.stats()
    assert st["tiers"]["gpu"] == {"hits": 1, "misses": 3} and st["fetches"] == 3 and st["bytes_fetched"] > 0
    assert p.location(1, 2) == "gpu" and p.location(1, 0) == "store"


def test_store_experts_lru_bound_keeps_pinned(packed):
    p = StoreExperts(source(packed), cache_bytes=1)  # smaller than one expert
    p.prepare(0, [0, 1])
    assert p.ready(0, 0) and p.ready(0, 1)       # pinned while the layer computes
    p.release(0, [0, 1])
    assert not p.ready(0, 0) and not p.ready(0, 1)
    assert p.stats()["evictions"] == 2


@pytest.mark.parametrize("precision,bits", [("int8", 8), ("int4", 4)])
def test_quantized_experts_dequantize_within_bound(packed, precision, bits):
    from expert_store.quant import error_bound

    client, cfg, ref = packed
    blob = client.fetch_expert("p", 1, 2, precision)
    packed_w = decode_expert_blob(blob)                      # keeps q + scales
    dense_w = decode_expert_blob(blob, dtype=torch.float32)  # dequantized once
    assert isinstance(packed_w.w1, QuantizedMatrix) and packed_w.w1.bits == bits
    assert packed_w.nbytes < dense_w.nbytes
    want = reference_expert(ref, 1, 2)
    for name in ("w1", "w3", "w2"):
        m = getattr(packed_w, name)
        err = (m.dequantize(torch.float32) - want[name]).abs()
        assert (err <= error_bound(m.scales, m.group_size, m.shape[1])).all()
    x = torch.randn(3, cfg.hidden_size)
    assert torch.allclose(packed_w(x), dense_w(x), atol=1e-6)
    exact = ExpertWeights(want["w1"], want["w3"], want["w2"])
    rel = (packed_w(x) - exact(x)).abs().max() / exact(x).abs().max()
    assert rel < (0.02 if bits == 8 else 0.3)


def test_missing_precision_is_a_clear_error(packed):
    client, cfg, _ = packed
    with pytest.raises(ValueError, match="no int2 experts"):
        ExpertSource(client=client, model="p", config=cfg, manifest=client.manifest("p"), precision="int2")


def test_a_failed_build_closes_the_expert_cache_it_made(tmp_path):
    """Engine.from_store that fails after building its ExpertCache (here: the dense weights are
    gone from the store) stops the cache's loader threads instead of leaking them (the decoder's
    --wait-for-model retries a failed load)."""
    import os
    import threading

    from expert_store import format as blob_format
    from expert_store.errors import StoreError
    from expert_store.pack import pack_checkpoint
    from expert_store.tiers import NvmeTier

    ckpt, _ = make_mixtral_checkpoint(tmp_path / "ckpt", hidden=32, ffn=48, layers=2, experts=4, vocab=280)
    pack_checkpoint(ckpt, NvmeTier(tmp_path / "store"), model="m", precisions=("bf16",), progress=False)
    dense = [p for p in (tmp_path / "store").rglob("*") if p.name == blob_format.dense_key("m").split("/")[-1]]
    assert len(dense) == 1
    os.remove(dense[0])
    before = set(threading.enumerate())
    for _ in range(3):
        with pytest.raises(StoreError):
            Engine.from_store(str(tmp_path / "store"), "m", gpu_cache_bytes=1 << 20, host_cache_bytes=1 << 20,
                              cache_options={"workers": 2})
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, leaked
