"""Tiny random Mixtral checkpoints for tests, written the way Hugging Face writes them.

    from tests.checkpoints import make_mixtral_checkpoint
    ckpt_dir, config = make_mixtral_checkpoint(tmp_path / "ckpt", hidden=64, ffn=96, layers=2)

builds a random ``transformers.MixtralForCausalLM`` (seeded), saves it with
``save_pretrained`` (safetensors; sharded with an index json when ``shards > 1``) and writes a
byte-level BPE ``tokenizer.json`` trained on fixed text.  ``config`` is the dict written to
``config.json``.

transformers 5 keeps the experts of a layer fused in memory (``mlp.experts.gate_up_proj``
``[E, 2*ffn, hidden]`` with the gate half first, ``mlp.experts.down_proj`` ``[E, hidden, ffn]``,
router ``mlp.gate``) but ``save_pretrained`` converts them back to the original Mixtral names
(``block_sparse_moe.experts.{e}.w1/w2/w3.weight``, ``block_sparse_moe.gate.weight``).
``expert_layout="fused"`` writes the in-memory (fused) names instead, the other layout a
Mixtral-family checkpoint can come in.

``load_reference_model(dir)`` loads the checkpoint back with transformers (the independent
reference tests compare against) and ``reference_expert(model, layer, expert)`` returns one
expert's ``{"w1", "w3", "w2"}`` tensors from it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to two of
eight feed-forward experts, so most of the weights are idle at any moment. Streaming experts
from a store into a small GPU cache hides the loading cost when the prefetcher guesses well.
Once upon a time, in a land far away, there lived a model that was too large for its machine.
It kept its experts on a fast disk and asked for them only when the router said so.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14159 2.71828; punctuation: , . ; : ! ? ( ) [ ] { }.
def forward(x): return silu(x @ w1.T) * (x @ w3.T) @ w2.T  # the expert
Hello, world! Bonjour le monde. Hallo Welt. Hola mundo. Ciao mondo. Olá mundo.
"""
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, like Mixtral's tokenizer


def make_tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE tokenizer with exactly ``vocab_size`` tokens (BOS ``<s>`` prepended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"a byte-level tokenizer needs vocab >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:  # the text ran out of merges: fill with reserved special tokens
        tok.add_special_tokens([f"<extra_{i}>" for i in range(missing)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok.to_str()


def make_mixtral_checkpoint(
    out_dir: str | os.PathLike,
    *,
    hidden: int = 64,
    ffn: int = 96,
    layers: int = 2,
    experts: int = 4,
    top_k: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 320,
    rope_style: str = "rope_parameters",
    rope_theta: float = 1_000_000.0,
    shards: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    expert_layout: str = "per_expert",
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    chat_template: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write a random Mixtral checkpoint to ``out_dir``; return ``(out_dir, config_dict)``.

    rope_style: ``"rope_parameters"`` (transformers 5: ``{"rope_parameters": {"rope_theta":
    ..., "rope_type": "default"}}``) or ``"rope_theta"`` (older: top-level ``rope_theta``).
    shards > 1 splits the weights into several ``model-0000i-of-0000n.safetensors`` files with
    a ``model.safetensors.index.json`` (at least two files; the exact count depends on tensor
    sizes).  expert_layout: ``"per_expert"`` (what ``save_pretrained`` writes) or ``"fused"``.
    chat_template: also write a ``tokenizer_config.json`` with it (and Mixtral's ``<s>``/``</s>``
    as bos/eos tokens), as HF checkpoints of chat models carry it.
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    if rope_style not in ("rope_theta", "rope_parameters"):
        raise ValueError(f"rope_style must be 'rope_theta' or 'rope_parameters', got {rope_style!r}")
    if expert_layout not in ("per_expert", "fused"):
        raise ValueError(f"expert_layout must be 'per_expert' or 'fused', got {expert_layout!r}")
    if shards < 1:
        raise ValueError("shards must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_theta": float(rope_theta), "rope_type": "default"},
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).to(dtype).eval()
    if expert_layout == "per_expert":
        kwargs: dict[str, Any] = {}
        if shards > 1:
            total = sum(p.numel() * p.element_size() for p in model.parameters())
            kwargs["max_shard_size"] = max(1, math.ceil(total / shards))
        model.save_pretrained(out, safe_serialization=True, **kwargs)
    else:
        config.dtype = dtype
        config.save_pretrained(out)
        _save_fused(model, out, shards)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if rope_style == "rope_theta":
        cfg.pop("rope_parameters", None)
        cfg["rope_theta"] = float(rope_theta)
    else:
        cfg.pop("rope_theta", None)
        cfg["rope_parameters"] = {"rope_theta": float(rope_theta), "rope_type": "default"}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "tokenizer.json").write_text(make_tokenizer_json(vocab))
    if chat_template is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "chat_template": chat_template}, indent=2) + "\n")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert (len(files) > 1) == (shards > 1), f"expected {'several' if shards > 1 else 'one'} shard(s), got {files}"
    return out, cfg


def _save_fused(model: torch.nn.Module, out: Path, shards: int) -> None:
    """Save the in-memory (transformers 5, fused experts) state dict, sharded like HF does."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    names = sorted(state)
    if shards == 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    groups: list[list[str]] = [[] for _ in range(shards)]
    sizes = [0] * shards
    for name in sorted(names, key=lambda n: -state[n].numel()):  # largest first, into the emptiest shard
        i = sizes.index(min(sizes))
        groups[i].append(name)
        sizes[i] += state[name].numel() * state[name].element_size()
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in group}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_reference_model(ckpt_dir: str | os.PathLike, dtype: torch.dtype | None = None):
    """The checkpoint loaded back by transformers (eval mode), for reference outputs."""
    from transformers import MixtralForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    return MixtralForCausalLM.from_pretrained(str(ckpt_dir), **kwargs).eval()


def reference_expert(model, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """``{"w1": [ffn, hidden] gate, "w3": [ffn, hidden] up, "w2": [hidden, ffn] down}`` of one
    expert of a transformers Mixtral model (fused or per-expert modules)."""
    block = model.model.layers[layer]
    moe = getattr(block, "mlp", None) or block.block_sparse_moe
    experts = moe.experts
    if hasattr(experts, "gate_up_proj"):
        gate_up = experts.gate_up_proj[expert]
        ffn = gate_up.shape[0] // 2
        return {
            "w1": gate_up[:ffn].detach().clone(),
            "w3": gate_up[ffn:].detach().clone(),
            "w2": experts.down_proj[expert].detach().clone(),
        }
    e = experts[expert]
    return {k: getattr(e, k).weight.detach().clone() for k in ("w1", "w3", "w2")}


def make_packed_store(root: str | os.PathLike, *, model: str = "tiny", precisions: tuple[str, ...] = ("bf16",),
                      group_size: int | None = None, **checkpoint: Any) -> Path:
    """A random checkpoint (``make_mixtral_checkpoint(root / "ckpt", **checkpoint)``) packed into
    the store directory ``root / "store"`` as ``model``; returns the store directory."""
    from expert_store.pack import pack_checkpoint
    from expert_store.tiers import NvmeTier

    root = Path(root)
    ckpt, _ = make_mixtral_checkpoint(root / "ckpt", **checkpoint)
    extra = {} if group_size is None else {"group_size": group_size}
    pack_checkpoint(ckpt, NvmeTier(root / "store"), model=model, precisions=precisions, progress=False, **extra)
    return root / "store"
