"""The committed generated modules must match what proto/gen.py makes from proto/."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_protos_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "proto" / "gen.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    committed = ROOT / "expert_store" / "_proto"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert fresh, "proto/gen.py generated nothing"
    for rel in fresh:
        assert (committed / rel).exists(), f"{rel} missing: run `make proto`"
        assert (committed / rel).read_text() == (tmp_path / rel).read_text(), \
            f"{rel} is stale against proto/: run `make proto`"


def test_generated_modules_import():
    from expert_store._proto.adapmoe.v1 import decoder_pb2_grpc, expert_store_pb2_grpc  # noqa: F401
