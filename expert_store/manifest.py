"""The manifest of one packed model, one type on every side: what ``expert-store pack`` writes as
``models/<model>/manifest.json``, what ``ModelStore`` reads and serves, what the
``adapmoe.v1.Manifest`` message carries and what the client and the decoder read.

The message is the file plus the small files stored beside it, verbatim (``config.json``,
``tokenizer.json``, ``tokenizer_config.json``, ``profile.json``); the pack's record of the
checkpoint (shapes, family, group size, digests of the small files) is in the file only.

manifest.json (``to_json``; ``from_json`` reads it, unknown fields are ignored):

    {"model": str, "num_layers": int, "num_experts": int, "precisions": [str, ...],
     "blobs": [{"layer", "expert", "precision", "size", "xxh3"}, ...],
     "dense_size": int, "dense_xxh3": str, ...the pack's record}

``blobs`` may also be a dict ``{expert_key: {"size", "xxh3"}}`` and the dense entry a
``"dense": {"size", "xxh3"}`` object; ``num_layers``/``num_experts`` default to
config.json's ``num_hidden_layers``/``num_local_experts``. ``xxh3`` is
``format.blob_checksum`` (xxh3-128 hex of the whole file).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, NamedTuple

from expert_store import format as blob_format
from expert_store._proto.adapmoe.v1 import expert_store_pb2 as pb
from expert_store.errors import DataLoss

MANIFEST_FORMAT = 1
Ref = tuple[int, int, str]  # (layer, expert, precision)
EXPERT_FILE_RE = re.compile(r"^L(\d{3})/E(\d{3})\.(bf16|int8|int4)\.blob$")


class BlobEntry(NamedTuple):
    """One expert blob as the manifest lists it."""

    size: int
    xxh3: str  # xxh3-128 hex of the whole blob file; "" = not recorded

    @classmethod
    def of(cls, data: bytes) -> "BlobEntry":
        return cls(len(data), blob_format.blob_checksum(data))


@dataclass(frozen=True)
class Manifest:
    model: str
    num_layers: int
    num_experts: int
    precisions: tuple[str, ...]
    blobs: dict[Ref, BlobEntry] = field(default_factory=dict)
    dense_size: int = 0
    dense_xxh3: str = ""
    # stored beside manifest.json and served with it, verbatim ("" / b"": not stored)
    config_json: str = ""
    tokenizer_json: bytes = b""
    tokenizer_config_json: str = ""  # its chat_template renders chat requests
    profile_json: str = ""  # calibration profile (decoder.calibrate)
    # the pack's record of the checkpoint: manifest.json only, not in the message
    format: int = MANIFEST_FORMAT
    architecture: str = ""
    top_k: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0  # ffn width of one routed expert
    vocab_size: int | None = None
    rope_theta: float | None = None
    group_size: int = 0
    expert_layout: str = ""  # "fused" | "per_expert": how the checkpoint stored its experts
    moe_layers: tuple[int, ...] = ()  # layers with routed experts (every layer when empty)
    config_xxh3: str = ""
    tokenizer_xxh3: str | None = None
    tokenizer_config_xxh3: str | None = None

    # -- the small files, parsed (DataLoss for invalid JSON; a non-object reads as empty) ----
    @cached_property
    def config(self) -> dict:
        return _json_object(self.config_json)

    @cached_property
    def tokenizer_config(self) -> dict | None:
        return _json_object(self.tokenizer_config_json) or None

    @cached_property
    def profile(self) -> dict | None:
        return _json_object(self.profile_json) or None

    def expert_layers(self) -> tuple[int, ...]:
        """The layers that have expert blobs."""
        return self.moe_layers or tuple(range(self.num_layers))

    def sorted_blobs(self) -> list[tuple[Ref, BlobEntry]]:
        """(ref, entry) by layer, expert, precision (bf16, int8, int4)."""
        return sorted(self.blobs.items(), key=lambda kv: (kv[0][0], kv[0][1], _precision_rank(kv[0][2])))

    # -- a re-pack keeps what an earlier pack stored --------------------------------------------
    def older_precisions(self, old: "Manifest") -> dict[str, dict[Ref, BlobEntry]]:
        """Precisions an earlier manifest of the model (``old``) holds that this one does not,
        each with its complete set of blob entries: ``{precision: {ref: entry}}``. Empty when
        there is nothing to keep (another shape, no other precision, an incomplete one)."""
        same_shape = all(getattr(old, k) == getattr(self, k)
                         for k in ("num_layers", "num_experts", "hidden_size", "intermediate_size"))
        if not same_shape or old.expert_layers() != self.expert_layers():
            return {}
        out = {}
        for precision in old.precisions:
            if precision not in blob_format.PRECISIONS or precision in self.precisions:
                continue
            entries = {ref: b for ref, b in old.blobs.items() if ref[2] == precision}
            if len(entries) == len(self.expert_layers()) * self.num_experts:
                out[precision] = entries
        return out

    def with_precisions(self, extras: dict[str, dict[Ref, BlobEntry]]) -> "Manifest":
        """This manifest plus the blob entries of more precisions (precisions in canonical order)."""
        blobs = dict(self.blobs)
        for entries in extras.values():
            blobs.update(entries)
        precisions = [p for p in blob_format.PRECISIONS if p in self.precisions or p in extras]
        return replace(self, precisions=tuple(precisions), blobs=blobs)

    # -- the adapmoe.v1.Manifest message ------------------------------------------------------
    def to_proto(self) -> pb.Manifest:
        return pb.Manifest(
            model=self.model,
            config_json=self.config_json,
            tokenizer_json=self.tokenizer_json,
            tokenizer_config_json=self.tokenizer_config_json,
            num_layers=self.num_layers,
            num_experts=self.num_experts,
            precisions=list(self.precisions),
            blobs=[pb.BlobInfo(layer=l, expert=e, precision=p, size=b.size, xxh3=b.xxh3)
                   for (l, e, p), b in self.sorted_blobs()],
            dense_size=self.dense_size,
            dense_xxh3=self.dense_xxh3,
            profile_json=self.profile_json,
        )

    @classmethod
    def from_proto(cls, m: pb.Manifest) -> "Manifest":
        """The message as received; its JSON files are parsed here (DataLoss when invalid)."""
        manifest = cls(
            model=m.model,
            num_layers=m.num_layers,
            num_experts=m.num_experts,
            precisions=tuple(m.precisions),
            blobs={(b.layer, b.expert, b.precision): BlobEntry(b.size, b.xxh3) for b in m.blobs},
            dense_size=m.dense_size,
            dense_xxh3=m.dense_xxh3,
            config_json=m.config_json,
            tokenizer_json=bytes(m.tokenizer_json),
            tokenizer_config_json=m.tokenizer_config_json,
            profile_json=m.profile_json,
        )
        manifest.config, manifest.tokenizer_config, manifest.profile  # noqa: B018 (parse now)
        return manifest

    # -- manifest.json ----------------------------------------------------------------------
    def to_json(self) -> bytes:
        """The manifest.json bytes (blobs sorted by layer, expert, precision; keys sorted):
        deterministic, so a local and a remote pack of one checkpoint write the same file."""
        doc = {
            "format": self.format,
            "model": self.model,
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "precisions": list(self.precisions),
            "group_size": self.group_size,
            "expert_layout": self.expert_layout,
            "moe_layers": list(self.moe_layers),
            "blobs": [{"layer": l, "expert": e, "precision": p, "size": b.size, "xxh3": b.xxh3}
                      for (l, e, p), b in self.sorted_blobs()],
            "dense_size": self.dense_size,
            "dense_xxh3": self.dense_xxh3,
            "config_xxh3": self.config_xxh3,
            "tokenizer_xxh3": self.tokenizer_xxh3,
            "tokenizer_config_xxh3": self.tokenizer_config_xxh3,
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, model: str, raw: dict, config_json: str = "") -> "Manifest":
        """A parsed manifest.json of ``model`` (and its config.json text, for the defaults).
        DataLoss when the file names another model or a field is malformed."""
        if raw.get("model", model) != model:
            raise DataLoss(f"{model}/manifest.json names model {raw.get('model')!r}")
        config = _json_object(config_json)
        try:
            blobs: dict[Ref, BlobEntry] = {}
            entries = raw.get("blobs", [])
            if isinstance(entries, dict):
                prefix = f"{model}/experts/"
                for key, info in entries.items():
                    m = EXPERT_FILE_RE.match(key[len(prefix):] if key.startswith(prefix) else key)
                    if m is None:
                        raise ValueError(f"unrecognised blob key {key!r}")
                    blobs[(int(m.group(1)), int(m.group(2)), m.group(3))] = _entry(info)
            else:
                for info in entries:
                    blobs[(int(info["layer"]), int(info["expert"]), str(info["precision"]))] = _entry(info)
            precisions = raw.get("precisions")
            if precisions is None:
                precisions = sorted({p for (_, _, p) in blobs}, key=_precision_rank)
            dense = raw.get("dense") if isinstance(raw.get("dense"), dict) else {}
            return cls(
                model=model,
                num_layers=int(raw.get("num_layers", config.get("num_hidden_layers", 0))),
                num_experts=int(raw.get("num_experts", config.get("num_local_experts", 0))),
                precisions=tuple(str(p) for p in precisions),
                blobs=blobs,
                dense_size=int(raw.get("dense_size", dense.get("size", 0)) or 0),
                dense_xxh3=str(raw.get("dense_xxh3", dense.get("xxh3", "")) or ""),
                config_json=config_json,
                format=int(raw.get("format", MANIFEST_FORMAT)),
                architecture=str(raw.get("architecture") or ""),
                top_k=int(raw.get("top_k") or 0),
                hidden_size=int(raw.get("hidden_size") or 0),
                intermediate_size=int(raw.get("intermediate_size") or 0),
                vocab_size=raw.get("vocab_size"),
                rope_theta=raw.get("rope_theta"),
                group_size=int(raw.get("group_size") or 0),
                expert_layout=str(raw.get("expert_layout") or ""),
                moe_layers=tuple(int(l) for l in raw.get("moe_layers") or ()),
                config_xxh3=str(raw.get("config_xxh3") or ""),
                tokenizer_xxh3=raw.get("tokenizer_xxh3") or None,
                tokenizer_config_xxh3=raw.get("tokenizer_config_xxh3") or None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataLoss(f"{model}/manifest.json is malformed: {exc}") from None


def _entry(info: Any) -> BlobEntry:
    return BlobEntry(int(info["size"]), str(info.get("xxh3", "")))


def _precision_rank(precision: str) -> int:
    return blob_format.PRECISIONS.index(precision) if precision in blob_format.PRECISIONS else 99


def _json_object(text: str | bytes) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataLoss(f"manifest holds invalid JSON: {e}") from None
    return value if isinstance(value, dict) else {}
