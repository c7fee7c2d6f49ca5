"""ArenaPublisher's raw write: a coded bf16 blob is transcoded into its slot when the raw form
fits, copied as it came when it does not, and a blob whose seal is right but whose payload is
damaged is refused (BlobError), never copied."""

from __future__ import annotations

import numpy as np
import pytest

from expert_store import format as fmt
from expert_store.arena_publisher import ArenaPublisher
from tests.unit.test_format import _reseal


def _coded_blob() -> tuple[bytes, bytes]:
    rng = np.random.default_rng(7)
    raw = (rng.normal(size=4096).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    blob = fmt.encode_blob("m", 1, 2, "bf16", [fmt.RawTensor("w1", (64, 64), "bfloat16", 0, 8192)], raw)
    assert fmt.read_header(blob)[0].codec == "bf16-planes+lz4"
    return blob, raw


def test_raw_write_transcodes_when_the_raw_blob_fits():
    blob, raw = _coded_blob()
    slot = bytearray(fmt.raw_blob_size(fmt.read_header(blob)[0]))
    n = ArenaPublisher._write_raw(memoryview(blob), fmt.read_header(blob)[0], memoryview(slot), len(blob))
    header, got = fmt.decode_raw(bytes(slot[:n]))
    assert header.codec == "none" and bytes(got) == raw


def test_raw_write_copies_the_blob_as_it_came_when_the_raw_form_does_not_fit():
    blob, raw = _coded_blob()
    slot = bytearray(len(blob) + 8)
    assert len(slot) < fmt.raw_blob_size(fmt.read_header(blob)[0])
    n = ArenaPublisher._write_raw(memoryview(blob), fmt.read_header(blob)[0], memoryview(slot), len(blob))
    assert n == len(blob) and bytes(slot[:n]) == blob
    assert bytes(fmt.decode_raw(bytes(slot[:n]))[1]) == raw


def test_raw_write_refuses_a_damaged_payload_under_a_good_seal():
    blob, _ = _coded_blob()
    _, off = fmt.read_header(blob)
    payload = bytearray(blob[off:])
    payload[len(payload) // 2] ^= 0x01
    bad = _reseal(blob[:off], bytes(payload))   # only the payload checksum can catch it
    fmt.check_blob(bad)                       # the seal alone passes it
    slot = bytearray(fmt.raw_blob_size(fmt.read_header(bad)[0]))
    with pytest.raises(fmt.BlobError):
        ArenaPublisher._write_raw(memoryview(bad), fmt.read_header(bad)[0], memoryview(slot), len(bad))
    assert bytes(slot[:len(bad)]) != bad          # the damaged blob was not copied as it came


def _store(tmp_path, codec: str):
    """A tiny bf16 model packed with `codec` (auto: lz4 byte planes) into a store directory."""
    import torch

    from expert_store.pack import pack_checkpoint
    from expert_store.tiers import NvmeTier
    from tests.checkpoints import make_mixtral_checkpoint

    ckpt, _ = make_mixtral_checkpoint(tmp_path / "m", dtype=torch.bfloat16, seed=5)
    pack_checkpoint(ckpt, NvmeTier(tmp_path / codec), precisions=("bf16",), progress=False, codec=codec)
    return tmp_path / codec


@pytest.mark.parametrize("codec,guess", [("none", None), ("none", True), ("auto", None), ("auto", False)])
def test_raw_publish_of_coded_and_plain_blobs(tmp_path, codec, guess):
    """raw publishing: a blob stored with codec none goes into its slot as read (the store's
    bytes, published with their own digest); a coded one is transcoded beside it (codec none in
    the slot, the same payload). Either way whatever the publisher guessed from the blob before."""
    from expert_store.client import StoreClient
    from expert_store.shm_arena import ArenaReader, ArenaWriter

    store = _store(tmp_path, codec)
    with StoreClient.open(str(store)) as up:
        refs = sorted(r for r in up.manifest("m").blobs if r[2] == "bf16")
        stored = {r: bytes(up.fetch_expert("m", *r)) for r in refs}
        slot = -(-max(fmt.raw_blob_size(fmt.read_header(b)[0]) for b in stored.values()) // 4096) * 4096
        path = tmp_path / "arena"
        writer = ArenaWriter.open(path, slot * (len(refs) + 1), slot)
        pub = ArenaPublisher(up, writer, fetch_threads=2, raw=True)
        try:
            if guess is not None:
                pub._coded[("m", "bf16")] = guess
            pub.ensure("m", refs, priority="prefetch")
            reader = ArenaReader(path)
            try:
                for r in refs:
                    got = bytes(reader.read("m", *r))
                    assert fmt.read_header(got)[0].codec == "none"
                    assert bytes(fmt.decode_raw(got)[1]) == bytes(fmt.decode_raw(stored[r])[1])
                    if codec == "none":
                        assert got == stored[r]
                    else:
                        assert fmt.read_header(stored[r])[0].codec == "bf16-planes+lz4" and got != stored[r]
            finally:
                reader.close()
            assert pub._coded[("m", "bf16")] is (codec == "auto")
        finally:
            pub.close()
            writer.close()
