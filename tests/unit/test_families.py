"""The non-Mixtral families in process: config switches, pack layout, the model against
transformers (full forward and token-by-token through the KV cache), refusals.

Checkpoints come from tests/family_checkpoints.py (transformers' own classes, bf16, saved with
save_pretrained); references are the same checkpoints loaded by AutoModelForCausalLM in float32.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import safetensors.torch
import torch

from family_checkpoints import load_reference, make_family_checkpoint

from decoder.model.config import ModelConfig
from decoder.model.transformer import Transformer
from decoder.routing import TopKGating, selected_probs, topk_route
from expert_store import format as fmt
from expert_store.families import SUPPORTED_MODEL_TYPES
from expert_store.pack import NotMixtralCheckpointError, pack_checkpoint, read_checkpoint_layout
from expert_store.quant import blob_to_tensors
from expert_store.tiers import NvmeTier

torch.set_num_threads(1)

# family -> (make_family_checkpoint kwargs, expected ModelConfig switches)
CASES = {
    "qwen3_moe": (dict(layers=3, experts=8, top_k=4, norm_topk_prob=True, mlp_only_layers=[0],
                       intermediate_size=40, seed=11),
                  dict(qk_norm="head", norm_topk_prob=True, dense_layers=(0,), dense_intermediate_size=40,
                       shared_expert_intermediate_size=0)),
    "qwen2_moe": (dict(layers=2, experts=6, top_k=3, shared_expert_intermediate_size=56, seed=12),
                  dict(qk_norm=None, norm_topk_prob=False, qkv_bias=True, o_bias=False, dense_layers=(),
                       shared_expert_intermediate_size=56)),
    "olmoe": (dict(layers=2, experts=8, top_k=4, kv_heads=2, clip_qkv=0.7, seed=13),
              dict(qk_norm="full", norm_topk_prob=False, clip_qkv=0.7, qkv_bias=False, dense_layers=(),
                   shared_expert_intermediate_size=0)),
    # MLA with low-rank q, 2 of 4 groups, a dense first layer, one shared expert, YaRN with mscale
    "deepseek_v3": (dict(layers=3, experts=8, top_k=3, heads=4, ffn=24, intermediate_size=40, first_k_dense_replace=1,
                         n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=12,
                         v_head_dim=10, n_group=4, topk_group=2, routed_scaling_factor=2.5, seed=14,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                          "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1,
                                          "mscale": 1.0, "mscale_all_dim": 1.0}),
                    dict(attention="mla", router_scores="sigmoid", score_correction_bias=True, norm_topk_prob=True,
                         n_group=4, topk_group=2, routed_scaling_factor=2.5, dense_layers=(0,),
                         dense_intermediate_size=40, shared_expert_intermediate_size=24, shared_expert_gated=False,
                         head_dim=8, qk_nope_head_dim=12, v_head_dim=10, kv_lora_rank=16, q_lora_rank=24)),
    # sinks, a window of 4 on layers 0 and 2, clamps that bite (limit 0.6), YaRN without truncation
    "gpt_oss": (dict(layers=3, experts=8, top_k=3, heads=4, kv_heads=2, ffn=20, sliding_window=4, swiglu_limit=0.6,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention"], seed=15,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0,
                                      "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                                      "truncate": False}),
                dict(attention_sinks=True, sliding_window=4, sliding_layers=(0, 2), router_bias=True, qkv_bias=True,
                     o_bias=True, expert_act="swiglu_clamped", expert_bias=True, swiglu_limit=0.6,
                     norm_topk_prob=True, dense_layers=())),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {fam: make_family_checkpoint(root / fam, fam, **kw) for fam, (kw, _) in CASES.items()}


def _load_resident(ckpt) -> Transformer:
    cfg = ModelConfig.from_hf(json.loads((ckpt / "config.json").read_text()))
    net = Transformer(cfg)
    state = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        state.update(safetensors.torch.load_file(str(f)))
    net.load_hf_state_dict({k: v.float() for k, v in state.items()})
    return net.eval()


@pytest.mark.parametrize("family", list(CASES))
def test_config_switches_and_round_trip(checkpoints, family):
    import transformers

    raw = json.loads((checkpoints[family] / "config.json").read_text())
    cfg = ModelConfig.from_hf(raw)
    assert cfg.family == family
    for k, v in CASES[family][1].items():
        assert getattr(cfg, k) == v, k
    assert cfg.moe_layers == tuple(l for l in range(cfg.num_hidden_layers) if l not in cfg.dense_layers)
    hf = cfg.to_hf()
    assert ModelConfig.from_hf(json.loads(json.dumps(hf))) == cfg
    # transformers' own config class reads what to_hf writes to the same model
    cls = transformers.AutoConfig.for_model(hf["model_type"])
    back = type(cls).from_dict({k: v for k, v in hf.items() if k != "model_type"})
    assert ModelConfig.from_hf(back.to_dict()) == cfg


@pytest.mark.parametrize("family", list(CASES))
def test_model_matches_reference_full_and_kv_cache(checkpoints, family):
    net = _load_resident(checkpoints[family])
    ref = load_reference(checkpoints[family])
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, net.config.vocab_size, (2, 13), generator=g)
    with torch.no_grad():
        want = ref(ids).logits
        got = net(ids)
        assert (got - want).abs().max().item() < 1e-4
        # token by token through the static KV cache (batched rows) gives the same logits
        net.setup_caches(2, 32)
        steps = [net(ids[:, i:i + 1], torch.tensor([i]))[:, 0] for i in range(ids.shape[1])]
        assert (torch.stack(steps, dim=1) - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", list(CASES))
def test_hf_state_dict_loads_into_transformers(checkpoints, family, tmp_path):
    """hf_state_dict() writes the family's own names: transformers loads them with the same logits."""
    import transformers

    net = _load_resident(checkpoints[family])
    state = net.hf_state_dict()
    assert not any(".block_sparse_moe." in k or k.endswith(".w1.weight") for k in state)
    hf_cfg = transformers.AutoConfig.from_pretrained(str(checkpoints[family]))
    ref = transformers.AutoModelForCausalLM.from_config(hf_cfg, experts_implementation="eager")
    # every dense name is the module's own (transformers 5 fuses the experts in memory; they
    # load through from_pretrained's conversion of the per-expert names below)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not [k for k in unexpected + missing if ".mlp.experts." not in k]
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(net.config.to_hf()))
    ref = load_reference(tmp_path)
    ids = torch.randint(3, net.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ref(ids).logits - net(ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "olmoe"])
def test_pack_stores_routed_experts_as_blobs_and_the_rest_dense(checkpoints, family, tmp_path):
    ckpt = checkpoints[family]
    layout = read_checkpoint_layout(ckpt)
    cfg = ModelConfig.from_hf(layout.config)
    assert layout.family == family and layout.expert_layers == cfg.moe_layers
    store = NvmeTier(tmp_path / "store")
    res = pack_checkpoint(ckpt, store, model="m", progress=False)
    m = res.manifest
    assert m.architecture == family and m.moe_layers == cfg.moe_layers
    assert {(layer, expert) for layer, expert, _ in m.blobs} == {
        (l, e) for l in cfg.moe_layers for e in range(cfg.num_local_experts)}
    state = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        state.update(safetensors.torch.load_file(str(f)))
    # one blob: w1/w3/w2 are the checkpoint's gate/up/down
    l, e = cfg.moe_layers[-1], cfg.num_local_experts - 1
    t = blob_to_tensors(store.get(fmt.expert_key("m", l, e, "bf16")))
    for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        assert torch.equal(t[w], state[f"model.layers.{l}.mlp.experts.{e}.{proj}.weight"])
    dense = safetensors.torch.load(store.get(fmt.dense_key("m")))
    assert not any(".experts." in k for k in dense)
    for l in cfg.dense_layers:
        assert f"model.layers.{l}.mlp.gate_proj.weight" in dense
    for l in cfg.moe_layers:
        assert f"model.layers.{l}.block_sparse_moe.gate.weight" in dense
    if cfg.shared_expert_intermediate_size:
        assert "model.layers.0.mlp.shared_expert.down_proj.weight" in dense
        assert "model.layers.0.mlp.shared_expert_gate.weight" in dense


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_pack_layout_deepseek_and_gpt_oss(checkpoints, family, tmp_path):
    """Routed experts become w1/w3/w2 blobs (GPT-OSS's fused, transposed, interleaved gate/up
    split per expert); routers, DeepSeek's e_score_correction_bias and shared experts, GPT-OSS's
    router bias, sinks and per-expert biases go to the dense file; dense layers get no blobs."""
    ckpt = checkpoints[family]
    layout = read_checkpoint_layout(ckpt)
    cfg = ModelConfig.from_hf(layout.config)
    assert layout.family == family and layout.expert_layers == cfg.moe_layers
    store = NvmeTier(tmp_path / "store")
    pack_checkpoint(ckpt, store, model="m", progress=False, precisions=("bf16", "int8"))
    for l in range(cfg.num_hidden_layers):
        for e in range(cfg.num_local_experts):
            assert store.contains(fmt.expert_key("m", l, e, "bf16")) == (l in cfg.moe_layers)
    state = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        state.update(safetensors.torch.load_file(str(f)))
    dense = safetensors.torch.load(store.get(fmt.dense_key("m")))
    l, e = cfg.moe_layers[-1], cfg.num_local_experts - 2
    t = blob_to_tensors(store.get(fmt.expert_key("m", l, e, "bf16")))
    p = f"model.layers.{l}.mlp."
    if family == "gpt_oss":
        gate_up, down = state[p + "experts.gate_up_proj"][e], state[p + "experts.down_proj"][e]   # [H, 2F], [F, H]
        assert torch.equal(t["w1"], gate_up[:, 0::2].t()) and torch.equal(t["w3"], gate_up[:, 1::2].t())
        assert torch.equal(t["w2"], down.t())
        for name in ("experts.gate_up_proj_bias", "experts.down_proj_bias", "router.bias"):
            assert torch.equal(dense[p + name], state[p + name])
        assert torch.equal(dense[f"model.layers.{l}.block_sparse_moe.gate.weight"], state[p + "router.weight"])
        assert f"model.layers.{l}.self_attn.sinks" in dense
        assert not any(k.endswith("gate_up_proj") or k.endswith("down_proj") for k in dense)
    else:
        for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            assert torch.equal(t[w], state[f"{p}experts.{e}.{proj}.weight"])
        assert not any(".experts." in k for k in dense)
        assert torch.equal(dense[p + "gate.e_score_correction_bias"], state[p + "gate.e_score_correction_bias"])
        assert p + "shared_experts.down_proj.weight" in dense and p + "gate.weight" not in dense
        assert "model.layers.0.mlp.gate_proj.weight" in dense and "model.layers.0.self_attn.kv_b_proj.weight" in dense
    # int8 blobs: the same matrices, quantized
    q = blob_to_tensors(store.get(fmt.expert_key("m", l, e, "int8")), dtype=torch.float32)
    assert (q["w1"] - t["w1"].float()).abs().max() <= t["w1"].float().abs().max() / 100


def test_gpt_oss_mxfp4_experts_are_dequantized_when_packed(tmp_path):
    """A GPT-OSS checkpoint as released (experts as MXFP4 `*_blocks` + `*_scales`, quantization_config
    mxfp4) packs into the bf16 blobs of its dequantized experts: transformers' own MXFP4 conversion
    (`convert_moe_packed_tensors`) of the same blocks gives the bf16 checkpoint AutoModelForCausalLM
    runs, the blobs hold exactly its experts and the engine over the packed store matches it."""
    import shutil

    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from decoder import Engine

    src = make_family_checkpoint(tmp_path / "src", "gpt_oss", hidden=64, ffn=32, experts=4, top_k=2, layers=2,
                                 heads=4, kv_heads=2, sliding_window=4, swiglu_limit=1.0, seed=16)
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(safetensors.torch.load_file(str(f)))
    cfg = json.loads((src / "config.json").read_text())
    g = torch.Generator().manual_seed(17)
    packed, ref = dict(state), dict(state)
    for l in range(cfg["num_hidden_layers"]):
        for proj, rows, cols in (("gate_up_proj", 64, 64), ("down_proj", 64, 32)):   # [E, rows, cols/32, 16]
            name = f"model.layers.{l}.mlp.experts.{proj}"
            blocks = torch.randint(0, 256, (4, rows, cols // 32, 16), generator=g, dtype=torch.int32).to(torch.uint8)
            scales = torch.randint(118, 123, (4, rows, cols // 32), generator=g, dtype=torch.int32).to(torch.uint8)
            del packed[name]
            packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
            ref[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)   # [E, cols, rows]
            assert ref[name].shape == state[name].shape
    for d, tensors, extra in ((tmp_path / "mxfp4", packed, {"quantization_config": {"quant_method": "mxfp4"}}),
                              (tmp_path / "ref", ref, {})):
        d.mkdir()
        safetensors.torch.save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**cfg, **extra}))
        shutil.copy(src / "tokenizer.json", d / "tokenizer.json")
    store = NvmeTier(tmp_path / "store")
    pack_checkpoint(tmp_path / "mxfp4", store, model="m", progress=False)
    t = blob_to_tensors(store.get(fmt.expert_key("m", 1, 3, "bf16")))
    gate_up, down = ref["model.layers.1.mlp.experts.gate_up_proj"][3], ref["model.layers.1.mlp.experts.down_proj"][3]
    assert torch.equal(t["w1"], gate_up[:, 0::2].t()) and torch.equal(t["w3"], gate_up[:, 1::2].t())
    assert torch.equal(t["w2"], down.t())
    want_model = load_reference(tmp_path / "ref")
    ids = [1] + torch.randint(3, 300, (17,), generator=g).tolist()
    with Engine.from_store(str(tmp_path / "store"), "m", decode_step="eager") as engine, torch.no_grad():
        got = engine.forward_logits(ids)
        want = want_model(torch.tensor([ids])).logits[0]
    assert want.abs().max().item() > 0.5 and (got - want).abs().max().item() < 1e-4


def test_deepseek_fp8_weights_are_dequantized_when_packed(tmp_path):
    """A DeepSeek-V3 checkpoint as released (every projection fp8 e4m3 with a float32
    weight_scale_inv per block, quantization_config fp8) packs into bf16: experts and dense part
    are transformers' own block dequantization of the same bytes (`_dequantize_fp8_weight`), and
    the engine over the packed store matches AutoModelForCausalLM on that dequantized checkpoint."""
    import shutil

    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    from decoder import Engine

    kw, _ = CASES["deepseek_v3"]
    src = make_family_checkpoint(tmp_path / "src", "deepseek_v3", **{**kw, "seed": 18})
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(safetensors.torch.load_file(str(f)))
    cfg = json.loads((src / "config.json").read_text())
    block = [16, 8]
    fp8, ref = dict(state), dict(state)
    for name, w in state.items():
        if "_proj" not in name or not name.endswith(".weight"):
            continue   # norms, embeddings, lm_head and routers ship unquantized
        rows, cols = w.shape
        grid = torch.nn.functional.pad(w.float(), (0, -cols % block[1], 0, -rows % block[0])).abs()
        grid = grid.unflatten(1, (-1, block[1])).unflatten(0, (-1, block[0])).amax(dim=(1, 3))   # [R, C]
        scale = (grid / 448.0).clamp(min=1e-12)
        full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
        fp8[name] = (w.float() / full).to(torch.float8_e4m3fn)
        fp8[name + "_scale_inv"] = scale
        ref[name] = _dequantize_fp8_weight(fp8[name], scale, block, torch.float32).to(torch.bfloat16)
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": block}
    for d, tensors, extra in ((tmp_path / "fp8", fp8, {"quantization_config": quant}), (tmp_path / "ref", ref, {})):
        d.mkdir()
        safetensors.torch.save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**cfg, **extra}))
        shutil.copy(src / "tokenizer.json", d / "tokenizer.json")
    store = NvmeTier(tmp_path / "store")
    pack_checkpoint(tmp_path / "fp8", store, model="m", progress=False)
    t = blob_to_tensors(store.get(fmt.expert_key("m", 2, 5, "bf16")))
    for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        assert torch.equal(t[w], ref[f"model.layers.2.mlp.experts.5.{proj}.weight"])
    dense = safetensors.torch.load(store.get(fmt.dense_key("m")))
    assert not any(k.endswith("_scale_inv") for k in dense)
    for name in ("model.layers.0.self_attn.kv_b_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight"):
        assert dense[name].dtype == torch.bfloat16 and torch.equal(dense[name], ref[name])
    want_model = load_reference(tmp_path / "ref")
    ids = [1] + torch.randint(3, 300, (17,), generator=torch.Generator().manual_seed(19)).tolist()
    with Engine.from_store(str(tmp_path / "store"), "m", decode_step="eager") as engine, torch.no_grad():
        got = engine.forward_logits(ids)
        want = want_model(torch.tensor([ids])).logits[0]
    assert want.abs().max().item() > 0.5 and (got - want).abs().max().item() < 1e-4


def test_refusals_name_the_supported_model_types(tmp_path):
    for bad in ({"model_type": "llama", "vocab_size": 10}, {"architectures": ["DbrxForCausalLM"]}):
        with pytest.raises(ValueError) as ei:
            ModelConfig.from_hf(bad)
        msg = str(ei.value)
        assert "\n" not in msg and all(t in msg for t in SUPPORTED_MODEL_TYPES), msg
    ckpt = make_family_checkpoint(tmp_path / "q3", "qwen3_moe", layers=1, experts=4, top_k=2)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "dbrx", ["DbrxForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    store = NvmeTier(tmp_path / "store")
    with pytest.raises(NotMixtralCheckpointError) as ei:
        pack_checkpoint(ckpt, store, progress=False)
    assert "dbrx" in str(ei.value) and all(t in str(ei.value) for t in SUPPORTED_MODEL_TYPES)
    assert list(store.keys()) == []
    # a quantized release in another format than the family's own is refused in one line
    for family, method in (("gpt_oss", "fp8"), ("deepseek_v3", "mxfp4")):
        cfg.update(model_type=family, quantization_config={"quant_method": method})
        (ckpt / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(NotMixtralCheckpointError, match=f"{method}-quantized") as ei:
            pack_checkpoint(ckpt, store, progress=False)
        assert "\n" not in str(ei.value)
        with pytest.raises(ValueError, match=f"{method}-quantized"):
            ModelConfig.from_hf(cfg)
    assert list(store.keys()) == []
    cfg.pop("quantization_config")
    # a variant the decoder does not implement is refused in one line
    cfg.update(model_type="qwen3_moe", use_sliding_window=True, sliding_window=8)
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelConfig.from_hf(cfg)


@pytest.mark.parametrize("family,minimal", [
    ("deepseek_v3", dict(vocab_size=100, hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
                         n_routed_experts=16, moe_intermediate_size=32, intermediate_size=96, kv_lora_rank=16,
                         q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)),
    ("gpt_oss", dict(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=16,
                     num_key_value_heads=2, num_local_experts=8, intermediate_size=32)),
])
def test_absent_keys_read_as_transformers_defaults(family, minimal):
    """A config.json without the family's optional keys reads as transformers' config class fills them."""
    import transformers

    cls = type(transformers.AutoConfig.for_model(family))
    full = ModelConfig.from_hf(cls(**minimal).to_dict())
    mine = ModelConfig.from_hf({"model_type": family, **minimal})
    skip = {"extra", "bos_token_id", "eos_token_ids", "rope_scaling", "rope_theta", "max_position_embeddings",
            "tie_word_embeddings", "router_aux_loss_coef", "rms_norm_eps"}   # shared keys, not the family's
    for f in dataclasses.fields(ModelConfig):
        if f.name not in skip:
            assert getattr(mine, f.name) == getattr(full, f.name), f.name


def test_kimi_k2_reads_as_deepseek_v3(checkpoints, tmp_path):
    """Kimi-K2 ships DeepSeek-V3's architecture under model_type kimi_k2: it packs and runs as deepseek_v3."""
    import shutil

    ckpt = tmp_path / "kimi"
    shutil.copytree(checkpoints["deepseek_v3"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "kimi_k2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert ModelConfig.from_hf(cfg) == ModelConfig.from_hf({**cfg, "model_type": "deepseek_v3"})
    assert read_checkpoint_layout(ckpt).family == "deepseek_v3"
    with pytest.raises(ValueError, match="supported model_type"):   # the alias needs the architecture too
        ModelConfig.from_hf({**cfg, "architectures": ["Qwen3MoeForCausalLM"]})


def test_sigmoid_router_stays_float32_in_a_bf16_model(checkpoints):
    """DeepSeek's router (weight and e_score_correction_bias) is float32 after .to(bfloat16) and
    computes float32 logits; the rest of the model is bf16."""
    net = _load_resident(checkpoints["deepseek_v3"]).to(torch.bfloat16)
    gate = net.layers[1].block_sparse_moe.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert net.layers[1].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    x = torch.randn(5, net.config.hidden_size, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    assert gate(x).dtype == torch.float32
    ids = torch.randint(3, net.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.isfinite(net(ids).float()).all()


def test_router_variants_top_k_above_two():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 16, generator=g)
    w, idx = topk_route(logits, 8)
    assert torch.allclose(w.sum(-1), torch.ones(7))
    raw, idx2 = topk_route(logits, 8, renormalize=False)
    assert torch.equal(idx, idx2) and (raw.sum(-1) < 1).all()
    assert torch.equal(selected_probs(logits, idx), raw)
    assert torch.equal(TopKGating(8, renormalize=False).route(0, logits)[0], raw)
    # a slot without an expert (-1) weighs 0
    idx3 = idx.clone()
    idx3[:, -1] = -1
    p = selected_probs(logits, idx3)
    assert (p[:, -1] == 0).all() and torch.equal(p[:, :-1], raw[:, :-1])
