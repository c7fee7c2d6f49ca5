"""The project's modules import one way: no cycle among the modules of `decoder` and
`expert_store` (module-level imports, read from the sources), and `expert_store` never imports
`decoder` (the store's serving path stays torch-free and the decoder a client of it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("decoder", "expert_store")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules `path` imports at module level (not inside functions, not under
    `if TYPE_CHECKING:`): a name `a.b.c` counts as the longest project module prefix."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in modules:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        if name and name != me:
            found.add(name)

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                continue
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(a.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
    visit(tree.body)
    return found


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "_proto" not in p.parts]
    modules = {module_name(p) for p in files}
    return {module_name(p): top_level_imports(p, modules) for p in files}


def test_no_import_cycle_among_project_modules():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_expert_store_never_imports_decoder():
    g = graph()
    bad = {m: sorted(n for n in deps if n.split(".")[0] == "decoder")
           for m, deps in g.items() if m.split(".")[0] == "expert_store"}
    assert not {m: d for m, d in bad.items() if d}


def test_the_graph_sees_known_edges():
    g = graph()
    assert "decoder.routing" in g["decoder.model.transformer"]
    assert "decoder.experts.provider" in g["decoder.model.transformer"]
    assert "decoder.routing" in g["decoder.experts.prefetch"]


def test_serving_never_imports_the_cli():
    """decoder.cli parses flags and calls into decoder.serving, never the other way round:
    no import of decoder.cli anywhere in decoder/serving/, inside functions included."""
    bad = []
    for path in sorted((ROOT / "decoder" / "serving").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{path.name}: {n}" for n in names if n == "decoder.cli" or n.startswith("decoder.cli.")]
    assert not bad
    assert not (ROOT / "decoder" / "server.py").exists()  # the service lives in decoder/serving/


def test_each_wire_constant_is_defined_once():
    """The constants clients and servers must agree on live in expert_store/wire.py and
    decoder/wire.py; no other module assigns them."""
    import re

    from decoder import wire as decoder_wire
    from expert_store import wire as store_wire

    names = {n for mod in (decoder_wire, store_wire) for n in vars(mod) if n.isupper()}
    assert {"MAX_MESSAGE_BYTES", "TOKEN_ENV", "PUT_KINDS"} <= names
    defs: dict[str, list[str]] = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            if "_proto" in p.parts:
                continue
            for n in re.findall(r"^([A-Z_]+)\s*(?::[^=]+)?=", p.read_text(), flags=re.M):
                if n in names:
                    defs.setdefault(n, []).append(module_name(p))
    # MAX_MESSAGE_BYTES and TOKEN_ENV: once for the store, once for the decoder (two protocols)
    for n, where in defs.items():
        assert all(m in ("expert_store.wire", "decoder.wire") for m in where), (n, where)
        assert len(where) == len(set(where)) <= 2, (n, where)


def test_listen_addresses_are_parsed_in_one_place():
    """HOST:PORT / [V6]:PORT parsing lives in expert_store.grpc_serving.split_host_port; a
    service's own split_host_port only names its example port and hands the address on."""
    where = []
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            if "_proto" in p.parts or module_name(p) == "expert_store.grpc_serving":
                continue
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.FunctionDef) and node.name == "split_host_port":
                    body = [n for n in node.body if not isinstance(n, ast.Expr)]   # a docstring may stay
                    delegates = (len(body) == 1 and isinstance(body[0], ast.Return)
                                 and isinstance(body[0].value, ast.Call)
                                 and "grpc_serving.split_host_port" in ast.unparse(body[0].value.func))
                    where.append((module_name(p), delegates))
    assert where and all(d for _, d in where), where
