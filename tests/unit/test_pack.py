"""pack_checkpoint: HF Mixtral checkpoints (as transformers writes them) into a real NvmeTier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from expert_store import format as fmt
from expert_store.manifest import Manifest
from expert_store.pack import (
    CheckpointError,
    NotMixtralCheckpointError,
    default_model_name,
    pack_checkpoint,
    read_checkpoint_layout,
)
from expert_store.quant import blob_to_tensors, error_bound
from expert_store.tiers import MemoryTier, NvmeTier, TieredStore
from tests.checkpoints import load_reference_model, make_mixtral_checkpoint, reference_expert

REPO = Path(__file__).resolve().parents[2]


def _expert_forward(x, w):
    return (torch.nn.functional.silu(x @ w["w1"].T) * (x @ w["w3"].T)) @ w["w2"].T


def _check_store_against_reference(store: NvmeTier, model: str, ckpt: Path, precisions, group_size):
    ref = load_reference_model(ckpt)
    manifest = json.loads(store.get(fmt.file_key(model, "manifest.json")))
    cfg = ref.config
    assert manifest["model"] == model
    assert manifest["num_layers"] == cfg.num_hidden_layers and manifest["num_experts"] == cfg.num_local_experts
    assert manifest["hidden_size"] == cfg.hidden_size and manifest["intermediate_size"] == cfg.intermediate_size
    assert manifest["precisions"] == [p for p in fmt.PRECISIONS if p in precisions]
    assert len(manifest["blobs"]) == cfg.num_hidden_layers * cfg.num_local_experts * len(precisions)
    for entry in manifest["blobs"]:
        l, e, p = entry["layer"], entry["expert"], entry["precision"]
        blob = store.get(fmt.expert_key(model, l, e, p))
        assert len(blob) == entry["size"] and fmt.blob_checksum(blob) == entry["xxh3"]
        src = reference_expert(ref, l, e)
        if p == "bf16":
            got = blob_to_tensors(blob)
            for name in ("w1", "w3", "w2"):
                want = src[name].to(torch.bfloat16)
                assert torch.equal(got[name].view(torch.int16), want.view(torch.int16)), (l, e, name)
            if src["w1"].dtype == torch.bfloat16:  # bit-exact against the source itself
                assert all(torch.equal(got[n], src[n]) for n in src)
            # the packed weights are the bf16 rounding of the source, and the source, read as
            # w1 = gate, w3 = up, w2 = down, computes what transformers' expert computes
            x = torch.randn(3, cfg.hidden_size).to(ref.dtype)
            moe = ref.model.layers[l].mlp
            idx = torch.full((3, 1), e)
            hf = moe.experts(x, idx, torch.ones(3, 1, dtype=ref.dtype)).float()
            ours = _expert_forward(x.float(), {n: t.float() for n, t in src.items()})
            tol = 1e-5 if ref.dtype == torch.float32 else 2e-2
            torch.testing.assert_close(ours, hf, atol=tol * max(1.0, hf.abs().max().item()), rtol=tol)
        else:
            header, _ = fmt.read_header(blob)
            views = blob_to_tensors(blob, dequant=False)
            got = blob_to_tensors(blob, dtype=torch.float32)
            for name in ("w1", "w3", "w2"):
                w = src[name].float()
                assert header.tensor(name).quant.group_size == group_size
                bound = error_bound(views[name].scales, group_size, w.shape[1])
                assert ((w - got[name]).abs() <= bound).all(), (l, e, p, name)
    # dense part: every non-expert tensor, router renamed, values and dtypes as in the checkpoint
    raw_dense = store.get(fmt.dense_key(model))
    dense = load_safetensors(raw_dense)
    assert len(raw_dense) == manifest["dense_size"] and fmt.blob_checksum(raw_dense) == manifest["dense_xxh3"]
    ref_sd = ref.state_dict()
    expected = {k for k in ref_sd if ".experts." not in k}
    expected = {k.replace(".mlp.gate.", ".block_sparse_moe.gate.") for k in expected}
    assert set(dense) == expected
    for k, v in dense.items():
        src_name = k.replace(".block_sparse_moe.gate.", ".mlp.gate.")
        assert v.dtype == ref_sd[src_name].dtype and torch.equal(v, ref_sd[src_name]), k
    assert store.get(fmt.file_key(model, "config.json")) == (ckpt / "config.json").read_bytes()
    assert store.get(fmt.file_key(model, "tokenizer.json")) == (ckpt / "tokenizer.json").read_bytes()
    return manifest


def test_pack_all_precisions_into_nvme(tmp_path):
    ckpt, cfg = make_mixtral_checkpoint(tmp_path / "tiny-mixtral", dtype=torch.bfloat16, seed=1)
    store = NvmeTier(tmp_path / "store")
    result = pack_checkpoint(ckpt, store, precisions=("bf16", "int8", "int4"), group_size=32, progress=False)
    assert result.model == "tiny-mixtral"
    assert result.blobs_written == 2 * 4 * 3 and result.blobs_skipped == 0
    manifest = _check_store_against_reference(store, "tiny-mixtral", ckpt, ("bf16", "int8", "int4"), 32)
    assert store.get(fmt.file_key("tiny-mixtral", "manifest.json")) == result.manifest.to_json()
    assert Manifest.from_json("tiny-mixtral", manifest) == result.manifest  # the file reads back whole
    assert manifest["rope_theta"] == 1_000_000.0 and manifest["top_k"] == 2 and manifest["group_size"] == 32
    # files sit where the store layout says: <root>/models/<key>
    assert (tmp_path / "store" / "models" / "tiny-mixtral" / "experts" / "L001" / "E003.int4.blob").is_file()
    # int blobs are smaller than bf16 ones
    sizes = {p: sum(b["size"] for b in manifest["blobs"] if b["precision"] == p) for p in ("bf16", "int8", "int4")}
    assert sizes["int4"] < sizes["int8"] < sizes["bf16"]


@pytest.mark.parametrize(
    "layout,shards,rope_style,dtype",
    [
        ("per_expert", 3, "rope_theta", torch.float32),
        ("fused", 2, "rope_parameters", torch.bfloat16),
        ("fused", 1, "rope_theta", torch.float32),
    ],
)
def test_pack_layouts_shards_and_rope_styles(tmp_path, layout, shards, rope_style, dtype):
    ckpt, cfg = make_mixtral_checkpoint(
        tmp_path / "ck", expert_layout=layout, shards=shards, rope_style=rope_style, rope_theta=12345.0,
        dtype=dtype, layers=2, experts=3, seed=2,
    )
    assert ("rope_theta" in cfg) == (rope_style == "rope_theta")
    layout_info = read_checkpoint_layout(ckpt)
    assert layout_info.fused == (layout == "fused") and layout_info.rope_theta == 12345.0
    store = NvmeTier(tmp_path / "store")
    pack_checkpoint(ckpt, store, model="m1", precisions=("bf16", "int8"), progress=False)
    manifest = _check_store_against_reference(store, "m1", ckpt, ("bf16", "int8"), 128)
    assert manifest["rope_theta"] == 12345.0
    assert manifest["expert_layout"] == layout


def test_pack_is_resumable(tmp_path):
    ckpt, _ = make_mixtral_checkpoint(tmp_path / "ck", layers=2, experts=3)
    root = tmp_path / "store"
    store = NvmeTier(root)
    first = pack_checkpoint(ckpt, store, model="m", precisions=("bf16", "int4"), progress=False)
    assert first.blobs_written == 12
    files = {p: (p.stat().st_ino, p.read_bytes()) for p in root.rglob("*") if p.is_file()}

    # damage one blob, delete another: only those two are written again
    damaged = store.path(fmt.expert_key("m", 1, 2, "int4"))
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    store.delete(fmt.expert_key("m", 0, 1, "bf16"))
    second = pack_checkpoint(ckpt, store, model="m", precisions=("bf16", "int4"), progress=False)
    assert (second.blobs_written, second.blobs_skipped) == (2, 10)
    assert second.manifest == first.manifest
    deleted = store.path(fmt.expert_key("m", 0, 1, "bf16"))
    for p, (ino, content) in files.items():
        assert p.read_bytes() == content, p  # everything back as it was (blobs are deterministic)
        if p not in (damaged, deleted):
            assert p.stat().st_ino == ino, f"{p} was rewritten"
    assert second.files_written == []  # config, tokenizer, dense, manifest unchanged

    # a third run writes nothing
    third = pack_checkpoint(ckpt, store, model="m", precisions=("bf16", "int4"), progress=False)
    assert (third.blobs_written, third.blobs_skipped) == (0, 12)

    # a different group size is a different blob: rewritten, not skipped
    fourth = pack_checkpoint(ckpt, store, model="m", precisions=("int4",), group_size=32, progress=False)
    assert fourth.blobs_written == 6
    assert fmt.read_header(store.get(fmt.expert_key("m", 0, 0, "int4")))[0].tensors[0].quant.group_size == 32
    # adding a precision later keeps the earlier ones in the manifest
    fifth = pack_checkpoint(ckpt, store, model="m", precisions=("int8",), progress=False)
    assert fifth.blobs_written == 6
    manifest = json.loads(store.get(fmt.file_key("m", "manifest.json")))
    assert manifest["precisions"] == ["bf16", "int8", "int4"]
    assert len(manifest["blobs"]) == 18
    for b in manifest["blobs"]:
        blob = store.get(fmt.expert_key("m", b["layer"], b["expert"], b["precision"]))
        assert fmt.blob_checksum(blob) == b["xxh3"] and len(blob) == b["size"]


def test_pack_through_tiered_store_does_not_fill_the_cache(tmp_path):
    ckpt, _ = make_mixtral_checkpoint(tmp_path / "ck", layers=1, experts=2)
    memory = MemoryTier(1 << 24)
    tiered = TieredStore(NvmeTier(tmp_path / "store"), memory=memory)
    result = pack_checkpoint(ckpt, tiered, model="m", progress=False)
    assert result.blobs_written == 2
    assert memory.stats()["bytes_written"] == 0
    assert tiered.get(fmt.expert_key("m", 0, 1, "bf16")) is not None


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_non_mixtral_checkpoint_rejected(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    store = NvmeTier(tmp_path / "store")
    with pytest.raises(NotMixtralCheckpointError) as ei:
        pack_checkpoint(tmp_path / "llama", store, progress=False)
    assert isinstance(ei.value, ValueError)
    assert "not a Mixtral" in _one_line_error(ei) and "llama" in str(ei.value)
    # nothing was written for it
    assert list(store.keys()) == []

    # a config that says mixtral over weights without experts is rejected too
    cfg_path = tmp_path / "llama" / "config.json"
    c = json.loads(cfg_path.read_text())
    c.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=4, num_experts_per_tok=2)
    cfg_path.write_text(json.dumps(c))
    with pytest.raises(NotMixtralCheckpointError) as ei:
        pack_checkpoint(tmp_path / "llama", store, progress=False)
    _one_line_error(ei)


def test_broken_checkpoints_rejected(tmp_path):
    store = NvmeTier(tmp_path / "store")
    with pytest.raises(CheckpointError) as ei:
        pack_checkpoint(tmp_path / "nope", store, progress=False)
    _one_line_error(ei)
    ckpt, _ = make_mixtral_checkpoint(tmp_path / "ck", layers=2, experts=2, shards=2)
    # the config says more experts than the weights hold
    c = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**c, "num_local_experts": 3}))
    with pytest.raises(CheckpointError) as ei:
        pack_checkpoint(ckpt, store, progress=False)
    assert "missing tensor" in _one_line_error(ei) or "shape" in str(ei.value)
    (ckpt / "config.json").write_text(json.dumps(c))
    # a shard listed in the index is gone
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    (ckpt / sorted(set(index["weight_map"].values()))[0]).unlink()
    with pytest.raises(CheckpointError) as ei:
        pack_checkpoint(ckpt, store, progress=False)
    _one_line_error(ei)
    # a shard that is not safetensors at all
    shard = sorted(ckpt.glob("*.safetensors"))[-1]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}     ")
    (ckpt / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError) as ei:
        pack_checkpoint(ckpt, store, progress=False)
    assert "safetensors" in _one_line_error(ei)
    with pytest.raises(ValueError):
        pack_checkpoint(ckpt, store, precisions=("fp8",), progress=False)
    with pytest.raises(ValueError):
        pack_checkpoint(ckpt, store, model="../evil", progress=False)


def test_default_model_name():
    assert default_model_name("/x/Mixtral-8x7B-v0.1") == "Mixtral-8x7B-v0.1"
    assert default_model_name("/x/my model (copy)") == "my-model-copy-"
    assert default_model_name("/x/..hidden") == "hidden"
    fmt.validate_model_name(default_model_name("/x/" + "a" * 300))


def test_pack_stores_tokenizer_config_with_its_chat_template(tmp_path):
    """tokenizer_config.json goes into the store verbatim, its xxh3 into the manifest, and the
    store's manifest (what GetManifest sends) carries it; a malformed one is left out."""
    from expert_store.client import StoreClient
    from expert_store.store import ModelStore

    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    ckpt, _ = make_mixtral_checkpoint(tmp_path / "chat", seed=2, chat_template=template)
    store = NvmeTier(tmp_path / "store")
    result = pack_checkpoint(ckpt, store, model="chat", progress=False)
    raw = (ckpt / "tokenizer_config.json").read_bytes()
    assert store.get(fmt.file_key("chat", "tokenizer_config.json")) == raw
    assert result.manifest.tokenizer_config_xxh3 == fmt.blob_checksum(raw)
    with StoreClient.open(tmp_path / "store") as client:
        assert client.manifest("chat").tokenizer_config["chat_template"] == template
    assert ModelStore.open(tmp_path / "store").verify_details("chat") == []

    plain, _ = make_mixtral_checkpoint(tmp_path / "plain", seed=2)
    (plain / "tokenizer_config.json").write_text("[not an object]")
    result = pack_checkpoint(plain, store, model="plain", progress=False)
    assert result.manifest.tokenizer_config_xxh3 is None
    assert not store.contains(fmt.file_key("plain", "tokenizer_config.json"))
    with StoreClient.open(tmp_path / "store") as client:
        assert client.manifest("plain").tokenizer_config is None


def test_pack_codec_none_stores_raw_payloads_a_reader_uses_as_they_lie(tmp_path):
    """`expert-store pack --codec none`: every bf16 blob stored with codec none (no lz4 to undo
    when a co-located store publishes it), the same payload as the default coded pack."""
    from expert_store.cli import main as store_cli

    ckpt, _ = make_mixtral_checkpoint(tmp_path / "tiny-mixtral", dtype=torch.bfloat16, seed=3)
    coded, plain = NvmeTier(tmp_path / "coded"), tmp_path / "plain"
    pack_checkpoint(ckpt, coded, precisions=("bf16",), progress=False)
    assert store_cli(["pack", str(ckpt), "--store", str(plain), "--codec", "none", "--no-progress"]) == 0
    plain_tier = NvmeTier(plain)
    keys = [fmt.expert_key("tiny-mixtral", l, e, "bf16") for l in range(2) for e in range(4)]
    codecs = {fmt.read_header(coded.get(k))[0].codec for k in keys}
    assert codecs == {"bf16-planes+lz4"}, codecs   # the default codes these bf16 experts
    for k in keys:
        a, b = coded.get(k), plain_tier.get(k)
        assert fmt.read_header(b)[0].codec == "none"
        assert bytes(fmt.decode_raw(a)[1]) == bytes(fmt.decode_raw(b)[1])
        assert len(b) > len(a)
    with pytest.raises(SystemExit):
        store_cli(["pack", str(ckpt), "--store", str(tmp_path / "x"), "--codec", "zstd"])
