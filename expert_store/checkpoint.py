"""Reading a Hugging Face safetensors MoE checkpoint for a pack: Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, DeepSeek-V3 and GPT-OSS (``expert_store.families``); what both packs (``expert_store.pack``,
``expert_store.remote_pack``) write of it besides the expert blobs.

Checkpoints: one ``*.safetensors`` file or several (with or without
``model.safetensors.index.json``); config with ``rope_theta`` or ``rope_parameters``; experts as
``model.layers.{l}.block_sparse_moe.experts.{e}.w1/w2/w3.weight`` (Mixtral),
``model.layers.{l}.mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`` (Qwen, OLMoE; stored
as w1/w3/w2), or fused transformers-5 tensors ``model.layers.{l}.mlp.experts.gate_up_proj [E, 2*ffn, hidden]`` (gate half first) and
``down_proj [E, hidden, ffn]``; GPT-OSS's fused tensors are transposed with gate/up interleaved
(``gate_up_proj [E, hidden, 2*ffn]``, ``down_proj [E, ffn, hidden]``; blobs hold them as
w1/w3/w2 like every family) and their per-expert biases (``*_proj_bias``) go to the dense file;
GPT-OSS as released ships them MXFP4 (``*_proj_blocks`` + ``*_proj_scales``, rows = outputs),
dequantized exactly when read (``quant.dequantize_mxfp4``). DeepSeek-V3's
multi-token-prediction layers (past ``num_hidden_layers``) are not packed; its fp8 release
(e4m3 weights with a float32 ``weight_scale_inv`` per ``weight_block_size`` block) is dequantized
into bf16 when read, experts and dense part alike (``quant.dequantize_fp8_blocks``).

Memory stays bounded by one expert plus one copy of the dense part (small next to the experts):
tensors are read one at a time through ``safetensors.safe_open``, and each file mapping is
closed again right after the read, so the mapped pages of a checkpoint larger than RAM never
accumulate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import xxhash
from safetensors import safe_open

from . import families
from . import format as fmt
from .manifest import BlobEntry, Manifest, Ref
from .quant import dequantize_fp8_blocks, dequantize_mxfp4

log = logging.getLogger(__name__)

_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_PER_EXPERT_PROJ = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PROJ_TO_W = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
# GPT-OSS as released: MXFP4 experts, [E, rows, in/32, 16] packed nibbles + [E, rows, in/32] exponents
_FUSED_MXFP4 = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.((?:gate_up_proj|down_proj)_(?:blocks|scales))$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.(?:gate|router)\.weight$")  # GPT-OSS: router
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint directory cannot be packed (missing or inconsistent files/tensors)."""


class UnsupportedCheckpointError(CheckpointError):
    """The checkpoint is not a MoE model of a supported family (the message lists them)."""


NotMixtralCheckpointError = UnsupportedCheckpointError  # the name callers catch


@dataclass
class CheckpointLayout:
    """Where every tensor of a MoE checkpoint lives, read from file headers only."""

    root: Path
    config: dict[str, Any]
    config_bytes: bytes
    num_layers: int
    num_experts: int
    hidden_size: int
    intermediate_size: int  # ffn width of one routed expert
    top_k: int
    rope_theta: float
    files: dict[str, Path]  # tensor name -> file
    fused: bool  # experts stored as transformers-5 fused tensors
    dense: list[str]  # non-expert tensor names (source names), sorted
    routers: dict[str, str]  # source name of a router -> normalised name
    family: str = "mixtral"  # expert_store.families model_type
    moe_layers: tuple[int, ...] | None = None  # layers with routed experts (None: all)
    expert_names: dict[tuple[int, int, str], str] = field(default_factory=dict)  # (l, e, w1|w3|w2) -> source name
    mxfp4: bool = False  # GPT-OSS experts as MXFP4 blocks + scales (dequantized when read)
    fp8_scales: dict[str, str] = field(default_factory=dict)  # fp8 weight -> its weight_scale_inv (DeepSeek-V3)
    fp8_block: tuple[int, int] = (128, 128)  # rows x columns one fp8 scale covers

    def _tensor(self, name: str) -> torch.Tensor:
        """One tensor by its source name; an fp8 weight comes dequantized to bf16."""
        t = _read(self.files[name], name)
        scale = self.fp8_scales.get(name)
        if scale is None:
            return t
        return dequantize_fp8_blocks(t, _read(self.files[scale], scale), self.fp8_block).to(torch.bfloat16)

    @property
    def expert_layers(self) -> tuple[int, ...]:
        """The layers whose experts become blobs, ascending."""
        return tuple(range(self.num_layers)) if self.moe_layers is None else self.moe_layers

    def expert_tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """``{"w1", "w3", "w2"}`` (gate, up, down) of one expert, read from disk (only those bytes)."""
        if self.mxfp4:   # rows are outputs: [2F, H] with gate/up interleaved, [H, F]
            base = f"model.layers.{layer}.mlp.experts."
            gate_up, down = (dequantize_mxfp4(_read(self.files[base + p + "_blocks"], base + p + "_blocks", expert),
                                              _read(self.files[base + p + "_scales"], base + p + "_scales", expert))
                             for p in ("gate_up_proj", "down_proj"))
            return {"w1": gate_up[0::2].contiguous(), "w3": gate_up[1::2].contiguous(), "w2": down}
        if self.fused and self.family == "gpt_oss":   # [H, 2F] gate/up interleaved, [F, H]: transposed
            base = f"model.layers.{layer}.mlp.experts."
            gate_up = _read(self.files[base + "gate_up_proj"], base + "gate_up_proj", expert)
            return {
                "w1": gate_up[:, 0::2].t().contiguous(),
                "w3": gate_up[:, 1::2].t().contiguous(),
                "w2": _read(self.files[base + "down_proj"], base + "down_proj", expert).t().contiguous(),
            }
        if self.fused:
            base = f"model.layers.{layer}.mlp.experts."
            gate_up = _read(self.files[base + "gate_up_proj"], base + "gate_up_proj", expert)
            ffn = self.intermediate_size
            return {
                "w1": gate_up[:ffn],
                "w3": gate_up[ffn:],
                "w2": _read(self.files[base + "down_proj"], base + "down_proj", expert),
            }
        out = {}
        for w in ("w1", "w3", "w2"):
            name = self.expert_names.get((layer, expert, w),
                                         f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight")
            out[w] = self._tensor(name)
        return out

    def dense_tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        """(normalised name, tensor) of every non-expert tensor, one at a time."""
        for name in self.dense:
            yield self.routers.get(name, name), self._tensor(name)


def _read(path: Path, name: str, index: int | None = None) -> torch.Tensor:
    # Open, read one tensor (or one expert's slice of a fused tensor), close: the mapping of
    # the file is released after every read, so resident pages never add up over a big file.
    with safe_open(str(path), framework="pt") as f:
        if index is None:
            return f.get_tensor(name)
        return f.get_slice(name)[index].contiguous()


def _open_header(path: Path):
    """safe_open for reading headers; an unreadable file is a CheckpointError."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises SafetensorError / OSError / RuntimeError
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {msg})") from None


def _shape(handle, name: str) -> list[int]:
    return list(handle.get_slice(name).get_shape())


def _positive_int(config: dict, key: str, where: Path) -> int:
    v = config.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise NotMixtralCheckpointError(f"{where}: config.json has no positive int {key!r} (got {v!r})")
    return v


def _rope_theta(config: dict) -> float:
    theta = config.get("rope_theta")
    params = config.get("rope_parameters")
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    if theta is None:
        return 1_000_000.0  # transformers' Mixtral default
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise CheckpointError(f"rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def _expert_name(family: str, layer: int, expert: int, w: str) -> str:
    """The name a per-expert tensor has in a checkpoint of `family` as it ships."""
    if family == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"
    proj = {v: k for k, v in _PROJ_TO_W.items()}[w]
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def read_checkpoint_layout(checkpoint_dir: str | os.PathLike) -> CheckpointLayout:
    """Validate a checkpoint directory and map its tensors (reads headers, not weights)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{root}: no config.json")
    config_bytes = cfg_path.read_bytes()
    try:
        config = json.loads(config_bytes)
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    try:
        experts_at = families.expert_layout(config)  # UnsupportedFamilyError is a ValueError too
    except ValueError as e:
        raise UnsupportedCheckpointError(f"{root}: {e}") from None
    family = experts_at.family
    num_layers = experts_at.num_layers
    num_experts = experts_at.num_experts
    hidden = _positive_int(config, "hidden_size", root)
    ffn = experts_at.expert_ffn
    top_k = experts_at.top_k
    moe_layers = experts_at.moe_layers
    rope_theta = _rope_theta(config)

    # tensor name -> file
    index_path = root / _INDEX
    files: dict[str, Path] = {}
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: unreadable index ({e})") from None
        for name, fname in weight_map.items():
            p = root / fname
            if Path(fname).name != fname or not p.is_file():
                raise CheckpointError(f"{index_path}: {name} maps to missing or invalid file {fname!r}")
            files[name] = p
    else:
        shards = sorted(root.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{root}: no *.safetensors files")
        for p in shards:
            with _open_header(p) as f:
                for name in f.keys():
                    if name in files:
                        raise CheckpointError(f"{root}: tensor {name} is in both {files[name].name} and {p.name}")
                    files[name] = p

    fp8_scales: dict[str, str] = {}
    fp8_block = (128, 128)
    quant = config.get("quantization_config")
    if family == "deepseek_v3" and isinstance(quant, dict) and quant.get("quant_method") == "fp8":
        # fp8 e4m3 weights, each with a float32 weight_scale_inv per block: dequantized into bf16 when read
        block = quant.get("weight_block_size") or [128, 128]
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise CheckpointError(f"{root}: quantization_config weight_block_size must be two positive ints, got {block!r}")
        fp8_block = (block[0], block[1])
        for n in [n for n in files if n.endswith(".weight_scale_inv")]:
            w = n[:-len("_scale_inv")]
            if w not in files:
                raise CheckpointError(f"{root}: {n} scales no weight ({w} is missing)")
            fp8_scales[w] = n
        scale_files = {n: files.pop(n) for n in fp8_scales.values()}

    if family == "deepseek_v3":
        # the multi-token-prediction module (layers num_hidden_layers..) is not part of the decoder
        mtp = [n for n in files if (m := _LAYER.match(n)) and int(m[1]) >= num_layers]
        if mtp:
            log.info("%s: %d tensors of the multi-token-prediction layers are not packed", root, len(mtp))
            for n in mtp:
                del files[n]

    # classify
    per_expert: dict[tuple[int, int], set[str]] = defaultdict(set)
    expert_names: dict[tuple[int, int, str], str] = {}
    fused: dict[int, set[str]] = defaultdict(set)
    routers: dict[str, str] = {}
    dense: list[str] = []
    for name in files:
        if m := _PER_EXPERT.match(name):
            w = m[3]
        elif m := _PER_EXPERT_PROJ.match(name):
            w = _PROJ_TO_W[m[3]]
        else:
            m = None
        if m is not None:
            key = (int(m[1]), int(m[2]), w)
            if key in expert_names:
                raise CheckpointError(f"{root}: layer {key[0]} expert {key[1]} has two {w} tensors "
                                      f"({expert_names[key]}, {name})")
            per_expert[key[:2]].add(w)
            expert_names[key] = name
        elif (m := _FUSED.match(name)) or (family == "gpt_oss" and (m := _FUSED_MXFP4.match(name))):
            fused[int(m[1])].add(m[2])
        else:
            if m := _ROUTER.match(name):
                routers[name] = f"model.layers.{m[1]}.block_sparse_moe.gate.weight"
            dense.append(name)
    if not per_expert and not fused:
        raise UnsupportedCheckpointError(
            f"{root}: no {family} expert tensors (block_sparse_moe.experts.*, mlp.experts.{{e}}.*_proj or "
            f"fused mlp.experts.*)")
    if per_expert and fused:
        raise CheckpointError(f"{root}: mixes per-expert and fused expert tensors")
    is_fused = bool(fused)
    mxfp4 = any(n.endswith("_blocks") for names in fused.values() for n in names)
    if mxfp4 and (hidden % 32 or ffn % 32):
        raise CheckpointError(f"{root}: MXFP4 experts need hidden_size and intermediate_size multiples of 32")

    # completeness and shapes (headers only)
    shapes: dict[str, list[int]] = {}
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, p in files.items():
        by_file[p].append(name)
    for p, names in by_file.items():
        with _open_header(p) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{p.name}: index lists {name} but the file does not hold it")
                shapes[name] = _shape(f, name)

    def expect(name: str, shape: list[int]) -> None:
        if name not in shapes:
            raise CheckpointError(f"{root}: missing tensor {name}")
        if shapes[name] != shape:
            raise CheckpointError(f"{root}: {name} has shape {shapes[name]}, expected {shape}")

    moe_set = set(moe_layers)
    for layer in moe_layers:
        if mxfp4:
            base = f"model.layers.{layer}.mlp.experts."
            for proj, rows, cols in (("gate_up_proj", 2 * ffn, hidden), ("down_proj", hidden, ffn)):
                expect(base + proj + "_blocks", [num_experts, rows, cols // 32, 16])
                expect(base + proj + "_scales", [num_experts, rows, cols // 32])
        if is_fused and family == "gpt_oss":   # transposed, plus per-expert biases (packed dense)
            base = f"model.layers.{layer}.mlp.experts."
            if not mxfp4:
                expect(base + "gate_up_proj", [num_experts, hidden, 2 * ffn])
                expect(base + "down_proj", [num_experts, ffn, hidden])
            expect(base + "gate_up_proj_bias", [num_experts, 2 * ffn])
            expect(base + "down_proj_bias", [num_experts, hidden])
        elif is_fused:
            base = f"model.layers.{layer}.mlp.experts."
            expect(base + "gate_up_proj", [num_experts, 2 * ffn, hidden])
            expect(base + "down_proj", [num_experts, hidden, ffn])
        else:
            for e in range(num_experts):
                for w, shape in (("w1", [ffn, hidden]), ("w3", [ffn, hidden]), ("w2", [hidden, ffn])):
                    expect(expert_names.get((layer, e, w)) or _expert_name(family, layer, e, w), shape)
        router = [n for n, norm in routers.items() if norm == f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        if len(router) != 1:
            raise CheckpointError(f"{root}: layer {layer} needs exactly one router gate, found {router}")
        expect(router[0], [num_experts, hidden])
    extra = sorted({k[0] for k in per_expert if k[0] not in moe_set or k[1] >= num_experts}
                   | {l for l in fused if l not in moe_set})
    if extra:
        raise CheckpointError(f"{root}: expert tensors in layers {extra} beyond the config's MoE layers "
                              f"x {num_experts} experts")
    if fp8_scales:
        files.update({n: p for n, p in scale_files.items() if n[:-len("_scale_inv")] in files})
        with_scale = [w for w in fp8_scales if w in shapes]
        for w in with_scale:   # headers only: the scale grid covers the weight
            rows, cols = shapes[w]
            with _open_header(files[fp8_scales[w]]) as f:
                got = _shape(f, fp8_scales[w])
            want = [-(-rows // fp8_block[0]), -(-cols // fp8_block[1])]
            if got != want:
                raise CheckpointError(f"{root}: {fp8_scales[w]} has shape {got}, expected {want}")
    stray = sorted(int(n.split(".")[2]) for n in routers if int(n.split(".")[2]) not in moe_set)
    if stray:
        raise CheckpointError(f"{root}: router gates in layers {stray}, which the config makes dense")
    return CheckpointLayout(
        root=root,
        config=config,
        config_bytes=config_bytes,
        num_layers=num_layers,
        num_experts=num_experts,
        hidden_size=hidden,
        intermediate_size=ffn,
        top_k=top_k,
        rope_theta=rope_theta,
        files=files,
        fused=is_fused,
        dense=sorted(dense),
        routers=routers,
        family=family,
        moe_layers=None if moe_layers == tuple(range(num_layers)) else moe_layers,
        expert_names=expert_names,
        mxfp4=mxfp4,
        fp8_scales={w: n for w, n in fp8_scales.items() if w in files},
        fp8_block=fp8_block,
    )


def default_model_name(checkpoint_dir: str | os.PathLike) -> str:
    """The checkpoint directory's name, made into a valid model name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(checkpoint_dir).resolve().name)
    name = re.sub(r"\.{2,}", ".", name).lstrip("._-")[:128] or "model"
    return fmt.validate_model_name(name)


CHUNK_BYTES = 8 << 20


def file_checksum(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def dense_file(layout: CheckpointLayout, tmp_root: str | os.PathLike | None) -> Iterator[tuple[Path, int, str]]:
    """dense.safetensors written to a temp file under ``tmp_root`` (None: $TMPDIR); yields
    (path, size, xxh3). The tensors are freed before it yields: peak memory is one copy of the
    dense part, while it is written."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix=".pack-", dir=tmp_root) as tmp:
        path = Path(tmp) / "dense.safetensors"
        tensors = dict(layout.dense_tensors())
        # one metadata key: safetensors writes a map in hash order, so several keys would make
        # the bytes (and the checksum a resumed pack compares) differ from run to run
        save_file(tensors, str(path), metadata={"format": "pt"})
        del tensors
        yield path, path.stat().st_size, file_checksum(path)


def tokenizer_files(layout: CheckpointLayout) -> tuple[bytes | None, bytes | None]:
    """The checkpoint's tokenizer.json and tokenizer_config.json bytes (None for a missing
    file). A tokenizer_config.json that is not a JSON object is left out with a warning: it is
    optional (the chat template), and the store accepts only JSON objects."""
    tok_path = layout.root / "tokenizer.json"
    tokenizer = tok_path.read_bytes() if tok_path.is_file() else None
    if tokenizer is None:
        log.warning("%s has no tokenizer.json: the model will need one to generate text", layout.root)
    cfg_path = layout.root / "tokenizer_config.json"
    tokenizer_config = cfg_path.read_bytes() if cfg_path.is_file() else None
    if tokenizer_config is not None:
        try:
            ok = isinstance(json.loads(tokenizer_config), dict)
        except (ValueError, UnicodeDecodeError):
            ok = False
        if not ok:
            log.warning("%s is not a JSON object: not packed (chat requests will be refused)", cfg_path)
            tokenizer_config = None
    return tokenizer, tokenizer_config


def expert_shapes(layout: CheckpointLayout) -> dict[str, list[int]]:
    hidden, ffn = layout.hidden_size, layout.intermediate_size
    return {"w1": [ffn, hidden], "w3": [ffn, hidden], "w2": [hidden, ffn]}


def check_pack_args(precisions: Iterable[str], group_size: int) -> tuple[str, ...]:
    precisions = tuple(dict.fromkeys(precisions))
    if not precisions:
        raise ValueError("at least one precision is needed")
    for p in precisions:
        if p not in fmt.PRECISIONS:
            raise ValueError(f"unknown precision {p!r}; expected some of {fmt.PRECISIONS}")
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even int >= 2, got {group_size!r}")
    return precisions


def pack_manifest(layout: CheckpointLayout, model: str, precisions: tuple[str, ...], group_size: int,
                    blobs: dict[Ref, BlobEntry], dense_size: int, dense_xxh3: str,
                    tokenizer: bytes | None, tokenizer_config: bytes | None = None) -> Manifest:
    return Manifest(
        model=model,
        num_layers=layout.num_layers,
        num_experts=layout.num_experts,
        precisions=precisions,
        blobs=blobs,
        dense_size=dense_size,
        dense_xxh3=dense_xxh3,
        architecture=layout.family,
        top_k=layout.top_k,
        hidden_size=layout.hidden_size,
        intermediate_size=layout.intermediate_size,
        vocab_size=layout.config.get("vocab_size"),
        rope_theta=layout.rope_theta,
        group_size=group_size,
        expert_layout="fused" if layout.fused else "per_expert",
        moe_layers=tuple(layout.expert_layers),
        config_xxh3=fmt.blob_checksum(layout.config_bytes),
        tokenizer_xxh3=None if tokenizer is None else fmt.blob_checksum(tokenizer),
        tokenizer_config_xxh3=None if tokenizer_config is None else fmt.blob_checksum(tokenizer_config),
    )
