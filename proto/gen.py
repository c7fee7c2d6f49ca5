"""Regenerate the protobuf/gRPC modules (``make proto``): each service's code lives with the
package that serves it, the expert store's (expert_store.proto, expert_arena.proto) in
expert_store/_proto and the decoder's (decoder.proto) in decoder/_proto.

Usage: python proto/gen.py [--out DIR]   (DIR: the repository root to write under; default
the one this script is in)
"""
import argparse
import pathlib
import re
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent
# proto file -> the package its generated modules go to
OWNERS = {"adapmoe/v1/expert_store.proto": "expert_store._proto",
          "adapmoe/v1/expert_arena.proto": "expert_store._proto",
          "adapmoe/v1/decoder.proto": "decoder._proto"}


def generate(repo: pathlib.Path) -> list[pathlib.Path]:
    protos = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.proto"))
    unknown = sorted(set(protos) - set(OWNERS))
    if unknown:
        raise SystemExit(f"no package owns {unknown}: add them to OWNERS in proto/gen.py")
    written = []
    for package in sorted(set(OWNERS.values())):
        out = repo / package.replace(".", "/")
        out.mkdir(parents=True, exist_ok=True)
        mine = [p for p in protos if OWNERS[p] == package]
        rc = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out}",
                          f"--pyi_out={out}", f"--grpc_python_out={out}", *mine])
        if rc != 0:
            raise SystemExit(f"protoc failed with {rc}")
        for path in sorted(out.rglob("*_pb2*.py*")):
            text = path.read_text()
            # generated code imports "adapmoe.v1.X"; X lives in the package that owns X's proto
            def owner(m: re.Match) -> str:
                return f"from {OWNERS[f'adapmoe/v1/{m.group(1)}.proto']}.adapmoe.v1 import {m.group(1)}_pb2"
            text = re.sub(r"^from adapmoe\.v1 import (\w+?)_pb2", owner, text, flags=re.M)
            path.write_text(text)
            written.append(path)
        for d in (out, out / "adapmoe", out / "adapmoe" / "v1"):
            (d / "__init__.py").touch()
    return written


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT.parent))
    args = ap.parse_args()
    for p in generate(pathlib.Path(args.out)):
        print(p)


if __name__ == "__main__":
    sys.exit(main())
