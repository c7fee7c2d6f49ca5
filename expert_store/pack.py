"""Import a Hugging Face safetensors MoE checkpoint into the expert store: Mixtral, Qwen2-MoE,
Qwen3-MoE and OLMoE (``expert_store.families``).

``pack_checkpoint(checkpoint_dir, store, model=None, precisions=("bf16",), group_size=128)``
writes, under the model name:

- one blob per expert per precision (``format.expert_key``; see ``quant.expert_to_blob``),
- ``dense.safetensors``: every non-expert tensor under its HF name, dtype as in the checkpoint,
  the router normalised to ``model.layers.{l}.block_sparse_moe.gate.weight``; shared experts
  (Qwen2-MoE ``mlp.shared_expert.*`` and its ``shared_expert_gate``) and the MLPs of dense
  layers are dense tensors like attention,
- ``config.json``, ``tokenizer.json`` and ``tokenizer_config.json`` (whose ``chat_template`` the
  decoder's chat API renders) verbatim, the last two when the checkpoint has them,
- ``manifest.json`` last (so a model without one is an incomplete import): model,
  num_layers, num_experts, top_k, hidden/ffn sizes, precisions, group_size, rope_theta, every
  blob's size and xxh3-128, dense size/xxh3.

Checkpoints: one ``*.safetensors`` file or several (with or without
``model.safetensors.index.json``); config with ``rope_theta`` or ``rope_parameters``; experts as
``model.layers.{l}.block_sparse_moe.experts.{e}.w1/w2/w3.weight`` (Mixtral),
``model.layers.{l}.mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`` (Qwen, OLMoE; stored
as w1/w3/w2), or fused transformers-5 tensors ``model.layers.{l}.mlp.experts.gate_up_proj [E, 2*ffn, hidden]`` (gate half first) and
``down_proj [E, hidden, ffn]``; GPT-OSS's fused tensors are transposed with gate/up interleaved
(``gate_up_proj [E, hidden, 2*ffn]``, ``down_proj [E, ffn, hidden]``; blobs hold them as
w1/w3/w2 like every family) and their per-expert biases (``*_proj_bias``) go to the dense file.
DeepSeek-V3's multi-token-prediction layers (past ``num_hidden_layers``) are not packed.

Memory stays bounded by one expert plus one copy of the dense part (small next to the experts):
tensors are read one at a time through ``safetensors.safe_open``, and each file mapping is
closed again right after the read, so the mapped pages of a checkpoint larger than RAM never
accumulate.  Re-running skips every blob already in the store whose seal verifies and whose
header matches (resumable).

``pack_remote(checkpoint_dir, "grpc://h1:p1,h2:p2" | "dns:///h:p" | "k8s://ns/svc:p", ...)`` packs
the same files, byte for byte, into running store replicas over PutBlob (``expert-store pack
--store grpc://...``): by default every file to every replica (each replica holds the whole
model, as the k8s deployment runs them), or with ``placement="owner"`` each blob only to its
rendezvous owner; the manifest goes last, to every replica, only after every replica accepted
all of its files, so a failed pack leaves no model visible anywhere. A re-run skips the files a
replica already serves with the same size and xxh3 (see ``pack_remote``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import torch
import xxhash
from safetensors import safe_open
from tqdm.auto import tqdm

from . import families
from . import format as fmt
from .errors import DataLoss
from .format import BlobError
from .manifest import MANIFEST_FORMAT, BlobEntry, Manifest, Ref
from .quant import DEFAULT_GROUP_SIZE, expert_to_blob

__all__ = [
    "CheckpointError",
    "NotMixtralCheckpointError",
    "UnsupportedCheckpointError",
    "PackResult",
    "CheckpointLayout",
    "read_checkpoint_layout",
    "pack_checkpoint",
    "default_model_name",
    "MANIFEST_FORMAT",
]

log = logging.getLogger(__name__)

_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_PER_EXPERT_PROJ = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PROJ_TO_W = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.(?:gate|router)\.weight$")  # GPT-OSS: router
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint directory cannot be packed (missing or inconsistent files/tensors)."""


class UnsupportedCheckpointError(CheckpointError):
    """The checkpoint is not a MoE model of a supported family (the message lists them)."""


NotMixtralCheckpointError = UnsupportedCheckpointError  # the name callers catch


class _Store(Protocol):
    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, data: bytes) -> None: ...
    def contains(self, key: str) -> bool: ...


@dataclass
class PackResult:
    model: str
    manifest: Manifest | None
    blobs_written: int = 0
    blobs_skipped: int = 0
    bytes_written: int = 0  # expert blob bytes written by this run
    files_written: list[str] = field(default_factory=list)  # non-expert keys (re)written


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

    @property
    def expert_layers(self) -> tuple[int, ...]:
        """The layers whose experts become blobs, ascending."""
        return tuple(range(self.num_layers)) if self.moe_layers is None else self.moe_layers

    def expert_tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """``{"w1", "w3", "w2"}`` (gate, up, down) of one expert, read from disk (only those bytes)."""
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
            out[w] = _read(self.files[name], name)
        return out

    def dense_tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        """(normalised name, tensor) of every non-expert tensor, one at a time."""
        for name in self.dense:
            yield self.routers.get(name, name), _read(self.files[name], name)


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
        elif m := _FUSED.match(name):
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
        if is_fused and family == "gpt_oss":   # transposed, plus per-expert biases (packed dense)
            base = f"model.layers.{layer}.mlp.experts."
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
    )


def default_model_name(checkpoint_dir: str | os.PathLike) -> str:
    """The checkpoint directory's name, made into a valid model name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(checkpoint_dir).resolve().name)
    name = re.sub(r"\.{2,}", ".", name).lstrip("._-")[:128] or "model"
    return fmt.validate_model_name(name)


# ---------------------------------------------------------------------------------------------


def _source(store: _Store):
    """The tier to verify existing blobs against: a TieredStore's NVMe tier (no promotion)."""
    return getattr(store, "nvme", store)


def _put(store: _Store, key: str, data: bytes) -> None:
    from .tiers.tiered import TieredStore

    if isinstance(store, TieredStore):
        store.put(key, data, cache=False)  # bulk import: do not flood RAM/Redis
    else:
        store.put(key, data)


def _existing_blob(store: _Store, key: str, want: dict[str, Any]) -> bytes | None:
    """The stored blob under ``key`` if it verifies and matches what would be written."""
    if not store.contains(key):
        return None
    data = _source(store).get(key)
    if data is None:
        return None
    try:
        header = fmt.check_blob(data)
    except BlobError as e:
        log.warning("re-packing %s: stored copy is corrupt (%s)", key, e)
        return None
    got = {
        "model": header.model,
        "layer": header.layer,
        "expert": header.expert,
        "precision": header.precision,
        "shapes": {t.name: list(t.shape) for t in header.tensors},
        "group_size": {t.quant.group_size for t in header.tensors if t.quant is not None} or None,
    }
    if got != want:
        log.warning("re-packing %s: stored blob was packed differently", key)
        return None
    return data


def _put_file(store: _Store, key: str, data: bytes, result: PackResult) -> None:
    if store.contains(key):
        old = _source(store).get(key)
        if old is not None and fmt.blob_checksum(old) == fmt.blob_checksum(data):
            return
    _put(store, key, data)
    result.files_written.append(key)


_CHUNK = 8 << 20


def _file_checksum(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stored_checksum(store: _Store, key: str) -> str | None:
    """xxh3-128 of what the store holds under ``key`` (streamed from the file when the store
    is an NVMe directory), None when absent."""
    if not store.contains(key):
        return None
    src = _source(store)
    path = src.path(key) if hasattr(src, "path") else None
    if path is not None and path.is_file():
        return _file_checksum(path)
    data = src.get(key)
    return None if data is None else fmt.blob_checksum(data)


@contextlib.contextmanager
def _dense_file(layout: CheckpointLayout, tmp_root: str | os.PathLike | None) -> Iterator[tuple[Path, int, str]]:
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
        yield path, path.stat().st_size, _file_checksum(path)


def _pack_dense(layout: CheckpointLayout, store: _Store, model: str, result: PackResult) -> tuple[int, str]:
    """Write dense.safetensors; return (size, xxh3).  The tensors go to a temp file (next to the
    store when it is a directory, so it is disk and not tmpfs) and are freed before the file
    is streamed into the store: peak memory is one copy of the dense part."""
    key = fmt.dense_key(model)
    src = _source(store)
    with _dense_file(layout, getattr(src, "root", None)) as (path, size, checksum):
        if _stored_checksum(store, key) == checksum:
            return size, checksum
        streamable = hasattr(src, "writer") and (src is store or hasattr(store, "invalidate"))
        if streamable:  # NvmeTier, or a TieredStore's NVMe tier: atomic streamed write
            with src.writer(key) as w, open(path, "rb", buffering=0) as f:
                while chunk := f.read(_CHUNK):
                    w.write(chunk)
            if src is not store:
                store.invalidate(key)  # drop stale cached copies (RAM, Redis)
        else:
            _put(store, key, path.read_bytes())
    result.files_written.append(key)
    return size, checksum


def pack_checkpoint(
    checkpoint_dir: str | os.PathLike,
    store: _Store,
    model: str | None = None,
    precisions: Iterable[str] = ("bf16",),
    group_size: int = DEFAULT_GROUP_SIZE,
    progress: bool = True,
) -> PackResult:
    """Pack a MoE checkpoint into ``store`` (anything with ``get/put/contains`` by key:
    ``NvmeTier``, ``TieredStore``).  Raises :class:`UnsupportedCheckpointError` (also known as
    ``NotMixtralCheckpointError``) for models of other families,
    :class:`CheckpointError` for broken checkpoints, ValueError for bad arguments."""
    precisions = _check_pack_args(precisions, group_size)
    layout = read_checkpoint_layout(checkpoint_dir)
    model = fmt.validate_model_name(model) if model is not None else default_model_name(checkpoint_dir)
    result = PackResult(model=model, manifest=None)

    # small files first, manifest last: a store without manifest.json holds no usable model
    _put_file(store, fmt.file_key(model, "config.json"), layout.config_bytes, result)
    tokenizer, tokenizer_config = _tokenizer_files(layout)
    if tokenizer is not None:
        _put_file(store, fmt.file_key(model, "tokenizer.json"), tokenizer, result)
    if tokenizer_config is not None:
        _put_file(store, fmt.file_key(model, "tokenizer_config.json"), tokenizer_config, result)
    dense_size, dense_xxh3 = _pack_dense(layout, store, model, result)

    shapes = _expert_shapes(layout)
    blobs: dict[Ref, BlobEntry] = {}
    total = len(layout.expert_layers) * layout.num_experts * len(precisions)
    with tqdm(total=total, unit="blob", desc=f"pack {model}", disable=not progress) as bar:
        for layer in layout.expert_layers:
            for expert in range(layout.num_experts):
                pending = []
                for precision in precisions:
                    key = fmt.expert_key(model, layer, expert, precision)
                    want = {
                        "model": model,
                        "layer": layer,
                        "expert": expert,
                        "precision": precision,
                        "shapes": shapes,
                        "group_size": None if precision == "bf16" else {group_size},
                    }
                    data = _existing_blob(store, key, want)
                    if data is None:
                        pending.append((precision, key))
                        continue
                    blobs[(layer, expert, precision)] = _blob_entry(data)
                    result.blobs_skipped += 1
                    bar.update(1)
                if not pending:
                    continue
                weights = layout.expert_tensors(layer, expert)
                for precision, key in pending:
                    data = expert_to_blob(model, layer, expert, precision, weights, group_size=group_size)
                    _put(store, key, data)
                    blobs[(layer, expert, precision)] = _blob_entry(data)
                    result.blobs_written += 1
                    result.bytes_written += len(data)
                    bar.update(1)
                    del data
                del weights

    manifest = _build_manifest(layout, model, precisions, group_size, blobs, dense_size, dense_xxh3, tokenizer,
                               tokenizer_config)
    manifest = _merge_previous(store, manifest)
    _put_file(store, fmt.file_key(model, "manifest.json"), manifest.to_json(), result)
    result.manifest = manifest
    log.info(
        "packed %s: %d blobs written (%d bytes), %d already present",
        model,
        result.blobs_written,
        result.bytes_written,
        result.blobs_skipped,
    )
    return result


def _blob_entry(data: bytes) -> BlobEntry:
    return BlobEntry(len(data), fmt.blob_checksum(data))


def _check_pack_args(precisions: Iterable[str], group_size: int) -> tuple[str, ...]:
    precisions = tuple(dict.fromkeys(precisions))
    if not precisions:
        raise ValueError("at least one precision is needed")
    for p in precisions:
        if p not in fmt.PRECISIONS:
            raise ValueError(f"unknown precision {p!r}; expected some of {fmt.PRECISIONS}")
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even int >= 2, got {group_size!r}")
    return precisions


def _expert_shapes(layout: CheckpointLayout) -> dict[str, list[int]]:
    hidden, ffn = layout.hidden_size, layout.intermediate_size
    return {"w1": [ffn, hidden], "w3": [ffn, hidden], "w2": [hidden, ffn]}


def _build_manifest(layout: CheckpointLayout, model: str, precisions: tuple[str, ...], group_size: int,
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


def _tokenizer_files(layout: CheckpointLayout) -> tuple[bytes | None, bytes | None]:
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


def _extra_precisions(manifest: Manifest, old: Manifest) -> dict[str, dict[Ref, BlobEntry]]:
    """Precisions an earlier manifest of the model (``old``) holds that this pack does not
    write, each with its complete set of blob entries: ``{precision: {ref: entry}}``. Empty when
    there is nothing to consider (another shape, no other precision, an incomplete one)."""
    same_shape = all(getattr(old, k) == getattr(manifest, k)
                     for k in ("num_layers", "num_experts", "hidden_size", "intermediate_size"))
    if not same_shape or old.expert_layers() != manifest.expert_layers():
        return {}
    out = {}
    for precision in old.precisions:
        if precision not in fmt.PRECISIONS or precision in manifest.precisions:
            continue
        entries = {ref: b for ref, b in old.blobs.items() if ref[2] == precision}
        if len(entries) == len(manifest.expert_layers()) * manifest.num_experts:
            out[precision] = entries
    return out


def _add_precisions(manifest: Manifest, extras: dict[str, dict[Ref, BlobEntry]]) -> Manifest:
    blobs = dict(manifest.blobs)
    for entries in extras.values():
        blobs.update(entries)
    precisions = [p for p in fmt.PRECISIONS if p in manifest.precisions or p in extras]
    return replace(manifest, precisions=tuple(precisions), blobs=blobs)


def _merge_previous(store: _Store, manifest: Manifest) -> Manifest:
    """Keep precisions an earlier pack of the same model stored (re-packing at int4 after bf16
    must not drop bf16 from the manifest), when all their blobs are still in the store."""
    key = fmt.file_key(manifest.model, "manifest.json")
    old_bytes = _source(store).get(key) if store.contains(key) else None
    if not old_bytes:
        return manifest
    try:
        raw = json.loads(old_bytes)
        old = Manifest.from_json(manifest.model, raw if isinstance(raw, dict) else {})
    except (ValueError, DataLoss):
        return manifest
    extras = _extra_precisions(manifest, old)
    kept = {
        p: entries for p, entries in extras.items()
        if all(store.contains(fmt.expert_key(manifest.model, *ref)) for ref in entries)
    }
    return _add_precisions(manifest, kept) if kept else manifest


# ---------------------------------------------------------------------------------------------
# remote pack: PutBlob into running store replicas

PLACEMENTS = ("all", "owner")
# The deadline of one upload (or one probe) grows with its size: deadline_s plus the bytes at
# this rate, so a 3 GB dense file over a slow link is not cut off by a deadline meant for RPCs.
MIN_TRANSFER_BYTES_PER_S = 16 << 20
UPLOAD_WINDOW = 2  # blobs whose uploads may still be in flight while the next one is quantized
PROBE_MAX_REFS = 64  # the server's default --max-refs
PROBE_MAX_BYTES = 1 << 30  # stored bytes the server may hash for one probe call


@dataclass
class RemotePackResult:
    model: str
    manifest: Manifest
    replicas: list[str]
    placement: str
    uploaded: dict[str, int]  # replica -> files this run uploaded to it (blobs, dense, config, ..., manifest)
    skipped: dict[str, int]  # replica -> files it already held with the same size and xxh3 (checked by it)
    bytes_uploaded: int = 0  # over all replicas


def resolve_replicas(target: str, timeout_s: float = 30.0) -> list[str]:
    """The replica addresses a target names now: "grpc://h:p,h:p" (or "h:p,h:p") as given,
    "dns:///host:port" / "k8s://ns/svc:port" through expert_store.discovery (the ready set at
    this moment). ValueError for a malformed target, discovery.DiscoveryError when none is ready."""
    from .client import parse_replicas

    if target.startswith(("dns:", "k8s://")):
        from .discovery import open_discovery

        members = open_discovery(target)
        try:
            return members.wait_ready(timeout_s)
        finally:
            members.close()
    return parse_replicas(target)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _probe_answers() -> tuple:
    """Statuses by which a replica answers a probe with "not as expected" (the file is then
    uploaded); anything else (UNAVAILABLE, a broken stream) is an outage."""
    import grpc

    c = grpc.StatusCode
    return (c.NOT_FOUND, c.DATA_LOSS, c.INVALID_ARGUMENT, c.FAILED_PRECONDITION, c.OUT_OF_RANGE,
            c.RESOURCE_EXHAUSTED)


@dataclass
class _Replica:
    address: str
    client: Any  # GrpcStoreClient over this one address
    old: Manifest | None = None  # the model as this replica serves it before the pack (None: none)
    uploaded: int = 0
    skipped: int = 0
    bytes: int = 0


class _RemotePack:
    """One remote pack run: the replicas, their prior state, the upload pool."""

    def __init__(self, model: str, replicas: list[_Replica], placement: str, deadline_s: float, on_upload):
        from concurrent.futures import ThreadPoolExecutor

        self.model = model
        self.replicas = replicas
        self.addresses = [r.address for r in replicas]
        self.placement = placement
        self.deadline_s = deadline_s
        self.on_upload = on_upload
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=len(replicas) * (UPLOAD_WINDOW + 1),
                                       thread_name_prefix="pack-upload")
        self.pending: list[list[tuple[_Replica, Any]]] = []  # groups of (replica, future), oldest first

    # ---- placement

    def holders(self, key: str) -> list[_Replica]:
        """The replicas that must hold ``key``: every one ("all"), or its rendezvous owner
        (the replica a StoreClient over the same set fetches it from first)."""
        if self.placement == "all":
            return self.replicas
        from .client import rendezvous_order

        owner = rendezvous_order(key, self.addresses)[0]
        return [r for r in self.replicas if r.address == owner]

    # ---- prior state

    def preflight(self) -> None:
        """Every replica answers Stat (one attempt each, so a replica that is down fails the pack
        at once), then its manifest of the model is read."""
        from .errors import DataLoss, NotFound, error_for_code
        from ._proto.adapmoe.v1 import expert_store_pb2 as pb

        for r in self.replicas:
            reply = r.client.stat().get(r.address, {"error": "UNAVAILABLE: not in the replica set"})
            if "error" in reply:  # "CODE: details"
                code = reply["error"].split(":", 1)[0]
                what = "is unreachable" if code == "UNAVAILABLE" else "refused Stat"
                raise error_for_code(code, f"replica {r.address} {what}: {_one_line(reply['error'])}")
        request = pb.GetManifestRequest(model=self.model)
        for r in self.replicas:
            try:
                r.old = Manifest.from_proto(r.client.call(
                    fmt.file_key(self.model, "manifest.json"),
                    lambda stub, timeout, metadata: stub.GetManifest(request, timeout=timeout, metadata=metadata),
                    f"GetManifest({self.model})"))
            except NotFound:
                continue
            except DataLoss as e:
                log.warning("replica %s: its manifest of %s is unusable (%s); uploading everything",
                            r.address, self.model, _one_line(e))
                continue
            except Exception as e:
                raise self.replica_error(r, e) from None

    # ---- probes: does a replica hold a file with this size and xxh3? (resume)

    def probe_experts(self, r: _Replica, refs: list[Ref]) -> set[Ref]:
        """The refs (each listed in r's manifest) that r serves: each asked from its last byte
        (FetchExperts, offset size-1), so one byte per blob crosses the wire while the server
        checks the whole stored file against its manifest's size and xxh3 before it answers
        (store.NvmeRangeReader; a file it checked before and that has not changed since is
        trusted). A ref it cannot serve ends that stream (NOT_FOUND, DATA_LOSS, ...); the refs
        after it are asked again in the next call."""
        import grpc

        from ._proto.adapmoe.v1 import expert_store_pb2 as pb

        answers = _probe_answers()
        old_blobs = r.old.blobs if r.old is not None else {}
        refs = sorted(ref for ref in refs if ref in old_blobs and old_blobs[ref].size > 0)
        confirmed: set[Ref] = set()
        i = 0
        while i < len(refs):
            batch, nbytes = [], 0
            for ref in refs[i:i + PROBE_MAX_REFS]:
                if batch and nbytes + old_blobs[ref].size > PROBE_MAX_BYTES:
                    break
                batch.append(ref)
                nbytes += old_blobs[ref].size
            request = pb.FetchExpertsRequest(model=self.model, priority=pb.PREFETCH, refs=[
                pb.ExpertRef(layer=l, expert=e, precision=p, offset=old_blobs[(l, e, p)].size - 1)
                for (l, e, p) in batch])

            def rpc(stub, timeout, metadata, batch=batch, request=request, nbytes=nbytes):
                done: list[int] = []
                try:
                    for chunk in stub.FetchExperts(request, timeout=timeout + nbytes / MIN_TRANSFER_BYTES_PER_S,
                                                   metadata=metadata):
                        if chunk.last and chunk.index < len(batch) \
                                and chunk.total_size == old_blobs[batch[chunk.index]].size:
                            done.append(chunk.index)
                except grpc.RpcError as e:
                    if e.code() in answers:
                        return done, True
                    raise
                return done, False

            done, stopped = r.client.call(fmt.expert_key(self.model, *batch[0]), rpc,
                                          f"FetchExperts({self.model}) probe")
            confirmed.update(batch[j] for j in done)
            # a failed stream stops at the first ref it could not serve: the ones after it are unknown
            i += (max(done, default=-1) + 2) if stopped else len(batch)
        return confirmed

    def probe_dense(self, r: _Replica, size: int) -> bool:
        import grpc

        from ._proto.adapmoe.v1 import expert_store_pb2 as pb

        def rpc(stub, timeout, metadata):
            request = pb.FetchDenseRequest(model=self.model, offset=size - 1)
            try:
                for chunk in stub.FetchDense(request, timeout=timeout + size / MIN_TRANSFER_BYTES_PER_S,
                                             metadata=metadata):
                    if chunk.last:
                        return chunk.total_size == size
            except grpc.RpcError as e:
                if e.code() in _probe_answers():
                    return False
                raise
            return False

        return r.client.call(fmt.dense_key(self.model), rpc, f"FetchDense({self.model}) probe")

    # ---- uploads

    def upload(self, r: _Replica, kind: str, data: Any, key: str, **ref: Any) -> None:
        size = len(memoryview(data))
        r.client.put(self.model, kind, data, timeout_s=self.deadline_s + size / MIN_TRANSFER_BYTES_PER_S, **ref)
        with self.lock:
            r.uploaded += 1
            r.bytes += size
        if self.on_upload is not None:
            self.on_upload(r.address, key)

    def skip(self, r: _Replica) -> None:
        with self.lock:
            r.skipped += 1

    def ensure_file(self, r: _Replica, kind: str, data: bytes, same: bool) -> None:
        key = fmt.file_key(self.model, {"config": "config.json", "tokenizer": "tokenizer.json",
                                        "tokenizer_config": "tokenizer_config.json"}[kind])
        if same:
            self.skip(r)
        else:
            self.upload(r, kind, data, key)

    def ensure_expert(self, r: _Replica, ref: Ref, data: bytes, size: int, digest: str) -> None:
        if r.old is not None and r.old.blobs.get(ref) == (size, digest) and self.probe_experts(r, [ref]):
            self.skip(r)
            return
        layer, expert, precision = ref
        self.upload(r, "expert", data, fmt.expert_key(self.model, *ref), layer=layer, expert=expert,
                    precision=precision)

    def ensure_dense(self, r: _Replica, data: Any, size: int, digest: str) -> None:
        old = r.old
        if old is not None and (old.dense_size, old.dense_xxh3) == (size, digest) and self.probe_dense(r, size):
            self.skip(r)
            return
        self.upload(r, "dense", data, fmt.dense_key(self.model))

    def submit(self, replicas: list[_Replica], task, *args: Any) -> None:
        self.pending.append([(r, self.pool.submit(task, r, *args)) for r in replicas])

    def wait(self, keep: int = 0) -> None:
        """Wait until at most ``keep`` groups are in flight; the first failure raises, naming
        its replica."""
        while len(self.pending) > keep:
            for r, future in self.pending.pop(0):
                try:
                    future.result()
                except Exception as e:
                    raise self.replica_error(r, e) from None

    @staticmethod
    def replica_error(r: _Replica, e: BaseException) -> Exception:
        from .errors import StoreError, error_for_code

        if isinstance(e, StoreError):
            return error_for_code(e.code, f"replica {r.address}: {_one_line(e)}")
        return StoreError(f"replica {r.address}: {type(e).__name__}: {_one_line(e)}")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for r in self.replicas:
            r.client.close()  # cancels uploads still in flight after a failure


def pack_remote(
    checkpoint_dir: str | os.PathLike,
    target: str,
    model: str | None = None,
    precisions: Iterable[str] = ("bf16",),
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    placement: str = "all",
    token: str | None = None,
    tls_ca: Any = None,
    tls_cert: Any = None,
    tls_key: Any = None,
    tls_server_name: str | None = None,
    deadline_s: float = 30.0,
    discovery_timeout_s: float = 30.0,
    max_attempts: int | None = None,
    progress: bool = True,
    on_upload: Any = None,
) -> RemotePackResult:
    """Pack a MoE checkpoint into running store replicas over gRPC (PutBlob), as
    ``pack_checkpoint`` does into a directory: the same blobs, dense file, config, tokenizer and
    manifest, byte for byte.

    target: "grpc://h:p[,h:p]", "h:p[,h:p]", "dns:///host:port" or "k8s://ns/svc:port" (the
    ready set when the pack starts).

    placement: "all" (default) uploads every file to every replica: each replica holds the
    whole model and serves it alone, as a store directory packed locally would. "owner"
    uploads each expert blob and the dense file only to its rendezvous owner (the replica a
    StoreClient over the same address set fetches it from first): 1/N of the disk per replica,
    but no redundancy (a replica down makes its blobs unavailable) and only for a replica set
    that does not change; config, tokenizer and manifest still go to every replica, since
    each one needs them to serve.

    Order and visibility: config and tokenizer, the dense file, every expert blob, and last
    the manifest, to every replica, only once every replica accepted all of its files. The
    server makes an upload visible only when it is complete and its xxh3 matched, and a model
    is listed and served only once its manifest is there, so nothing of a failed pack is
    visible. Any replica failing (unreachable at the start or past the client's retry window
    later, or rejecting a file) stops the pack before any manifest is written, with an error
    naming that replica. Only a failure in the manifest step itself can leave some replicas
    with the new manifest and others without it; a re-run completes them.

    Resume: a replica that already serves this model (a manifest from an earlier pack, e.g. a
    re-run, or another precision) is not sent a file it already holds with the same size and
    xxh3: the manifest names them and a probe of the file's last byte has the server check
    the whole stored file first (``_RemotePack.probe_experts``). Without a manifest (a first
    pack that broke off) the protocol offers no way to see the files already uploaded, so they
    are uploaded again. Every blob is still quantized again (its xxh3 is what is compared).

    Memory: one expert's weights plus at most UPLOAD_WINDOW + 1 blobs, and the dense part once
    while its temp file (under $TMPDIR) is written; the dense file is uploaded from a memory
    map. Every RPC has a deadline: deadline_s, plus the size at MIN_TRANSFER_BYTES_PER_S for
    uploads and probes. on_upload(address, key) is called after each accepted upload."""
    import mmap

    from .client import GrpcStoreClient

    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    precisions = _check_pack_args(precisions, group_size)
    layout = read_checkpoint_layout(checkpoint_dir)
    model = fmt.validate_model_name(model) if model is not None else default_model_name(checkpoint_dir)
    addresses = resolve_replicas(target, discovery_timeout_s)
    replicas = []
    run = None
    try:
        for address in addresses:
            replicas.append(_Replica(address, GrpcStoreClient(
                [address], token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                tls_server_name=tls_server_name, deadline_s=deadline_s, max_streams=UPLOAD_WINDOW + 1,
                max_attempts=max_attempts, target=address)))
        run = _RemotePack(model, replicas, placement, deadline_s, on_upload)
        run.preflight()

        # config first (the server checks expert indices against it), then the tokenizer files
        tokenizer, tokenizer_config = _tokenizer_files(layout)
        for kind, data in (("config", layout.config_bytes), ("tokenizer", tokenizer),
                           ("tokenizer_config", tokenizer_config)):
            if data is None:
                continue
            for r in replicas:
                held = None if r.old is None else {
                    "config": lambda m: m.config_json.encode(), "tokenizer": lambda m: bytes(m.tokenizer_json),
                    "tokenizer_config": lambda m: m.tokenizer_config_json.encode()}[kind](r.old)
                run.submit([r], run.ensure_file, kind, data, held == data)
        run.wait()

        with _dense_file(layout, None) as (path, dense_size, dense_xxh3):
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                holders = run.holders(fmt.dense_key(model))
                log.info("dense.safetensors (%.1f MB) -> %s", dense_size / 1e6, ", ".join(r.address for r in holders))
                run.submit(holders, run.ensure_dense, mapped, dense_size, dense_xxh3)
                run.wait()
            finally:
                try:
                    mapped.close()
                except BufferError:  # a finished upload's view not yet collected: the GC unmaps it
                    pass

        blobs: dict[Ref, BlobEntry] = {}
        total = len(layout.expert_layers) * layout.num_experts * len(precisions)
        desc = f"pack {model} -> {len(replicas)} replica{'s' if len(replicas) > 1 else ''}"
        with tqdm(total=total, unit="blob", desc=desc, disable=not progress) as bar:
            for layer in layout.expert_layers:
                for expert in range(layout.num_experts):
                    weights = layout.expert_tensors(layer, expert)
                    for precision in precisions:
                        data = expert_to_blob(model, layer, expert, precision, weights, group_size=group_size)
                        entry = blobs[(layer, expert, precision)] = _blob_entry(data)
                        run.submit(run.holders(fmt.expert_key(model, layer, expert, precision)), run.ensure_expert,
                                   (layer, expert, precision), data, entry.size, entry.xxh3)
                        del data
                        run.wait(keep=UPLOAD_WINDOW)
                        bar.update(1)
                        bar.set_postfix_str(f"{sum(r.bytes for r in replicas) / 1e6:.1f} MB sent", refresh=False)
                    del weights
            run.wait()

        manifest = _build_manifest(layout, model, precisions, group_size, blobs, dense_size, dense_xxh3, tokenizer,
                               tokenizer_config)
        manifest = _merge_remote(run, manifest)
        data = manifest.to_json()
        # last, to every replica: every one of them has accepted all of its files by now
        key = fmt.file_key(model, "manifest.json")
        run.submit(replicas, run.upload, "manifest", data, key)
        run.wait()
    finally:
        if run is not None:
            run.close()
        else:
            for r in replicas:
                r.client.close()
    result = RemotePackResult(
        model=model, manifest=manifest, replicas=addresses, placement=placement,
        uploaded={r.address: r.uploaded for r in replicas}, skipped={r.address: r.skipped for r in replicas},
        bytes_uploaded=sum(r.bytes for r in replicas))
    log.info("packed %s into %s (placement %s): %d files uploaded (%d bytes), %d already there",
             model, ", ".join(addresses), placement, sum(result.uploaded.values()), result.bytes_uploaded,
             sum(result.skipped.values()))
    return result


def _merge_remote(run: _RemotePack, manifest: Manifest) -> Manifest:
    """_merge_previous for replicas: keep a precision an earlier pack left (named by the first
    replica's manifest that has the model) when every replica that must hold each of its blobs
    lists it with the same size and xxh3 and serves it (probe). The manifest is the same on
    every replica. The served manifest carries no checkpoint shapes: config.json's
    hidden_size/intermediate_size stand in for them."""
    old = next((r.old for r in run.replicas if r.old is not None), None)
    if old is None:
        return manifest
    old = replace(old, hidden_size=old.config.get("hidden_size"), intermediate_size=old.config.get("intermediate_size"))
    extras = _extra_precisions(manifest, old)
    if not extras:
        return manifest
    kept = {}
    for precision, entries in extras.items():
        need: dict[str, list[Ref]] = defaultdict(list)
        ok = True
        for ref, b in entries.items():
            for r in run.holders(fmt.expert_key(manifest.model, *ref)):
                if r.old is None or r.old.blobs.get(ref) != b:
                    ok = False
                need[r.address].append(ref)
        if ok:
            for r in run.replicas:
                if need[r.address] and len(run.probe_experts(r, need[r.address])) != len(need[r.address]):
                    ok = False
                    break
        if ok:
            kept[precision] = entries
        else:
            log.warning("dropping %s from %s's manifest: not every replica still holds all of its blobs",
                        precision, manifest.model)
    return _add_precisions(manifest, kept)
