"""Regenerate the protobuf/gRPC modules into expert_store/_proto (``make proto``).

Usage: python proto/gen.py [--out DIR]   (DIR defaults to expert_store/_proto)
"""
import argparse
import pathlib
import re
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent
PACKAGE = "expert_store._proto"


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.proto"))
    rc = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out}",
                      f"--pyi_out={out}", f"--grpc_python_out={out}", *protos])
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")
    written = []
    for path in sorted(out.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = path.read_text()
        # generated code imports "adapmoe.v1"; our modules live under expert_store._proto
        text = re.sub(r"^from adapmoe\.v1 import", f"from {PACKAGE}.adapmoe.v1 import", text, flags=re.M)
        path.write_text(text)
        written.append(path)
    for d in (out / "adapmoe", out / "adapmoe" / "v1"):
        (d / "__init__.py").touch()
    return written


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT.parent / "expert_store" / "_proto"))
    args = ap.parse_args()
    for p in generate(pathlib.Path(args.out)):
        print(p)


if __name__ == "__main__":
    sys.exit(main())
