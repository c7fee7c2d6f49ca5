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

What a checkpoint may look like, and how it is read: ``expert_store.checkpoint``.

Memory stays bounded by one expert plus one copy of the dense part (small next to the experts).
Re-running skips every blob already in the store whose seal verifies and whose
header matches (resumable).

``pack_remote(checkpoint_dir, "grpc://h1:p1,h2:p2" | "dns:///h:p" | "k8s://ns/svc:p", ...)``
(``expert_store.remote_pack``, exported here too) packs the same files, byte for byte, into running store replicas over PutBlob (``expert-store pack
--store grpc://...``): by default every file to every replica (each replica holds the whole
model, as the k8s deployment runs them), or with ``placement="owner"`` each blob only to its
rendezvous owner; the manifest goes last, to every replica, only after every replica accepted
all of its files, so a failed pack leaves no model visible anywhere. A re-run skips the files a
replica already serves with the same size and xxh3 (see ``pack_remote``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from tqdm.auto import tqdm

from . import format as fmt
from .checkpoint import (CheckpointError, CheckpointLayout, NotMixtralCheckpointError, UnsupportedCheckpointError,
                         CHUNK_BYTES, check_pack_args, default_model_name, dense_file, expert_shapes, file_checksum,
                         pack_manifest, read_checkpoint_layout, tokenizer_files)
from .errors import DataLoss
from .format import BlobError
from .manifest import MANIFEST_FORMAT, BlobEntry, Manifest, Ref
from .quant import DEFAULT_GROUP_SIZE, expert_to_blob
from .remote_pack import PLACEMENTS, RemotePackResult, pack_remote, resolve_replicas

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
    "pack_remote",
    "RemotePackResult",
    "resolve_replicas",
    "PLACEMENTS",
]

log = logging.getLogger(__name__)


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


def _stored_checksum(store: _Store, key: str) -> str | None:
    """xxh3-128 of what the store holds under ``key`` (streamed from the file when the store
    is an NVMe directory), None when absent."""
    if not store.contains(key):
        return None
    src = _source(store)
    path = src.path(key) if hasattr(src, "path") else None
    if path is not None and path.is_file():
        return file_checksum(path)
    data = src.get(key)
    return None if data is None else fmt.blob_checksum(data)


def _pack_dense(layout: CheckpointLayout, store: _Store, model: str, result: PackResult) -> tuple[int, str]:
    """Write dense.safetensors; return (size, xxh3).  The tensors go to a temp file (next to the
    store when it is a directory, so it is disk and not tmpfs) and are freed before the file
    is streamed into the store: peak memory is one copy of the dense part."""
    key = fmt.dense_key(model)
    src = _source(store)
    with dense_file(layout, getattr(src, "root", None)) as (path, size, checksum):
        if _stored_checksum(store, key) == checksum:
            return size, checksum
        streamable = hasattr(src, "writer") and (src is store or hasattr(store, "invalidate"))
        if streamable:  # NvmeTier, or a TieredStore's NVMe tier: atomic streamed write
            with src.writer(key) as w, open(path, "rb", buffering=0) as f:
                while chunk := f.read(CHUNK_BYTES):
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
    codec: str = "auto",
) -> PackResult:
    """Pack a MoE checkpoint into ``store`` (anything with ``get/put/contains`` by key:
    ``NvmeTier``, ``TieredStore``).  Raises :class:`UnsupportedCheckpointError` (also known as
    ``NotMixtralCheckpointError``) for models of other families,
    :class:`CheckpointError` for broken checkpoints, ValueError for bad arguments."""
    precisions = check_pack_args(precisions, group_size)
    layout = read_checkpoint_layout(checkpoint_dir)
    model = fmt.validate_model_name(model) if model is not None else default_model_name(checkpoint_dir)
    result = PackResult(model=model, manifest=None)

    # small files first, manifest last: a store without manifest.json holds no usable model
    _put_file(store, fmt.file_key(model, "config.json"), layout.config_bytes, result)
    tokenizer, tokenizer_config = tokenizer_files(layout)
    if tokenizer is not None:
        _put_file(store, fmt.file_key(model, "tokenizer.json"), tokenizer, result)
    if tokenizer_config is not None:
        _put_file(store, fmt.file_key(model, "tokenizer_config.json"), tokenizer_config, result)
    dense_size, dense_xxh3 = _pack_dense(layout, store, model, result)

    shapes = expert_shapes(layout)
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
                    blobs[(layer, expert, precision)] = BlobEntry.of(data)
                    result.blobs_skipped += 1
                    bar.update(1)
                if not pending:
                    continue
                weights = layout.expert_tensors(layer, expert)
                for precision, key in pending:
                    data = expert_to_blob(model, layer, expert, precision, weights, group_size=group_size,
                                          codec=codec)
                    _put(store, key, data)
                    blobs[(layer, expert, precision)] = BlobEntry.of(data)
                    result.blobs_written += 1
                    result.bytes_written += len(data)
                    bar.update(1)
                    del data
                del weights

    manifest = pack_manifest(layout, model, precisions, group_size, blobs, dense_size, dense_xxh3, tokenizer,
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
    extras = manifest.older_precisions(old)
    kept = {
        p: entries for p, entries in extras.items()
        if all(store.contains(fmt.expert_key(manifest.model, *ref)) for ref in entries)
    }
    return manifest.with_precisions(kept) if kept else manifest
