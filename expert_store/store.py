"""ModelStore: the store's logic over a TieredStore, bytes only (no torch).

The gRPC server wraps it; the client uses it in-process for a local store directory.
Layout of a store directory (NvmeTier root), per model (keys from ``expert_store.format``):

    models/<model>/manifest.json              written by pack (see below)
    models/<model>/config.json                HF config, verbatim
    models/<model>/tokenizer.json             optional
    models/<model>/tokenizer_config.json      optional (the chat template)
    models/<model>/profile.json               optional calibration profile
    models/<model>/dense.safetensors          every non-expert tensor
    models/<model>/experts/L000/E000.bf16.blob

manifest.json is ``expert_store.manifest.Manifest`` (its ``from_json`` says what is read).

Integrity: every expert blob and the dense file is checked before it is served (size and
xxh3 against the manifest, else the blob's own seal via ``format.check_blob``). A copy that
fails is dropped from RAM/Redis and the next tier is tried; when no tier has a good copy the
call raises DataLoss.

On request (the Verify RPC; ``verify_expert``/``verify_dense``) one blob's copies in every
tier are checked again in full, whatever was remembered, and a bad copy is removed: the
NVMe file too, which takes the cached copies with it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Protocol

import xxhash

from expert_store import format as blob_format
from expert_store.errors import DataLoss, InvalidArgument, NotFound, StoreError
from expert_store.manifest import EXPERT_FILE_RE, Manifest
from expert_store.tiers import MemoryTier, NvmeTier, RedisTier, TieredStore
from expert_store.tiers.base import BlobReader, BufferReader, SourceTier, check_offset
from expert_store.tiers.nvme import READ_BLOCK_BYTES
from expert_store.wire import PUT_KINDS

DEFAULT_RAM_BYTES = 256 << 20
DEFAULT_CHUNK_BYTES = 1 << 20
# Files larger than this are streamed from NVMe in chunks (ranged serving, see
# tiers.nvme.NvmeRangeReader); files up to this size are read whole, checked and promoted into RAM/Redis.
DEFAULT_STREAM_ABOVE_BYTES = 16 << 20
MAX_INDEX = 999  # what format.expert_key accepts
log = logging.getLogger(__name__)

_FILE_OF_KIND = {
    "config": "config.json",
    "tokenizer": "tokenizer.json",
    "tokenizer_config": "tokenizer_config.json",  # its chat_template renders chat requests
    "profile": "profile.json",
    "manifest": "manifest.json",
}


def _xxh3(data) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def _check_int(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{what} must be an integer, got {value!r}")
    if value < 0:
        raise InvalidArgument(f"{what} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class VerifyResult:
    """What ModelStore.verify_expert/verify_dense found (the VerifyResponse message)."""

    key: str
    good: bool      # every copy found passed the full check
    dropped: bool   # some copy was removed
    detail: str     # per tier: what was found and done


def _check_digest(n: int, hexdigest: Callable[[], str], size: int, digest: str) -> None:
    """DataLoss unless n bytes with this xxh3 match the manifest's (size, xxh3); 0 / "" = unlisted."""
    if size and n != size:
        raise DataLoss(f"size {n} != manifest size {size}")
    if digest and hexdigest() != digest:
        raise DataLoss("xxh3 does not match the manifest")


def _check_file_digest(f: Any, size: int, digest: str) -> None:
    """Hash an open file in READ_BLOCK_BYTES blocks against (size, xxh3); DataLoss if not."""
    h = xxhash.xxh3_128()
    n = 0
    while True:
        block = f.read(READ_BLOCK_BYTES)
        if not block:
            break
        h.update(block)
        n += len(block)
    _check_digest(n, h.hexdigest, size, digest)


class ServedStore(Protocol):
    """What ExpertStoreServicer serves from: ModelStore, or a co-located store's read-through
    face (arena_publisher.ReadThroughStore, which refuses writes and Verify)."""

    def models(self) -> list[str]: ...

    def manifest(self, model: str) -> Manifest: ...

    def check_ref(self, model: str, layer: Any, expert: Any, precision: Any) -> Any: ...

    def open_expert(self, model: str, layer: int, expert: int, precision: str, offset: int = 0,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> BlobReader: ...

    def open_dense(self, model: str, offset: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> BlobReader: ...

    def put_file(self, model: str, kind: str, data: Any, xxh3: str, *, layer: int = 0, expert: int = 0,
                 precision: str = "", cache: bool = False) -> tuple[str, int]: ...

    def verify_expert(self, model: str, layer: int, expert: int, precision: str) -> VerifyResult: ...

    def verify_dense(self, model: str) -> VerifyResult: ...

    def stats(self) -> dict[str, dict]: ...


class ModelStore:
    def __init__(self, tiered: TieredStore, stream_above_bytes: int = DEFAULT_STREAM_ABOVE_BYTES) -> None:
        self.tiered = tiered
        self.stream_above_bytes = int(stream_above_bytes)
        self.nvme: SourceTier = tiered.nvme  # the source of truth; RAM/Redis are reached through tiered
        self._index_lock = threading.Lock()
        self._index: dict[str, tuple[tuple, Manifest]] = {}

    @classmethod
    def open(
        cls,
        store_dir: str | os.PathLike,
        redis_url: str | None = None,
        ram_bytes: int = DEFAULT_RAM_BYTES,
        stream_above_bytes: int = DEFAULT_STREAM_ABOVE_BYTES,
        **redis_options: Any,
    ) -> "ModelStore":
        """A store over the directory ``store_dir`` (created if missing), with a Redis
        tier when ``redis_url`` is given (``redis://``, ``rediss://``, ``redis+cluster://``;
        ``redis_options`` go to RedisTier) and a RAM LRU of ``ram_bytes`` (0 = none).
        Files above ``stream_above_bytes`` are served by ranged reads (open_expert)."""
        nvme = NvmeTier(store_dir)
        redis = RedisTier(redis_url, **redis_options) if redis_url else None
        memory = MemoryTier(ram_bytes) if ram_bytes and ram_bytes > 0 else None
        return cls(TieredStore(nvme, redis=redis, memory=memory), stream_above_bytes=stream_above_bytes)

    @property
    def root(self) -> Path:
        return self.nvme.root

    # -- validation ----------------------------------------------------------------------
    @staticmethod
    def _model_name(model: Any) -> str:
        try:
            return blob_format.validate_model_name(model)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

    @staticmethod
    def _precision(precision: Any) -> str:
        if precision not in blob_format.PRECISIONS:
            raise InvalidArgument(f"unknown precision {precision!r}; expected one of {blob_format.PRECISIONS}")
        return precision

    # -- reading the model index -----------------------------------------------------------
    def _read_small(self, model: str, name: str) -> bytes | None:
        """A metadata file straight from NVMe (not counted as a blob read)."""
        return self.nvme.read_range(blob_format.file_key(model, name))

    def _read_json(self, model: str, name: str) -> dict | None:
        data = self._read_small(model, name)
        if data is None:
            return None
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataLoss(f"{model}/{name} is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise DataLoss(f"{model}/{name} is not a JSON object")
        return value

    def _signature(self, model: str) -> tuple | None:
        """What the cached index of ``model`` depends on: its manifest.json and config.json files."""
        manifest = self.nvme.signature(blob_format.file_key(model, "manifest.json"))
        if manifest is None:
            return None
        return manifest, self.nvme.signature(blob_format.file_key(model, "config.json"))

    def _model_index(self, model: Any) -> Manifest:
        model = self._model_name(model)
        sig = self._signature(model)
        if sig is None:
            raise NotFound(f"model {model!r} not found in {self.root}")
        with self._index_lock:
            cached = self._index.get(model)
        if cached is not None and cached[0] == sig:
            return cached[1]
        index = self._parse_index(model)
        with self._index_lock:
            self._index[model] = (sig, index)
        return index

    def _parse_index(self, model: str) -> Manifest:
        raw = self._read_json(model, "manifest.json")
        if raw is None:
            raise NotFound(f"model {model!r} not found in {self.root}")
        self._read_json(model, "config.json")  # DataLoss when it does not parse
        config_json = (self._read_small(model, "config.json") or b"").decode("utf-8", "replace")
        return Manifest.from_json(model, raw, config_json)

    # -- queries -------------------------------------------------------------------------
    def models(self) -> list[str]:
        """Names of the models that have a manifest, sorted."""
        return [name for name in self._model_dirs()
                if self.nvme.contains(blob_format.file_key(name, "manifest.json"))]

    def _model_dirs(self) -> Iterator[str]:
        """Top-level NVMe directories named like a model (what a pack writes into)."""
        for name in self.nvme.children(""):
            try:
                blob_format.validate_model_name(name)
            except ValueError:
                continue
            yield name

    def has_model(self, model: str) -> bool:
        try:
            self._model_index(model)
        except NotFound:
            return False
        return True

    def manifest(self, model: str) -> Manifest:
        """The model's manifest with the files served beside it (``.to_proto()`` is the
        ``adapmoe.v1.Manifest`` message GetManifest answers)."""
        index = self._model_index(model)

        def text(name: str) -> str:
            return (self._read_small(index.model, name) or b"").decode("utf-8", "replace")

        return replace(
            index,
            tokenizer_json=self._read_small(index.model, "tokenizer.json") or b"",
            tokenizer_config_json=text("tokenizer_config.json"),
            profile_json=text("profile.json"),
            dense_size=index.dense_size or self.nvme.size(blob_format.dense_key(index.model)) or 0,
        )

    def check_ref(self, model: str, layer: Any, expert: Any, precision: Any) -> str:
        """Validate one expert reference against the model; returns its store key.
        InvalidArgument for bad names/indices/precisions, NotFound for an unknown model or
        a precision the model was not packed at."""
        return self._ref(model, layer, expert, precision)[1]

    def _ref(self, model: str, layer: Any, expert: Any, precision: Any) -> tuple[Manifest, str]:
        model = self._model_name(model)
        precision = self._precision(precision)
        layer = _check_int("layer", layer)
        expert = _check_int("expert", expert)
        index = self._model_index(model)
        if layer >= index.num_layers:
            raise InvalidArgument(f"layer {layer} out of range: {model} has {index.num_layers} layers")
        if expert >= index.num_experts:
            raise InvalidArgument(f"expert {expert} out of range: {model} has {index.num_experts} experts per layer")
        if index.precisions and precision not in index.precisions:
            raise NotFound(f"{model} was not packed at precision {precision!r} (has {', '.join(index.precisions)})")
        return index, blob_format.expert_key(model, layer, expert, precision)

    def _expert_check(self, index: Manifest, layer: int, expert: int, precision: str) -> tuple[Any, tuple]:
        """(validator, token) of one expert blob: TieredStore.get's check and its name."""
        expected = index.blobs.get((layer, expert, precision))
        if expected is not None and expected[1]:
            token = ("xxh3", expected[0], expected[1])
        else:
            token = ("seal", index.model, layer, expert, precision)
        return self._expert_validator(index, layer, expert, precision), token

    def _expert_validator(self, index: Manifest, layer: int, expert: int, precision: str):
        expected = index.blobs.get((layer, expert, precision))

        def validate(data: bytes) -> None:
            if expected is not None and expected[1]:
                size, digest = expected
                if len(data) != size:
                    raise DataLoss(f"size {len(data)} != manifest size {size}")
                if _xxh3(data) != digest:
                    raise DataLoss("xxh3 does not match the manifest")
                return
            try:
                header = blob_format.check_blob(data)
            except blob_format.BlobError as exc:
                raise DataLoss(f"corrupt blob: {exc}") from None
            if (header.model, header.layer, header.expert, header.precision) != (index.model, layer, expert, precision):
                raise DataLoss(
                    f"blob header is for {header.model} L{header.layer} E{header.expert} {header.precision}"
                )

        return validate

    def expert_blob(self, model: str, layer: int, expert: int, precision: str) -> bytes:
        """The encoded blob of one expert, checked before it is returned."""
        index, key = self._ref(model, layer, expert, precision)
        validate, token = self._expert_check(index, layer, expert, precision)
        data = self.tiered.get(key, validate=validate, token=token)
        if data is None:
            raise NotFound(f"no blob for {model} layer {layer} expert {expert} at {precision}")
        return data

    def expert_into(self, model: str, layer: int, expert: int, precision: str, out: memoryview) -> memoryview:
        """expert_blob into ``out`` (a writable byte view): a checked RAM/Redis copy is copied,
        else the file is read straight into ``out`` and checked there (once while the file is
        unchanged, as expert_blob does) and not promoted: the caller's buffer is the cache (a
        co-located store's arena slot). Returns the view of the blob in ``out``."""
        index, key = self._ref(model, layer, expert, precision)
        validate, token = self._expert_check(index, layer, expert, precision)
        cached = self.tiered.get_cached(key, validate=validate, token=token)
        if cached is not None:
            if len(cached) > len(out):
                raise InvalidArgument(f"out holds {len(out)} bytes; the blob has {len(cached)}")
            out[:len(cached)] = cached
            return out[:len(cached)]
        got = self.nvme.read_into(key, out)
        if got is None:
            raise NotFound(f"no blob for {model} layer {layer} expert {expert} at {precision}")
        n, signature = got
        view = out[:n]
        if signature is None or not self.nvme.checked(key, signature, token):
            try:
                validate(view)
            except Exception as exc:  # noqa: BLE001 - any rejection means a bad copy
                self.tiered.note_corrupt()
                log.warning("bad copy of %s in the nvme tier: %s", key, exc)
                raise DataLoss(f"no good copy of {key}: nvme: {exc}") from None
            if signature is not None:
                self.nvme.mark_checked(key, signature, token)
        return view

    def expert_size(self, model: str, layer: int, expert: int, precision: str) -> int:
        """Size of an expert blob (from the manifest, else the file) without reading it."""
        index, key = self._ref(model, layer, expert, precision)
        entry = index.blobs.get((layer, expert, precision))
        if entry is not None:
            return entry[0]
        size = self.nvme.size(key)
        if size is None:
            raise NotFound(f"no blob for {model} layer {layer} expert {expert} at {precision}")
        return size

    def dense(self, model: str) -> bytes:
        """The safetensors bytes of the model's dense part, checked against the manifest."""
        index = self._model_index(model)
        key = blob_format.dense_key(index.model)

        def validate(data: bytes) -> None:
            if index.dense_size and len(data) != index.dense_size:
                raise DataLoss(f"size {len(data)} != manifest dense_size {index.dense_size}")
            if index.dense_xxh3 and _xxh3(data) != index.dense_xxh3:
                raise DataLoss("xxh3 does not match the manifest's dense_xxh3")

        token = ("xxh3", index.dense_size, index.dense_xxh3) if index.dense_size or index.dense_xxh3 else None
        data = self.tiered.get(key, validate=validate, token=token)
        if data is None:
            raise NotFound(f"{index.model} has no dense weights")
        return data

    # -- ranged serving --------------------------------------------------------------------
    def open_expert(self, model: str, layer: int, expert: int, precision: str, offset: int = 0,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> BlobReader:
        """A BlobReader over one expert blob from ``offset``: what FetchExperts streams.

        Blobs up to ``stream_above_bytes`` (or without a manifest xxh3) are read whole
        (expert_blob: checked, promoted into RAM/Redis). Larger ones come from RAM/Redis when
        a checked copy is cached there, else are streamed from NVMe chunk by chunk
        (tiers.nvme.NvmeRangeReader: checked against the manifest's xxh3 before the last chunk), so a
        stream holds a few chunks, not the blob. Streamed blobs are not promoted (that would
        need the whole blob in memory); the page cache serves repeats."""
        index, key = self._ref(model, layer, expert, precision)
        entry = index.blobs.get((layer, expert, precision))
        if entry is None or not entry[1] or entry[0] <= self.stream_above_bytes:
            data = self.expert_blob(model, layer, expert, precision)
            return BufferReader(data, offset, chunk_bytes, "whole")
        size, digest = entry
        return self._open_ranged(key, size, digest, self._expert_validator(index, layer, expert, precision),
                                 offset, chunk_bytes)

    def open_dense(self, model: str, offset: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> BlobReader:
        """A BlobReader over the dense safetensors (as open_expert; the manifest's dense_size
        and dense_xxh3 are the check). A Mixtral dense part is ~3 GB: always worth ranging."""
        index = self._model_index(model)
        if not index.dense_xxh3 or not index.dense_size or index.dense_size <= self.stream_above_bytes:
            return BufferReader(self.dense(model), offset, chunk_bytes, "whole")
        key = blob_format.dense_key(index.model)

        def validate(data: bytes) -> None:
            if len(data) != index.dense_size or _xxh3(data) != index.dense_xxh3:
                raise DataLoss("size/xxh3 do not match the manifest's dense entry")

        return self._open_ranged(key, index.dense_size, index.dense_xxh3, validate, offset, chunk_bytes)

    def _open_ranged(self, key: str, size: int, digest: str, validate, offset: int, chunk_bytes: int) -> BlobReader:
        check_offset(offset, size)
        # the token of a size+xxh3 check is the same as expert_blob's, so a copy checked by
        # either path counts for both
        data = self.tiered.get_cached(key, validate=validate, token=("xxh3", size, digest))
        if data is not None:
            return BufferReader(data, offset, chunk_bytes, "cached")
        reader = self.nvme.open_range(key, size, digest, offset, chunk_bytes, on_corrupt=self.tiered.note_corrupt)
        if reader is None:
            raise NotFound(f"no file for {key}")
        return reader

    def read_file(self, model: str, name: str) -> bytes | None:
        """config.json / tokenizer.json / profile.json / manifest.json bytes, or None."""
        model = self._model_name(model)
        try:
            key = blob_format.file_key(model, name)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return self.nvme.read_range(key)

    # -- writing -------------------------------------------------------------------------
    def put_file(
        self,
        model: str,
        kind: str,
        data,
        xxh3: str,
        *,
        layer: int = 0,
        expert: int = 0,
        precision: str = "",
        cache: bool = False,
    ) -> tuple[str, int]:
        """Store one file of a model (PutBlob): ``kind`` is one of PUT_KINDS. Checks, in
        order, the name, the kind, the checksum of ``data`` against ``xxh3`` (DataLoss on
        mismatch) and the content (an expert must be a well-formed blob for exactly this
        model/layer/expert/precision, JSON files must parse), all before anything becomes
        visible; then writes atomically. Returns (key, size)."""
        model = self._model_name(model)
        if kind not in PUT_KINDS:
            raise InvalidArgument(f"unknown kind {kind!r}; expected one of {PUT_KINDS}")
        if not isinstance(xxh3, str) or not xxh3:
            raise InvalidArgument("xxh3 of the payload is required")
        view = memoryview(data).cast("B")
        if _xxh3(view) != xxh3.lower():
            raise DataLoss(f"checksum mismatch for {model} {kind}: payload does not match the given xxh3")
        if kind == "expert":
            precision = self._precision(precision)
            layer = _check_int("layer", layer)
            expert = _check_int("expert", expert)
            if layer > MAX_INDEX or expert > MAX_INDEX:
                raise InvalidArgument(f"layer/expert must be <= {MAX_INDEX}")
            self._check_put_range(model, layer, expert)
            try:
                header = blob_format.check_blob(view)
            except blob_format.BlobError as exc:
                raise InvalidArgument(f"malformed expert blob: {exc}") from None
            if (header.model, header.layer, header.expert, header.precision) != (model, layer, expert, precision):
                raise InvalidArgument(
                    f"blob header is for {header.model} L{header.layer} E{header.expert} {header.precision}, "
                    f"not {model} L{layer} E{expert} {precision}"
                )
            key = blob_format.expert_key(model, layer, expert, precision)
        elif kind == "dense":
            key = blob_format.dense_key(model)
        else:
            name = _FILE_OF_KIND[kind]
            if kind != "tokenizer" or len(view):
                try:
                    value = json.loads(bytes(view))
                except (ValueError, UnicodeDecodeError) as exc:
                    raise InvalidArgument(f"{name} is not valid JSON: {exc}") from None
                if not isinstance(value, dict):
                    raise InvalidArgument(f"{name} must be a JSON object")
                if kind == "manifest" and value.get("model", model) != model:
                    raise InvalidArgument(f"manifest names model {value.get('model')!r}, not {model!r}")
            key = blob_format.file_key(model, name)
        self.tiered.put(key, view, cache=cache and kind in ("expert", "dense"))
        if kind in ("manifest", "config"):
            with self._index_lock:
                self._index.pop(model, None)
        return key, len(view)

    def _check_put_range(self, model: str, layer: int, expert: int) -> None:
        try:
            index = self._model_index(model)
            num_layers, num_experts = index.num_layers, index.num_experts
        except NotFound:
            try:
                config = self._read_json(model, "config.json") or {}
            except DataLoss:
                config = {}
            num_layers = int(config.get("num_hidden_layers", 0) or 0)
            num_experts = int(config.get("num_local_experts", 0) or 0)
        if num_layers and layer >= num_layers:
            raise InvalidArgument(f"layer {layer} out of range: {model} has {num_layers} layers")
        if num_experts and expert >= num_experts:
            raise InvalidArgument(f"expert {expert} out of range: {model} has {num_experts} experts per layer")

    # -- maintenance ---------------------------------------------------------------------
    def _models_arg(self, model: str | None) -> list[str]:
        if model is None:
            return self.models()
        model = self._model_name(model)
        if not self.nvme.children(model):
            raise NotFound(f"model {model!r} not found in {self.root}")
        return [model]

    def verify_details(self, model: str | None = None, progress: bool = False) -> list[tuple[str, str]]:
        """Check every file of the model(s) on NVMe (the source of truth, caches ignored):
        manifest and config parse, every manifest blob exists with the recorded size and
        xxh3 and a sound header for its own ref, every other blob file is well formed, the
        dense file matches. Returns [(key, reason)] of what is bad."""
        bad: list[tuple[str, str]] = []
        for name in self._models_arg(model):
            try:
                index = self._parse_index(name)
            except StoreError as exc:
                bad.append((blob_format.file_key(name, "manifest.json"), str(exc)))
                continue
            try:
                self._read_json(name, "config.json")
            except DataLoss as exc:
                bad.append((blob_format.file_key(name, "config.json"), str(exc)))
            for fname, digest in (("config.json", index.config_xxh3), ("tokenizer.json", index.tokenizer_xxh3),
                                  ("tokenizer_config.json", index.tokenizer_config_xxh3)):
                if digest:
                    fkey = blob_format.file_key(name, fname)
                    fdata = self._read_small(name, fname)
                    if fdata is None:
                        bad.append((fkey, "missing"))
                    elif _xxh3(fdata) != digest:
                        bad.append((fkey, "xxh3 mismatch"))
            keys = [k for k in self.nvme.keys(f"{name}/experts/")]
            listed = {blob_format.expert_key(name, *ref) for ref in index.blobs}
            todo: list[tuple[str, tuple[int, int, str] | None]] = [
                (blob_format.expert_key(name, *ref), ref) for ref in sorted(index.blobs)
            ]
            todo += [(k, None) for k in keys if k not in listed]
            items: Iterable = todo
            if progress:
                from tqdm import tqdm

                items = tqdm(todo, desc=f"verify {name}", unit="blob")
            for key, ref in items:
                reason = self._verify_blob(index, key, ref)
                if reason:
                    bad.append((key, reason))
            dkey = blob_format.dense_key(name)
            data = self.nvme.read_range(dkey)
            if data is None:
                if index.dense_size or index.dense_xxh3:
                    bad.append((dkey, "missing"))
            elif index.dense_size and len(data) != index.dense_size:
                bad.append((dkey, f"size {len(data)} != manifest {index.dense_size}"))
            elif index.dense_xxh3 and _xxh3(data) != index.dense_xxh3:
                bad.append((dkey, "xxh3 mismatch"))
        return bad

    def _verify_blob(self, index: Manifest, key: str, ref: tuple[int, int, str] | None) -> str | None:
        data = self.nvme.read_range(key)
        if data is None:
            return "missing"
        if ref is None:
            m = EXPERT_FILE_RE.match(key[len(f"{index.model}/experts/"):])
            if m is None:
                return "unexpected file"
            ref = (int(m.group(1)), int(m.group(2)), m.group(3))
        else:
            size, digest = index.blobs[ref]
            if len(data) != size:
                return f"size {len(data)} != manifest {size}"
            if digest and _xxh3(data) != digest:
                return "xxh3 mismatch"
        try:
            header = blob_format.check_blob(data)
        except blob_format.BlobError as exc:
            return f"corrupt blob: {exc}"
        if (header.model, header.layer, header.expert, header.precision) != (index.model, *ref):
            return f"header is for {header.model} L{header.layer} E{header.expert} {header.precision}"
        return None

    # -- one blob, on request (the Verify RPC) ------------------------------------------------
    def verify_expert(self, model: str, layer: int, expert: int, precision: str) -> "VerifyResult":
        """Check every stored copy of one expert blob fully, now: the manifest's size and
        xxh3 (when it lists the blob) and the blob's own seal and header (format.check_blob),
        whatever was remembered as checked before. A bad copy is removed from its tier; a bad
        NVMe file (the source of truth) takes every copy with it, so the blob is then
        NOT_FOUND here and a resumed pack uploads it again. InvalidArgument for a bad ref,
        NotFound for an unknown model or a blob no tier holds."""
        index, key = self._ref(model, layer, expert, precision)
        expected = index.blobs.get((layer, expert, precision))
        seal = self._expert_validator(replace(index, blobs={}), layer, expert, precision)

        def check(data: bytes) -> None:
            if expected is not None:
                _check_digest(len(data), lambda: _xxh3(data), *expected)
            seal(data)

        _, token = self._expert_check(index, layer, expert, precision)
        return self._verify_key(key, check, token)

    def verify_dense(self, model: str) -> "VerifyResult":
        """As verify_expert, for the model's dense file: its size and xxh3 against the
        manifest (the NVMe file is hashed in blocks, never held whole). Without a manifest
        size/xxh3 there is nothing to check against: present copies count as good."""
        index = self._model_index(model)
        key = blob_format.dense_key(index.model)
        size, digest = index.dense_size, index.dense_xxh3

        def check(data: bytes) -> None:
            _check_digest(len(data), lambda: _xxh3(data), size, digest)

        token = ("xxh3", size, digest) if size or digest else None
        return self._verify_key(key, check, token, stream_check=(size, digest))

    def _verify_key(self, key: str, check, token: Any, stream_check: tuple[int, str] | None = None) -> "VerifyResult":
        """Re-read ``key`` from NVMe, then RAM and Redis, run ``check`` on each copy (for
        NVMe with ``stream_check`` = (size, xxh3): hashed in blocks instead), drop the
        stale "checked" marks and remove what fails (see verify_expert)."""
        tiered = self.tiered
        notes: list[str] = []
        found = bad = dropped = False
        nvme_bad = False

        def check_file(f: BinaryIO) -> None:
            if stream_check is not None:
                _check_file_digest(f, *stream_check)
            else:
                check(f.read())

        rechecked = self.nvme.recheck(key, check_file, token)
        if rechecked is not None:
            found = True
            reason, removed = rechecked
            if reason is None:
                notes.append("nvme: good")
            else:
                bad = nvme_bad = True
                tiered.note_corrupt()
                dropped = dropped or removed
                notes.append(f"nvme: bad ({reason}), " + ("file removed" if removed else "already replaced"))
                log.warning("verify %s: nvme copy is bad (%s)%s", key, reason, ", removed" if removed else "")
        for tier in (tiered.memory, tiered.redis):
            if tier is None:
                continue
            data = tier.get_entry(key)[0] if tier is tiered.memory else tier.get(key)
            if data is None:
                continue
            found = True
            if nvme_bad:  # the source of truth is gone: no copy of it stays
                tier.delete(key)
                dropped = True
                notes.append(f"{tier.name}: copy removed with the nvme file")
                continue
            try:
                check(data)
            except Exception as exc:  # noqa: BLE001
                bad = dropped = True
                tiered.note_corrupt()
                tier.delete(key)
                notes.append(f"{tier.name}: bad ({exc}), removed")
                log.warning("verify %s: %s copy is bad (%s), removed", key, tier.name, exc)
                continue
            if tier is tiered.memory and token is not None:
                tier.mark_verified(key, data, token)
            notes.append(f"{tier.name}: good")
        if not found:
            raise NotFound(f"no copy of {key} in any tier")
        return VerifyResult(key=key, good=not bad, dropped=dropped, detail="; ".join(notes))

    def verify(self, model: str | None = None, progress: bool = False) -> list[str]:
        """Keys of every bad or missing file (see verify_details); [] when all is sound."""
        return list(dict.fromkeys(key for key, _ in self.verify_details(model, progress=progress)))

    def inspect(self, model: str | None = None) -> list[dict]:
        """What is on disk, one row per (model, kind, precision):
        {"model", "kind": "expert"|"dense"|"file", "precision", "count", "bytes"}."""
        rows = []
        for name in self._models_arg(model):
            rows += self._inspect_rows(name)
        return rows

    def unfinished_models(self) -> list[str]:
        """Models with files on disk but no manifest yet: a pack that has not finished (or
        broke off), sorted. Nothing of them is served."""
        out = []
        for name in self._model_dirs():
            has_files = next(iter(self.nvme.keys(f"{name}/")), None) is not None
            if has_files and not self.nvme.contains(blob_format.file_key(name, "manifest.json")):
                out.append(name)
        return out

    def inspect_unfinished(self) -> list[dict]:
        """`inspect`'s rows for the unfinished models."""
        return [row for name in self.unfinished_models() for row in self._inspect_rows(name)]

    def _inspect_rows(self, name: str) -> list[dict]:
        rows = []
        per_precision: dict[str, list[int]] = {}
        for key in self.nvme.keys(f"{name}/experts/"):
            m = EXPERT_FILE_RE.match(key[len(f"{name}/experts/"):])
            precision = m.group(3) if m else "?"
            acc = per_precision.setdefault(precision, [0, 0])
            acc[0] += 1
            acc[1] += self.nvme.size(key) or 0
        for precision in sorted(per_precision, key=lambda p: blob_format.PRECISIONS.index(p)
                                if p in blob_format.PRECISIONS else 99):
            count, nbytes = per_precision[precision]
            rows.append({"model": name, "kind": "expert", "precision": precision, "count": count, "bytes": nbytes})
        dense_size = self.nvme.size(blob_format.dense_key(name))
        if dense_size is not None:
            rows.append({"model": name, "kind": "dense", "precision": "", "count": 1, "bytes": dense_size})
        files = [self.nvme.size(blob_format.file_key(name, f)) for f in blob_format.MODEL_FILES]
        files = [s for s in files if s is not None]
        rows.append({"model": name, "kind": "file", "precision": "", "count": len(files), "bytes": sum(files)})
        return rows

    def stats(self) -> dict[str, dict]:
        """Per-tier counters (TieredStore.stats)."""
        return self.tiered.stats()

    def close(self) -> None:
        self.tiered.close()

    def __enter__(self) -> "ModelStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r}, tiers={[t.name for t in self.tiered.tiers]})"
