"""`expert-store pack CKPT --store grpc://...` of a Qwen2-MoE checkpoint with dense layers and a
shared expert: the replica ends up with the same files, byte for byte, as a local pack of the
same checkpoint (blobs for the MoE layers only), and an Engine over that replica decodes the
same logits as transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from family_checkpoints import load_reference, make_family_checkpoint
from service_procs import StoreServerProcess, child_env, run_cli

from decoder import Engine
from expert_store.pack import pack_checkpoint
from expert_store.tiers import NvmeTier

pytestmark = pytest.mark.timeout(240)
torch.set_num_threads(1)


def _files(store: Path, model: str) -> dict[str, bytes]:
    root = store / "models" / model
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def test_remote_pack_of_qwen2_moe_with_dense_layers(tmp_path):
    ckpt = make_family_checkpoint(tmp_path / "ckpt", "qwen2_moe", layers=4, experts=6, top_k=3, ffn=24,
                                  shared_expert_intermediate_size=40, mlp_only_layers=[0, 2], intermediate_size=52,
                                  shards=2, seed=21)
    local = tmp_path / "local"
    pack_checkpoint(ckpt, NvmeTier(local), model="q2", precisions=("bf16", "int4"), progress=False)
    (tmp_path / "replica").mkdir()
    server = StoreServerProcess(tmp_path / "replica", "--ram-bytes", "0", log_dir=tmp_path / "logs").start()
    try:
        r = run_cli("pack", str(ckpt), "--store", f"grpc://{server.address}", "--model", "q2",
                    "--precisions", "bf16,int4", "--no-progress", env=child_env(), timeout=180)
        assert r.returncode == 0, r.stderr
        remote = _files(tmp_path / "replica", "q2")
        assert remote == _files(local, "q2")
        blobs = {k for k in remote if k.startswith("experts/")}
        assert blobs == {f"experts/L{l:03d}/E{e:03d}.{p}.blob" for l in (1, 3) for e in range(6) for p in ("bf16", "int4")}
        ref = load_reference(ckpt)
        ids = [1] + torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(2)).tolist()
        with Engine.from_store(server.address, "q2", decode_step="eager") as engine:
            got = engine.forward_logits(ids)
            with torch.no_grad():
                want = ref(torch.tensor([ids])).logits[0]
            assert (got - want).abs().max().item() < 1e-4
            assert engine.stats()["bytes_fetched"] > 0
    finally:
        server.stop()
