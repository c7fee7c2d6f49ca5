"""A tiny packed model written straight into a store directory, the way `expert-store pack` lays
it out (manifest last), for the store's tests: deterministic expert weights per (layer, expert)."""

from __future__ import annotations

import json
import os

import torch

from expert_store import format as fmt
from expert_store import quant
from expert_store.tiers import NvmeTier

MODEL = "tiny-moe"
LAYERS, EXPERTS, HIDDEN, FFN = 2, 3, 32, 64
PRECISIONS = ("bf16", "int8")


def expert_weights(layer: int, expert: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * layer + expert)
    return {
        "w1": torch.randn(FFN, HIDDEN, generator=g),
        "w3": torch.randn(FFN, HIDDEN, generator=g),
        "w2": torch.randn(HIDDEN, FFN, generator=g),
    }


def make_blob(layer: int, expert: int, precision: str, model: str = MODEL) -> bytes:
    return quant.expert_to_blob(model, layer, expert, precision, expert_weights(layer, expert), group_size=32)


def write_model(root, model: str = MODEL) -> dict:
    """A packed model laid out the way `expert-store pack` writes it (manifest last)."""
    nvme = NvmeTier(root)
    config = {"num_hidden_layers": LAYERS, "num_local_experts": EXPERTS, "hidden_size": HIDDEN}
    config_bytes = json.dumps(config).encode()
    tokenizer = b'{"version": "1.0"}'
    dense = os.urandom(4096)
    nvme.put(fmt.file_key(model, "config.json"), config_bytes)
    nvme.put(fmt.file_key(model, "tokenizer.json"), tokenizer)
    nvme.put(fmt.dense_key(model), dense)
    blobs = []
    for layer in range(LAYERS):
        for expert in range(EXPERTS):
            for precision in PRECISIONS:
                data = make_blob(layer, expert, precision, model)
                nvme.put(fmt.expert_key(model, layer, expert, precision), data)
                blobs.append({"layer": layer, "expert": expert, "precision": precision,
                              "size": len(data), "xxh3": fmt.blob_checksum(data)})
    manifest = {
        "model": model, "num_layers": LAYERS, "num_experts": EXPERTS, "precisions": list(PRECISIONS),
        "blobs": blobs, "dense_size": len(dense), "dense_xxh3": fmt.blob_checksum(dense),
        "config_xxh3": fmt.blob_checksum(config_bytes), "tokenizer_xxh3": fmt.blob_checksum(tokenizer),
    }
    nvme.put(fmt.file_key(model, "manifest.json"), json.dumps(manifest).encode())
    return {"dense": dense, "config": config_bytes, "tokenizer": tokenizer, "manifest": manifest}


def flip_byte(path, at: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))
