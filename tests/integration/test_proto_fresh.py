"""The committed generated modules must match what proto/gen.py makes from proto/."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_protos_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "proto" / "gen.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*") if p.suffix in (".py", ".pyi"))
    assert fresh, "proto/gen.py generated nothing"
    for rel in fresh:
        assert (ROOT / rel).exists(), f"{rel} missing: run `make proto`"
        assert (ROOT / rel).read_text() == (tmp_path / rel).read_text(), \
            f"{rel} is stale against proto/: run `make proto`"
    # each service's code lives with its package: no stray copies elsewhere
    committed = sorted(p.relative_to(ROOT) for d in ("expert_store", "decoder") for p in (ROOT / d).rglob("*_pb2*.py*")
                       if p.suffix in (".py", ".pyi"))
    assert committed == fresh, f"generated modules not made by proto/gen.py: {set(committed) - set(fresh)}"


def test_generated_modules_import():
    from decoder._proto.adapmoe.v1 import decoder_pb2_grpc  # noqa: F401
    from expert_store._proto.adapmoe.v1 import expert_store_pb2_grpc  # noqa: F401
